//! Scaled dot-product attention: fused on the CPU in f32, query-chunked elsewhere.

use super::contiguous;
use super::pointwise::{fast_exp, lanes_max, widest};
#[cfg(test)]
use candle_core::Device;
use candle_core::{DType, Tensor};
use magcache_core::Result;

#[path = "attention_amx.rs"]
mod on_amx;
#[path = "attention_f32.rs"]
mod on_f32;
#[path = "attention_onednn.rs"]
mod on_onednn;
#[path = "softmax_pairs.rs"]
mod softmax_pairs;
pub(crate) use on_onednn::cpu_task_scores;
use on_onednn::onednn_heads;
pub use on_onednn::ONEDNN_KEY_ROWS;
use softmax_pairs::exps_to_pairs;

/// Largest score matrix (bytes) one attention matmul may materialise; longer sequences are processed
/// in query chunks, so a 32k-token video needs ~256 MB for scores, not `H * S * S * 4` bytes.
pub const ATTENTION_SCORE_BUDGET: usize = 256 << 20;

/// Scaled dot-product attention, no mask. `q [B, H, S, D]`, `k`/`v` `[B, H, L, D]` -> `[B, H, S, D]`.
/// On the CPU in f32: `cpu_attention`, fused. Elsewhere queries are processed in chunks whose
/// `[B, H, chunk, L]` scores fit [`ATTENTION_SCORE_BUDGET`] (candle's CPU flash attention avoids the
/// scores too but measured 2.6-3.5x slower here).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if q.device().is_cpu()
        && !super::differentiable()
        && [q, k, v].iter().all(|t| t.dtype() == DType::F32)
    {
        return cpu_attention(q, k, v);
    }
    let (b, h, s, _) = q.dims4()?;
    let per_query = b * h * k.dim(2)? * 4;
    attention_in_chunks(
        q,
        k,
        v,
        (ATTENTION_SCORE_BUDGET / per_query.max(1)).clamp(1, s.max(1)),
    )
}

/// [`attention`], with both products in bf16 on the CPU's bf16 kernel when `bf16` is set and the
/// CPU has it ([`super::bf16_gemm`]): the blocks whose linear weights run there pass
/// [`super::Linear::runs_bf16`], so a bf16 run's attention is bf16 too (q, k, v and the
/// probabilities rounded to bf16, products accumulated in f32; the softmax in f32).
///
/// Where oneDNN runs the bf16 linear products (`MAGCACHE_ONEDNN` on a CPU with AMX, or with
/// `MAGCACHE_ONEDNN_BF16=on`: [`super::onednn::bf16_products`]) both products run on it instead,
/// on AMX's tiles where the CPU has them (the layers'
/// AVX512-BF16 kernel ran at 0.5-0.8x gemm's f32 on a Sapphire Rapids-class Xeon:
/// docs/benchmarks.md).
pub fn attention_as(q: &Tensor, k: &Tensor, v: &Tensor, bf16: bool) -> Result<Tensor> {
    let f32_cpu = q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    if bf16 && f32_cpu && !super::differentiable() {
        if let Some(d) = super::onednn::get().filter(|d| d.bf16_products()) {
            return fused(q, k, v, CpuAttention::OneDnn(d, OneDnnBlocks::default()));
        }
        if super::bf16_gemm::available() {
            return fused(q, k, v, CpuAttention::Bf16Kernel);
        }
    }
    attention(q, k, v)
}

/// [`attention`] with both products in bf16 on `dnnl` (q, k, v and the probabilities rounded to
/// bf16, f32 accumulation, the softmax in f32), whatever the CPU's ISA where oneDNN implements a
/// bf16 product: [`attention_as`]'s path on CPUs with AMX, and the tests' elsewhere.
pub fn attention_onednn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dnnl: &'static super::onednn::OneDnn,
) -> Result<Tensor> {
    attention_onednn_blocks(q, k, v, dnnl, OneDnnBlocks::default())
}

/// [`attention_onednn`] with its blocks given (the tests' and the benchmarks' way to compare
/// sizes in one process); a field left `None` takes the run's default.
pub fn attention_onednn_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dnnl: &'static super::onednn::OneDnn,
    blocks: OneDnnBlocks,
) -> Result<Tensor> {
    fused(q, k, v, CpuAttention::OneDnn(dnnl, blocks))
}

