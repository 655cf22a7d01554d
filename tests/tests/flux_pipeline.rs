//! Prompted FLUX.1 runs against diffusers' whole `FluxPipeline` (`fixtures/pipelines/flux_pipeline.*`):
//! a pipeline folder assembled from the fixture parts as a released one is laid out (the json's
//! `components`), the contract's `[prompt]` run through the runner (CLIP and T5 tokenizers and
//! encoders, transformer under dynamic-shift Euler with embedded guidance, cache decisions,
//! AutoencoderKL decode).

use magcache_tests::{
    assert_calls_match, cache_table_for, fixture, link_all, load, load_json, max_abs_diff,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

const PIPELINE: &str = "pipelines/flux_pipeline";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A released-style pipeline folder from the fixture parts named in the json's `components`.
fn assemble(dir: &Path, meta: &Value) -> PathBuf {
    let root = dir.join("FLUX-Tiny-Diffusers");
    for (part, folder) in meta["components"].as_object().unwrap() {
        copy_dir(
            &fixture(&format!("pipelines/{}", folder.as_str().unwrap())),
            &root.join(part),
        );
    }
    std::fs::write(
        root.join("model_index.json"),
        r#"{"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}"#,
    )
    .unwrap();
    root
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// The contract's prompted run for reference run `name` (its cache from the json).
fn run_toml(root: &Path, meta: &Value, name: &str) -> String {
    let call = &meta["call"];
    let run = &meta["runs"][name];
    let mut s = format!(
        "[model]\nfamily = \"flux\"\nweights = {}\n\n[prompt]\ntext = {}\nmax_sequence_length = {}\n\n[inputs]\nheight = {}\nwidth = {}\nfile = {}\n\n[sampling]\nsteps = {}\nguidance_scale = {}\n",
        toml_str(&root.display().to_string()),
        toml_str(call["prompt"].as_str().unwrap()),
        call["max_sequence_length"],
        call["height"],
        call["width"],
        toml_str(&fixture(&format!("{PIPELINE}.safetensors")).display().to_string()),
        call["num_inference_steps"],
        call["guidance_scale"],
    );
    if name != "dense" {
        let t = cache_table_for(name, &run["config"]).unwrap();
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
    let root = assemble(dir.path(), &meta);
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, run_toml(&root, &meta, name)).unwrap();
    let mut p = magcache_cli::prepare(&cfg).unwrap();
    let (fin, report) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
    let extra = magcache_tests::decoded_outputs(&mut *p.pipeline, &fin);
    let get = |k: &str| {
        extra
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| panic!("{name}: no `{k}` output"))
    };
    let run = &meta["runs"][name];
    if name.starts_with("magcache") {
        // This fixture's MagCache `metric` is the accumulated error as tested (null in the
        // retention steps, the pre-reset value on computed calls); ours is the value after the
        // decision (0 once computed). They agree on reused calls; decisions must agree everywhere.
        let refc = run["calls"].as_array().unwrap();
        assert_eq!(report.calls.len(), refc.len(), "{name}: number of calls");
        for (i, (a, b)) in report.calls.iter().zip(refc).enumerate() {
            assert_eq!(
                a.step as u64,
                b["step"].as_u64().unwrap(),
                "{name} call {i}"
            );
            assert_eq!(
                a.computed,
                b["computed"].as_bool(),
                "{name} call {i}: computed"
            );
            if a.computed == Some(false) {
                let (got, want) = (a.metric.unwrap(), b["metric"].as_f64().unwrap());
                assert!(
                    (got - want).abs() <= 1e-3 * want.abs().max(1e-3),
                    "{name} call {i}: metric {got} vs {want}"
                );
            }
        }
    } else {
        assert_calls_match(name, &report, &run["calls"], 1e-3);
    }
    assert_eq!(
        report.computed_calls as u64,
        run["computed_calls"].as_u64().unwrap(),
        "{name}: computed calls"
    );
    for (k, tol) in [("prompt_embeds", 1e-4), ("pooled_prompt_embeds", 1e-4)] {
        let d = max_abs_diff(&get(k), &want[k]);
        assert!(d <= tol, "{name}: {k} differs by {d}");
    }
    let d = max_abs_diff(&fin, &want[&format!("{name}.final")]);
    assert!(d <= 1e-3, "{name}: final differs by {d}");
    let d = max_abs_diff(&get("decoded"), &want[&format!("{name}.image")]);
    assert!(d <= 3e-3, "{name}: decoded differs by {d}");
}

#[test]
fn dense_run_matches_the_pipeline() {
    check_run("dense");
}

#[test]
fn magcache_calibrated_run_matches_the_pipeline() {
    check_run("magcache_calibrated");
}

#[test]
fn magcache_flux_ratios_run_matches_the_pipeline() {
    check_run("magcache_flux_ratios");
}

#[test]
fn fbcache_run_matches_the_pipeline() {
    check_run("fbcache");
}

/// `[vae] tiling = true` reaches the decode: a 128x96 image (larger than the 64-pixel tile the run
/// file sets) decodes as the VAE's own tiled decode of the final latents, not the untiled one; and the
/// runner's `release_models` frees the transformer before it (a later generation is refused).
#[test]
fn vae_tiling_reaches_the_decode_and_the_transformer_is_released_first() {
    use candle_core::{DType, Device};
    use magcache_layers::autoencoder_kl::{FluxTiling, FluxVae};
    link_all();
    let meta = load_json(&format!("{PIPELINE}.json"));
    let dir = tempfile::tempdir().unwrap();
    let root = assemble(dir.path(), &meta);
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nfamily = \"flux\"\nweights = {}\ndtype = \"f32\"\n\n[prompt]\ntext = \"a cat\"\nmax_sequence_length = 8\n\n[inputs]\nheight = 128\nwidth = 96\n\n[sampling]\nsteps = 1\n\n[vae]\ntiling = true\ntile_sample_min_size = 64\n",
            toml_str(&root.display().to_string())
        ),
    )
    .unwrap();
    let mut p = magcache_cli::prepare(&cfg).unwrap();
    let (fin, _) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
    p.pipeline.release_models();
    let e = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("released"), "{e}");
    let extra = magcache_tests::decoded_outputs(&mut *p.pipeline, &fin);
    let decoded = &extra.iter().find(|(n, _)| n == "decoded").unwrap().1;
    assert_eq!(decoded.dims(), [1, 128, 96, 3]);
    let mut vae = FluxVae::load(&root.join("vae"), &Device::Cpu, DType::F32).unwrap();
    let untiled = vae.decode_packed(&fin, 128, 96).unwrap();
    vae.set_tiling(Some(FluxTiling {
        tile_sample_min_size: 64,
    }))
    .unwrap();
    let tiled = vae.decode_packed(&fin, 128, 96).unwrap();
    assert_eq!(max_abs_diff(decoded, &tiled), 0.0);
    assert!(max_abs_diff(decoded, &untiled) > 1e-3);
}

