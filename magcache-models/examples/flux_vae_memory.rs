//! Peak memory and time of a FLUX VAE decode at a real size (issue 30).
//!
//!     cargo run --release -p magcache-models --example flux_vae_memory -- VAE_DIR H W [tiled]
//!
//! `VAE_DIR`: an `AutoencoderKL` folder (`config.json` + weights; random weights at the released
//! config are enough: `scripts/flux-vae-random.py` writes one); `H`, `W`: latent sizes (2048x2048
//! pixels = 256x256); `tiled`: diffusers' `enable_tiling()` (tiles of the config's `sample_size`),
//! as `[vae] tiling = true`. Prints the size guard's estimate, the process's peak RSS (Linux
//! `VmHWM`) after loading and after the decode, and the wall time.
use candle_core::{DType, Device, Tensor};
use magcache_layers::autoencoder_kl::{FluxTiling, FluxVae};
use std::time::Instant;

/// The process's peak resident memory (Linux `VmHWM`), GB.
fn hwm_gb() -> f64 {
    magcache_core::runtime::progress::peak_rss_bytes().map_or(f64::NAN, |b| b as f64 / 1e9)
}

fn main() -> magcache_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        return Err(magcache_core::Error::msg(
            "usage: flux_vae_memory VAE_DIR H W [tiled]",
        ));
    };
    let tiled = args.iter().any(|a| a == "tiled");
    let a: Vec<usize> = args.iter().skip(1).filter_map(|s| s.parse().ok()).collect();
    let (h, w) = (
        a.first().copied().unwrap_or(128),
        a.get(1).copied().unwrap_or(128),
    );
    let mut vae = FluxVae::load(std::path::Path::new(dir), &Device::Cpu, DType::F32)?;
    let c = vae.config.clone();
    let tiling = tiled.then(|| FluxTiling::of_config(&c));
    vae.set_tiling(tiling)?;
    let (eh, ew) = match tiling.filter(|t| t.tiles_latents(&c, h, w)) {
        Some(t) => (h.min(t.latent_min(&c)), w.min(t.latent_min(&c))),
        None => (h, w),
    };
    let gb = |s: magcache_layers::footprint::Sz| s.0.unwrap_or(u64::MAX) as f64 / 1e9;
    println!(
        "predicted: weights {:.2} + working set {:.2} ({eh}x{ew} latents) + image {:.2} GB",
        gb(c.params() * magcache_layers::footprint::sz(4)),
        gb(c.decode_working_bytes(eh, ew, true)),
        gb(c.decode_image_bytes(h, w)),
    );
    let z = Tensor::randn(0f32, 1f32, (1, c.latent_channels, h, w), &Device::Cpu)?;
    println!("loaded: peak {:.2} GB", hwm_gb());
    let t = Instant::now();
    let out = vae.decode_latents(&z)?;
    println!(
        "decode {h}x{w} -> {:?}: {:.1} s, peak {:.2} GB",
        out.dims(),
        t.elapsed().as_secs_f64(),
        hwm_gb()
    );
    Ok(())
}