/// How the attention on oneDNN splits its work: queries per task, keys per product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OneDnnBlocks {
    /// Queries per task (each task one head's block of queries); `None`: the run's
    /// (`MAGCACHE_ONEDNN_QUERY_ROWS`, else sized by the keys per product).
    pub query_rows: Option<usize>,
    /// Keys per product: a task runs `q . k^T` and `p . v` on one block of keys at a time,
    /// carrying each row's softmax across them (its running maximum and sum, the output rescaled
    /// where the maximum grows); at least all the keys: one product each. `None`: the run's
    /// (`MAGCACHE_ONEDNN_KEY_ROWS`, else [`ONEDNN_KEY_ROWS`]).
    pub key_rows: Option<usize>,
}

/// Queries per task of `cpu_attention`: its scores are `QUERY_BLOCK x L` floats per thread.
pub const QUERY_BLOCK: usize = 128;

/// [`attention`] on the CPU in f32, fused: one task per (batch, head, block of [`QUERY_BLOCK`]
/// queries), spread over the threads, each running its two products single-threaded through `gemm`
/// with the softmax in between on its own score rows. candle's batched matmul instead threads each
/// head's small product in turn (measured 25-45% below the linear layers' throughput), materialises
/// `[B, H, S, L]` scores and passes over them three times; candle's CPU flash attention was slower
/// still (see [`attention`]).
///
/// Where the layers' f32 kernel runs (`super::f32_gemm::available`: Intel's AVX-512 CPUs by
/// default) both products run on it instead (`attention_f32.rs`).
fn cpu_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let op = match super::f32_gemm::available() {
        true => CpuAttention::F32Kernel,
        false => CpuAttention::F32,
    };
    fused(q, k, v, op)
}

/// [`attention`]'s fused f32 CPU path with both products on candle's gemm whatever the CPU (the
/// benchmarks' comparison with the f32 kernel's): `q`, `k`, `v` f32 on the CPU.
pub fn attention_on_gemm(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    fused(q, k, v, CpuAttention::F32)
}

/// The fused op `op` on `q` scaled by `1/sqrt(d)` and contiguous `k`, `v`.
fn fused(q: &Tensor, k: &Tensor, v: &Tensor, op: CpuAttention) -> Result<Tensor> {
    let _timer = super::timing::Timer::attention(true);
    let d = q.dim(3)?;
    let q = (q * (1.0 / (d as f64).sqrt()))?;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    Ok(q.apply_op3_no_bwd(&k, &v, &op)?)
}

/// The fused CPU attention, by where its products run.
#[derive(Clone, Copy)]
enum CpuAttention {
    /// gemm's f32.
    F32,
    /// The layers' f32 kernel ([`super::f32_gemm`]), blocks of keys, the scores transposed.
    F32Kernel,
    /// The layers' AVX512-BF16 kernel ([`super::bf16_gemm`]).
    Bf16Kernel,
    /// oneDNN's bf16 product (AMX's tiles where the CPU has them), in these blocks.
    OneDnn(&'static super::onednn::OneDnn, OneDnnBlocks),
}

impl candle_core::CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "cpu-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage::F32;
        let (F32(q), F32(k), F32(v)) = (s1, s2, s3) else {
            candle_core::bail!("cpu attention: f32 only");
        };
        let what = "cpu attention";
        let (q, k, v) = (
            contiguous(q, l1, what)?,
            contiguous(k, l2, what)?,
            contiguous(v, l3, what)?,
        );
        let (b, h, s, d) = l1.shape().dims4()?;
        let (kb, kh, l, kd) = l2.shape().dims4()?;
        if (kb, kh, kd) != (b, h, d) || l3.shape() != l2.shape() {
            candle_core::bail!(
                "cpu attention: q {:?}, k {:?}, v {:?} do not match",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let mut out = vec![0f32; b * h * s * d];
        if out.is_empty() || l == 0 {
            return Ok((F32(out), l1.shape().clone()));
        }
        let threads = candle_core::utils::get_num_threads().max(1);
        if let CpuAttention::F32Kernel = self {
            let io = Io { q, k, v, s, l, d };
            on_f32_heads(io, &mut out, threads)?;
            return Ok((F32(out), l1.shape().clone()));
        }
        let bf16 = matches!(self, CpuAttention::Bf16Kernel);
        // On AMX's tiles a task takes fewer queries: its blocks of keys stay in L2 (`on_amx`).
        let amx = bf16 && super::bf16_gemm::amx::usable();
        let qb = if amx {
            on_amx::AMX_QUERIES
        } else {
            QUERY_BLOCK
        }
        .min(s);
        if let CpuAttention::OneDnn(dnnl, blocks) = *self {
            let io = Io { q, k, v, s, l, d };
            onednn_heads(io, &mut out, (dnnl, blocks), threads)?;
            return Ok((F32(out), l1.shape().clone()));
        }
        // bf16: the heads a group at a time, each group's keys and transposed values packed for
        // the kernel first (the packed copies stay a group's, not every head's).
        let group = if bf16 { 2 * threads } else { b * h };
        for (g, group_out) in out.chunks_mut(group * s * d).enumerate() {
            let first = g * group;
            let heads = group_out.len() / (s * d);
            let packed = if bf16 {
                let span = first * l * d..(first + heads) * l * d;
                Some(pack_heads(
                    (&k[span.clone()], &v[span]),
                    heads,
                    (l, d),
                    threads,
                    |ks, vs| {
                        use super::bf16_gemm::PackedBf16;
                        (
                            PackedBf16::pack_f32(ks, l, d),
                            PackedBf16::pack_f32_transposed(vs, l, d),
                        )
                    },
                ))
            } else {
                None
            };
            let io = Io { q, k, v, s, l, d };
            attend_heads(io, (first, group_out), qb, packed.as_deref(), threads)?;
        }
        Ok((F32(out), l1.shape().clone()))
    }
}

/// The fused attention's inputs: `q [BH, s, d]`, `k` and `v [BH, l, d]`, row-major.
#[derive(Clone, Copy)]
struct Io<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    s: usize,
    l: usize,
    d: usize,
}

