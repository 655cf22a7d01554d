//! Prompted FLUX.2 [klein] runs against diffusers' whole `Flux2KleinPipeline`
//! (`fixtures/pipelines/flux2_klein{,_base}_pipeline.*`): a pipeline folder assembled from the
//! fixture parts as a released one is laid out (the json's `components` and `model_index`), the
//! contract's `[prompt]` run through the runner (chat template, Qwen3, transformer under FLUX.2's
//! schedule, distilled or with CFG, cache decisions, AutoencoderKLFlux2 decode).

use magcache_tests::prompted::{check_calibration, q as toml_str, set_key};
use magcache_tests::{fixture, link_all, load, max_abs_diff};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The run file of reference run `name` of `case` in a fresh folder (`pipeline/` assembled as
/// released): `(tempdir, run.toml, meta)`.
fn setup(case: &str, name: &str, dtype: &str) -> (tempfile::TempDir, PathBuf, Value) {
    magcache_tests::prompted::setup("flux2", case, name, dtype)
}

/// Runs `name` of `case` and checks decisions, final latents, pixels and embeddings.
fn check_run(case: &str, name: &str) {
    magcache_tests::prompted::check_run("flux2", case, name)
}

/// `magcache calibrate` on a FLUX.2 run gives diffusers' calibration curves (one per context), and
/// a profile of them drives MagCache to the reference decisions.
#[test]
fn calibration_matches_diffusers_and_drives_magcache() {
    // The reference MagCache run used the cond curve for every context.
    for case in ["flux2_klein_pipeline", "flux2_klein_base_pipeline"] {
        check_calibration("flux2", case, "cond");
    }
}

/// The distilled folder's few steps: caching is warned about, with the best case it can reach.
#[test]
fn few_step_warning_fires_on_the_distilled_folder() {
    let (_dir, cfg, meta) = setup("flux2_klein_pipeline", "magcache", "f32");
    let steps = &meta["call"]["num_inference_steps"];
    let mut p = magcache_cli::prepare(&cfg).unwrap();
    let (_, rep) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
    assert!(
        rep.warnings
            .iter()
            .any(|w| w.contains(&format!("only {steps} steps")) && w.contains("fewer calls")),
        "{:?}",
        rep.warnings
    );
    // No "-0.0 %" (an empty f64 sum) where nothing is reused.
    assert!(
        rep.warnings.iter().all(|w| !w.contains("-0.0")),
        "{:?}",
        rep.warnings
    );
}

/// bf16 weights: every run takes the reference decisions (their margins are at least 10%) and
/// stays near the f32 result.
#[test]
fn bf16_runs_take_the_reference_decisions() {
    for case in ["flux2_klein_pipeline", "flux2_klein_base_pipeline"] {
        for name in ["dense", "magcache", "fbcache"] {
            let (_dir, cfg, meta) = setup(case, name, "bf16");
            let want = load(&format!("pipelines/{case}.safetensors"));
            let mut p = magcache_cli::prepare(&cfg).unwrap();
            let (fin, rep) =
                magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
            let got: Vec<Option<bool>> = rep.calls.iter().map(|c| c.computed).collect();
            let want_calls: Vec<Option<bool>> = meta["runs"][name]["calls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["computed"].as_bool())
                .collect();
            let got = if name == "dense" {
                vec![None; got.len()]
            } else {
                got
            };
            assert_eq!(got, want_calls, "{case}/{name} bf16: decisions");
            let d = max_abs_diff(&fin, &want[&format!("{name}.final")]);
            eprintln!("{case}/{name} bf16: max |final| diff {d:.2e}");
            assert!(d < 5e-2, "{case}/{name} bf16: final differs by {d}");
        }
    }
}

/// TeaCache decides on the first double block's modulated input (FLUX.2's shared image
/// modulation); with coefficients given it runs and reports its metric.
#[test]
fn teacache_runs_on_the_modulated_input() {
    let (_dir, cfg, meta) = setup("flux2_klein_base_pipeline", "dense", "f32");
    let text = std::fs::read_to_string(&cfg).unwrap()
        + "\n[cache]\nstrategy = \"teacache\"\nthreshold = 0.3\ncoefficients = [1.0, 0.0]\n";
    std::fs::write(&cfg, text).unwrap();
    let mut p = magcache_cli::prepare(&cfg).unwrap();
    let (fin, rep) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
    // Classifier-free guidance: two calls a step.
    assert_eq!(
        rep.total_calls as u64,
        2 * meta["call"]["num_inference_steps"].as_u64().unwrap()
    );
    assert!(rep.calls.iter().skip(2).any(|c| c.metric.is_some()));
    let v = fin.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
}

#[test]
fn distilled_dense_matches_the_pipeline() {
    check_run("flux2_klein_pipeline", "dense");
}

#[test]
fn distilled_magcache_matches_the_pipeline() {
    check_run("flux2_klein_pipeline", "magcache");
}

#[test]
fn distilled_fbcache_matches_the_pipeline() {
    check_run("flux2_klein_pipeline", "fbcache");
}

#[test]
fn base_dense_matches_the_pipeline() {
    check_run("flux2_klein_base_pipeline", "dense");
}

#[test]
fn base_magcache_matches_the_pipeline() {
    check_run("flux2_klein_base_pipeline", "magcache");
}

#[test]
fn base_fbcache_matches_the_pipeline() {
    check_run("flux2_klein_base_pipeline", "fbcache");
}

/// `offload = "stream"` gives the held run's bits and decisions (FBCache runs the first block
/// alone; TeaCache's indicator comes from the held shared modulation), and `magcache plan`
/// predicts the MagCache run call for call.
#[test]
fn streamed_runs_match_held_runs_and_plan_predicts_magcache() {
    let decisions =
        |r: &magcache_cli::Report| r.calls.iter().map(|c| c.computed).collect::<Vec<_>>();
    for name in ["fbcache", "magcache"] {
        let (_dir, cfg, _) = setup("flux2_klein_base_pipeline", name, "f32");
        let held = std::fs::read_to_string(&cfg).unwrap();
        let mut p = magcache_cli::prepare(&cfg).unwrap();
        let (a, ra) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
        if name == "magcache" {
            let plan = magcache_cli::plan(&cfg).unwrap();
            assert_eq!(plan.total_calls, ra.total_calls);
            assert_eq!(plan.computed_calls, ra.computed_calls);
        }
        let streamed = held.replace("dtype = \"f32\"", "dtype = \"f32\"\noffload = \"stream\"");
        std::fs::write(&cfg, streamed).unwrap();
        let mut p = magcache_cli::prepare(&cfg).unwrap();
        let (b, rb) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
        assert!(rb.model.contains("streamed"), "{}", rb.model);
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{name}");
        assert_eq!(decisions(&ra), decisions(&rb), "{name}");
        assert!(
            decisions(&rb).contains(&Some(false)),
            "{name}: nothing reused"
        );
    }
}

/// A preset (random init, here shrunk to the fixture's size) runs on seeded random inputs, exports
/// as a diffusers folder, and that folder loads (streamed) to the same bits.
#[test]
fn a_preset_runs_exports_and_loads_back() {
    link_all();
    let dir = tempfile::tempdir().unwrap();
    let toml = |model: &str| {
        format!(
            "[model]\nfamily = \"flux2\"\n{model}\n\n[inputs]\nlatent_shape = [1, 32, 4, 6]\ntext_len = 8\n\n[sampling]\nsteps = 4\nguidance_scale = 3.0\n\n[cache]\nstrategy = \"fbcache\"\nthreshold = 0.5\n"
        )
    };
    let model = "preset = \"flux2-klein-base-4b\"\nseed = 3\n[model.overrides]\nattention_head_dim = 16\naxes_dims_rope = [4, 4, 4, 4]\njoint_attention_dim = 48\nnum_attention_heads = 2\nnum_layers = 2\nnum_single_layers = 3";
    let path = dir.path().join("preset.toml");
    std::fs::write(&path, toml(model)).unwrap();
    let plan = magcache_cli::plan(&path).unwrap();
    assert_eq!(plan.total_calls, 8, "base preset: CFG, two calls per step");
    let mut p = magcache_cli::prepare(&path).unwrap();
    let (_, ra) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
    assert_eq!(ra.total_calls, 8);
    let out = dir.path().join("flux2");
    magcache_cli::export(&path, &out, 1 << 30, &mut |_| {}).unwrap();
    // The preset and its export on the same inputs file (the transformer folder alone does not say
    // it is a base model: the negative embeddings do).
    let inputs = dir.path().join("inputs.safetensors");
    let randn = magcache_layers::random::randn;
    candle_core::safetensors::save(
        &[
            ("latents_init".to_string(), randn(4, &[1, 6, 128]).unwrap()),
            ("prompt_embeds".to_string(), randn(5, &[1, 8, 48]).unwrap()),
            (
                "negative_prompt_embeds".to_string(),
                randn(6, &[1, 8, 48]).unwrap(),
            ),
            (
                "img_ids".to_string(),
                magcache_models::flux2::prompted::image_ids(2, 3).unwrap(),
            ),
        ]
        .into_iter()
        .collect(),
        &inputs,
    )
    .unwrap();
    let from_file = |model: &str| {
        format!(
            "[model]\nfamily = \"flux2\"\n{model}\n\n[inputs]\nfile = {}\n\n[sampling]\nsteps = 4\nguidance_scale = 3.0\n",
            toml_str(&inputs.display().to_string())
        )
    };
    let (x, rx) = magcache_tests::run_toml(dir.path(), &from_file(model));
    let (y, ry) = magcache_tests::run_toml(
        dir.path(),
        &from_file(&format!(
            "weights = {}\noffload = \"stream\"",
            toml_str(&out.display().to_string())
        )),
    );
    assert_eq!(rx.total_calls, 8);
    assert_eq!(ry.total_calls, 8);
    assert_eq!(max_abs_diff(&x, &y), 0.0);
}

/// A size that is not a multiple of 16 is rounded down, as the pipeline does (with a warning):
/// 8 more pixels each way (56 x 72 for a 48 x 64 run) give the run's latent grid (a multiple of
/// 16), so the reference dense run is reproduced.
#[test]
fn sizes_round_down_to_the_packing_as_the_pipeline_does() {
    let (_dir, cfg, meta) = setup("flux2_klein_pipeline", "dense", "f32");
    let (h, w) = (&meta["call"]["height"], &meta["call"]["width"]);
    let (h, w) = (h.as_u64().unwrap(), w.as_u64().unwrap());
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = set_key(&text, "height", &(h + 8).to_string());
    let text = set_key(&text, "width", &(w + 8).to_string());
    std::fs::write(&cfg, text).unwrap();
    let want = load("pipelines/flux2_klein_pipeline.safetensors");
    let mut p = magcache_cli::prepare(&cfg).unwrap();
    let (fin, rep) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
    assert!(
        rep.warnings.iter().any(|w| w.contains("rounded down")),
        "{:?}",
        rep.warnings
    );
    assert!(max_abs_diff(&fin, &want["dense.final"]) <= 1e-3);
    let extra = magcache_tests::decoded_outputs(&mut *p.pipeline, &fin);
    let decoded = &extra.iter().find(|(k, _)| k == "decoded").unwrap().1;
    assert!(max_abs_diff(decoded, &want["dense.image"]) <= 3e-3);
}

/// Bad inputs end with one error naming the file and key; keys that do not apply are warned about.
#[test]
fn errors_name_the_file_and_key() {
    link_all();
    let prepare_err = |cfg: &Path| match magcache_cli::prepare(cfg) {
        Ok(_) => panic!("{} prepared", cfg.display()),
        Err(e) => e.to_string(),
    };
    // A FLUX.1 folder given to flux2.
    let (dir, cfg, meta) = setup("flux2_klein_pipeline", "dense", "f32");
    let flux1 = fixture("pipelines/flux_tiny_folder");
    let root = dir.path().join("pipeline");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            &toml_str(&root.display().to_string()),
            &toml_str(&flux1.display().to_string()),
        ),
    )
    .unwrap();
    let e = prepare_err(&cfg);
    assert!(
        e.contains("model_index.json") && e.contains("_class_name"),
        "{e}"
    );
    // A transformer config of another class.
    std::fs::write(&cfg, &text).unwrap();
    let tcfg = root.join("transformer").join("config.json");
    let t = std::fs::read_to_string(&tcfg).unwrap();
    std::fs::write(
        &tcfg,
        t.replace("Flux2Transformer2DModel", "FluxTransformer2DModel"),
    )
    .unwrap();
    let e = prepare_err(&cfg);
    assert!(
        e.contains("config.json") && e.contains("_class_name"),
        "{e}"
    );
    std::fs::write(&tcfg, t).unwrap();
    // A text encoder that is not Qwen3.
    let qcfg = root.join("text_encoder").join("config.json");
    let q = std::fs::read_to_string(&qcfg).unwrap();
    std::fs::write(&qcfg, q.replace("\"qwen3\"", "\"qwen2\"")).unwrap();
    let e = prepare_err(&cfg);
    assert!(e.contains("config.json") && e.contains("model_type"), "{e}");
    std::fs::write(&qcfg, q).unwrap();
    // A negative prompt on the distilled folder: warned about, not used.
    std::fs::write(
        &cfg,
        text.replace(
            "max_sequence_length",
            "negative = \"blurry\"\nmax_sequence_length",
        ),
    )
    .unwrap();
    let mut p = magcache_cli::prepare(&cfg).unwrap();
    let (_, rep) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
    // One call a step: the negative prompt runs no second branch.
    assert_eq!(
        rep.total_calls as u64,
        meta["call"]["num_inference_steps"].as_u64().unwrap()
    );
    assert!(
        rep.warnings.iter().any(|w| w.contains("prompt.negative")),
        "{:?}",
        rep.warnings
    );
}

