//! Bad input ends with a non-zero exit and one line on stderr naming the file and the key or tensor;
//! no panic, no partial output file.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference")
}

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Case {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    /// A valid run over the tiny reference model; `edit` changes its text.
    fn toml(&self, weights: &Path, inputs: &Path, cache: &str) -> String {
        format!(
            "[model]\nfamily = \"wan2.1\"\nweights = \"{}\"\n\n[inputs]\nfile = \"{}\"\n\n[sampling]\nsteps = 3\nshift = 5.0\nguidance_scale = 5.0\n\n[cache]\n{cache}",
            weights.display(),
            inputs.display()
        )
    }
    fn default_toml(&self, cache: &str) -> String {
        self.toml(
            &fixtures().join("wan21_tiny"),
            &fixtures().join("wan21_tiny_loop.safetensors"),
            cache,
        )
    }
    /// Runs `magcache run` and returns (exit code, stderr); asserts the error contract.
    fn run_err(&self, text: &str, must_name: &[&str]) -> String {
        self.run_err_env(text, &[], must_name)
    }
    /// [`Case::run_err`] with these environment variables set.
    fn run_err_env(&self, text: &str, env: &[(&str, &str)], must_name: &[&str]) -> String {
        let cfg = self.path("run.toml");
        std::fs::write(&cfg, text).unwrap();
        let out_file = self.path("out.safetensors");
        let report = self.path("report.json");
        let o = Command::new(env!("CARGO_BIN_EXE_magcache"))
            .args(["run", "--quiet", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&out_file)
            .arg("--report")
            .arg(&report)
            .env("RUST_BACKTRACE", "1")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "expected failure for:\n{text}");
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "one line expected:\n{stderr}"
        );
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
        for n in must_name {
            assert!(stderr.contains(n), "stderr should name `{n}`: {stderr}");
        }
        assert!(
            !out_file.exists() && !report.exists(),
            "partial output left behind"
        );
        let leftovers: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert!(
            leftovers
                .iter()
                .all(|n| !n.to_string_lossy().contains(".tmp")),
            "{leftovers:?}"
        );
        stderr
    }
    fn write_tensors(&self, name: &str, t: HashMap<String, Tensor>) -> PathBuf {
        let p = self.path(name);
        candle_core::safetensors::save(&t, &p).unwrap();
        p
    }
}

const MAG: &str = "strategy = \"magcache\"\nthreshold = 0.1\nmag_ratios = [1.0, 0.99]\n";

#[test]
fn unknown_strategy() {
    let c = Case::new();
    c.run_err(
        &c.default_toml("strategy = \"warp\"\n"),
        &["run.toml", "cache", "warp"],
    );
}

/// Any of the `MAGCACHE_ONEDNN_*` switches set other than `on` or `off` stops the run
/// before anything loads, in one line naming it (the library from `MAGCACHE_TEST_ONEDNN`, as
/// `.ci/run` sets it; without one a note, and nothing tested).
#[test]
fn a_bad_onednn_switch_value_is_one_line_naming_it() {
    let Ok(lib) = std::env::var("MAGCACHE_TEST_ONEDNN") else {
        eprintln!("note: MAGCACHE_TEST_ONEDNN unset: the oneDNN switches' checks not tested");
        return;
    };
    let c = Case::new();
    for var in [
        "MAGCACHE_ONEDNN_PACK_BF16",
        "MAGCACHE_ONEDNN_BF16",
        "MAGCACHE_ONEDNN_GELU",
        "MAGCACHE_ONEDNN_PACK_KV",
    ] {
        let env = [("MAGCACHE_ONEDNN", lib.as_str()), (var, "yes")];
        let named = format!("{var}=\"yes\"");
        let err = c.run_err_env(
            &c.default_toml(MAG),
            &env,
            &[named.as_str(), "expected on or off"],
        );
        assert!(err.contains("MAGCACHE_ONEDNN="), "{err}");
    }
    for value in ["100", "0", "8192", "many"] {
        let env = [
            ("MAGCACHE_ONEDNN", lib.as_str()),
            ("MAGCACHE_ONEDNN_QUERY_ROWS", value),
        ];
        let named = format!("MAGCACHE_ONEDNN_QUERY_ROWS=\"{value}\"");
        c.run_err_env(
            &c.default_toml(MAG),
            &env,
            &[named.as_str(), "a multiple of 16 from 16 to 4096"],
        );
    }
    for value in ["16", "100", "0", "everything"] {
        let env = [
            ("MAGCACHE_ONEDNN", lib.as_str()),
            ("MAGCACHE_ONEDNN_KEY_ROWS", value),
        ];
        let named = format!("MAGCACHE_ONEDNN_KEY_ROWS=\"{value}\"");
        c.run_err_env(
            &c.default_toml(MAG),
            &env,
            &[
                named.as_str(),
                "a multiple of 32 from 32 to 1048576, or all",
            ],
        );
    }
}

