//! Parity of the Wan video VAE (`AutoencoderKLWan`) with diffusers: `pipelines/wan_vae_forward.*`
//! (encode and decode with intermediates) and the `dense` run's video in `pipelines/wan_pipeline.*`.

use candle_core::{DType, Device, Tensor};
use magcache_layers::autoencoder_kl_wan::{VaeTrace, WanVae};
use magcache_tests::{fixture, load, load_json, max_abs, max_abs_diff};
use std::collections::HashMap;

fn vae() -> WanVae {
    WanVae::load(&fixture("pipelines/wan_vae"), &Device::Cpu, DType::F32).unwrap()
}

/// Checks `got` against `want` within `rel` x max |want| (the README's VAE tolerance); returns the
/// relative error.
fn check(name: &str, got: &Tensor, want: &Tensor, rel: f32) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let err = max_abs_diff(got, want);
    let scale = max_abs(want).max(1e-12);
    eprintln!(
        "{name}: max abs err {err:.3e}, max |ref| {scale:.3e}, relative {:.3e}",
        err / scale
    );
    assert!(
        err <= rel * scale,
        "{name}: max abs err {err} > {rel} x {scale}"
    );
    err / scale
}

fn traced(tr: &VaeTrace, name: &str) -> Tensor {
    tr.get(name)
        .unwrap()
        .unwrap_or_else(|| panic!("{name} not traced"))
}

#[test]
fn encode_matches_diffusers() {
    let f = load("pipelines/wan_vae_forward.safetensors");
    let meta = load_json("pipelines/wan_vae_forward.json");
    let v = vae();
    let mut tr = VaeTrace::default();
    let (mean, logvar) = v
        .encode_moments_traced(&f["encode.video"], Some(&mut tr))
        .unwrap();
    // Shapes come from the fixture, not from this test.
    let want: Vec<usize> = serde_json::from_value(meta["tensors"]["encode.mean"].clone()).unwrap();
    assert_eq!(mean.dims(), want.as_slice());
    for name in ["encoder.mid_block", "encoder"] {
        check(
            name,
            &traced(&tr, name),
            &f[&format!("encode.{name}.out")],
            1e-4,
        );
    }
    check("encode.mean", &mean, &f["encode.mean"], 1e-4);
    check("encode.logvar", &logvar, &f["encode.logvar"], 1e-4);
    let enc_mean = v.encode_mean(&f["encode.video"]).unwrap();
    assert_eq!(max_abs_diff(&enc_mean, &mean), 0.0);
    let norm = v.encode_normalized(&f["encode.video"]).unwrap();
    check("encode.normalized", &norm, &f["encode.normalized"], 1e-4);
}

#[test]
fn decode_matches_diffusers() {
    let f = load("pipelines/wan_vae_forward.safetensors");
    let v = vae();
    let mut tr = VaeTrace::default();
    let video = v
        .decode_traced(&f["decode.latents"], Some(&mut tr))
        .unwrap();
    let mut names = vec![
        "post_quant_conv".to_string(),
        "decoder.conv_in".into(),
        "decoder.mid_block".into(),
    ];
    // Every up block the fixture recorded.
    names.extend(
        (0..)
            .map(|i| format!("decoder.up_blocks.{i}"))
            .take_while(|n| f.contains_key(&format!("decode.{n}.out"))),
    );
    assert!(names.len() > 3, "fixture has no up-block intermediates");
    for name in &names {
        check(
            name,
            &traced(&tr, name),
            &f[&format!("decode.{name}.out")],
            1e-4,
        );
    }
    check("decode.video", &video, &f["decode.video"], 1e-4);
}

/// `WanPipeline(output_type="np")`'s `video` from the dense run's final latents: de-normalise,
/// decode, [-1, 1] -> [0, 1], `[B, F, H, W, C]`.
#[test]
fn pipeline_video_from_final_latents() {
    let p = load("pipelines/wan_pipeline.safetensors");
    let v = vae();
    let video = v.decode_latents(&p["dense.final"]).unwrap();
    let want = &p["dense.video"];
    assert_eq!(video.dims(), want.dims());
    let err = max_abs_diff(&video, want);
    eprintln!("dense.video: max abs err {err:.3e}");
    assert!(err < 3e-3, "dense.video: {err}");
    let lo = video.flatten_all().unwrap().min(0).unwrap();
    let hi = video.flatten_all().unwrap().max(0).unwrap();
    assert!(lo.to_scalar::<f32>().unwrap() >= 0.0 && hi.to_scalar::<f32>().unwrap() <= 1.0);
    // normalize_latents inverts denormalize_latents.
    let z = v.denormalize_latents(&p["dense.final"]).unwrap();
    let back = v.normalize_latents(&z).unwrap();
    assert!(max_abs_diff(&back, &p["dense.final"]) < 1e-5);
}

