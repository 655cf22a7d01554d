//! Prompted Wan2.1 runs against diffusers' whole `WanPipeline` (`fixtures/pipelines/wan_pipeline.*`):
//! a pipeline folder assembled from the fixture parts as a released one is laid out, the contract's
//! `[prompt]` run through the runner (tokenizer, UMT5, transformer under UniPC or Euler with CFG,
//! cache decisions, VAE decode). The binary's prompted runs are tested in
//! `magcache-cli/tests/prompted.rs`.

use magcache_tests::{
    assert_calls_match, cache_table_for, copy_dir, fixture, link_all, load, load_json, max_abs_diff,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

const PIPELINE: &str = "pipelines/wan_pipeline";

/// A released-style pipeline folder from the fixture parts: `wan_X/` becomes `X/`.
fn assemble(dir: &Path) -> PathBuf {
    let root = dir.join("Wan-Tiny-Diffusers");
    for part in [
        "tokenizer",
        "text_encoder",
        "transformer",
        "vae",
        "scheduler",
    ] {
        copy_dir(&fixture(&format!("pipelines/wan_{part}")), &root.join(part));
    }
    std::fs::write(
        root.join("model_index.json"),
        r#"{"_class_name": "WanPipeline", "_diffusers_version": "0.42.1", "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}"#,
    )
    .unwrap();
    root
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// The contract's prompted run for reference run `name` (its scheduler and cache from the json).
fn run_toml(root: &Path, meta: &Value, name: &str) -> String {
    let call = &meta["call"];
    let run = &meta["runs"][name];
    let mut s = format!(
        "[model]\nfamily = \"wan2.1\"\nweights = {}\n\n[prompt]\ntext = {}\nnegative = {}\nmax_sequence_length = {}\n\n[inputs]\nheight = {}\nwidth = {}\nnum_frames = {}\nfile = {}\n\n[sampling]\nsteps = {}\nguidance_scale = {}\n",
        toml_str(&root.display().to_string()),
        toml_str(call["prompt"].as_str().unwrap()),
        toml_str(call["negative_prompt"].as_str().unwrap()),
        call["max_sequence_length"],
        call["height"],
        call["width"],
        call["num_frames"],
        toml_str(&fixture(&format!("{PIPELINE}.safetensors")).display().to_string()),
        call["num_inference_steps"],
        call["guidance_scale"],
    );
    if run["scheduler"].as_str() == Some("FlowMatchEulerDiscreteScheduler") {
        s.push_str(&format!(
            "scheduler = \"euler\"\nshift = {}\n",
            meta["scheduler_alternative"]["config"]["shift"]
        ));
    }
    let table = if name.starts_with("dense") {
        None
    } else {
        cache_table_for(name, &run["config"])
    };
    if let Some(t) = table {
        s.push_str("\n[cache]\n");
        s.push_str(&t);
    }
    s
}

fn check_run(name: &str) {
    link_all();
    let meta = load_json(&format!("{PIPELINE}.json"));
    let want = load(&format!("{PIPELINE}.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    let root = assemble(dir.path());
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, run_toml(&root, &meta, name)).unwrap();
    let mut p = magcache_cli::prepare(&cfg).unwrap();
    let (fin, report) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
    // As the runner does: the transformer is freed before the decode, which does not need it ...
    p.pipeline.release_models();
    let extra = magcache_tests::decoded_outputs(&mut *p.pipeline, &fin);
    // ... and a generation after that is refused, not run on missing weights.
    let e = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("released"), "{e}");
    let get = |k: &str| {
        extra
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| panic!("{name}: no `{k}` output"))
    };
    let run = &meta["runs"][name];
    // The README's tolerance: SeaCache `metric` 1e-4 relative.
    let metric_tol = if name.starts_with("seacache") {
        1e-4
    } else {
        1e-3
    };
    assert_calls_match(name, &report, &run["calls"], metric_tol);
    assert_eq!(
        report.computed_calls as u64,
        run["computed_calls"].as_u64().unwrap(),
        "{name}: computed calls"
    );
    for (k, tol) in [("prompt_embeds", 1e-4), ("negative_prompt_embeds", 1e-4)] {
        let d = max_abs_diff(&get(k), &want[k]);
        assert!(d <= tol, "{name}: {k} differs by {d}");
    }
    let d = max_abs_diff(&fin, &want[&format!("{name}.final")]);
    eprintln!("{name}: final max |diff| {d:.3e}");
    assert!(d <= 1e-3, "{name}: final differs by {d}");
    let d = max_abs_diff(&get("decoded"), &want[&format!("{name}.video")]);
    eprintln!("{name}: decoded max |diff| {d:.3e}");
    assert!(d <= 3e-3, "{name}: decoded differs by {d}");
}

#[test]
fn dense_unipc_run_matches_the_pipeline() {
    check_run("dense");
}

#[test]
fn dense_euler_run_matches_the_pipeline() {
    check_run("dense_euler");
}

#[test]
fn magcache_run_matches_the_pipeline() {
    check_run("magcache");
}

#[test]
fn fbcache_run_matches_the_pipeline() {
    check_run("fbcache");
}

#[test]
fn seacache_run_matches_the_pipeline() {
    check_run("seacache");
}

#[test]
fn seacache_order0_run_matches_the_pipeline() {
    check_run("seacache_order0");
}

/// The SEA indicator of every step's `cond` call against `RUN.sea_indicator` (1e-5 absolute), from
/// the sample the transformer received (`latents_init`, then `RUN.trajectory[k - 1]`: UniPC's
/// corrector runs after the model call on the predicted sample) and the step's sigma; and the distance of
/// consecutive indicators against the calls' `distance` (1e-4 relative).
#[test]
fn sea_indicator_matches_the_pipeline() {
    let meta = load_json(&format!("{PIPELINE}.json"));
    let want = load(&format!("{PIPELINE}.safetensors"));
    let sigmas: Vec<f64> = meta["scheduler"]["sigmas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for name in ["seacache", "seacache_order0"] {
        let run = &meta["runs"][name];
        let p = run["config"]["power_exp"].as_f64().unwrap();
        let trajectory = &want[&format!("{name}.trajectory")];
        let reference = &want[&format!("{name}.sea_indicator")];
        let steps = reference.dim(0).unwrap();
        let mut prev: Option<Vec<Vec<f64>>> = None;
        for (k, &sigma) in sigmas.iter().enumerate().take(steps) {
            // [B, C, F, h, w] -> [B, F, h, w, C], as the model offers `input_latents`.
            let input = if k == 0 {
                want["latents_init"].clone()
            } else {
                trajectory.get(k - 1).unwrap()
            };
            let x = input
                .permute((0, 2, 3, 4, 1))
                .unwrap()
                .contiguous()
                .unwrap();
            let ind = magcache_strategies::seacache::sea_indicator(&x, sigma, p).unwrap();
            let d = max_abs_diff(&ind.get(0).unwrap(), &reference.get(k).unwrap());
            eprintln!("{name} step {k}: indicator max |diff| {d:.3e}");
            assert!(d <= 1e-5, "{name} step {k}: indicator differs by {d}");
            let rows = magcache_strategies::seacache::sea_filter(&x, sigma, p).unwrap();
            let call = run["calls"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["step"].as_u64() == Some(k as u64) && c["context"] == "cond")
                .unwrap();
            if let (Some(pr), Some(want_d)) = (&prev, call["distance"].as_f64()) {
                let got = magcache_strategies::seacache::sea_distance(&rows, pr).unwrap();
                assert!(
                    (got - want_d).abs() <= 1e-4 * want_d.abs(),
                    "{name} step {k}: distance {got} vs {want_d}"
                );
            }
            prev = Some(rows);
        }
    }
}
