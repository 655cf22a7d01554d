//! What the product tests share: an f64 reference for `x W^T + b`, and the largest absolute value.
// Each test binary uses part of these.
#![allow(dead_code)]

use magcache_layers::nn::bf16_gemm::bf16_bits;
use magcache_layers::nn::onednn::{self, OneDnn, State};
use proptest::prelude::*;

/// `v` rounded to bf16 as the kernels round it, widened to f64.
pub fn rounded(v: f32) -> f64 {
    f64::from(f32::from_bits(u32::from(bf16_bits(v)) << 16))
}

/// `got [m, n]` (row-major) against the f64 product of `x [m, k]` and `w [n, k]` (values through
/// `round`) plus `bias`, within f32 accumulation error.
pub fn check_product(
    got: &[f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    round: fn(f32) -> f64,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), m * n);
    for r in 0..m {
        for c in 0..n {
            let mut want = bias.map_or(0.0, |b| f64::from(b[c]));
            let mut scale = want.abs();
            for j in 0..k {
                let p = round(x[r * k + j]) * round(w[c * k + j]);
                want += p;
                scale += p.abs();
            }
            let d = (f64::from(got[r * n + c]) - want).abs();
            prop_assert!(
                d <= 1e-5 * scale + 1e-6,
                "[{m}x{k}] x [{n}x{k}]^T at ({r}, {c}): {} against {want}",
                got[r * n + c]
            );
        }
    }
    Ok(())
}

/// The largest absolute value of a tensor (the attention tests' error and scale).
pub fn largest_abs(t: &candle_core::Tensor) -> f32 {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// The oneDNN named by `MAGCACHE_TEST_ONEDNN` (or `MAGCACHE_ONEDNN`); `None`, with a printed note,
/// where none is named.
pub fn library() -> Option<&'static OneDnn> {
    let spec = std::env::var("MAGCACHE_TEST_ONEDNN")
        .or_else(|_| std::env::var(onednn::ENV))
        .ok();
    if spec.is_none() {
        eprintln!(
            "note: no oneDNN named (MAGCACHE_TEST_ONEDNN or MAGCACHE_ONEDNN, a libdnnl.so.3): oneDNN products are not tested"
        );
        return None;
    }
    match onednn::init(spec.as_deref()) {
        State::Loaded(d) => Some(d),
        State::Failed(e) => panic!("{e}"),
        State::Off => None,
    }
}