/// A sharded checkpoint (`*.safetensors.index.json`) inside a pipeline folder's `vae/` loads and
/// decodes the same as the single file.
#[test]
fn sharded_vae_in_pipeline_folder() {
    let dir = tempfile::tempdir().unwrap();
    let vae_dir = dir.path().join("vae");
    std::fs::create_dir(&vae_dir).unwrap();
    std::fs::copy(
        fixture("pipelines/wan_vae/config.json"),
        vae_dir.join("config.json"),
    )
    .unwrap();
    let all = load("pipelines/wan_vae/diffusion_pytorch_model.safetensors");
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (k, t) in all {
        let (shard, name) = if k.starts_with("encoder.") {
            (&mut a, "diffusion_pytorch_model-00001-of-00002.safetensors")
        } else {
            (&mut b, "diffusion_pytorch_model-00002-of-00002.safetensors")
        };
        weight_map.insert(k.clone(), name.into());
        shard.insert(k, t);
    }
    candle_core::safetensors::save(
        &a,
        vae_dir.join("diffusion_pytorch_model-00001-of-00002.safetensors"),
    )
    .unwrap();
    candle_core::safetensors::save(
        &b,
        vae_dir.join("diffusion_pytorch_model-00002-of-00002.safetensors"),
    )
    .unwrap();
    std::fs::write(
        vae_dir.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
    )
    .unwrap();
    let sharded = WanVae::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let f = load("pipelines/wan_vae_forward.safetensors");
    let frames = f["decode.latents"].dim(2).unwrap().min(2);
    let z = f["decode.latents"].narrow(2, 0, frames).unwrap();
    let got = sharded.decode(&z).unwrap();
    let want = vae().decode(&z).unwrap();
    assert_eq!(max_abs_diff(&got, &want), 0.0);
}

