//! One task of the fused f32 attention on the layers' f32 kernel (`f32_gemm`, Intel's AVX-512
//! CPUs by default): [`QUERIES`] queries of one head over all its keys, [`KEYS`] keys at a time,
//! the softmax carried from block to block (running maximum and sum), the block's scores in L2.
//!
//! The scores are computed transposed (`k . q^T`, a block's keys as the kernel's rows and the
//! queries as its panels), so that they lie as the second product's rows where they were written:
//! each tile of 12 queries' probabilities is feature-major (a key's 12 values in a row), read in
//! place with a row stride, with no packing pass between the products; the softmax runs down the
//! columns, 16 queries a vector. gemm's single-threaded products on each task's whole rows of
//! scores measured slower (docs/benchmarks.md, "f32 on a kernel of our own").

#[cfg(target_arch = "x86_64")]
use super::softmax_pairs::exp16;
use crate::nn::f32_gemm::{MR, NR};

/// Queries per task: three panels of 32 for the scores, eight tiles of 12 for the output.
pub(super) const QUERIES: usize = 96;

/// Keys per block, a multiple of the kernel's 12 rows: a block's scores `[KEYS][QUERIES]` (144 KB)
/// stay in L2.
const KEYS: usize = 384;

/// Vectors of 16 queries in a task.
const VECS: usize = QUERIES / 16;

/// One head's keys and values packed for the kernel: the keys in tiles of 12 rows, feature-major
/// (`[l / 12][d][12]`, zero past `l`), the values in panels of 32 of their `d` columns
/// (`[d / 32][l][32]`, zero past `d`).
pub(super) struct PackedHead {
    keys: Vec<f32>,
    values: Vec<f32>,
    l: usize,
    d: usize,
}

impl PackedHead {
    /// Packs one head's row-major keys and values `[l, d]`.
    pub(super) fn pack(k: &[f32], v: &[f32], l: usize, d: usize) -> Self {
        let mut keys = vec![0f32; l.div_ceil(MR) * MR * d];
        for (t, tile) in keys.chunks_exact_mut(MR * d).enumerate() {
            for (r, row) in k[t * MR * d..].chunks(d).take(MR).enumerate() {
                for (f, &x) in row.iter().enumerate() {
                    tile[f * MR + r] = x;
                }
            }
        }
        let mut values = vec![0f32; d.div_ceil(NR) * l * NR];
        for (p, panel) in values.chunks_exact_mut(l * NR).enumerate() {
            let cols = NR.min(d - p * NR);
            for (out, row) in panel.chunks_exact_mut(NR).zip(v.chunks(d)) {
                out[..cols].copy_from_slice(&row[p * NR..p * NR + cols]);
            }
        }
        PackedHead { keys, values, l, d }
    }
}

