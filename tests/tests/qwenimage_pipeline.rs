//! Prompted Qwen-Image runs against diffusers' whole `QwenImagePipeline` (`fixtures/pipelines/
//! qwenimage{,_nocfg}_pipeline.*`) through the runner (the pipeline's template, the tokenizer from
//! vocab.json + merges.txt, Qwen2.5-VL with the 34-row drop, the double-stream transformer under the
//! dynamic shift stretched to its terminal, true CFG with the cond norm kept, cache decisions, the
//! Wan-architecture VAE on one frame): [`magcache_tests::prompted`].

use magcache_tests::prompted::{check_bf16_and_streamed, check_calibration, check_run};

#[test]
fn true_cfg_dense_magcache_fbcache_match_diffusers() {
    for name in ["dense", "magcache", "fbcache"] {
        check_run("qwen-image", "qwenimage_pipeline", name);
    }
}

#[test]
fn nocfg_dense_magcache_fbcache_match_diffusers() {
    for name in ["dense", "magcache", "fbcache"] {
        check_run("qwen-image", "qwenimage_nocfg_pipeline", name);
    }
}

/// `magcache calibrate` gives diffusers' curves (`cond`, `uncond`); the reference MagCache runs
/// used the cond curve for both contexts.
#[test]
fn calibration_matches_diffusers_and_drives_magcache() {
    for case in ["qwenimage_pipeline", "qwenimage_nocfg_pipeline"] {
        check_calibration("qwen-image", case, "cond");
    }
}

#[test]
fn bf16_and_streamed_runs_stay_close() {
    check_bf16_and_streamed("qwen-image", "qwenimage_nocfg_pipeline");
}

/// A Qwen-Image preset shrunk to a test size, exported with `magcache export`, runs from the
/// written transformer folder (held and streamed) to the preset run's exact bits, with true CFG on
/// seeded captions.
#[test]
fn an_exported_preset_runs_held_and_streamed_to_the_preset_bits() {
    magcache_tests::link_all();
    let dir = tempfile::tempdir().unwrap();
    let inputs = "[inputs]\nlatent_shape = [1, 16, 6, 10]\ntext_len = 20\n[sampling]\nsteps = 3\nguidance_scale = 3.0\n";
    let preset = format!(
        "[model]\nfamily = \"qwen-image\"\npreset = \"qwen-image\"\nseed = 5\n[model.overrides]\nnum_layers = 2\nnum_attention_heads = 2\nattention_head_dim = 16\njoint_attention_dim = 24\naxes_dims_rope = [4, 6, 6]\n{inputs}"
    );
    let (want, rep) = magcache_tests::run_toml(dir.path(), &preset);
    assert_eq!(rep.total_calls, 6, "cond and uncond each step");
    let cfg = dir.path().join("export.toml");
    std::fs::write(&cfg, &preset).unwrap();
    let out = dir.path().join("ckpt");
    magcache_cli::export(&cfg, &out, 4096, &mut |_| {}).unwrap();
    for extra in ["", "offload = \"stream\"\n"] {
        let text = format!(
            "[model]\nfamily = \"qwen-image\"\nweights = {}\n{extra}{}",
            magcache_tests::prompted::q(&out.display().to_string()),
            inputs.replace("[inputs]\n", "[inputs]\nseed = 5\n")
        );
        let (got, _) = magcache_tests::run_toml(dir.path(), &text);
        assert_eq!(
            magcache_tests::max_abs_diff(&got, &want),
            0.0,
            "exported {extra}"
        );
    }
}

/// TeaCache on the first block's modulated input: a streamed chain (block 0's `img_mod` held beside
/// it) decides and ends exactly as the held one.
#[test]
fn teacache_on_the_modulated_input_streams_as_it_holds() {
    let mut finals = Vec::new();
    for extra in ["", "offload = \"stream\"\n"] {
        let (_dir, cfg, _) = magcache_tests::prompted::setup(
            "qwen-image",
            "qwenimage_nocfg_pipeline",
            "dense",
            "f32",
        );
        let text = std::fs::read_to_string(&cfg).unwrap().replacen("[prompt]", &format!("{extra}\n[prompt]"), 1)
            + "\n[cache]\nstrategy = \"teacache\"\nthreshold = 0.6\ncoefficients = [1.0, 0.0]\nindicator = \"modulated_input\"\n";
        std::fs::write(&cfg, text).unwrap();
        let mut p = magcache_cli::prepare(&cfg).unwrap();
        let (fin, rep) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
        let decisions: Vec<Option<bool>> = rep.calls.iter().map(|c| c.computed).collect();
        assert!(
            decisions.contains(&Some(false)),
            "{extra}: nothing reused: {decisions:?}"
        );
        finals.push((fin, decisions));
    }
    assert_eq!(finals[0].1, finals[1].1);
    assert_eq!(
        magcache_tests::max_abs_diff(&finals[0].0, &finals[1].0),
        0.0
    );
}

/// A negative prompt with `guidance_scale` at most 1 runs no true CFG: said, as the pipeline warns.
#[test]
fn an_unused_negative_prompt_is_warned_about() {
    let (_dir, cfg, meta) =
        magcache_tests::prompted::setup("qwen-image", "qwenimage_nocfg_pipeline", "dense", "f32");
    let g = meta["call"]["true_cfg_scale"].as_f64().unwrap_or(1.0);
    assert!(g <= 1.0, "the no-CFG case runs at {g}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(!text.contains("negative ="));
    let text = text.replacen("\n\n[inputs]", "\nnegative = \" \"\n\n[inputs]", 1);
    std::fs::write(&cfg, text).unwrap();
    let mut p = magcache_cli::prepare(&cfg).unwrap();
    let (_, rep) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
    assert!(
        rep.warnings
            .iter()
            .any(|w| w.contains("prompt.negative is not used")),
        "{:?}",
        rep.warnings
    );
    assert_eq!(
        rep.total_calls,
        meta["call"]["num_inference_steps"].as_u64().unwrap() as usize
    );
}
