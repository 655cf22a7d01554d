//! The size guard's estimate of a FLUX VAE decode covers what the decode allocates: peak heap bytes,
//! counted by this binary's allocator, of the tiny fixture VAE (`pipelines/flux_vae`) decoding
//! latents of a few sizes, against `FluxVaeConfig::decode_working_bytes` + `decode_image_bytes`
//! (within 2x, beyond the estimate's 16 MB for small buffers).
//!
//! One test in this binary: the counter is process-wide, so no other test may run beside it.

use candle_core::{DType, Device, Tensor};
use magcache_models::flux::vae::FluxVae;
use magcache_tests::fixture;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

fn peak_of<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (PEAK.load(Ordering::Relaxed) - base, out)
}

#[test]
fn decode_estimate_covers_the_measured_peak() {
    let vae = FluxVae::load(&fixture("pipelines/flux_vae"), &Device::Cpu, DType::F32).unwrap();
    let c = vae.config.clone();
    for (h, w) in [(8, 8), (24, 40), (48, 64)] {
        let z = Tensor::randn(0f32, 1f32, (1, c.latent_channels, h, w), &Device::Cpu).unwrap();
        let (peak, img) = peak_of(|| vae.decode_latents(&z).unwrap());
        assert_eq!(img.dims()[1..3], [8 * h, 8 * w]);
        let predicted = (c.decode_working_bytes(h, w, true) + c.decode_image_bytes(h, w))
            .0
            .unwrap() as usize;
        eprintln!(
            "{h}x{w} latents: decode peak {peak} B, predicted {predicted} B ({:.2}x)",
            predicted as f64 / peak as f64
        );
        assert!(
            predicted >= peak && predicted < 2 * peak + (16 << 20),
            "{h}x{w}: predicted {predicted} B against {peak} B measured"
        );
    }
}
