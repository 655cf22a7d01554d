//! Wan2.2 TI2V (one model, per-token timesteps): the first latent frame's tokens get t = 0 when an
//! image conditions it, and the frame stays the image.

use candle_core::{Device, Tensor};
use magcache_tests::{fixture, load, load_json, loop_toml, max_abs_diff, run_toml};
use std::collections::HashMap;

#[test]
fn ti2v_without_image_equals_the_plain_loop() {
    // Per-token timesteps that are all equal give the same result as one timestep per sample.
    let meta = load_json("reference/wan21_tiny_loop.json");
    let dir = tempfile::tempdir().unwrap();
    let inputs = fixture("reference/wan21_tiny_loop.safetensors")
        .display()
        .to_string();
    let w = format!("\"{}\"", fixture("reference/wan21_tiny").display());
    let (a, _) = run_toml(dir.path(), &loop_toml("wan2.2", &w, &inputs, &meta, None));
    let reference = load("reference/wan21_tiny_loop.safetensors");
    assert!(max_abs_diff(&a, &reference["dense.final"]) < 1e-3);
}

#[test]
fn ti2v_with_image_keeps_the_first_frame_and_changes_the_rest() {
    let meta = load_json("reference/wan21_tiny_loop.json");
    let dir = tempfile::tempdir().unwrap();
    let mut t: HashMap<String, Tensor> = load("reference/wan21_tiny_loop.safetensors")
        .into_iter()
        .filter(|(k, _)| ["latents_init", "cond", "uncond"].contains(&k.as_str()))
        .collect();
    // The first latent frame of the loop's latents: `[B, C, 1, h, w]`.
    let (b, c, frames, h, w) = t["latents_init"].dims5().unwrap();
    let img = (Tensor::ones((b, c, 1, h, w), candle_core::DType::F32, &Device::Cpu).unwrap() * 0.5)
        .unwrap();
    t.insert("image_latents".into(), img.clone());
    let p = dir.path().join("in.safetensors");
    candle_core::safetensors::save(&t, &p).unwrap();
    let w = format!("\"{}\"", fixture("reference/wan21_tiny").display());
    let (out, rep) = run_toml(
        dir.path(),
        &loop_toml("wan2.2", &w, &p.display().to_string(), &meta, None),
    );
    assert_eq!(max_abs_diff(&out.narrow(2, 0, 1).unwrap(), &img), 0.0);
    assert!(rep.calls.iter().all(|c| c.expert == 0));
    if frames == 1 {
        eprintln!("note: the loop's latents have one frame: there is no rest to change");
        return;
    }
    let reference = load("reference/wan21_tiny_loop.safetensors");
    let rest = out.narrow(2, 1, frames - 1).unwrap();
    let dense_rest = reference["dense.final"].narrow(2, 1, frames - 1).unwrap();
    assert!(max_abs_diff(&rest, &dense_rest) > 1e-3);
}
