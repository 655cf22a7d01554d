//! The Wan VAE decodes (and encodes) in memory bounded by one frame's working set, not by the
//! frame count (issue 30): peak heap bytes, counted by this binary's allocator, of a tiny random
//! VAE decoding 5 and 17 frames, and encoding them.
//!
//! One test in this binary: the counter is process-wide, so no other test may run beside it.

use candle_core::{DType, Device, Tensor};
use magcache_layers::autoencoder_kl_wan::{VaeTiling, WanVae, WanVaeConfig};
use magcache_tests::{heap_peak_of, CountingAlloc};

#[global_allocator]
static A: CountingAlloc = CountingAlloc;

fn bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

#[test]
fn decode_and_encode_memory_does_not_grow_with_frames() {
    // The released architecture (4 stages, 2 temporal resamplers) at a small width.
    let cfg = WanVaeConfig::from_json(
        &serde_json::json!({"base_dim": 8, "z_dim": 4, "latents_mean": [0.0, 0.0, 0.0, 0.0], "latents_std": [1.0, 1.0, 1.0, 1.0]}),
        "(test)",
    )
    .unwrap();
    let mut vae = WanVae::random(cfg, 3, &Device::Cpu, DType::F32).unwrap();
    let (h, w) = (12, 16);
    let mut peaks = Vec::new();
    for latent_frames in [2, 5] {
        let z = Tensor::randn(0f32, 1f32, (1, 4, latent_frames, h, w), &Device::Cpu).unwrap();
        let (dec_peak, video) = heap_peak_of(|| vae.decode(&z).unwrap());
        let frames = video.dim(2).unwrap();
        let (enc_peak, mean) = heap_peak_of(|| vae.encode_mean(&video).unwrap());
        assert_eq!(mean.dims(), z.dims());
        // What necessarily grows with the frames: the decoded video (and its per-frame pieces
        // before they are joined), the input video of the encode.
        let video_bytes = bytes(&video);
        eprintln!(
            "{frames} frames: decode peak {dec_peak} B, encode peak {enc_peak} B, video {video_bytes} B"
        );
        peaks.push((frames, dec_peak, enc_peak, video_bytes));
    }
    // The size guard's estimate of the decode (weights aside: the VAE was built before counting)
    // covers what was measured, and not by a wide margin once gemm's per-thread scratch (sized by
    // this CPU's L2 cache and thread count, allocated by the first decode and kept) is set aside.
    let slabs = magcache_layers::autoencoder_kl_wan::gemm_slabs().0.unwrap() as usize;
    for (&lf, &(frames, dec_peak, _, _)) in [2usize, 5].iter().zip(&peaks) {
        let p = vae.config.decode_bytes(lf, h, w, 4, true);
        let predicted = p.activations().0.unwrap();
        eprintln!("{frames} frames: decode predicted {predicted} B, measured {dec_peak} B");
        assert!(
            predicted as usize >= dec_peak && (predicted as usize) - slabs < 3 * dec_peak,
            "{frames} frames: predicted {predicted} B against {dec_peak} B measured"
        );
    }
    let (f5, d5, e5, v5) = peaks[0];
    let (f17, d17, e17, v17) = peaks[1];
    assert_eq!((f5, f17), (5, 17));
    // The working set beyond the output is the same for 17 frames as for 5: the growth is at most
    // the output's own growth (twice: the frames and their concatenation) and a 10% margin.
    let allowed = |p5: usize| p5 + p5 / 10 + 2 * (v17 - v5);
    assert!(
        d17 <= allowed(d5),
        "decode peak grew from {d5} B (5 frames) to {d17} B (17 frames), more than the video"
    );
    assert!(
        e17 <= allowed(e5),
        "encode peak grew from {e5} B (5 frames) to {e17} B (17 frames), more than the video"
    );
    // And one output frame's working set is far below four frames' activations at full
    // resolution (the widest stage: base_dim channels in f32): the decoder streams the frames.
    // gemm's per-thread scratch (sized by this CPU's L2 cache and thread count, allocated by the
    // first decode) is the machine's, not the decoder's: taken out, so the bound holds on any CPU.
    let full_res_frame = 8 * (8 * h) * (8 * w) * 4;
    let own = (d5 - 2 * v5).saturating_sub(slabs);
    assert!(
        own < 48 * full_res_frame,
        "decode working set {own} B (gemm's {slabs} B of scratch aside) is not bounded by a few full-resolution frames ({full_res_frame} B each)"
    );
    // Tiled (`[vae] tiling`, tiles of 4x4 latents, one every 3): the feature cache and working set
    // are a tile's, and the guard's estimate (with two rows of tiles) still covers the peak.
    let tiling = VaeTiling {
        tile_sample_min_height: 32,
        tile_sample_min_width: 32,
        tile_sample_stride_height: 24,
        tile_sample_stride_width: 24,
    };
    vae.set_tiling(Some(tiling)).unwrap();
    for (&lf, &(frames, dec_peak, _, video_bytes)) in [2usize, 5].iter().zip(&peaks) {
        let z = Tensor::randn(0f32, 1f32, (1, 4, lf, h, w), &Device::Cpu).unwrap();
        let (tiled_peak, video) = heap_peak_of(|| vae.decode(&z).unwrap());
        assert_eq!(bytes(&video), video_bytes);
        let p = vae
            .config
            .decode_bytes_tiled(lf, h, w, 4, Some(tiling), true);
        let predicted = p.activations().0.unwrap();
        eprintln!(
            "{frames} frames tiled: decode peak {tiled_peak} B (untiled {dec_peak} B), predicted {predicted} B"
        );
        // gemm's per-thread scratch was allocated by the untiled decodes above: not in this peak.
        assert!(
            predicted as usize >= tiled_peak && (predicted as usize) - slabs < 3 * tiled_peak,
            "{frames} frames tiled: predicted {predicted} B against {tiled_peak} B measured"
        );
        // Beyond the video itself, a tile's cache and working set are smaller than the frame's.
        assert!(
            tiled_peak - 2 * video_bytes < dec_peak - 2 * video_bytes,
            "{frames} frames: tiling did not lower the decode's own memory ({tiled_peak} B against {dec_peak} B)"
        );
    }
}