/// User errors are one-line errors naming the file and the key or tensor, never panics.
#[test]
fn errors_name_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("pipelines/wan_vae/config.json")).unwrap(),
    )
    .unwrap();
    // A patchified config whose channels are not whole patches is refused at its config (the
    // Wan2.2 VAE's are 12 = 3 x 2 x 2; its parity is in wan_i2v.rs).
    cfg["is_residual"] = true.into();
    cfg["patch_size"] = 2.into();
    let path = dir.path().join("config.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    std::fs::copy(
        fixture("pipelines/wan_vae/diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let e = WanVae::load(dir.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.starts_with(&format!("{}: in_channels:", path.display())),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1);

    // A config whose sizes do not match the weights names the tensor.
    cfg["is_residual"] = false.into();
    cfg["patch_size"] = serde_json::Value::Null;
    cfg["base_dim"] = (2 * cfg["base_dim"].as_u64().unwrap()).into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let e = WanVae::load(dir.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("encoder.conv_in.weight"), "{e}");

    // No config at all.
    let empty = tempfile::tempdir().unwrap();
    let e = WanVae::load(empty.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("config.json"), "{e}");

    // Mis-shaped inputs.
    let v = vae();
    // Latents of one channel more than z_dim, and no video's 3 (z_dim is at least 3 here).
    let z = cfg["z_dim"].as_u64().unwrap();
    let bad_channels = (z as usize + 1).max(4);
    let bad = Tensor::zeros((1, bad_channels, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let e = v.encode_mean(&bad).err().unwrap().to_string();
    assert!(e.contains("video") && e.contains("3 channels"), "{e}");
    let e = v.decode_latents(&bad).err().unwrap().to_string();
    assert!(
        e.contains("latents") && e.contains(&format!("{z} channels")),
        "{e}"
    );
    let e = v
        .decode(&Tensor::zeros((1, 8, 2, 2), DType::F32, &Device::Cpu).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("latents"), "{e}");
}

fn prefix_err(full: &Tensor, part: &Tensor) -> f32 {
    let n = part.dim(2).unwrap();
    max_abs_diff(&full.narrow(2, 0, n).unwrap(), part)
}

/// Other sizes (read from the config, never assumed): a held-out-like VAE (z_dim 6, 13 frames,
/// 48x32) and one with attention stages, 3 stages, 1 res block, a distinct decoder width and
/// temporal downsampling in the first stage. Shapes follow the config; the chunked causal passes are
/// causal (a prefix of the input gives a prefix of the output) and batch-independent.
#[test]
fn other_sizes_shapes_causality_batch() {
    let dev = Device::Cpu;
    let configs = [
        (
            r#"{"base_dim": 4, "z_dim": 6, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                "temperal_downsample": [false, true, true], "attn_scales": [],
                "latents_mean": [0.1, -0.2, 0.3, 0.0, 0.5, -0.6],
                "latents_std": [1.0, 2.0, 1.5, 0.9, 2.5, 1.1]}"#,
            (13, 48, 32),
        ),
        (
            r#"{"base_dim": 4, "decoder_base_dim": 6, "z_dim": 3, "dim_mult": [1, 2, 2],
                "num_res_blocks": 1, "temperal_downsample": [true, false], "attn_scales": [1.0, 0.5],
                "latents_mean": [0.1, -0.2, 0.3], "latents_std": [1.0, 2.0, 1.5],
                "is_residual": false, "patch_size": null}"#,
            (9, 12, 20),
        ),
    ];
    for (i, (json, (f, h, w))) in configs.iter().enumerate() {
        let cfg = magcache_layers::autoencoder_kl_wan::WanVaeConfig::from_json(
            &serde_json::from_str(json).unwrap(),
            "test",
        )
        .unwrap();
        let (s, ts, z) = (cfg.spatial_scale(), cfg.temporal_scale(), cfg.z_dim);
        let v = WanVae::random(cfg, 7 + i as u64, &dev, DType::F32).unwrap();
        let video = Tensor::rand(-1f32, 1.0, (2, 3, *f, *h, *w), &dev).unwrap();
        let mean = v.encode_mean(&video).unwrap();
        // Frame 0 alone, then chunks of 4 frames, each giving 4 / temporal_scale latent frames.
        let lf = 1 + (f - 1) / 4 * (4 / ts);
        assert_eq!(mean.dims(), &[2, z, lf, h / s, w / s], "config {i}");
        let head = v.encode_mean(&video.narrow(2, 0, 5).unwrap()).unwrap();
        assert!(
            prefix_err(&mean, &head) < 1e-5,
            "config {i}: encode not causal"
        );
        let one = v.encode_mean(&video.narrow(0, 1, 1).unwrap()).unwrap();
        assert!(
            max_abs_diff(&mean.narrow(0, 1, 1).unwrap(), &one) < 1e-5,
            "config {i}: encode batch"
        );

        let out = v.decode(&mean).unwrap();
        assert_eq!(out.dims(), &[2, 3, 1 + (lf - 1) * ts, *h, *w], "config {i}");
        let part = v.decode(&mean.narrow(2, 0, 2).unwrap()).unwrap();
        assert!(
            prefix_err(&out, &part) < 1e-5,
            "config {i}: decode not causal"
        );
        let one = v.decode(&mean.narrow(0, 1, 1).unwrap()).unwrap();
        assert!(
            max_abs_diff(&out.narrow(0, 1, 1).unwrap(), &one) < 1e-5,
            "config {i}: decode batch"
        );
        let px = v.decode_latents(&mean).unwrap();
        assert_eq!(px.dims(), &[2, 1 + (lf - 1) * ts, *h, *w, 3]);
    }
}

/// bf16 / f16 convolution weights (norms, attention and activations stay f32) stay close to f32:
/// about 30 convolutions deep, weight rounding (2^-9 relative for bf16, 2^-12 for f16) adds up.
/// How far it can add up depends on the weights, so the bound is the f32 decode of the same weights
/// rounded to the half type: the half-precision path may not drift much further than the rounding
/// itself takes the result. That relative check is the guard; the absolute bound only catches a
/// result far off on any weights (f16 rounding alone moved a regenerated variant's decode by 5e-2).
#[test]
fn half_precision_decode_close_to_f32() {
    let f = load("pipelines/wan_vae_forward.safetensors");
    let src = fixture("pipelines/wan_vae");
    for (dtype, tol) in [(DType::BF16, 2e-1), (DType::F16, 2e-1)] {
        let v = WanVae::load(&src, &Device::Cpu, dtype).unwrap();
        let got = v.decode(&f["decode.latents"]).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let err = max_abs_diff(&got, &f["decode.video"]);
        // The same weights rounded to `dtype`, decoded in f32.
        let rounded = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let p = e.unwrap().path();
            let to = rounded.path().join(p.file_name().unwrap());
            if p.extension().is_some_and(|x| x == "safetensors") {
                let t: HashMap<String, Tensor> = candle_core::safetensors::load(&p, &Device::Cpu)
                    .unwrap()
                    .into_iter()
                    .map(|(k, t)| (k, t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()))
                    .collect();
                candle_core::safetensors::save(&t, &to).unwrap();
            } else {
                std::fs::copy(&p, &to).unwrap();
            }
        }
        let r = WanVae::load(rounded.path(), &Device::Cpu, DType::F32).unwrap();
        let inherent = max_abs_diff(&r.decode(&f["decode.latents"]).unwrap(), &f["decode.video"]);
        eprintln!(
            "{dtype:?} decode.video: max abs err {err:.3e} (weights rounded, f32: {inherent:.3e})"
        );
        assert!(err < tol, "{dtype:?}: {err}");
        assert!(
            err <= 2.0 * inherent + 1e-2,
            "{dtype:?}: {err} against {inherent} from the rounding alone"
        );
    }
}

