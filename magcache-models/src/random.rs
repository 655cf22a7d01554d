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

/// Elements of `shape`; an error (not an overflow) for sizes no memory holds.
fn elems(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| {
            magcache_core::Error::msg(format!("random tensor of shape {shape:?} is too large"))
        })
}

/// Standard normal samples (Box-Muller).
pub fn randn(seed: u64, shape: &[usize]) -> Result<Tensor> {
    let n = elems(shape)?;
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
    let n = elems(shape)?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    // `gen::<f32>()` (uniform in [0, 1)) is far cheaper than `gen_range` per element.
    let v: Vec<f32> = (0..n).map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * a).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Random weights for a list of `(name, shape)`: 1-D `*.weight` (norm scales) ones, biases zeros,
/// `*scale_shift_table` `randn / sqrt(d)`, other tensors uniform with std `1/sqrt(fan_in)`, stored in
/// `dtype` (converted tensor by tensor, so a bf16 preset never holds its f32 weights whole).
pub fn random_store(
    seed: u64,
    shapes: Vec<(String, Vec<usize>)>,
    d: usize,
    dtype: candle_core::DType,
) -> Result<crate::weights::WeightStore> {
    use candle_core::DType;
    let mut map = std::collections::HashMap::new();
    for (name, shape) in shapes {
        let s = sub_seed(seed, &name);
        let t = if name.ends_with("scale_shift_table") {
            (randn(s, &shape)? / (d as f64).sqrt())?
        } else if shape.len() == 1 && name.ends_with(".weight") {
            Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu)?
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu)?
        } else {
            let fan_in: usize = shape[1..].iter().product();
            uniform(s, &shape, (3.0 / fan_in.max(1) as f32).sqrt())?.to_dtype(dtype)?
        };
        map.insert(name, t);
    }
    Ok(crate::weights::WeightStore::from_map("(random init)", map))
}
