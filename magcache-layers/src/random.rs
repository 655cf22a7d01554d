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

/// [`randn`] for a run's random input, whose shape the run file's `key` sets: the tensor's size is
/// checked against the available memory before anything is allocated (the size guard, see
/// [`magcache_core::runtime::guard`]), and every error names `file` and `key`.
pub fn randn_for(file: &str, key: &str, seed: u64, shape: &[usize]) -> Result<Tensor> {
    let mut fp = magcache_core::runtime::guard::Footprint::default();
    fp.add(
        format!("random tensor of shape {shape:?} (f32)"),
        key,
        magcache_core::runtime::guard::product(shape).and_then(|n| n.checked_mul(4)),
    );
    fp.check(file)?;
    randn(seed, shape).map_err(|e| magcache_core::Error::config(file, key, e.to_string()))
}

/// Uniform samples in `[-a, a]` (fast; used for large random weights).
pub fn uniform(seed: u64, shape: &[usize], a: f32) -> Result<Tensor> {
    let n = elems(shape)?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    // `gen::<f32>()` (uniform in [0, 1)) is far cheaper than `gen_range` per element.
    let v: Vec<f32> = (0..n).map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * a).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// The dtype a preset stores a tensor in: linear (and conv) weights in the run's `dtype`; norm
/// scales, biases and modulation tables in f32.
pub fn random_dtype(name: &str, shape: &[usize], dtype: candle_core::DType) -> candle_core::DType {
    let f32_kept = name.ends_with("scale_shift_table")
        || (shape.len() == 1 && name.ends_with(".weight"))
        || name.ends_with(".bias");
    if f32_kept {
        candle_core::DType::F32
    } else {
        dtype
    }
}

/// One preset tensor: 1-D `*.weight` (norm scales) ones, biases zeros, `*scale_shift_table`
/// `randn / sqrt(d)`, other tensors uniform with std `1/sqrt(fan_in)` in `dtype`; seeded by `seed` and
/// the name, so it is the same whichever tensors are generated before it.
pub fn random_tensor(
    seed: u64,
    name: &str,
    shape: &[usize],
    d: usize,
    dtype: candle_core::DType,
) -> Result<Tensor> {
    use candle_core::DType;
    let s = sub_seed(seed, name);
    Ok(if name.ends_with("scale_shift_table") {
        (randn(s, shape)? / (d as f64).sqrt())?
    } else if shape.len() == 1 && name.ends_with(".weight") {
        Tensor::ones(shape, DType::F32, &Device::Cpu)?
    } else if name.ends_with(".bias") {
        Tensor::zeros(shape, DType::F32, &Device::Cpu)?
    } else {
        let fan_in: usize = shape[1..].iter().product();
        uniform(s, shape, (3.0 / fan_in.max(1) as f32).sqrt())?.to_dtype(dtype)?
    })
}

/// Random weights for a list of `(name, shape)` ([`random_tensor`]), converted tensor by tensor, so
/// a bf16 preset never holds its f32 weights whole.
pub fn random_store(
    seed: u64,
    shapes: Vec<(String, Vec<usize>)>,
    d: usize,
    dtype: candle_core::DType,
) -> Result<crate::weights::WeightStore> {
    let mut map = std::collections::HashMap::new();
    for (name, shape) in shapes {
        let t = random_tensor(seed, &name, &shape, d, dtype)?;
        map.insert(name, t);
    }
    Ok(crate::weights::WeightStore::from_map("(random init)", map))
}

/// A preset's transformer as [`magcache_core::GeneratedWeights`]: the same tensors
/// [`random_store`] builds, generated one at a time when written.
pub fn generated(
    folder: &str,
    config: serde_json::Map<String, serde_json::Value>,
    seed: u64,
    shapes: Vec<(String, Vec<usize>)>,
    d: usize,
    dtype: candle_core::DType,
) -> magcache_core::GeneratedWeights {
    magcache_core::GeneratedWeights {
        folder: folder.to_string(),
        config,
        tensors: shapes
            .into_iter()
            .map(|(n, s)| {
                let dt = random_dtype(&n, &s, dtype);
                (n, s, dt)
            })
            .collect(),
        generate: Box::new(move |name, shape| random_tensor(seed, name, shape, d, dtype)),
    }
}