/// `[vae] tiling = true` reaches FLUX.2's `AutoencoderKLFlux2` decode (its config's class is not
/// `AutoencoderKL`'s, which the tiling's reader once demanded): the run decodes as the VAE's own
/// tiled decode of the final latents.
#[test]
fn vae_tiling_reaches_the_flux2_decode() {
    use candle_core::{DType, Device};
    use magcache_layers::autoencoder_kl::FluxTiling;
    use magcache_models::flux2::vae::Flux2Vae;
    let (dir, cfg, meta) = setup("flux2_klein_pipeline", "dense", "f32");
    let factor = meta["vae_scale_factor"].as_u64().unwrap() as usize;
    let (h, w) = (
        meta["call"]["height"].as_u64().unwrap() as usize,
        meta["call"]["width"].as_u64().unwrap() as usize,
    );
    // The smallest tile the tiling takes (kept parts of whole latents), so the picture spans tiles.
    let tile = 4 * factor;
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{text}\n[vae]\ntiling = true\ntile_sample_min_size = {tile}\n"),
    )
    .unwrap();
    let mut p = magcache_cli::prepare(&cfg).unwrap();
    let (fin, _) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
    let extra = magcache_tests::decoded_outputs(&mut *p.pipeline, &fin);
    let decoded = &extra.iter().find(|(n, _)| n == "decoded").unwrap().1;
    let mut vae = Flux2Vae::load(
        &dir.path().join("pipeline").join("vae"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let untiled = vae.decode_packed(&fin, h, w).unwrap();
    vae.set_tiling(Some(FluxTiling {
        tile_sample_min_size: tile,
    }))
    .unwrap();
    let tiled = vae.decode_packed(&fin, h, w).unwrap();
    assert_eq!(max_abs_diff(decoded, &tiled), 0.0);
    if h.max(w) > tile {
        assert!(max_abs_diff(decoded, &untiled) > 1e-4);
    }
}
