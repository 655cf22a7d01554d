//! Prompted Z-Image runs against diffusers' whole `ZImagePipeline` (`fixtures/pipelines/
//! zimage_{turbo,cfg}_pipeline.*`) through the runner (chat template, Qwen3 `hidden_states[-2]`,
//! refiners and main layers under the static shift, Turbo without CFG or CFG as one batched call,
//! cache decisions, AutoencoderKL decode): [`magcache_tests::prompted`].

use magcache_tests::prompted::{check_bf16_and_streamed, check_calibration, check_run, q};
use magcache_tests::{link_all, max_abs_diff};

#[test]
fn turbo_dense_magcache_fbcache_match_diffusers() {
    for name in ["dense", "magcache", "fbcache"] {
        check_run("z-image", "zimage_turbo_pipeline", name);
    }
}

#[test]
fn cfg_dense_magcache_fbcache_match_diffusers() {
    for name in ["dense", "magcache", "fbcache"] {
        check_run("z-image", "zimage_cfg_pipeline", name);
    }
}

/// `magcache calibrate` gives diffusers' calibration curve (context `inference`), and a profile of
/// it drives MagCache to the reference decisions.
#[test]
fn calibration_matches_diffusers_and_drives_magcache() {
    for case in ["zimage_turbo_pipeline", "zimage_cfg_pipeline"] {
        check_calibration("z-image", case, "inference");
    }
}

#[test]
fn bf16_and_streamed_runs_stay_close() {
    check_bf16_and_streamed("z-image", "zimage_turbo_pipeline");
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
