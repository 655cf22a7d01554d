//! The softmax's exponentials rounded to bf16 in place, for the attention's second bf16 product
//! (on the layers' kernel or oneDNN), on AVX512-BF16 where the CPU has it.

use crate::nn::pointwise::{fast_exp, lanes_max, widest};

/// The exponentials of each `l`-wide row of `sc` (`rows` rows) for a bf16 product, in place: row
/// `r`'s `exp(x - m)`, rounded to bf16, become its `lp` pairs at `u32` offset `r * lp` of the same
/// memory (the low half of each `u32` the even key, zero past `l`), left unnormalised, where `m`
/// is the larger of `max[r]` (a running maximum over earlier keys; `-inf` for none) and the row's
/// own maximum, written back to `max[r]`. Returns each row's sum of the f32 exponentials: the
/// caller normalises the product's output rows instead (`softmax(s) . v = (exp(s - m) . v) /
/// sum`): two passes over the scores and half their bytes written, where normalising in f32 and
/// then rounding took four and wrote them twice (the attention on oneDNN at 4 680 tokens spent
/// more on these passes than on its products).
pub(super) fn exps_to_pairs(
    sc: &mut [f32],
    rows: usize,
    l: usize,
    lp: usize,
    max: &mut [f32],
) -> Vec<f32> {
    use crate::nn::bf16_gemm::bf16_bits;
    const W: usize = 32;
    debug_assert!(sc.len() >= rows * l && 2 * lp >= l && lp <= l.max(1) && max.len() >= rows);
    let base = sc.as_mut_ptr();
    #[cfg(target_arch = "x86_64")]
    let whole_rounding = crate::nn::bf16_gemm::cpu_has_bf16();
    widest(
        #[inline(always)]
        || {
            let mut sums = Vec::with_capacity(rows);
            for (r, running) in max.iter_mut().enumerate().take(rows) {
                // SAFETY: row r's values, not yet written (writes stay below them, see below).
                let row_max = lanes_max(unsafe { std::slice::from_raw_parts(base.add(r * l), l) });
                let m = running.max(row_max);
                *running = m;
                let out = base.cast::<u16>();
                let mut acc = [0f32; W];
                let mut i = 0;
                let mut sum = 0.0;
                // The whole 32-value steps on AVX512-BF16 where the CPU has it.
                #[cfg(target_arch = "x86_64")]
                if whole_rounding {
                    i = l / W * W;
                    // SAFETY: the CPU has the features; the row's first `i` values are read and
                    // its first `i` bf16 values written, each step reading before it writes,
                    // which stays below what it has not read (as below).
                    sum = unsafe { exps_row_bf16(base.add(r * l), out.add(2 * r * lp), i, m) };
                }
                // SAFETY: values `r * l + i ..` are copied out before bf16 values `2 * r * lp +
                // i ..` are written, and `2 * r * lp + i + W` bf16 (2 bytes) end at or before the
                // f32 (4 bytes) `r * l + i + W` as `lp <= l`: no write reaches a value unread.
                unsafe {
                    while i + W <= l {
                        let mut e = [0f32; W];
                        std::ptr::copy_nonoverlapping(base.add(r * l + i), e.as_mut_ptr(), W);
                        let mut b = [0u16; W];
                        for t in 0..W {
                            e[t] = fast_exp(e[t] - m);
                            acc[t] += e[t];
                            b[t] = bf16_bits(e[t]);
                        }
                        std::ptr::copy_nonoverlapping(b.as_ptr(), out.add(2 * r * lp + i), W);
                        i += W;
                    }
                    sum += acc.iter().sum::<f32>();
                    for i in i..2 * lp {
                        let e = if i < l {
                            fast_exp(*base.add(r * l + i) - m)
                        } else {
                            0.0
                        };
                        sum += e;
                        *out.add(2 * r * lp + i) = bf16_bits(e);
                    }
                    sums.push(sum);
                }
            }
            sums
        },
    )
}

/// [`exps_to_pairs`]' whole steps on one row: `exp(x - m)` of the `n` (a multiple of 32) values
/// from `src`, rounded to bf16 (`vcvtne2ps2bf16`, 32 values an instruction, round to nearest
/// even) into the `n` bf16 values from `out`; returns their f32 sum. The exponential is
/// [`fast_exp`]'s, its polynomial on fused multiply-adds. `out` may be `src`'s own memory at or
/// below it (each step loads its 32 values before it stores 64 bytes, which end at or before
/// them).
///
/// # Safety
/// The CPU has AVX-512F and AVX512-BF16; `src` holds `n` values and `out` `n` bf16 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn exps_row_bf16(src: *const f32, out: *mut u16, n: usize, m: f32) -> f32 {
    use std::arch::x86_64::*;
    let shift = _mm512_set1_ps(m);
    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i < n {
        // SAFETY: within the caller's `n` values and bf16 values.
        unsafe {
            let lo = exp16(_mm512_sub_ps(_mm512_loadu_ps(src.add(i)), shift));
            let hi = exp16(_mm512_sub_ps(_mm512_loadu_ps(src.add(i + 16)), shift));
            acc0 = _mm512_add_ps(acc0, lo);
            acc1 = _mm512_add_ps(acc1, hi);
            // The second operand fills the low half: `lo`'s 16 values first, in order.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.add(i).cast(), v);
        }
        i += 32;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

/// `exp(x - m)` of the `n` (a multiple of 16) values at `x`, in place, on 16 lanes a step;
/// returns their f32 sum (the f32 attention's rows: `attention::exp_rows`).
///
/// # Safety
/// The CPU has AVX-512F; `x` holds `n` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exps_row_f32(x: *mut f32, n: usize, m: f32) -> f32 {
    use std::arch::x86_64::*;
    let shift = _mm512_set1_ps(m);
    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i < n {
        // SAFETY: within the caller's `n` values.
        unsafe {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x.add(i)), shift));
            _mm512_storeu_ps(x.add(i), e);
            if i % 32 == 0 {
                acc0 = _mm512_add_ps(acc0, e);
            } else {
                acc1 = _mm512_add_ps(acc1, e);
            }
        }
        i += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

/// [`fast_exp`] on 16 lanes (the polynomial's steps fused: within an f32 rounding of it; a NaN
/// stays a NaN).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) fn exp16(z: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const ROUND: f32 = 12_582_912.0;
    let c = _mm512_set1_ps;
    // `max` and `min` return their second operand where either is NaN: `z`.
    let z = _mm512_min_ps(c(88.0), _mm512_max_ps(c(-87.0), z));
    let k = _mm512_fmadd_ps(z, c(std::f32::consts::LOG2_E), c(ROUND));
    let n = _mm512_sub_ps(k, c(ROUND));
    let r = _mm512_fnmadd_ps(
        n,
        c(1.428_606_8e-6),
        _mm512_fnmadd_ps(n, c(0.693_145_75), z),
    );
    let mut p = c(1.0 / 720.0);
    for coef in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, c(coef));
    }
    let bits = _mm512_sub_epi32(
        _mm512_castps_si512(k),
        _mm512_set1_epi32(ROUND.to_bits() as i32),
    );
    let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
        bits,
        _mm512_set1_epi32(127),
    )));
    _mm512_mul_ps(scale, p)
}
