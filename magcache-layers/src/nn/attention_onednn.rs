//! The fused attention's bf16 products on oneDNN (AMX's tiles where the CPU has them): its blocks
//! of queries and keys, and one task's products with the softmax carried from block to block.

use super::{divide_rows, exps_to_pairs, query_blocks, Io, OneDnnBlocks, QUERY_BLOCK};
use crate::nn::pointwise::{fast_exp, widest};
use magcache_core::Result;

/// The scores one task of the CPU attention over `l` keys holds, `(queries, keys)`:
/// [`QUERY_BLOCK`] queries by all `l` keys (f32), or, where the bf16 products run on oneDNN, its
/// block of queries by its block of keys ([`onednn_blocks`]: `MAGCACHE_ONEDNN_QUERY_ROWS` and
/// `MAGCACHE_ONEDNN_KEY_ROWS` included), whichever holds more (for the size guard's estimate).
/// Where the keys come in several blocks, a task also holds its queries' partial output,
/// `rows x head width`: counted as [`PARTIAL_WIDTH`] more columns.
pub(crate) fn cpu_task_scores(l: usize) -> (usize, usize) {
    let f32_task = (QUERY_BLOCK, l);
    if !crate::nn::onednn::bf16_products() {
        return f32_task;
    }
    let (qb, kb) = onednn_blocks(l, OneDnnBlocks::default());
    let cols = if kb < l { kb + PARTIAL_WIDTH } else { kb };
    match qb * cols > f32_task.0 * f32_task.1 {
        true => (qb, cols),
        false => f32_task,
    }
}

/// The widest head [`cpu_task_scores`] counts a partial output for (every family here: 128).
const PARTIAL_WIDTH: usize = 256;

/// Bytes of one task's scores in the attention on oneDNN: its blocks of queries are as many as
/// keep `rows x keys` f32 scores (one block of keys) within this (one core's L2 on the AMX Xeons
/// measured), between 64 and 512 rows.
const ONEDNN_SCORES_BYTES: usize = 2 << 20;

/// Keys per product of the attention on oneDNN where `MAGCACHE_ONEDNN_KEY_ROWS` is unset: a
/// sequence of more keys runs its products on blocks of this many
/// ([`OneDnnBlocks::key_rows`]). Measured on a Zen 5 (oneDNN's AVX512-BF16 product):
/// docs/benchmarks.md.
pub const ONEDNN_KEY_ROWS: usize = usize::MAX;

/// The attention on oneDNN's `(queries per task, keys per product)` over `l` keys: `blocks`'
/// fields where set, else the variables' (`MAGCACHE_ONEDNN_QUERY_ROWS`,
/// `MAGCACHE_ONEDNN_KEY_ROWS`), else [`ONEDNN_KEY_ROWS`] keys and as many queries as keep their
/// scores within [`ONEDNN_SCORES_BYTES`] (a multiple of 16, AMX's tile rows: 512 at 720 keys,
/// 112 at 4 680). Keys per product: all `l` where the setting is at least `l`; else as few
/// blocks as the setting rounded down to a multiple of 32 (32 at least) allows, each that count's
/// share rounded up to a multiple of 32 (bf16 pairs in whole 64-byte lines) but the last, which
/// holds the rest: 4 680 keys in blocks of at most 512 are 9 of 480 and one of 360; 301 in blocks
/// of at most 100, three of 96 and one of 13.
fn onednn_blocks(l: usize, blocks: OneDnnBlocks) -> (usize, usize) {
    let l = l.max(1);
    let kb = blocks
        .key_rows
        .or_else(crate::nn::onednn::key_rows)
        .unwrap_or(ONEDNN_KEY_ROWS)
        .max(1);
    let kb = match kb >= l {
        true => l,
        false => {
            let most = (kb / 32 * 32).max(32);
            l.div_ceil(l.div_ceil(most)).next_multiple_of(32).min(l)
        }
    };
    let qb = blocks
        .query_rows
        .or_else(crate::nn::onednn::query_rows)
        .unwrap_or_else(|| (ONEDNN_SCORES_BYTES / (4 * kb) / 16 * 16).clamp(64, 512));
    (qb.max(1), kb)
}