/// Runs `task(head, first query, its output rows, scratch)` once per block of `qb` queries of each
/// head of `out` (`[heads, s, d]`), over `threads` threads of rayon's pool, each with its own
/// scratch of `per_row` floats a query (`rows * per_row` handed to a block of `rows`: its scores);
/// the blocks are disjoint, in any order. The first error is returned.
fn query_blocks(
    out: &mut [f32],
    (s, per_row, d, qb): (usize, usize, usize, usize),
    threads: usize,
    task: impl Fn(usize, usize, &mut [f32], &mut [f32]) -> candle_core::Result<()> + Sync,
) -> candle_core::Result<()> {
    let mut tasks = Vec::new();
    for (i, head_out) in out.chunks_mut(s * d).enumerate() {
        for (j, rows) in head_out.chunks_mut(qb * d).enumerate() {
            tasks.push((i, j * qb, rows));
        }
    }
    let threads = threads.clamp(1, tasks.len().max(1));
    let tasks = std::sync::Mutex::new(tasks.into_iter());
    let failed = std::sync::Mutex::new(None);
    let run = || {
        let mut scores = vec![0f32; qb * per_row];
        loop {
            let next = match tasks.lock() {
                Ok(mut t) => t.next(),
                Err(_) => None,
            };
            let Some((i, q0, o)) = next else { break };
            let rows = o.len() / d;
            if let Err(e) = task(i, q0, o, &mut scores[..rows * per_row]) {
                if let Ok(mut f) = failed.lock() {
                    f.get_or_insert(e);
                }
            }
        }
    };
    rayon::scope(|sc| {
        for _ in 1..threads {
            sc.spawn(|_| run());
        }
        run();
    });
    match failed.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// All heads on the f32 kernel (`out` `[BH, s, d]`), [`on_f32::QUERIES`] queries a task, the
/// heads a group at a time (each group's keys and values packed first, over the threads).
fn on_f32_heads(io: Io<'_>, out: &mut [f32], threads: usize) -> candle_core::Result<()> {
    let Io { q, k, v, s, l, d } = io;
    let group = 2 * threads;
    for (g, group_out) in out.chunks_mut(group * s * d).enumerate() {
        let first = g * group;
        let heads = group_out.len() / (s * d);
        let span = first * l * d..(first + heads) * l * d;
        let packed = pack_heads(
            (&k[span.clone()], &v[span]),
            heads,
            (l, d),
            threads,
            |ks, vs| on_f32::PackedHead::pack(ks, vs, l, d),
        );
        let qb = on_f32::QUERIES.min(s);
        query_blocks(group_out, (s, 0, d, qb), threads, |i, q0, o, _| {
            let (bh, rows) = (first + i, o.len() / d);
            let qs = &q[(bh * s + q0) * d..(bh * s + q0 + rows) * d];
            match on_f32::attend_rows_f32(qs, &packed[i], o, rows) {
                true => Ok(()),
                false => candle_core::bail!("cpu attention: the f32 kernel needs AVX-512F"),
            }
        })?;
    }
    Ok(())
}

/// The heads from `first` whose outputs are `out` (`[heads, s, d]`): one task per block of `qb`
/// queries, over `threads` threads; `packed`: those heads' keys and values for the bf16 kernel.
fn attend_heads(
    io: Io<'_>,
    (first, out): (usize, &mut [f32]),
    qb: usize,
    packed: Option<&[(super::bf16_gemm::PackedBf16, super::bf16_gemm::PackedBf16)]>,
    threads: usize,
) -> candle_core::Result<()> {
    let Io { q, k, v, s, l, d } = io;
    // On AMX's tiles a task holds a block of keys' scores of its own, not a row of all keys.
    let on_amx = packed.is_some_and(|p| p.first().is_some_and(|(k, _)| k.on_amx()));
    let per_row = if on_amx { 0 } else { l };
    query_blocks(out, (s, per_row, d, qb), threads, |i, q0, o, sc| {
        let bh = first + i;
        let rows = o.len() / d;
        let qs = &q[(bh * s + q0) * d..(bh * s + q0 + rows) * d];
        match packed {
            Some(p) if on_amx => match on_amx::attend_rows_amx(qs, &p[i], o, rows) {
                true => Ok(()),
                false => candle_core::bail!("cpu attention: the keys are not packed for AMX"),
            },
            Some(p) => attend_rows_bf16(qs, &p[i], sc, o, rows),
            None => {
                let kv = (
                    &k[bh * l * d..(bh + 1) * l * d],
                    &v[bh * l * d..(bh + 1) * l * d],
                );
                attend_rows(qs, kv, sc, o, (rows, l, d));
                Ok(())
            }
        }
    })
}

/// One task of [`CpuAttention`]: `o = softmax(qs . ks^T) . vs` for `rows` queries over `l` keys of
/// width `d`, the scores in `sc` (`rows x l`); every slice row-major.
fn attend_rows(
    qs: &[f32],
    (ks, vs): (&[f32], &[f32]),
    sc: &mut [f32],
    o: &mut [f32],
    (rows, l, d): (usize, usize, usize),
) {
    // SAFETY: every pointer and stride below stays inside its slice: `qs` is
    // rows x d, `ks` and `vs` are l x d, `sc` rows x l and `o` rows x d, all row-major.
    unsafe {
        // sc = qs . ks^T
        gemm::gemm(
            rows,
            l,
            d,
            sc.as_mut_ptr(),
            1,
            l as isize,
            false,
            qs.as_ptr(),
            1,
            d as isize,
            ks.as_ptr(),
            d as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    let sums = exp_rows(sc, l);
    // SAFETY: as above.
    unsafe {
        // o = exp(sc - max) . vs, each row then divided by its sum
        gemm::gemm(
            rows,
            d,
            l,
            o.as_mut_ptr(),
            1,
            d as isize,
            false,
            sc.as_ptr(),
            1,
            l as isize,
            vs.as_ptr(),
            1,
            d as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    divide_rows(o, d, &sums);
}

/// Each `d`-wide row of `o` divided by its sum in `sums` (multiplied by `1 / sum`): the softmax's
/// normalisation, applied to the second product's output instead of the scores.
fn divide_rows(o: &mut [f32], d: usize, sums: &[f32]) {
    for (row, &s) in o.chunks_mut(d.max(1)).zip(sums) {
        let inv = 1.0 / s;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

/// `pack(keys, values)` of each of `heads` heads (`[l, d]` each), over `threads` threads (`k` and
/// `v` hold those heads only).
fn pack_heads<T: Send>(
    (k, v): (&[f32], &[f32]),
    heads: usize,
    (l, d): (usize, usize),
    threads: usize,
    pack: impl Fn(&[f32], &[f32]) -> T + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let one = |i: usize| {
        let span = i * l * d..(i + 1) * l * d;
        pack(&k[span.clone()], &v[span])
    };
    let per = heads.div_ceil(threads.max(1)).max(1);
    (0..heads)
        .into_par_iter()
        .with_min_len(per)
        .map(one)
        .collect()
}

/// [`attend_rows`] on the bf16 kernel: the scores from the packed keys, their exponentials
/// rounded to bf16 in place ([`exps_to_pairs`]), the output from the packed transposed values,
/// divided by the rows' sums.
fn attend_rows_bf16(
    qs: &[f32],
    (pk, pv): &(super::bf16_gemm::PackedBf16, super::bf16_gemm::PackedBf16),
    sc: &mut [f32],
    o: &mut [f32],
    rows: usize,
) -> candle_core::Result<()> {
    let (l, lp) = (pk.n(), pk.n().div_ceil(2));
    pk.product_into(qs, rows, sc, 1)?;
    let mut max = vec![f32::NEG_INFINITY; rows];
    let sums = exps_to_pairs(sc, rows, l, lp, &mut max);
    // SAFETY: the first rows * lp values of `sc`, now bf16 pairs (u32 and f32 have one size and
    // alignment, and any bits are a u32).
    let p = unsafe { std::slice::from_raw_parts(sc.as_ptr().cast::<u32>(), rows * lp) };
    pv.pairs_product_into(p, rows, o, 1)?;
    divide_rows(o, o.len() / rows.max(1), &sums);
    Ok(())
}

/// Each `l`-wide row of `sc` replaced by its exponentials `exp(x - max)` (f32), left
/// unnormalised; returns each row's sum, which the caller divides the product's output rows by
/// instead ([`divide_rows`]) (`softmax(s) . v = (exp(s - max) . v) / sum`). On the CPU's widest vectors
/// ([`widest`]): the maximum over [`super::pointwise::LANES`] partial results, the sum over 32
/// in the exponentials' loop (a single running sum kept that loop scalar: 25% of a bf16 Wan call
/// at 4 800 tokens, docs/benchmarks.md). Two passes over the scores, where normalising them took
/// four. On AVX-512 the exponentials are `softmax_pairs`' (the polynomial on fused multiply-adds),
/// so they may differ from other CPUs' in their last bits (unlike [`widest`]'s plain loops).
fn exp_rows(sc: &mut [f32], l: usize) -> Vec<f32> {
    const W: usize = 32;
    widest(
        #[inline(always)]
        || {
            let mut sums = Vec::with_capacity(sc.len() / l.max(1));
            for row in sc.chunks_mut(l) {
                let max = lanes_max(row);
                let mut acc = [0f32; W];
                #[cfg(target_arch = "x86_64")]
                let done = match std::arch::is_x86_feature_detected!("avx512f") {
                    true => {
                        let done = l / 16 * 16;
                        // SAFETY: the CPU has the feature; the row holds `l >= done` values.
                        acc[0] =
                            unsafe { softmax_pairs::exps_row_f32(row.as_mut_ptr(), done, max) };
                        done
                    }
                    false => 0,
                };
                #[cfg(not(target_arch = "x86_64"))]
                let done = 0;
                let mut chunks = row[done..].chunks_exact_mut(W);
                for c in &mut chunks {
                    for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
                        *x = fast_exp(*x - max);
                        *a += *x;
                    }
                }
                let mut sum = acc.iter().sum::<f32>();
                for x in chunks.into_remainder() {
                    *x = fast_exp(*x - max);
                    sum += *x;
                }
                sums.push(sum);
            }
            sums
        },
    )
}

/// [`attention`] over chunks of `chunk` queries (the path off the CPU, and the CPU path's reference).
pub fn attention_in_chunks(q: &Tensor, k: &Tensor, v: &Tensor, chunk: usize) -> Result<Tensor> {
    let _timer = super::timing::Timer::attention(q.device().is_cpu());
    let (_, _, s, d) = q.dims4()?;
    // The 1/sqrt(d) scale goes on `q` (S x D values), not on the S x L scores: candle's CPU affine
    // is a single-threaded pass, which over the scores of a 32k-token video would read and write
    // tens of GB per block while one core idles.
    let q = (q * (1.0 / (d as f64).sqrt()))?;
    let kt = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    let one = |q: &Tensor| -> Result<Tensor> {
        let scores = q.matmul(&kt)?;
        Ok(super::softmax_last_dim(&scores)?.matmul(&v)?)
    };
    if chunk >= s {
        return one(&q);
    }
    let parts = (0..s)
        .step_by(chunk.max(1))
        .map(|start| one(&q.narrow(2, start, chunk.min(s - start))?.contiguous()?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 2)?)
}

/// Largest absolute difference of two tensors (unit tests of this crate).
#[cfg(test)]
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