/// `o = softmax(qs . k^T) . v` for `rows` (at most [`QUERIES`]) queries `qs` (`rows x d`, already
/// scaled) of the head `head`, into `o` (`rows x d`); `false` (nothing done) on a CPU without
/// AVX-512F.
pub(super) fn attend_rows_f32(qs: &[f32], head: &PackedHead, o: &mut [f32], rows: usize) -> bool {
    if !crate::nn::f32_gemm::cpu_has_avx512() || rows == 0 || rows > QUERIES {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    crate::nn::bf16_gemm::amx::with_rows(QUERIES * head.d + KEYS * QUERIES, |buf| {
        // SAFETY: u32 and f32 have one size and alignment; every value is written before it is
        // read as f32 (the queries' panels in full, a block's scores before its softmax).
        let buf = unsafe { &mut *(buf as *mut [u32] as *mut [f32]) };
        let (qp, st) = buf.split_at_mut(QUERIES * head.d);
        // SAFETY: the CPU has AVX-512F (checked above); the slices hold what `attend` reads.
        unsafe { attend(qs, head, (qp, st), o, rows) };
    });
    cfg!(target_arch = "x86_64")
}

/// [`attend_rows_f32`]'s work: `qp` the queries' panels, `st` a block's transposed scores.
///
/// # Safety
/// The CPU has AVX-512F; `qs` and `o` hold `rows * d` values, `rows <= QUERIES`; `qp` holds
/// `QUERIES * d` values and `st` `KEYS * QUERIES`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend(
    qs: &[f32],
    head: &PackedHead,
    (qp, st): (&mut [f32], &mut [f32]),
    o: &mut [f32],
    rows: usize,
) {
    use crate::nn::f32_gemm::kernel;
    let (l, d) = (head.l, head.d);
    // The queries as panels of 32 columns, `[d][32]` each, zero past `rows`.
    let panels = rows.div_ceil(NR);
    for (p, panel) in qp.chunks_exact_mut(d * NR).take(panels).enumerate() {
        let cols = NR.min(rows - p * NR);
        if cols < NR {
            panel.fill(0.0);
        }
        for (c, row) in qs[p * NR * d..].chunks(d).take(cols).enumerate() {
            for (f, &x) in row.iter().enumerate() {
                panel[f * NR + c] = x;
            }
        }
    }
    let (mut max, mut sum) = ([f32::NEG_INFINITY; QUERIES], [0f32; QUERIES]);
    let vpanels = d.div_ceil(NR);
    for j0 in (0..l).step_by(KEYS) {
        let kb = KEYS.min(l - j0);
        // st[key][query] = k . q for the block's keys (all `panels * 32` columns written).
        for p in 0..panels {
            for t in 0..kb.div_ceil(MR) {
                // SAFETY: the key tile `j0 / 12 + t` holds `d * 12` values (`j0` is a multiple of
                // 12); the panel `d * 32`; the tile's rows of `st` are inside its `KEYS` rows.
                unsafe {
                    kernel(
                        (head.keys.as_ptr().add((j0 / MR + t) * MR * d), MR),
                        qp.as_ptr().add(p * d * NR),
                        d,
                        (st.as_mut_ptr().add(t * MR * QUERIES + p * NR), QUERIES),
                        (MR.min(kb - t * MR), NR),
                        true,
                    )
                };
            }
        }
        let first = j0 == 0;
        // SAFETY: the block's `kb` rows of `panels * 32` scores were written above.
        let alpha = unsafe { block_softmax(st, kb, panels * NR / 16, (&mut max, &mut sum)) };
        if !first {
            for (row, &a) in o.chunks_exact_mut(d).zip(&alpha) {
                row.iter_mut().for_each(|x| *x *= a);
            }
        }
        // o += p . v, a tile of 12 queries' probabilities read in place (row stride QUERIES).
        for t in 0..rows.div_ceil(MR) {
            for p in 0..vpanels {
                // SAFETY: the tile's 12 columns of `st` lie within its rows (t * 12 + 12 <=
                // QUERIES); the value panel's rows `j0..j0 + kb` are inside it; `o`'s rows and
                // columns are masked to `rows` and `d`.
                unsafe {
                    kernel(
                        (st.as_ptr().add(t * MR), QUERIES),
                        head.values.as_ptr().add((p * l + j0) * NR),
                        kb,
                        (o.as_mut_ptr().add(t * MR * d + p * NR), d),
                        (MR.min(rows - t * MR), NR.min(d - p * NR)),
                        first,
                    )
                };
            }
        }
    }
    for (row, &s) in o.chunks_exact_mut(d).zip(&sum) {
        let inv = 1.0 / s;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

/// The softmax of a block of transposed scores (`kb` rows of `vecs * 16` queries, row stride
/// [`QUERIES`]) carried on: each query's running maximum raised to the block's, the scores
/// replaced by `exp(x - max)`, the sums rescaled and added to. Returns each query's factor for
/// the output so far, `exp(old max - new max)` (0 in the first block).
///
/// # Safety
/// The CPU has AVX-512F; `st` holds `kb` rows; `vecs <= VECS`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_softmax(
    st: &mut [f32],
    kb: usize,
    vecs: usize,
    (max, sum): (&mut [f32; QUERIES], &mut [f32; QUERIES]),
) -> [f32; QUERIES] {
    use std::arch::x86_64::*;
    let mut alpha = [0f32; QUERIES];
    let rows = &mut st[..kb * QUERIES];
    // SAFETY (all loads and stores below): `v < vecs <= VECS`, so each 16 values lie within a
    // row of QUERIES values, and the arrays hold QUERIES.
    unsafe {
        let mut m = [_mm512_setzero_ps(); VECS];
        for (v, m) in m.iter_mut().enumerate().take(vecs) {
            *m = _mm512_loadu_ps(max.as_ptr().add(16 * v));
        }
        for row in rows.chunks_exact(QUERIES) {
            for (v, m) in m.iter_mut().enumerate().take(vecs) {
                *m = _mm512_max_ps(*m, _mm512_loadu_ps(row.as_ptr().add(16 * v)));
            }
        }
        let mut s = [_mm512_setzero_ps(); VECS];
        for row in rows.chunks_exact_mut(QUERIES) {
            for (v, (m, s)) in m.iter().zip(&mut s).enumerate().take(vecs) {
                let at = row.as_mut_ptr().add(16 * v);
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(at), *m));
                _mm512_storeu_ps(at, e);
                *s = _mm512_add_ps(*s, e);
            }
        }
        for (v, (m, s)) in m.iter().zip(&s).enumerate().take(vecs) {
            let old = _mm512_loadu_ps(max.as_ptr().add(16 * v));
            // The first block's old maximum is -inf: no output yet, a factor of 0.
            let a = _mm512_maskz_mov_ps(
                _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(old, _mm512_set1_ps(f32::NEG_INFINITY)),
                exp16(_mm512_sub_ps(old, *m)),
            );
            _mm512_storeu_ps(alpha.as_mut_ptr().add(16 * v), a);
            let total = _mm512_fmadd_ps(_mm512_loadu_ps(sum.as_ptr().add(16 * v)), a, *s);
            _mm512_storeu_ps(sum.as_mut_ptr().add(16 * v), total);
            _mm512_storeu_ps(max.as_mut_ptr().add(16 * v), *m);
        }
    }
    alpha
}
