//! One task of the fused bf16 attention on AMX's tiles (the layers' own kernel,
//! `bf16_gemm::amx`): [`AMX_QUERIES`] queries over all keys, [`KEYS`] keys at a time, the softmax
//! carried from block to block (FlashAttention's running maximum and sum), so that a block's
//! scores, its probabilities and the task's output stay in the core's L2 (the whole rows of scores
//! of the AVX512-BF16 path's 128 queries at 4 680 keys are 2.4 MB, more than the 2 MB L2 of the
//! AMX Xeon measured) and the probabilities are the second product's operand where they lie.

use super::{divide_rows, exps_to_pairs};
use crate::nn::bf16_gemm::{amx::with_rows, pairs_into, PackedBf16};
use crate::nn::pointwise::fast_exp;

/// Queries per task on AMX: two blocks of 32 rows, each block of keys' and values' tiles loaded
/// once for both.
pub(super) const AMX_QUERIES: usize = 64;

/// Keys per block: 64 x 512 f32 scores (128 KB) and their bf16 pairs in the same place.
const KEYS: usize = 512;

/// `o = softmax(qs . k^T) . v` for `rows` (at most [`AMX_QUERIES`]) queries `qs` (`rows x d`
/// f32, already scaled), `pk` the keys packed for AMX (`[l, d]`) and `pv` the values transposed
/// (`[d, l]`); `false` (nothing done) where they are not packed for AMX's tiles.
pub(super) fn attend_rows_amx(
    qs: &[f32],
    (pk, pv): &(PackedBf16, PackedBf16),
    o: &mut [f32],
    rows: usize,
) -> bool {
    let (Some(k), Some(v)) = (pk.amx_packed(), pv.amx_packed()) else {
        return false;
    };
    let (l, d) = (pk.n(), pk.k());
    let (dq, dpad, r32) = (
        k.row_pairs(),
        d.next_multiple_of(32),
        rows.next_multiple_of(32),
    );
    // The task's buffers, each on a 64-byte line: q as pairs, a block's scores, the output.
    let (qn, sn) = (r32 * dq, r32 * KEYS);
    with_rows(qn + sn + r32 * dpad, |buf| {
        let (q16, rest) = buf.split_at_mut(qn);
        let (scores, out) = rest.split_at_mut(sn);
        q16.fill(0);
        pairs_into(qs, (rows, d), (q16, dq), 1);
        let (scores, out) = (as_f32(scores), as_f32(out));
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut before = vec![f32::NEG_INFINITY; rows];
        let mut sums = vec![0f32; rows];
        for (b, j0) in (0..l).step_by(KEYS).enumerate() {
            // `w` keys, their panels of 32 (`wb`): the keys past `l` masked (`-inf`).
            let w = KEYS.min(l - j0);
            let wb = w.next_multiple_of(32);
            let s = &mut scores[..r32 * wb];
            let panels = j0 / 32..(j0 + wb) / 32;
            if !k.tile_product((q16, dq, r32), panels, (0, dq / 16), (s, wb), false) {
                return false;
            }
            for row in s.chunks_mut(wb).take(rows) {
                row[w..].fill(f32::NEG_INFINITY);
            }
            before.copy_from_slice(&max);
            let block_sums = exps_to_pairs(s, rows, wb, wb / 2, &mut max);
            if b == 0 {
                sums = block_sums;
            } else {
                for (r, row) in out.chunks_mut(dpad).take(rows).enumerate() {
                    let scale = fast_exp(before[r] - max[r]);
                    sums[r] = sums[r] * scale + block_sums[r];
                    row.iter_mut().for_each(|x| *x *= scale);
                }
            }
            // The pairs of the block's probabilities: `wb / 2` a row from the scores' start (the
            // rows past `rows` hold leftovers; their outputs are never read).
            let p = as_u32(&s[..r32 * wb / 2]);
            let steps = (j0 / 2, wb / 32);
            if !v.tile_product((p, wb / 2, r32), 0..dpad / 32, steps, (out, dpad), b > 0) {
                return false;
            }
        }
        for (o, row) in o.chunks_mut(d).zip(out.chunks(dpad)) {
            o.copy_from_slice(&row[..d]);
        }
        divide_rows(o, d, &sums);
        true
    })
}

/// `u32`s as the f32s of the same bits (one size and alignment; any bits are an f32).
fn as_f32(v: &mut [u32]) -> &mut [f32] {
    // SAFETY: as the doc says; the borrow moves into the result.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<f32>(), v.len()) }
}

/// f32s as the `u32`s of their bits.
fn as_u32(v: &[f32]) -> &[u32] {
    // SAFETY: one size and alignment; any bits are a `u32`.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u32>(), v.len()) }
}
