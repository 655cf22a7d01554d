//! Prompted Z-Image runs against diffusers' whole `ZImagePipeline` (`fixtures/pipelines/
//! zimage_{turbo,cfg}_pipeline.*`): a pipeline folder assembled as released from the fixture parts
//! (the json's `components` and `model_index`), the contract's `[prompt]` run through the runner
//! (chat template, Qwen3 `hidden_states[-2]`, refiners and main layers under the static shift, Turbo
//! without CFG or CFG as one batched call, cache decisions, AutoencoderKL decode).

use magcache_tests::{
    assert_calls_match, cache_table_for, copy_dir, fixture, link_all, load, load_json, max_abs_diff,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn assemble(dir: &Path, meta: &Value) -> PathBuf {
    let root = dir.join("Z-Image-Turbo-tiny");
    for (part, folder) in meta["components"].as_object().unwrap() {
        copy_dir(
            &fixture(&format!("pipelines/{}", folder.as_str().unwrap())),
            &root.join(part),
        );
    }
    std::fs::write(
        root.join("model_index.json"),
        serde_json::to_string_pretty(&meta["model_index"]).unwrap(),
    )
    .unwrap();
    root
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// The contract's run file for reference run `name` of `case`.
fn run_toml(root: &Path, case: &str, meta: &Value, name: &str, dtype: &str) -> String {
    let call = &meta["call"];
    let mut s = format!(
        "[model]\nfamily = \"z-image\"\nweights = {}\ndtype = \"{dtype}\"\n\n[prompt]\ntext = {}\nmax_sequence_length = {}\n",
        q(&root.display().to_string()),
        q(call["prompt"].as_str().unwrap()),
        call["max_sequence_length"],
    );
    if let Some(n) = call["negative_prompt"].as_str() {
        s.push_str(&format!("negative = {}\n", q(n)));
    }
    s.push_str(&format!(
        "\n[inputs]\nheight = {}\nwidth = {}\nfile = {}\n\n[sampling]\nsteps = {}\nguidance_scale = {}\n",
        call["height"],
        call["width"],
        q(&fixture(&format!("pipelines/{case}.safetensors")).display().to_string()),
        call["num_inference_steps"],
        call["guidance_scale"],
    ));
    if let Some(c) = cache_table_for(name, &meta["runs"][name]["config"]) {
        s.push_str(&format!("\n[cache]\n{c}"));
    }
    s
}

fn setup(case: &str, name: &str, dtype: &str) -> (tempfile::TempDir, PathBuf, Value) {
    link_all();
    let meta = load_json(&format!("pipelines/{case}.json"));
    let dir = tempfile::tempdir().unwrap();
    let root = assemble(dir.path(), &meta);
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, run_toml(&root, case, &meta, name, dtype)).unwrap();
    (dir, cfg, meta)
}

/// Decisions: identical everywhere; MagCache metrics compared on reused calls (the reference logs
/// the pre-reset accumulated error on computed ones), FBCache's on every call.
fn check_calls(label: &str, name: &str, report: &magcache_cli::Report, run: &Value) {
    if !name.starts_with("magcache") {
        return assert_calls_match(label, report, &run["calls"], 1e-3);
    }
    let refc = run["calls"].as_array().unwrap();
    assert_eq!(report.calls.len(), refc.len(), "{label}: number of calls");
    for (i, (a, b)) in report.calls.iter().zip(refc).enumerate() {
        assert_eq!(
            a.step as u64,
            b["step"].as_u64().unwrap(),
            "{label} call {i}"
        );
        assert_eq!(a.branch, b["context"].as_str().unwrap(), "{label} call {i}");
        assert_eq!(
            a.computed,
            b["computed"].as_bool(),
            "{label} call {i}: computed"
        );
        if a.computed == Some(false) {
            let (got, w) = (a.metric.unwrap(), b["metric"].as_f64().unwrap());
            assert!(
                (got - w).abs() <= 1e-3 * w.abs().max(1e-3),
                "{label} call {i}: metric {got} vs {w}"
            );
        }
    }
}

fn check_run(case: &str, name: &str) {
    let (_dir, cfg, meta) = setup(case, name, "f32");
    let want = load(&format!("pipelines/{case}.safetensors"));
    let mut p = magcache_cli::prepare(&cfg).unwrap();
    let (fin, report) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
    let extra = magcache_tests::decoded_outputs(&mut *p.pipeline, &fin);
    let get = |k: &str| {
        extra
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| panic!("{case}/{name}: no `{k}` output"))
    };
    let run = &meta["runs"][name];
    let label = format!("{case}/{name}");
    check_calls(&label, name, &report, run);
    assert_eq!(
        report.computed_calls as u64,
        run["computed_calls"].as_u64().unwrap(),
        "{label}: computed calls"
    );
    let mut embeds = vec!["prompt_embeds"];
    if meta["cfg"].as_bool().unwrap() {
        embeds.push("negative_prompt_embeds");
    }
    for k in embeds {
        let d = max_abs_diff(&get(k), &want[k]);
        assert!(d <= 1e-4, "{label}: {k} differs by {d}");
    }
    let df = max_abs_diff(&fin, &want[&format!("{name}.final")]);
    assert!(df <= 1e-3, "{label}: final differs by {df}");
    let dd = max_abs_diff(&get("decoded"), &want[&format!("{name}.image")]);
    assert!(dd <= 3e-3, "{label}: decoded differs by {dd}");
    eprintln!("{label}: max |final| diff {df:.2e}, decoded {dd:.2e}");
}

