//! Seeded random tensors for presets (random init at real sizes) and random inputs.

use candle_core::{Device, Tensor};
use magcache_core::Result;
use rand::{Rng, SeedableRng};

/// A seed derived from a base seed and a name, so every tensor gets its own stream.
pub fn sub_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the seed.
    let mut h: u64 = 0xcbf29ce484222325 ^ seed.wrapping_mul(0x9E3779B97F4A7C15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Standard normal samples (Box-Muller).
pub fn randn(seed: u64, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let u1: f32 = rng.gen::<f32>().max(f32::MIN_POSITIVE);
        let u2: f32 = rng.gen();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = std::f32::consts::TAU * u2;
        v.push(r * th.cos());
        if v.len() < n {
            v.push(r * th.sin());
        }
    }
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Uniform samples in `[-a, a]` (fast; used for large random weights).
pub fn uniform(seed: u64, shape: &[usize], a: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-a..=a)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}
