//! Peak memory and time of the Wan VAE decode at a real size, random weights (issue 30).
//!
//!     cargo run --release -p magcache-models --example vae_memory -- LATENT_FRAMES H W [tiled]
//!
//! `H`, `W` are latent sizes (480x832 pixels = 60x104); `tiled`: diffusers' default tiles (256
//! pixels, one every 192), as `[vae] tiling = true`. Prints the process's peak RSS before and
//! after the decode (Linux `VmHWM`) and the wall time.
use candle_core::{DType, Device, Tensor};
use magcache_layers::autoencoder_kl_wan::{VaeTiling, WanVae, WanVaeConfig};
use std::time::Instant;

/// The process's peak resident memory (Linux `VmHWM`), GB.
fn hwm_gb() -> f64 {
    magcache_core::runtime::progress::peak_rss_bytes().map_or(f64::NAN, |b| b as f64 / 1e9)
}

fn main() -> magcache_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tiling = args.iter().any(|a| a == "tiled").then(VaeTiling::default);
    let a: Vec<usize> = args.iter().filter_map(|s| s.parse().ok()).collect();
    let (f, h, w) = (
        a.first().copied().unwrap_or(3),
        a.get(1).copied().unwrap_or(60),
        a.get(2).copied().unwrap_or(104),
    );
    let cfg = WanVaeConfig::from_json(&serde_json::json!({}), "(released defaults)")?;
    let p = cfg.decode_bytes_tiled(f, h, w, 4, tiling, true);
    let gb = |s: magcache_layers::footprint::Sz| s.0.unwrap_or(u64::MAX) as f64 / 1e9;
    println!(
        "predicted: weights {:.2} + max(cache {:.2} + working {:.2} + video {:.2} + tiles {:.2}, join {:.2}) = {:.2} GB",
        gb(p.weights),
        gb(p.cache),
        gb(p.working),
        gb(p.video),
        gb(p.tiles),
        gb(p.join),
        gb(p.total())
    );
    let mut vae = WanVae::random(cfg, 0, &Device::Cpu, DType::F32)?;
    vae.set_tiling(tiling)?;
    let z = Tensor::randn(0f32, 1f32, (1, 16, f, h, w), &Device::Cpu)?;
    println!("loaded: peak {:.2} GB", hwm_gb());
    let t = Instant::now();
    let out = vae.decode(&z)?;
    println!(
        "decode {f}x{h}x{w} -> {:?}: {:.1} s, peak {:.2} GB",
        out.dims(),
        t.elapsed().as_secs_f64(),
        hwm_gb()
    );
    Ok(())
}
