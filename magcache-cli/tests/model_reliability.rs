//! Through the binary: non-finite values stop the run (weights at load, every call, every step), the
//! size guard refuses what cannot fit before allocating (run and plan), empty tensors are refused,
//! and checkpoint tensors the model did not use are reported (an error for a whole block, and for a
//! tensor held by two shards). Each failure is one line naming the file and the key or tensor, and
//! nothing is written.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference")
}

fn magcache(args: &[&str], cfg: &Path, limit: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(args)
        .arg("--config")
        .arg(cfg)
        .env("MAGCACHE_MEMORY_LIMIT", limit)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

/// Runs `magcache run --out`; asserts one error line naming every `must_name` and no output.
fn run_err(dir: &Path, text: &str, must_name: &[&str]) -> String {
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = dir.join("out.safetensors");
    let o = magcache(
        &["run", "--quiet", "--out", out.to_str().unwrap()],
        &cfg,
        "8G",
    );
    check_err(&o, text, must_name);
    assert!(!out.exists(), "output written despite the error");
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn check_err(o: &Output, text: &str, must_name: &[&str]) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{text}\n{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line:\n{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in must_name {
        assert!(stderr.contains(n), "stderr should name `{n}`: {stderr}");
    }
}

fn wan_toml(weights: &Path, inputs: &Path, extra_model: &str, sampling: &str) -> String {
    format!(
        "[model]\nfamily = \"wan2.1\"\nweights = \"{}\"\n{extra_model}\n[inputs]\nfile = \"{}\"\n[sampling]\nsteps = 3\n{sampling}\n",
        weights.display(),
        inputs.display()
    )
}

fn load(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn wan_inputs() -> HashMap<String, Tensor> {
    load(&fixtures().join("wan21_tiny_loop.safetensors"))
        .into_iter()
        .filter(|(k, _)| ["latents_init", "cond", "uncond"].contains(&k.as_str()))
        .collect()
}

fn wan_weights() -> HashMap<String, Tensor> {
    load(&fixtures().join("wan21_tiny/diffusion_pytorch_model.safetensors"))
}

/// A Wan checkpoint folder `name` in `dir` with these tensors (and the fixture's config).
fn wan_folder(dir: &Path, name: &str, shards: &[(&str, HashMap<String, Tensor>)]) -> PathBuf {
    let w = dir.join(name);
    std::fs::create_dir(&w).unwrap();
    std::fs::copy(
        fixtures().join("wan21_tiny/config.json"),
        w.join("config.json"),
    )
    .unwrap();
    for (f, m) in shards {
        candle_core::safetensors::save(m, w.join(f)).unwrap();
    }
    w
}

fn with_value(t: &Tensor, at: usize, x: f32) -> Tensor {
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[at] = x;
    Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
}

#[test]
fn a_nan_weight_is_named_with_its_file() {
    let d = tempfile::tempdir().unwrap();
    let mut m = wan_weights();
    let name = "blocks.1.ffn.net.0.proj.weight";
    m.insert(name.into(), with_value(&m[name], 3, f32::NAN));
    let w = wan_folder(d.path(), "w", &[("diffusion_pytorch_model.safetensors", m)]);
    let inp = fixtures().join("wan21_tiny_loop.safetensors");
    run_err(
        d.path(),
        &wan_toml(&w, &inp, "", "guidance_scale = 5.0"),
        &[name, "diffusion_pytorch_model.safetensors", "NaN"],
    );
}

#[test]
fn a_weight_that_overflows_the_run_dtype_is_named() {
    let d = tempfile::tempdir().unwrap();
    let mut m = wan_weights();
    let name = "blocks.0.attn1.to_q.weight";
    m.insert(name.into(), with_value(&m[name], 0, 1e6));
    let w = wan_folder(d.path(), "w", &[("diffusion_pytorch_model.safetensors", m)]);
    let inp = fixtures().join("wan21_tiny_loop.safetensors");
    run_err(
        d.path(),
        &wan_toml(&w, &inp, "dtype = \"f16\"", "guidance_scale = 5.0"),
        &[name, "overflows", "F16"],
    );
}

#[test]
fn huge_inputs_end_in_a_non_finite_error_not_a_nan_result() {
    let d = tempfile::tempdir().unwrap();
    let mut m = wan_inputs();
    let lat = (&m["latents_init"] * 1e30).unwrap();
    m.insert("latents_init".into(), lat);
    let p = d.path().join("in.safetensors");
    candle_core::safetensors::save(&m, &p).unwrap();
    let w = fixtures().join("wan21_tiny");
    let e = run_err(
        d.path(),
        &wan_toml(&w, &p, "", "guidance_scale = 5.0"),
        &["non-finite values at sampler step 0", "(expert 0, cond)"],
    );
    assert!(e.contains("NaN") || e.contains("inf"), "{e}");
    let inp = fixtures().join("wan21_tiny_loop.safetensors");
    run_err(
        d.path(),
        &wan_toml(&w, &inp, "", "guidance_scale = 1e38"),
        &[
            "non-finite values at sampler step",
            "sampling.guidance_scale",
        ],
    );
    run_err(
        d.path(),
        &wan_toml(&w, &inp, "", "shift = 1e-300\nguidance_scale = 5.0"),
        &["run.toml", "sampling.shift", "1e-300"],
    );
    // plan refuses the same schedule.
    let cfg = d.path().join("run.toml");
    let o = magcache(&["plan"], &cfg, "8G");
    check_err(&o, "plan", &["sampling.shift"]);
}

#[test]
fn empty_tensors_are_refused_naming_file_and_tensor() {
    let d = tempfile::tempdir().unwrap();
    let w = fixtures().join("wan21_tiny");
    for (name, shape) in [
        ("cond", vec![1usize, 0, 24]),
        ("uncond", vec![1, 0, 24]),
        ("latents_init", vec![1, 4, 0, 8, 12]),
    ] {
        let mut m = wan_inputs();
        m.insert(
            name.into(),
            Tensor::zeros(shape.as_slice(), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        let p = d.path().join(format!("{name}.safetensors"));
        candle_core::safetensors::save(&m, &p).unwrap();
        run_err(
            d.path(),
            &wan_toml(&w, &p, "", "guidance_scale = 5.0"),
            &[
                &format!("{name}.safetensors"),
                &format!("`{name}`"),
                "empty",
            ],
        );
    }
    // FLUX: zero-token text embeddings.
    let mut m = load(&fixtures().join("flux_tiny_loop.safetensors"));
    let ctx = &m["encoder_hidden_states"];
    let (b, _, c) = ctx.dims3().unwrap();
    m.insert(
        "encoder_hidden_states".into(),
        Tensor::zeros((b, 0, c), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    m.insert(
        "txt_ids".into(),
        Tensor::zeros((0, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let p = d.path().join("flux_in.safetensors");
    candle_core::safetensors::save(&m, &p).unwrap();
    let t = format!(
        "[model]\nfamily = \"flux\"\nweights = \"{}\"\n[inputs]\nfile = \"{}\"\n[sampling]\nsteps = 2\n",
        fixtures().join("flux_tiny").display(),
        p.display()
    );
    run_err(
        d.path(),
        &t,
        &["flux_in.safetensors", "`encoder_hidden_states`", "empty"],
    );
}

fn preset_toml(family: &str, preset: &str, extra: &str, steps: &str) -> String {
    format!("[model]\nfamily = \"{family}\"\npreset = \"{preset}\"\n{extra}\n[sampling]\nsteps = {steps}\n")
}

/// `run` (and `plan` where `plan_too`) refuse quickly, naming `key`.
fn refused(text: &str, key: &str, plan_too: bool) {
    let d = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let e = run_err(
        d.path(),
        text,
        &["run.toml", key, "GB", "MAGCACHE_MEMORY_LIMIT"],
    );
    assert!(t0.elapsed() < Duration::from_secs(1), "slow refusal: {e}");
    if plan_too {
        let t0 = Instant::now();
        let o = magcache(&["plan"], &d.path().join("run.toml"), "8G");
        check_err(&o, text, &["run.toml", key, "GB"]);
        assert!(t0.elapsed() < Duration::from_secs(1));
    }
}

#[test]
fn the_size_guard_refuses_what_cannot_fit_naming_the_knob() {
    let small = "[model.overrides]\nnum_layers = 1\nnum_attention_heads = 2\nattention_head_dim = 16\nffn_dim = 16\ntext_dim = 8\nfreq_dim = 16\n";
    for fam in ["wan2.1", "wan2.2", "flux"] {
        let preset = match fam {
            "wan2.1" => "wan2.1-t2v-1.3b",
            "wan2.2" => "wan2.2-t2v-a14b",
            _ => "flux-dev",
        };
        // A step count past any sampler's is refused by its range, before the size guard.
        let text = preset_toml(fam, preset, "", "1000000000000");
        let d = tempfile::tempdir().unwrap();
        let must = ["run.toml", "sampling.steps", "1..=100000"];
        run_err(d.path(), &text, &must);
        let o = magcache(&["plan"], &d.path().join("run.toml"), "8G");
        check_err(&o, &text, &must);
    }
    refused(
        &preset_toml(
            "wan2.1",
            "wan2.1-t2v-1.3b",
            &format!("{small}[inputs]\ntext_len = 100000000000\n"),
            "2",
        ),
        "inputs.text_len",
        false,
    );
    refused(
        &preset_toml(
            "wan2.1",
            "wan2.1-t2v-1.3b",
            "[model.overrides]\nffn_dim = 100000000000\n",
            "2",
        ),
        "model.overrides.ffn_dim",
        false,
    );
    refused(
        &preset_toml(
            "wan2.1",
            "wan2.1-t2v-1.3b",
            &format!("{small}[inputs]\nlatent_shape = [1, 16, 100001, 1000000, 1000000]\n"),
            "2",
        ),
        "inputs.latent_shape",
        false,
    );
    refused(
        &preset_toml(
            "flux",
            "flux-dev",
            "[inputs]\nlatent_shape = [1, 16, 2000000, 2000000]\n",
            "2",
        ),
        "inputs.latent_shape",
        false,
    );
    // The 14B preset at full size on an 8 GB machine; plan still predicts it.
    refused(
        &preset_toml("wan2.1", "wan2.1-t2v-14b", "", "4"),
        "model.preset",
        false,
    );
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("run.toml");
    std::fs::write(&cfg, preset_toml("wan2.1", "wan2.1-t2v-14b", "", "4")).unwrap();
    assert!(magcache(&["plan"], &cfg, "8G").status.success());
    // A bad limit is named.
    let o = magcache(&["run", "--quiet"], &cfg, "lots");
    check_err(&o, "", &["MAGCACHE_MEMORY_LIMIT", "lots"]);
}

#[test]
fn a_checkpoint_block_the_model_does_not_build_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let inp = fixtures().join("wan21_tiny_loop.safetensors");
    run_err(
        d.path(),
        &wan_toml(
            &fixtures().join("wan21_tiny"),
            &inp,
            "[model.overrides]\nnum_layers = 2",
            "guidance_scale = 5.0",
        ),
        &["run.toml", "model.overrides.num_layers", "blocks.2.*"],
    );
    // A fourth block in a three-block config: the checkpoint file is named.
    let mut m = wan_weights();
    let extra: Vec<(String, Tensor)> = m
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("blocks.2.")
                .map(|r| (format!("blocks.3.{r}"), t.clone()))
        })
        .collect();
    m.extend(extra);
    let w = wan_folder(d.path(), "w", &[("diffusion_pytorch_model.safetensors", m)]);
    run_err(
        d.path(),
        &wan_toml(&w, &inp, "", "guidance_scale = 5.0"),
        &[
            "diffusion_pytorch_model.safetensors",
            "blocks.3.*",
            "num_layers",
        ],
    );
}

#[test]
fn unused_checkpoint_tensors_are_a_warning_on_stderr_and_in_the_report() {
    let d = tempfile::tempdir().unwrap();
    let mut m = wan_weights();
    m.insert(
        "stray.weight".into(),
        Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let w = wan_folder(d.path(), "w", &[("diffusion_pytorch_model.safetensors", m)]);
    let cfg = d.path().join("run.toml");
    let inp = fixtures().join("wan21_tiny_loop.safetensors");
    std::fs::write(&cfg, wan_toml(&w, &inp, "", "guidance_scale = 5.0")).unwrap();
    let report = d.path().join("r.json");
    let o = magcache(&["run", "--report", report.to_str().unwrap()], &cfg, "8G");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("stray.weight"),
        "{stderr}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let ws = r["warnings"].to_string();
    assert!(
        ws.contains("stray.weight") && ws.contains("not used"),
        "{ws}"
    );
}

#[test]
fn two_unindexed_shards_with_one_tensor_are_an_error_naming_both() {
    let d = tempfile::tempdir().unwrap();
    let m = wan_weights();
    let (mut a, mut b): (HashMap<_, _>, HashMap<_, _>) =
        m.into_iter().partition(|(k, _)| k.starts_with("blocks."));
    let dup = "proj_out.weight";
    a.insert(dup.into(), b[dup].clone());
    b.insert(dup.into(), b[dup].clone());
    let w = wan_folder(
        d.path(),
        "w",
        &[("part-a.safetensors", a), ("part-b.safetensors", b)],
    );
    let inp = fixtures().join("wan21_tiny_loop.safetensors");
    run_err(
        d.path(),
        &wan_toml(&w, &inp, "", "guidance_scale = 5.0"),
        &["part-a.safetensors", "part-b.safetensors", dup],
    );
}

/// `dtype = "auto"` (the default): f32 when the run fits, bf16 (with a note in the report) when only
/// bf16 does; an explicit dtype is obeyed, and refused when it does not fit.
#[test]
fn auto_dtype_falls_back_to_bf16_only_when_f32_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    // A one-block 1.3B-wide Wan: ~56M parameters, weights ~225 MB in f32 and ~112 MB in bf16.
    let text = |dtype: &str| {
        format!(
            "[model]\nfamily = \"wan2.1\"\npreset = \"wan2.1-t2v-1.3b\"\n{dtype}\n[model.overrides]\nnum_layers = 1\n\n[inputs]\nlatent_shape = [1, 16, 1, 4, 4]\ntext_len = 8\n\n[sampling]\nsteps = 1\n"
        )
    };
    let run = |dtype: &str, limit: &str| {
        let cfg = dir.path().join("run.toml");
        std::fs::write(&cfg, text(dtype)).unwrap();
        magcache(&["run", "--json"], &cfg, limit)
    };
    let warnings = |o: &Output| -> Vec<String> {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap().to_string())
            .collect()
    };
    let chose_bf16 = |w: &[String]| w.iter().any(|l| l.contains("chose bf16"));
    // Room for f32: no note.
    assert!(!chose_bf16(&warnings(&run("", "4G"))));
    // Room for bf16 only: the note, naming the key.
    let w = warnings(&run("", "190M"));
    assert!(chose_bf16(&w), "{w:?}");
    assert!(w.iter().any(|l| l.contains("model.dtype")), "{w:?}");
    // The same with the default spelled out.
    assert!(chose_bf16(&warnings(&run("dtype = \"auto\"", "190M"))));
    // An explicit f32 is obeyed: refused, naming the knob.
    let o = run("dtype = \"f32\"", "190M");
    check_err(
        &o,
        &text("dtype = \"f32\""),
        &["run.toml", "GB", "2-byte model.dtype"],
    );
    // An explicit bf16 runs without a note.
    assert!(!chose_bf16(&warnings(&run("dtype = \"bf16\"", "190M"))));
    // `plan` resolves it the same way and shows each stage's estimate in the chosen dtype.
    let cfg = dir.path().join("run.toml");
    for (limit, want) in [("4G", "f32"), ("190M", "bf16")] {
        std::fs::write(&cfg, text("")).unwrap();
        let o = magcache(&["plan", "--json"], &cfg, limit);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["dtype"], want, "{limit}");
        let stages = v["memory"].as_array().unwrap();
        assert_eq!(stages.len(), 1, "{v}");
        assert_eq!(stages[0]["stage"], "denoise");
        let total = stages[0]["bytes"].as_u64().unwrap();
        let parts: u64 = stages[0]["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["bytes"].as_u64().unwrap())
            .sum();
        assert_eq!(total, parts);
        // Fits the limit in the chosen dtype (the guard's own comparison).
        assert!(total <= v["available_bytes"].as_u64().unwrap(), "{v}");
    }
}
