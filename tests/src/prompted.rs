//! Prompted image pipelines against diffusers' whole pipelines (`fixtures/pipelines/*_pipeline.*`):
//! a pipeline folder assembled as released from the fixture parts (the json's `components` and
//! `model_index`), the contract's run file, and the checks every such family shares (decisions,
//! final latents, pixels, embeddings).

use crate::{
    assert_calls_match, cache_table_for, copy_dir, fixture, link_all, load, load_json, max_abs_diff,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A released-style pipeline folder from the fixture parts named in the json's `components`.
pub fn assemble(dir: &Path, meta: &Value) -> PathBuf {
    let root = dir.join("pipeline");
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

/// A TOML string literal.
pub fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// `text` (a run file) with the line of `key` (the first that starts `key = `) set to `value`;
/// panics where there is none, so that a test never edits a line it did not find.
pub fn set_key(text: &str, key: &str, value: &str) -> String {
    let prefix = format!("{key} = ");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let line = lines
        .iter_mut()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{key}` line in\n{text}"));
    *line = format!("{prefix}{value}");
    lines.join("\n") + if text.ends_with('\n') { "\n" } else { "" }
}

/// The contract's run file for reference run `name` of `case` (`guidance_scale` is the call's
/// `true_cfg_scale` where it has one, else its `guidance_scale`).
pub fn run_toml(
    family: &str,
    root: &Path,
    case: &str,
    meta: &Value,
    name: &str,
    dtype: &str,
) -> String {
    let call = &meta["call"];
    let mut s = format!(
        "[model]\nfamily = \"{family}\"\nweights = {}\ndtype = \"{dtype}\"\n\n[prompt]\ntext = {}\nmax_sequence_length = {}\n",
        q(&root.display().to_string()),
        q(call["prompt"].as_str().unwrap()),
        call["max_sequence_length"],
    );
    if let Some(n) = call["negative_prompt"].as_str() {
        s.push_str(&format!("negative = {}\n", q(n)));
    }
    let guidance = match call.get("true_cfg_scale") {
        Some(g) if !g.is_null() => g,
        _ => &call["guidance_scale"],
    };
    s.push_str(&format!(
        "\n[inputs]\nheight = {}\nwidth = {}\nfile = {}\n\n[sampling]\nsteps = {}\nguidance_scale = {}\n",
        call["height"],
        call["width"],
        q(&fixture(&format!("pipelines/{case}.safetensors")).display().to_string()),
        call["num_inference_steps"],
        guidance,
    ));
    if let Some(c) = cache_table_for(name, &meta["runs"][name]["config"]) {
        s.push_str(&format!("\n[cache]\n{c}"));
    }
    s
}

/// The run file of `name` of `case` in a fresh folder: `(tempdir, run.toml, meta)`.
pub fn setup(
    family: &str,
    case: &str,
    name: &str,
    dtype: &str,
) -> (tempfile::TempDir, PathBuf, Value) {
    link_all();
    let meta = load_json(&format!("pipelines/{case}.json"));
    let dir = tempfile::tempdir().unwrap();
    let root = assemble(dir.path(), &meta);
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, run_toml(family, &root, case, &meta, name, dtype)).unwrap();
    (dir, cfg, meta)
}

/// Decisions: identical everywhere; MagCache metrics compared on reused calls (the reference logs
/// the pre-reset accumulated error on computed ones), FBCache's on every call.
pub fn check_calls(label: &str, name: &str, report: &magcache_cli::Report, run: &Value) {
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

/// Runs reference run `name` of `case` through the runner and checks decisions, computed calls,
/// embeddings (1e-4), final latents (1e-3) and pixels (3e-3).
pub fn check_run(family: &str, case: &str, name: &str) {
    let (_dir, cfg, meta) = setup(family, case, name, "f32");
    let want = load(&format!("pipelines/{case}.safetensors"));
    let mut p = magcache_cli::prepare(&cfg).unwrap();
    let (fin, report) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
    let extra = crate::decoded_outputs(&mut *p.pipeline, &fin);
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

/// `magcache calibrate` gives the reference's curves (one per context); a profile of the `ctx`
/// curve for every context drives MagCache to the reference decisions.
pub fn check_calibration(family: &str, case: &str, ctx_for_all: &str) {
    let (dir, cfg, meta) = setup(family, case, "dense", "f32");
    let (mut prof, _) = magcache_cli::calibrate(&cfg, magcache_cli::Verbosity::Quiet).unwrap();
    assert_eq!(prof.meta.family, family);
    for (ctx, want) in meta["mag_calibration"].as_object().unwrap() {
        let got = &prof.ratios["main"][ctx.as_str()];
        let want: Vec<f64> = serde_json::from_value(want.clone()).unwrap();
        assert_eq!(got.len(), want.len(), "{case} {ctx}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{case} {ctx}[{i}]: {a} vs {b}"
            );
        }
    }
    let one = prof.ratios["main"][ctx_for_all].clone();
    for v in prof.ratios.get_mut("main").unwrap().values_mut() {
        *v = one.clone();
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

/// bf16 weights and streamed blocks keep the dense run within bf16's rounding of the f32 one
/// (streamed f32: within the f32 tolerance).
pub fn check_bf16_and_streamed(family: &str, case: &str) {
    let want = load(&format!("pipelines/{case}.safetensors"));
    for (dtype, extra) in [("bf16", ""), ("f32", "offload = \"stream\"\n")] {
        let (_dir, cfg, _) = setup(family, case, "dense", dtype);
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
        assert!(d <= tol, "{case} {dtype} {extra}: final differs by {d}");
    }
}
