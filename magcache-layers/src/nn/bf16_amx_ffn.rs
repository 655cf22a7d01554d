//! A feed-forward's two products on AMX's tiles with its hidden activations as bf16 pairs between
//! them: the first product's blocks of outputs get the bias and the GELU on a scratch tile and are
//! rounded straight into the second product's rows of pairs, so the `[tokens, hidden]`
//! activations are never written in f32, read back and rounded (at 4 680 Wan tokens: 168 MB
//! written, 168 MB read and 84 MB written a block). The same bits as the two products apart: the
//! first product takes its whole input in one block of pairs (its accumulators stay on the tiles,
//! where apart they are stored and reloaded between blocks: exact either way), then the
//! epilogue's function, then the rounding the second product gives its input (to nearest even).

use super::super::{bf16_bits, Epilogue, SendPtr};
use super::{split_panels, tiles, usable, Lines, PackedAmx, Scratch, NB, NR, STEP};

/// `(gelu(x w1^T + b1)) w2^T + b2` for `x [m, k]` (f32): `None` where either weight is not
/// packed for AMX's tiles or their sizes do not chain.
pub(crate) fn feed_forward(
    (w1, b1): (&PackedAmx, Option<&[f32]>),
    (w2, b2): (&PackedAmx, Option<&[f32]>),
    x: &[f32],
    m: usize,
    threads: usize,
) -> Option<Vec<f32>> {
    let chains = w2.k == w1.n && x.len() == m * w1.k;
    let biases = b1.is_none_or(|b| b.len() == w1.n) && b2.is_none_or(|b| b.len() == w2.n);
    if !usable() || !chains || !biases || m == 0 || w1.kp == 0 || w2.kp == 0 {
        return None;
    }
    let m32 = m.next_multiple_of(32);
    let mut a = Lines::zeroed(m32 * w1.kp);
    super::super::bf16_pairs::pairs_into(x, (m, w1.k), (a.as_mut_slice(), w1.kp), threads);
    // The hidden rows, padded with zero pairs to the second weight's pairs and to 32 rows.
    let mut hidden = Lines::zeroed(m32 * w2.kp);
    let epi = Epilogue {
        bias: b1,
        gelu: true,
    };
    let out = SendPtr(hidden.as_mut_slice().as_mut_ptr().cast::<f32>());
    let a = a.as_slice();
    split_panels(w1.n.div_ceil(NR), threads, |range| {
        // SAFETY: AMX is usable; tasks write disjoint pairs (their panels' columns) of the
        // hidden rows; every tile stays inside `a`, the weight and the scratch tile.
        unsafe { first_product(w1, a, m, range, out.get().cast::<u32>(), (w2.kp, epi)) };
    });
    let mut c = vec![0f32; m * w2.n];
    let epi = Epilogue {
        bias: b2,
        gelu: false,
    };
    // SAFETY: f32 and `MaybeUninit<f32>` have one layout; only f32 values are written.
    let cu = unsafe { &mut *(c.as_mut_slice() as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
    w2.rows(hidden.as_slice(), m, cu, threads, epi);
    Some(c)
}

/// Panels `range` of `w1`'s product of the `m` rows `a` (padded to 32), each 32 x 32 block with
/// all of its input pairs on the tiles, `epi` on a scratch copy, its rows rounded to 16 pairs of
/// `hidden` (a row every `kp2` pairs) where the rows are `m`'s.
///
/// # Safety
/// AMX is usable; `a` holds `m` rows padded to 32 of `w1.kp` pairs, `hidden` `m` rows of `kp2 >=
/// 16 * panels` pairs.
#[cfg(target_arch = "x86_64")]
unsafe fn first_product(
    w1: &PackedAmx,
    a: &[u32],
    m: usize,
    range: std::ops::Range<usize>,
    hidden: *mut u32,
    (kp2, epi): (usize, Epilogue<'_>),
) {
    let mut scratch = Scratch([0f32; 32 * 32]);
    let s = scratch.0.as_mut_ptr();
    // Whole rows of 32 on `vcvtne2ps2bf16`, as the second product's own rounding of its input
    // takes them (`bf16_pairs`): the same bits, NaNs included.
    let vector = super::super::cpu_has_bf16();
    // SAFETY (the block): the caller's guarantee; the scratch tile holds 32 x 32 f32.
    unsafe {
        tiles::configure();
        for g0 in range.clone().step_by(NB) {
            for r0 in (0..m).step_by(32) {
                let rows = 32.min(m - r0);
                for p in g0..(g0 + NB).min(range.end) {
                    let block = tiles::Block {
                        a: a.as_ptr().add(r0 * w1.kp),
                        lda: w1.kp * 4,
                        b: w1.data.as_slice().as_ptr().add(p * w1.kp * NR),
                        steps: w1.kp / STEP,
                    };
                    block.run(s, 32 * 4, false);
                    let cols = NR.min(w1.n - p * NR);
                    epi.apply(s, (rows, 32), p * NR, cols);
                    for r in 0..rows {
                        let src = std::slice::from_raw_parts(s.add(r * 32), cols);
                        let dst = hidden.add((r0 + r) * kp2 + p * NR / 2);
                        if cols == NR && vector {
                            round32(src.as_ptr(), dst);
                            continue;
                        }
                        for (j, pair) in src.chunks(2).enumerate() {
                            let hi = pair.get(1).map_or(0, |&v| bf16_bits(v) as u32);
                            *dst.add(j) = bf16_bits(pair[0]) as u32 | (hi << 16);
                        }
                    }
                }
            }
        }
        tiles::release();
    }
}

/// 32 values from `src` rounded to 16 bf16 pairs at `dst` (`vcvtne2ps2bf16`, to nearest even).
///
/// # Safety
/// The CPU has AVX-512F and AVX512-BF16; `src` holds 32 values and `dst` 16 pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round32(src: *const f32, dst: *mut u32) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's guarantee.
    unsafe {
        let lo = _mm512_loadu_ps(src);
        let hi = _mm512_loadu_ps(src.add(16));
        // The second operand fills the low half: `lo`'s 16 values first, in order.
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.cast(), v);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn first_product(
    _: &PackedAmx,
    _: &[u32],
    _: usize,
    _: std::ops::Range<usize>,
    _: *mut u32,
    _: (usize, Epilogue<'_>),
) {
    unreachable!("AMX runs on x86_64 only")
}