#[test]
fn turbo_dense_magcache_fbcache_match_diffusers() {
    for name in ["dense", "magcache", "fbcache"] {
        check_run("zimage_turbo_pipeline", name);
    }
}

#[test]
fn cfg_dense_magcache_fbcache_match_diffusers() {
    for name in ["dense", "magcache", "fbcache"] {
        check_run("zimage_cfg_pipeline", name);
    }
}

/// `magcache calibrate` gives diffusers' calibration curve (context `inference`), and a profile of
/// it drives MagCache to the reference decisions.
#[test]
fn calibration_matches_diffusers_and_drives_magcache() {
    for case in ["zimage_turbo_pipeline", "zimage_cfg_pipeline"] {
        let (dir, cfg, meta) = setup(case, "dense", "f32");
        let (prof, _) = magcache_cli::calibrate(&cfg, magcache_cli::Verbosity::Quiet).unwrap();
        assert_eq!(prof.meta.family, "z-image");
        let want: Vec<f64> =
            serde_json::from_value(meta["mag_calibration"]["inference"].clone()).unwrap();
        let got = &prof.ratios["main"]["inference"];
        assert_eq!(got.len(), want.len(), "{case}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{case}[{i}]: {a} vs {b}"
            );
        }
        let ppath = dir.path().join("profile.toml");
        std::fs::write(&ppath, prof.to_toml().unwrap()).unwrap();
        let c = &meta["runs"]["magcache"]["config"];
        let text = std::fs::read_to_string(&cfg).unwrap()
            + &format!(
                "\n[cache]\nstrategy = \"magcache\"\nthreshold = {}\nmax_skip_steps = {}\nretention_ratio = {}\nprofile = {}\n",
                c["threshold"], c["max_skip_steps"], c["retention_ratio"], q(&ppath.display().to_string())
            );
        std::fs::write(&cfg, text).unwrap();
        let mut p = magcache_cli::prepare(&cfg).unwrap();
        let (_, rep) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
        let got: Vec<Option<bool>> = rep.calls.iter().map(|c| c.computed).collect();
        let want: Vec<Option<bool>> = meta["runs"]["magcache"]["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["computed"].as_bool())
            .collect();
        assert_eq!(got, want, "{case}: profile-driven MagCache");
    }
}

/// bf16 weights and streamed main blocks keep the dense run within bf16's rounding of the f32 one.
#[test]
fn bf16_and_streamed_runs_stay_close() {
    let case = "zimage_turbo_pipeline";
    let want = load(&format!("pipelines/{case}.safetensors"));
    for (dtype, extra) in [("bf16", ""), ("f32", "offload = \"stream\"\n")] {
        let (_dir, cfg, _) = setup(case, "dense", dtype);
        let text = std::fs::read_to_string(&cfg).unwrap().replacen(
            "[prompt]",
            &format!("{extra}\n[prompt]"),
            1,
        );
        std::fs::write(&cfg, text).unwrap();
        let mut p = magcache_cli::prepare(&cfg).unwrap();
        let (fin, _) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
        let d = max_abs_diff(&fin, &want["dense.final"]);
        let tol = if dtype == "bf16" { 0.1 } else { 1e-3 };
        assert!(d <= tol, "{dtype} {extra}: final differs by {d}");
    }
}

/// A Z-Image preset shrunk to a test size, exported with `magcache export`, runs from the written
/// transformer folder (held and streamed) to the preset run's exact bits; CFG batches the seeded
/// negative caption.
#[test]
fn an_exported_preset_runs_held_and_streamed_to_the_preset_bits() {
    link_all();
    let dir = tempfile::tempdir().unwrap();
    let inputs = "[inputs]\nlatent_shape = [1, 16, 6, 10]\ntext_len = 20\n[sampling]\nsteps = 3\nguidance_scale = 2.0\n";
    let preset = format!(
        "[model]\nfamily = \"z-image\"\npreset = \"z-image\"\nseed = 3\n[model.overrides]\ndim = 32\nn_heads = 2\nn_kv_heads = 2\nn_layers = 2\nn_refiner_layers = 1\ncap_feat_dim = 16\naxes_dims = [4, 6, 6]\n{inputs}"
    );
    let (want, rep) = magcache_tests::run_toml(dir.path(), &preset);
    assert_eq!(rep.total_calls, 3, "one batched call per step");
    let cfg = dir.path().join("export.toml");
    std::fs::write(&cfg, &preset).unwrap();
    let out = dir.path().join("ckpt");
    magcache_cli::export(&cfg, &out, 4096, &mut |_| {}).unwrap();
    for extra in ["", "offload = \"stream\"\n"] {
        let text = format!(
            "[model]\nfamily = \"z-image\"\nweights = {}\n{extra}{}",
            q(&out.display().to_string()),
            inputs.replace("[inputs]\n", "[inputs]\nseed = 3\n")
        );
        let (got, _) = magcache_tests::run_toml(dir.path(), &text);
        assert_eq!(max_abs_diff(&got, &want), 0.0, "exported {extra}");
    }
}