/// The switches read deep in a run (`MAGCACHE_CPU_BF16`, `MAGCACHE_PROGRESS_SECONDS`) refuse a
/// value they do not take, in one line naming the variable, before anything loads.
#[test]
fn a_bad_switch_value_is_one_line_naming_it() {
    let c = Case::new();
    for (var, value) in [
        ("MAGCACHE_CPU_BF16", "maybe"),
        ("MAGCACHE_PROGRESS_SECONDS", "abc"),
        ("MAGCACHE_PROGRESS_SECONDS", "-1"),
        ("MAGCACHE_LINE_ALLOC", "yes"),
        ("MAGCACHE_IN_POOL", "1"),
        ("MAGCACHE_AMX", "maybe"),
        ("MAGCACHE_HUGE_PAGES", "2"),
        ("MAGCACHE_CPU_F32", "fast"),
    ] {
        let named = format!("{var}=\"{value}\"");
        c.run_err_env(&c.default_toml(MAG), &[(var, value)], &[named.as_str()]);
    }
}

/// `MAGCACHE_LINE_ALLOC=on` (large blocks on 64-byte lines) and `MAGCACHE_HUGE_PAGES` (on 2 MB
/// pages) change where the values lie, and
/// `MAGCACHE_IN_POOL=on` which thread runs the command, never what the values are: the same run
/// gives the same bytes with either on and off.
#[test]
fn the_line_allocator_and_the_pool_give_the_same_bytes() {
    let c = Case::new();
    let text = c.default_toml(MAG);
    let cfg = c.path("run.toml");
    std::fs::write(&cfg, &text).unwrap();
    let out = |var: &str, on: &str| {
        let file = c.path(&format!("out_{var}_{on}.safetensors"));
        let o = Command::new(env!("CARGO_BIN_EXE_magcache"))
            .args(["run", "--quiet", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&file)
            .env(var, on)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(&file).unwrap()
    };
    let base = out("MAGCACHE_LINE_ALLOC", "off");
    assert_eq!(out("MAGCACHE_LINE_ALLOC", "on"), base);
    assert_eq!(out("MAGCACHE_IN_POOL", "on"), base);
    // 2 MB pages where large blocks are aligned (by default on CPUs with AMX).
    assert_eq!(out("MAGCACHE_HUGE_PAGES", "on"), base);
    assert_eq!(out("MAGCACHE_HUGE_PAGES", "off"), base);
}

/// A NaN or infinite `[model.overrides]` value (TOML has them, a model's JSON config does not) is
/// named, not passed on as `null`.
#[test]
fn a_non_finite_override_is_named() {
    let c = Case::new();
    for v in ["nan", "inf", "-inf"] {
        let text = c.default_toml(MAG).replace(
            "[inputs]",
            &format!("[model.overrides]\neps = {v}\n\n[inputs]"),
        );
        c.run_err(&text, &["run.toml", "model.overrides.eps", "finite"]);
    }
}

/// Errors found once the model runs (a strategy's keys against the model's blocks, values that
/// went non-finite) name the run file too.
#[test]
fn errors_at_run_time_name_the_run_file() {
    let c = Case::new();
    // 12 steps: no few-step warning before the error line.
    let long = |cache: &str| c.default_toml(cache).replace("steps = 3", "steps = 12");
    c.run_err(
        &long("strategy = \"dbcache\"\nfront_blocks = 100\n"),
        &["run.toml: ", "cache.front_blocks"],
    );
    let huge = long(MAG).replace("guidance_scale = 5.0", "guidance_scale = 1e38");
    c.run_err(&huge, &["run.toml: ", "non-finite"]);
}

#[test]
fn unknown_key() {
    let c = Case::new();
    c.run_err(
        &c.default_toml(&format!("{MAG}thresold = 0.2\n")),
        &["run.toml", "cache.thresold"],
    );
}

#[test]
fn wrong_type() {
    let c = Case::new();
    c.run_err(
        &c.default_toml("strategy = \"magcache\"\nthreshold = \"high\"\n"),
        &["run.toml", "cache.threshold"],
    );
}

#[test]
fn zero_steps() {
    let c = Case::new();
    c.run_err(
        &c.default_toml(MAG).replace("steps = 3", "steps = 0"),
        &["run.toml", "sampling.steps"],
    );
}

#[test]
fn empty_and_non_positive_ratios() {
    let c = Case::new();
    c.run_err(
        &c.default_toml("strategy = \"magcache\"\nmag_ratios = []\n"),
        &["run.toml", "cache.mag_ratios"],
    );
    c.run_err(
        &c.default_toml("strategy = \"magcache\"\nmag_ratios = [1.0, -0.5]\n"),
        &["run.toml", "cache.mag_ratios"],
    );
    c.run_err(
        &c.default_toml("strategy = \"magcache\"\nmag_ratios = [1.0, 0.0]\n"),
        &["run.toml", "cache.mag_ratios"],
    );
}

#[test]
fn negative_threshold() {
    let c = Case::new();
    c.run_err(
        &c.default_toml("strategy = \"fbcache\"\nthreshold = -0.1\n"),
        &["run.toml", "cache.threshold"],
    );
}

#[test]
fn missing_ratios_for_unknown_model() {
    let c = Case::new();
    c.run_err(
        &c.default_toml("strategy = \"magcache\"\n"),
        &["run.toml", "cache.mag_ratios"],
    );
}

#[test]
fn missing_weights() {
    let c = Case::new();
    let t = c.toml(
        &c.path("nowhere"),
        &fixtures().join("wan21_tiny_loop.safetensors"),
        MAG,
    );
    c.run_err(&t, &["nowhere"]);
}

#[test]
fn truncated_weights() {
    let c = Case::new();
    let w = c.path("w");
    std::fs::create_dir(&w).unwrap();
    std::fs::copy(
        fixtures().join("wan21_tiny/config.json"),
        w.join("config.json"),
    )
    .unwrap();
    let bytes =
        std::fs::read(fixtures().join("wan21_tiny/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(
        w.join("diffusion_pytorch_model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let t = c.toml(&w, &fixtures().join("wan21_tiny_loop.safetensors"), MAG);
    // Said in words, not the reader's variant names.
    let err = c.run_err(&t, &["diffusion_pytorch_model.safetensors", "truncated"]);
    assert!(!err.contains("MetadataIncompleteBuffer"), "{err}");
    // Cut within its header, too.
    std::fs::write(w.join("diffusion_pytorch_model.safetensors"), &bytes[..300]).unwrap();
    c.run_err(&t, &["diffusion_pytorch_model.safetensors", "truncated"]);
}

#[test]
fn missing_weight_tensor_is_named() {
    let c = Case::new();
    let w = c.path("w");
    std::fs::create_dir(&w).unwrap();
    std::fs::copy(
        fixtures().join("wan21_tiny/config.json"),
        w.join("config.json"),
    )
    .unwrap();
    let mut m = candle_core::safetensors::load(
        fixtures().join("wan21_tiny/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    m.remove("blocks.1.attn2.to_k.weight");
    candle_core::safetensors::save(&m, w.join("diffusion_pytorch_model.safetensors")).unwrap();
    let t = c.toml(&w, &fixtures().join("wan21_tiny_loop.safetensors"), MAG);
    c.run_err(&t, &["blocks.1.attn2.to_k.weight"]);
}

#[test]
fn missing_inputs_file() {
    let c = Case::new();
    let t = c.toml(
        &fixtures().join("wan21_tiny"),
        &c.path("absent.safetensors"),
        MAG,
    );
    c.run_err(&t, &["absent.safetensors"]);
}

fn inputs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("wan21_tiny_loop.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| ["latents_init", "cond", "uncond"].contains(&k.as_str()))
        .collect()
}

#[test]
fn missing_input_tensor() {
    let c = Case::new();
    let mut m = inputs();
    m.remove("uncond");
    let p = c.write_tensors("in.safetensors", m);
    c.run_err(
        &c.toml(&fixtures().join("wan21_tiny"), &p, MAG),
        &["in.safetensors", "uncond"],
    );
}

#[test]
fn input_of_wrong_shape() {
    let c = Case::new();
    let mut m = inputs();
    m.insert(
        "latents_init".into(),
        Tensor::zeros((1, 3, 3, 8, 12), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let p = c.write_tensors("in.safetensors", m);
    c.run_err(
        &c.toml(&fixtures().join("wan21_tiny"), &p, MAG),
        &["in.safetensors", "latents_init"],
    );
    let mut m = inputs();
    m.insert(
        "cond".into(),
        Tensor::zeros((1, 7, 23), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let p = c.write_tensors("in2.safetensors", m);
    c.run_err(
        &c.toml(&fixtures().join("wan21_tiny"), &p, MAG),
        &["in2.safetensors", "cond"],
    );
}

#[test]
fn nan_in_inputs() {
    let c = Case::new();
    let mut m = inputs();
    let mut v = m["latents_init"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    v[5] = f32::NAN;
    m.insert(
        "latents_init".into(),
        Tensor::from_vec(v, (1, 4, 3, 8, 12), &Device::Cpu).unwrap(),
    );
    let p = c.write_tensors("in.safetensors", m);
    c.run_err(
        &c.toml(&fixtures().join("wan21_tiny"), &p, MAG),
        &["in.safetensors", "latents_init", "NaN"],
    );
}

#[test]
fn unknown_family_and_preset() {
    let c = Case::new();
    c.run_err(
        "[model]\nfamily = \"sdxl\"\npreset = \"x\"\n[sampling]\nsteps = 2\n",
        &["run.toml", "model.family", "sdxl"],
    );
    c.run_err(
        "[model]\nfamily = \"wan2.1\"\npreset = \"wan9\"\n[sampling]\nsteps = 2\n",
        &["run.toml", "model.preset", "wan9"],
    );
    c.run_err(
        "[model]\nfamily = \"wan2.1\"\npreset = \"wan2.1-t2v-1.3b\"\n[model.overrides]\nlayers = 2\n[sampling]\nsteps = 2\n",
        &["run.toml", "model.overrides.layers"],
    );
}

#[test]
fn missing_config_file() {
    let c = Case::new();
    let o = Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(["run", "--config", "/nonexistent/run.toml"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(e.contains("/nonexistent/run.toml"), "{e}");
    drop(c);
}

#[test]
fn good_run_writes_outputs() {
    let c = Case::new();
    let cfg = c.path("run.toml");
    std::fs::write(&cfg, c.default_toml(MAG)).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(["run", "--quiet", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(c.path("o.safetensors"))
        .arg("--report")
        .arg(c.path("r.json"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = candle_core::safetensors::load(c.path("o.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(t["final"].dims(), [1, 4, 3, 8, 12]);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.path("r.json")).unwrap()).unwrap();
    assert_eq!(r["total_calls"], 6);
    assert_eq!(r["calls"][0]["branch"], "cond");
    assert_eq!(r["calls"][1]["branch"], "uncond");
}

#[test]
fn json_mode_streams_one_event_per_call_and_prints_the_report() {
    let c = Case::new();
    let cfg = c.path("run.toml");
    std::fs::write(&cfg, c.default_toml(MAG)).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(["run", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).expect("every stderr line is JSON"))
        .collect();
    let calls = events.iter().filter(|e| e["event"] == "call").count();
    assert_eq!(calls as u64, report["total_calls"].as_u64().unwrap());
    // Warnings (here: the few-step warning of a 3-step run) are JSON events too.
    assert!(events
        .iter()
        .all(|e| e["event"] == "call" || (e["event"] == "warning" && e["message"].is_string())));
    assert_eq!(report["scopes"].as_array().unwrap().len(), 2);
}

#[test]
fn class_conditioning_errors_name_the_key() {
    let c = Case::new();
    let digits =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/trained/digits_wan");
    let toml = |classes: &str, batch: usize| {
        format!(
            "[model]\nfamily = \"wan2.1\"\nweights = \"{}\"\n[inputs]\nclasses = {classes}\nlatent_shape = [{batch}, 1, 1, 16, 16]\n[sampling]\nsteps = 2\nshift = 3.0\nguidance_scale = 4.0\n",
            digits.display()
        )
    };
    c.run_err(&toml("[3, 12]", 2), &["run.toml", "inputs.classes", "12"]);
    c.run_err(&toml("[3, 1, 4]", 2), &["run.toml", "inputs.classes"]);
    c.run_err(&toml("[10]", 1), &["run.toml", "inputs.classes"]);
}

#[test]
fn one_row_class_table_is_named() {
    let c = Case::new();
    let digits =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/trained/digits_wan");
    let w = c.path("w");
    std::fs::create_dir(&w).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(digits.join(f), w.join(f)).unwrap();
    }
    // Only the null class: no row is left for a class.
    let table =
        candle_core::safetensors::load(digits.join("class_embeddings.safetensors"), &Device::Cpu)
            .unwrap();
    let one = table["class_embeddings"]
        .narrow(0, 0, 1)
        .unwrap()
        .contiguous()
        .unwrap();
    candle_core::safetensors::save(
        &HashMap::from([("class_embeddings".to_string(), one)]),
        w.join("class_embeddings.safetensors"),
    )
    .unwrap();
    let toml = format!(
        "[model]\nfamily = \"wan2.1\"\nweights = \"{}\"\n[inputs]\nclasses = [0]\nlatent_shape = [1, 1, 1, 16, 16]\n[sampling]\nsteps = 2\nshift = 3.0\nguidance_scale = 4.0\n",
        w.display()
    );
    c.run_err(
        &toml,
        &["class_embeddings.safetensors", "tensor `class_embeddings`"],
    );
}

/// A run on oneDNN reports the implementations its products were built on, counted
/// (`onednn_implementations`), none of them oneDNN's reference code for the tiny Wan's even
/// widths, and OpenMP's wait policy: passive unless the user set one; a run without oneDNN has no
/// such key.
#[test]
fn a_run_on_onednn_reports_its_products_implementations() {
    let Ok(lib) = std::env::var("MAGCACHE_TEST_ONEDNN") else {
        eprintln!("note: MAGCACHE_TEST_ONEDNN unset: the report of oneDNN's products not tested");
        return;
    };
    let c = Case::new();
    let cfg = c.path("run.toml");
    std::fs::write(&cfg, c.default_toml(MAG)).unwrap();
    // The report's implementations and products, and stderr (OpenMP's own account of its
    // settings where `OMP_DISPLAY_ENV` asks for it).
    let run = |env: &[(&str, &str)]| {
        let report = c.path("report.json");
        let o = Command::new(env!("CARGO_BIN_EXE_magcache"))
            .args(["run", "--quiet", "--config"])
            .arg(&cfg)
            .arg("--report")
            .arg(&report)
            .env_remove("MAGCACHE_ONEDNN")
            .env_remove("OMP_WAIT_POLICY")
            .env_remove("GOMP_SPINCOUNT")
            .env_remove("KMP_BLOCKTIME")
            .env_remove("KMP_LIBRARY")
            .env("OMP_DISPLAY_ENV", "VERBOSE")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{stderr}");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        std::fs::remove_file(&report).unwrap();
        let products = r["products"].as_str().unwrap_or_default().to_string();
        (r.get("onednn_implementations").cloned(), products, stderr)
    };
    let (Some(serde_json::Value::Object(counts)), products, stderr) =
        run(&[("MAGCACHE_ONEDNN", &lib)])
    else {
        panic!("no onednn_implementations in the report of a run on oneDNN");
    };
    let total: u64 = counts.values().filter_map(|v| v.as_u64()).sum();
    assert!(total > 0, "{counts:?}");
    assert!(counts.keys().all(|k| !k.starts_with("ref")), "{counts:?}");
    // OpenMP's idle threads sleep between products unless the user says otherwise: said in the
    // report, and set before OpenMP read it (libgomp's own display of its settings).
    assert!(products.contains("OMP_WAIT_POLICY=passive"), "{products}");
    // libgomp shows its spin count (0: passive; unset, it spins 300 000 rounds).
    let shown = stderr.contains("OPENMP DISPLAY ENVIRONMENT");
    if shown {
        assert!(stderr.contains("GOMP_SPINCOUNT = '0'"), "{stderr}");
    } else {
        eprintln!("note: this oneDNN's OpenMP displays no settings: its wait policy is checked in the report only");
    }
    // The user's own setting is left as it is.
    let (_, products, stderr) = run(&[("MAGCACHE_ONEDNN", &lib), ("GOMP_SPINCOUNT", "300000")]);
    assert!(!products.contains("OMP_WAIT_POLICY"), "{products}");
    assert!(
        !shown || stderr.contains("GOMP_SPINCOUNT = '300000'"),
        "{stderr}"
    );
    let (_, products, _) = run(&[("MAGCACHE_ONEDNN", &lib), ("OMP_WAIT_POLICY", "active")]);
    assert!(products.contains("OMP_WAIT_POLICY=active"), "{products}");
    // `off` opens nothing: no report of it, and nothing set.
    let (none, products, stderr) = run(&[("MAGCACHE_ONEDNN", "off")]);
    assert!(none.is_none() && products.is_empty(), "{products}");
    assert!(!stderr.contains("OPENMP DISPLAY ENVIRONMENT"), "{stderr}");
    assert!(run(&[]).0.is_none());
}