/// The fused attention with both products on oneDNN in bf16: q, k and v rounded to bf16 once;
/// then the heads a group at a time, and one task per (head, block of queries) over `threads`
/// threads ([`onednn_blocks`]), each running its products on one OpenMP thread, a block of keys
/// at a time ([`attend_key_blocks`]). Where a head has more than two blocks of queries, each
/// group's keys (the first product's `[d x keys]` operands) and values (the second's
/// `[keys x d]`) are packed in oneDNN's layout first, a block of keys at a time: given plain
/// operands, each product copies them into that layout (at 4 680 tokens 1.04-1.14x faster on the
/// Zen 4; at 720, two blocks, packing cost more than the copies it saved;
/// `MAGCACHE_ONEDNN_PACK_KV=off` leaves them plain, for an A/B on AMX). `out` is `[heads, s, d]`.
pub(super) fn onednn_heads(
    io: Io<'_>,
    out: &mut [f32],
    (dnnl, blocks): (&'static crate::nn::onednn::OneDnn, OneDnnBlocks),
    threads: usize,
) -> candle_core::Result<()> {
    use crate::nn::bf16_gemm::pairs;
    use rayon::prelude::*;
    let Io { q, k, v, s, l, d } = io;
    let heads = out.len() / (s * d);
    let dp = d.div_ceil(2);
    // The values' rows per head: `l`, and a row of zeros after an odd `l`, so that the second
    // product's inner size is even (the probabilities' padded pair by zeros): oneDNN 3.2 ran a
    // product of an odd inner size on padded rows on its reference code (430x slower at 1 201
    // tokens, docs/benchmarks.md).
    let lv = l.next_multiple_of(2);
    let (q16, k16) = (
        pairs(q, heads * s, d, dp, threads),
        pairs(k, heads * l, d, dp, threads),
    );
    let v16 = match lv == l {
        true => pairs(v, heads * l, d, dp, threads),
        false => {
            let mut padded = vec![0u32; heads * lv * dp];
            for (i, rows) in padded.chunks_mut(lv * dp).enumerate() {
                let head = pairs(&v[i * l * d..(i + 1) * l * d], l, d, dp, threads);
                rows[..l * dp].copy_from_slice(&head);
            }
            padded
        }
    };
    let (qb, kb) = onednn_blocks(l, blocks);
    let qb = qb.min(s);
    let pack = s.div_ceil(qb) > 2 && crate::nn::onednn::pack_kv();
    let err = |e: magcache_core::Error| candle_core::Error::Msg(e.to_string());
    // The blocks of keys: (first key, keys).
    let spans: Vec<(usize, usize)> = (0..l).step_by(kb).map(|j| (j, kb.min(l - j))).collect();
    let group = 2 * threads;
    for (g, group_out) in out.chunks_mut(group * s * d).enumerate() {
        let first = g * group;
        let n = group_out.len() / (s * d);
        // Each head's blocks of keys `[d x keys]` (k's row j is column j) and values
        // `[keys x d]`, packed.
        let packed = (first..first + n)
            .into_par_iter()
            .map(|i| {
                spans
                    .iter()
                    .map(|&(j, w)| {
                        if !pack {
                            return Ok((None, None));
                        }
                        let kv = KeyBlock::of((&k16, &v16), (i, l, lv, dp), (j, w));
                        Ok((
                            dnnl.pack_pairs((kv.k, [1, 2 * dp]), (d, w), qb, 1)?,
                            dnnl.pack_pairs((kv.v, [2 * dp, 1]), (kv.wv, d), qb, 1)?,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()
            .map_err(err)?;
        let per_row = kb + if spans.len() > 1 { d } else { 0 };
        query_blocks(
            group_out,
            (s, per_row, d, qb),
            threads,
            |j, q0, o, scratch| {
                let (i, rows) = (first + j, o.len() / d);
                let qs = &q16[(i * s + q0) * dp..(i * s + q0 + rows) * dp];
                let blocks = spans.iter().zip(&packed[j]).map(|(&(j0, w), (pk, pv))| {
                    let kv = KeyBlock::of((&k16, &v16), (i, l, lv, dp), (j0, w));
                    (kv, pk.as_ref(), pv.as_ref())
                });
                attend_key_blocks(dnnl, (qs, dp, d), blocks, scratch, o).map_err(err)
            },
        )?;
    }
    Ok(())
}

/// One block of a head's keys and values as bf16 pairs (`dp` pairs a row): `w` keys, and `wv`
/// values, `w` rounded up to even (the zero row after an odd count).
struct KeyBlock<'a> {
    k: &'a [u32],
    v: &'a [u32],
    w: usize,
    wv: usize,
}

impl<'a> KeyBlock<'a> {
    /// Head `i`'s keys `j .. j + w` of `l`, in `k16` (`[heads * l, dp]` pairs) and `v16`
    /// (`[heads * lv, dp]`: `l` rows and, where `l` is odd, a zero row; `j` even).
    fn of(
        (k16, v16): (&'a [u32], &'a [u32]),
        (i, l, lv, dp): (usize, usize, usize, usize),
        (j, w): (usize, usize),
    ) -> Self {
        let wv = w.next_multiple_of(2);
        KeyBlock {
            k: &k16[(i * l + j) * dp..(i * l + j + w) * dp],
            v: &v16[(i * lv + j) * dp..(i * lv + j + wv) * dp],
            w,
            wv,
        }
    }
}

/// One task of the attention on oneDNN: `o = softmax(qs . k^T) . v` for `rows = o.len() / d`
/// queries `qs` (bf16 pairs, `dp` a row) over the keys and values in `blocks` (each with its
/// packed operands where packed), one block at a time: the block's scores into `scratch`, their
/// exponentials rounded to bf16 in place against each row's running maximum
/// ([`exps_to_pairs`]), their product by the block's values into `o` (the first block) or into
/// `scratch` past the scores, added to `o` after `o` is rescaled by `exp(old max - new max)` (the
/// running sums too; FlashAttention's online softmax); `o` divided by the sums at the end. With
/// one block this is the softmax over all keys, normalised after the product.
fn attend_key_blocks<'a>(
    dnnl: &crate::nn::onednn::OneDnn,
    (qs, dp, d): (&[u32], usize, usize),
    blocks: impl Iterator<
        Item = (
            KeyBlock<'a>,
            Option<&'a crate::nn::onednn::PackedWeight>,
            Option<&'a crate::nn::onednn::PackedWeight>,
        ),
    >,
    scratch: &mut [f32],
    o: &mut [f32],
) -> Result<()> {
    let rows = o.len() / d;
    let mut max = vec![f32::NEG_INFINITY; rows];
    let mut before = vec![f32::NEG_INFINITY; rows];
    let mut sum = vec![0f32; rows];
    for (b, (kv, pk, pv)) in blocks.enumerate() {
        let (w, wp) = (kv.w, kv.w.div_ceil(2));
        let (sc, partial) = scratch.split_at_mut(rows * w);
        dnnl.bf16_into_packed(pk, (qs, 2 * dp), (kv.k, [1, 2 * dp]), (rows, d, w), sc, 1)?;
        before.copy_from_slice(&max);
        let sums = exps_to_pairs(sc, rows, w, wp, &mut max);
        // SAFETY: the first rows * wp values of `sc`, now bf16 pairs (u32 and f32 have one size
        // and alignment, and any bits are a u32).
        let p = unsafe { std::slice::from_raw_parts(sc.as_ptr().cast::<u32>(), rows * wp) };
        // The inner size `2 * wp`: the probabilities' padded last pair (zero) by the values'
        // zero row after an odd count.
        let values = (kv.v, [2 * dp, 1]);
        if b == 0 {
            dnnl.bf16_into_packed(pv, (p, 2 * wp), values, (rows, 2 * wp, d), o, 1)?;
            sum = sums;
            continue;
        }
        let partial = &mut partial[..rows * d];
        dnnl.bf16_into_packed(pv, (p, 2 * wp), values, (rows, 2 * wp, d), partial, 1)?;
        widest(
            #[inline(always)]
            || {
                for r in 0..rows {
                    let scale = fast_exp(before[r] - max[r]);
                    sum[r] = sum[r] * scale + sums[r];
                    let (o, part) = (&mut o[r * d..(r + 1) * d], &partial[r * d..(r + 1) * d]);
                    for (o, &x) in o.iter_mut().zip(part) {
                        *o = *o * scale + x;
                    }
                }
            },
        );
    }
    divide_rows(o, d, &sum);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys per product as [`onednn_blocks`]' doc says (oneDNN is not opened in these tests:
    /// no variable applies), and the blocks of queries sized by them.
    #[test]
    fn blocks_of_keys_are_as_documented() {
        let keys = |l: usize, key_rows: usize| {
            let blocks = OneDnnBlocks {
                query_rows: None,
                key_rows: Some(key_rows),
            };
            let (qb, kb) = onednn_blocks(l, blocks);
            let spans: Vec<usize> = (0..l).step_by(kb).map(|j| kb.min(l - j)).collect();
            (qb, kb, spans)
        };
        let (qb, kb, spans) = keys(4680, 512);
        assert_eq!((qb, kb, spans.len(), spans[9]), (512, 480, 10, 360));
        assert_eq!(keys(301, 100).2, [96, 96, 96, 13]);
        assert_eq!(keys(33, 32).2, [32, 1]);
        // A setting under 32 (or 0) takes 32; one at or past the keys takes them all.
        assert_eq!(keys(100, 16).1, 32);
        assert_eq!(keys(100, 0).1, 32);
        assert_eq!(keys(4680, usize::MAX).1, 4680);
        assert_eq!(keys(4680, 4680).2, [4680]);
        // Every block a multiple of 32 but the last, never more than the setting.
        for (l, most) in [(4680, 1000), (1201, 256), (97, 64), (5000, 33)] {
            let (_, kb, spans) = keys(l, most);
            assert!(kb % 32 == 0 && kb <= most.max(32), "{l} by {most}: {kb}");
            assert_eq!(spans.iter().sum::<usize>(), l);
        }
        // All keys at once: queries sized so that their scores stay within 2 MB.
        assert_eq!(keys(4680, usize::MAX).0, 112);
        assert_eq!(keys(720, usize::MAX).0, 512);
        assert_eq!(onednn_blocks(0, OneDnnBlocks::default()).1, 1);
    }
}
