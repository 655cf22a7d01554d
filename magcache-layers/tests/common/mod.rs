//! What the product tests share: an f64 reference for `x W^T + b`, and the largest absolute value.

use magcache_layers::nn::bf16_gemm::bf16_bits;
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