/// Spatial tiling against diffusers' own `tiled_decode` / `tiled_encode`
/// (`pipelines/wan_vae_tiling.*`, `tests/fixtures/tools/make_vae_tiling_fixtures.py`): the tiny
/// Wan2.1 VAE and the Wan2.2 (TI2V, patch 2) one at small tile sizes, narrow last rows and columns
/// included. Also prints how far tiling moves the output from the untiled one.
#[test]
fn tiled_decode_and_encode_match_diffusers() {
    use magcache_layers::autoencoder_kl_wan::VaeTiling;
    let f = load("pipelines/wan_vae_tiling.safetensors");
    let meta = load_json("pipelines/wan_vae_tiling.json");
    for (name, case) in meta["cases"].as_object().unwrap() {
        let mut v = WanVae::load(
            &fixture(case["vae"].as_str().unwrap()),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let size = |k: &str| case[k].as_u64().unwrap() as usize;
        let tiling = VaeTiling {
            tile_sample_min_height: size("tile_sample_min_height"),
            tile_sample_min_width: size("tile_sample_min_width"),
            tile_sample_stride_height: size("tile_sample_stride_height"),
            tile_sample_stride_width: size("tile_sample_stride_width"),
        };
        let z = &f[&format!("{name}.latents")];
        let video = &f[&format!("{name}.video")];
        let untiled = v.decode(z).unwrap();
        let want = case["decode_max_abs_tiled_vs_untiled"].as_f64().unwrap() as f32;
        let untiled_mean = v.encode_mean(video).unwrap();
        v.set_tiling(Some(tiling)).unwrap();
        assert_eq!(v.tiling(), Some(tiling));
        let tiled = v.decode(z).unwrap();
        let want_tiled = &f[&format!("{name}.decode.tiled")];
        // A random tiny VAE can have ill-conditioned points (a normalised channel vector near zero:
        // on a regenerated variant, latents moved by 1e-6 moved one pixel by 1e-4, and PyTorch's own
        // f32 result was 5e-5 from its f64 one there). The bound allows what the latents' f32
        // rounding, grown through the decoder (a relative 1e-6 move of them), does to our result;
        // a tiling defect (a seam, a wrong blend or tile) moves whole rows of pixels by 1e-2 and more.
        let nudged = v.decode(&(z * (1.0 + 1e-6)).unwrap()).unwrap();
        let rounding = max_abs_diff(&nudged, &tiled) / max_abs(want_tiled).max(1e-12);
        check(
            &format!("{name} tiled decode"),
            &tiled,
            want_tiled,
            1e-4 + 4.0 * rounding,
        );
        let (mean, logvar) = v.encode_moments(video).unwrap();
        check(
            &format!("{name} tiled encode mean"),
            &mean,
            &f[&format!("{name}.encode.tiled.mean")],
            1e-4,
        );
        check(
            &format!("{name} tiled encode logvar"),
            &logvar,
            &f[&format!("{name}.encode.tiled.logvar")],
            1e-4,
        );
        // Tiling moved the output as far as it did in diffusers (the inputs span several tiles) ...
        let moved = max_abs_diff(&tiled, &untiled);
        assert!(
            want > 1e-3 && (moved - want).abs() < 1e-3,
            "{name}: tiled vs untiled {moved} against diffusers' {want}"
        );
        assert!(
            max_abs_diff(&mean, &untiled_mean) > 1e-4,
            "{name}: encode not tiled"
        );
        eprintln!(
            "{name}: tiled vs untiled: decode max abs {:.3e}, encode mean max abs {:.3e}",
            max_abs_diff(&tiled, &untiled),
            max_abs_diff(&mean, &untiled_mean)
        );
        // ... and an input within one tile decodes exactly as untiled.
        let small = z.narrow(3, 0, 2).unwrap().narrow(4, 0, 2).unwrap();
        let tiled_small = v.decode(&small).unwrap();
        v.set_tiling(None).unwrap();
        assert_eq!(max_abs_diff(&tiled_small, &v.decode(&small).unwrap()), 0.0);
    }
}

/// A cancelled job (a served request) stops the encode of its conditioning video: the encode
/// checks `magcache_core::cancel` after each chunk of frames.
#[test]
fn a_cancelled_encode_stops() {
    let v = vae();
    let f = load("pipelines/wan_vae_forward.safetensors");
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let scope = magcache_core::cancel::Scope::enter(flag);
    let e = v.encode_mean(&f["encode.video"]).err();
    assert!(matches!(e, Some(magcache_core::Error::Cancelled)), "{e:?}");
    assert!(scope.tripped());
}