/// A prompt longer than the encoders read is cut, as the pipeline cuts it, and said (FluxPipeline
/// warns for CLIP's 77 tokens and for T5's `max_sequence_length`); a short one says nothing.
#[test]
fn a_cut_prompt_is_warned_about() {
    link_all();
    let meta = load_json(&format!("{PIPELINE}.json"));
    let dir = tempfile::tempdir().unwrap();
    let root = assemble(dir.path(), &meta);
    let run = |text: &str| {
        let cfg = dir.path().join("run.toml");
        std::fs::write(
            &cfg,
            format!(
                "[model]\nfamily = \"flux\"\nweights = {}\ndtype = \"f32\"\n\n[prompt]\ntext = {}\nmax_sequence_length = 8\n\n[inputs]\nheight = 32\nwidth = 32\n\n[sampling]\nsteps = 1\n",
                toml_str(&root.display().to_string()),
                toml_str(text)
            ),
        )
        .unwrap();
        let mut p = magcache_cli::prepare(&cfg).unwrap();
        magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet)
            .unwrap()
            .1
            .warnings
    };
    let long = "a red fox jumps over the lazy dog ".repeat(20);
    let w = run(&long);
    assert!(
        w.iter()
            .any(|w| w.contains("T5 reads max_sequence_length = 8")),
        "{w:?}"
    );
    assert!(
        w.iter().any(|w| w.contains("CLIP reads the first")),
        "{w:?}"
    );
    let w = run("a cat");
    assert!(w.iter().all(|w| !w.contains("are cut")), "{w:?}");
}
