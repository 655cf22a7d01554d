//! Activations rounded to bf16 pairs for the products: `vcvtne2ps2bf16`, 32 values an
//! instruction, where the CPU has AVX512-BF16; one pair at a time elsewhere.

use super::{bf16_bits, cpu_has_bf16};

/// `x [m, k]` as bf16 pairs `[m, kp]`: the low half of each `u32` the even feature, the high half
/// the odd one (zero past `k`).
pub(in crate::nn) fn pairs(x: &[f32], m: usize, k: usize, kp: usize, threads: usize) -> Vec<u32> {
    let mut a = vec![0u32; m * kp];
    pairs_into(x, (m, k), (&mut a, kp), threads);
    a
}

/// [`pairs`] into the first `m` rows of `out`, a row every `stride` pairs (at least
/// `ceil(k / 2)`; the pairs past `ceil(k / 2)` in each row are left as they are).
pub(in crate::nn) fn pairs_into(
    x: &[f32],
    (m, k): (usize, usize),
    (out, stride): (&mut [u32], usize),
    threads: usize,
) {
    let fast = cpu_has_bf16();
    let kp = k.div_ceil(2);
    let out = &mut out[..m * stride];
    let convert = |rows: &mut [u32], r0: usize| {
        for (i, row) in rows.chunks_mut(stride.max(1)).enumerate() {
            let row = &mut row[..kp];
            let src = &x[(r0 + i) * k..(r0 + i + 1) * k];
            // 32 values (16 pairs) at a time with `vcvtne2ps2bf16`, the same rounding as
            // [`bf16_bits`]; the tail one pair at a time.
            let whole = if fast { (k / 32) * 16 } else { 0 };
            // SAFETY: `convert_row` reads `2 * whole <= k` values of `src` and writes `whole <= kp`
            // pairs of `row`; it runs only where the CPU has the instructions (`whole` is 0
            // elsewhere).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                convert_row(src, &mut row[..whole])
            };
            #[cfg(not(target_arch = "x86_64"))]
            let whole = 0;
            for (q, out) in row.iter_mut().enumerate().skip(whole) {
                let lo = bf16_bits(src[2 * q]) as u32;
                let hi = src.get(2 * q + 1).map_or(0, |&v| bf16_bits(v) as u32);
                *out = lo | (hi << 16);
            }
        }
    };
    if threads > 1 && m * k >= 1 << 16 {
        let rows = m.div_ceil(threads);
        rayon::scope(|s| {
            for (t, chunk) in out.chunks_mut(rows * stride).enumerate() {
                s.spawn(move |_| convert(chunk, t * rows));
            }
        });
    } else {
        convert(out, 0);
    }
}

/// `out.len()` pairs (a multiple of 16) of `src` rounded to bf16, 32 values at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert_row(src: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::*;
    for (j, chunk) in out.chunks_exact_mut(16).enumerate() {
        let lo = _mm512_loadu_ps(src.as_ptr().add(32 * j));
        let hi = _mm512_loadu_ps(src.as_ptr().add(32 * j + 16));
        // The second operand fills the low half: `lo`'s 16 values first, in order.
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(chunk.as_mut_ptr() as *mut __m512i, v);
    }
}
