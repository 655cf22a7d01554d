//! The size guard's estimate of a FLUX VAE decode covers what the decode allocates: peak heap bytes,
//! counted by this binary's allocator, of the tiny fixture VAE (`pipelines/flux_vae`) decoding
//! latents of a few sizes, against `FluxVaeConfig::decode_working_bytes` + `decode_image_bytes`
//! (within 2x, beyond the estimate's 16 MB for small buffers and gemm's per-thread scratch, which
//! is the machine's: its size follows the CPU's L2 cache and thread count).
//!
//! One test in this binary: the counter is process-wide, so no other test may run beside it.

use candle_core::{DType, Device, Tensor};
use magcache_layers::autoencoder_kl::FluxVae;
use magcache_tests::fixture;
use magcache_tests::{heap_peak_of, CountingAlloc};

#[global_allocator]
static A: CountingAlloc = CountingAlloc;

#[test]
fn decode_estimate_covers_the_measured_peak() {
    let vae = FluxVae::load(&fixture("pipelines/flux_vae"), &Device::Cpu, DType::F32).unwrap();
    let c = vae.config.clone();
    let slabs = magcache_layers::footprint::gemm_slabs().0.unwrap() as usize;
    for (h, w) in [(8, 8), (24, 40), (48, 64)] {
        let z = Tensor::randn(0f32, 1f32, (1, c.latent_channels, h, w), &Device::Cpu).unwrap();
        let (peak, img) = heap_peak_of(|| vae.decode_latents(&z).unwrap());
        assert_eq!(img.dims()[1..3], [8 * h, 8 * w]);
        let predicted = (c.decode_working_bytes(h, w, true) + c.decode_image_bytes(h, w))
            .0
            .unwrap() as usize;
        eprintln!(
            "{h}x{w} latents: decode peak {peak} B, predicted {predicted} B ({:.2}x)",
            predicted as f64 / peak as f64
        );
        assert!(
            predicted >= peak && predicted - slabs < 2 * peak + (16 << 20),
            "{h}x{w}: predicted {predicted} B against {peak} B measured"
        );
    }
}
