//! bf16 matrix products on the CPU's matrix units: AMX's tiles where the CPU has them and Linux
//! grants them ([`amx`]: `tdpbf16ps`), else AVX512-BF16's `vdpbf16ps` (two bf16 products summed
//! into each f32 lane, twice the f32 FMA rate), for linear layers whose weights are bf16 and the
//! attention of their blocks (issue 45). One binary: the choice is made at run time.
//!
//! Written here rather than taken from a library: candle 0.11's CPU bf16 matmul (the `gemm` crate)
//! has no bf16 micro-kernel (it converts both operands and runs f32 FMAs), oneDNN and MKL are
//! system or Python libraries the default build may not require, and the kernels are small: one
//! micro-kernel each over weights packed once at load. This doc describes the AVX512-BF16
//! kernel's layout; [`amx`]'s has its own.
//!
//! The weight `[n, k]` is packed at load into panels of [`NR`] output columns; within a panel, each
//! pair of input features holds the panel's columns as `(w[c][2q], w[c][2q+1])` bf16 pairs, one
//! 32-bit lane a column, as `vdpbf16ps` reads them. The f32 activations are rounded to bf16 (round
//! to nearest even) once per product, the products accumulate in f32, and the output is f32. The
//! work is split by panels over candle's threads. A linear layer's bias, and a feed-forward's
//! GELU, run on each output tile after its last block of input features, while it is in the
//! core's cache ([`Epilogue`]), not in passes of their own over the output.

use candle_core::CpuStorage;
use std::sync::OnceLock;

#[path = "bf16_amx.rs"]
pub mod amx;
#[path = "bf16_pairs.rs"]
mod bf16_pairs;
#[path = "bf16_tile.rs"]
mod bf16_tile;
pub(super) use bf16_pairs::{pairs, pairs_into};
use bf16_tile::Tile;

/// Output columns per panel (two 16-lane f32 accumulators a row).
pub const NR: usize = 32;
/// Rows of the micro-kernel: 24 accumulators of the 32 vector registers, each pair of panel
/// vectors loaded once for 12 rows (8 rows: 6-10% slower products on Zen 4, 14: no faster;
/// docs/benchmarks.md).
const MR: usize = 12;
/// Input-feature pairs per cache block: the panel's block (`KC x NR x 4` bytes: 96 KB) streams
/// from L2; fewer, longer blocks rewrite the output less often (256 pairs: 4-10% slower on Zen 4).
const KC: usize = 768;
/// Rows per cache block of the activations (`MC x KC x 4` bytes at most: 1.1 MB).
const MC: usize = 384;

/// Whether this CPU runs the bf16 kernel: AVX512-F and AVX512-BF16, and not turned off with
/// `MAGCACHE_CPU_BF16=off` (then bf16 weights are widened to f32 for the product, as before).
///
/// On CPUs with AMX (Intel's Sapphire Rapids and later) the products run on its tiles
/// ([`amx::usable`]); where those are off (`MAGCACHE_AMX=off`, or refused by Linux) the
/// AVX512-BF16 kernel is off too unless `MAGCACHE_CPU_BF16=on`: there `vdpbf16ps` issues at half
/// the rate of two f32 FMAs, and it measured 0.5-0.8x gemm's f32 per product and 0.7-0.8x f32 per
/// call (docs/benchmarks.md); bf16 weights are widened to f32 then, or run on AMX's tiles through
/// oneDNN (`MAGCACHE_ONEDNN`).
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let var = std::env::var("MAGCACHE_CPU_BF16").unwrap_or_default();
        if var.eq_ignore_ascii_case("off") {
            return false;
        }
        amx::usable()
            || kernel_on(
                &var,
                cpu_has_bf16(),
                magcache_core::runtime::placement::cpu_has_amx(),
            )
    })
}

/// Refuses a `MAGCACHE_CPU_BF16` other than `on` or `off` (one line naming it), before a command
/// starts: [`available`] reads it deep in a run.
pub fn check_switch() -> magcache_core::Result<()> {
    let unset = "on where the CPU has AVX512-BF16 and no AMX";
    crate::env::env_switch("MAGCACHE_CPU_BF16", unset).map_err(magcache_core::Error::msg)?;
    Ok(())
}

/// [`available`]'s choice from `MAGCACHE_CPU_BF16`'s value and the CPU's AVX512-BF16 and AMX.
pub fn kernel_on(var: &str, bf16: bool, amx: bool) -> bool {
    if var.eq_ignore_ascii_case("off") {
        return false;
    }
    bf16 && (var.eq_ignore_ascii_case("on") || !amx)
}

/// The CPU's flags alone (the property tests use this: they test the kernel whatever the setting);
/// core's check, which `model.matmul_precision` uses too.
pub fn cpu_has_bf16() -> bool {
    magcache_core::runtime::placement::cpu_has_bf16()
}

/// A weight `[n, k]` packed for the kernel.
#[derive(Clone)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    /// Pairs of input features: `ceil(k / 2)`.
    kp: usize,
    /// `panels x kp x NR x 2` bf16 bits (zero past `n` and `k`); empty where the weight is
    /// packed for AMX's tiles instead.
    data: Vec<u16>,
    /// The weight packed for AMX's tiles, where they run the products ([`amx::usable`]).
    amx: Option<amx::PackedAmx>,
}

impl PackedBf16 {
    /// Packs a bf16 or f32 (rounded to bf16) weight `[n, k]` on the CPU, read in place: the packed
    /// copy is the only one made.
    pub fn from_tensor(w: &candle_core::Tensor) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        let w = w.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("bf16 packing: contiguous weights only");
        };
        match &*storage {
            candle_core::Storage::Cpu(CpuStorage::BF16(v)) => {
                let v = &v[a..b];
                Ok(Self::pack_with(n, k, |i| v[i].to_bits()))
            }
            candle_core::Storage::Cpu(CpuStorage::F32(v)) => Ok(Self::pack_f32(&v[a..b], n, k)),
            _ => candle_core::bail!("bf16 packing: bf16 or f32 weights on the CPU only"),
        }
    }

    /// Packs `w [n, k]` given in f32 (rounded to bf16).
    pub fn pack_f32(w: &[f32], n: usize, k: usize) -> Self {
        Self::pack_with(n, k, |i| bf16_bits(w[i]))
    }

    /// Packs the transpose of `w [rows, cols]` given in f32 (rounded to bf16): a weight `[cols,
    /// rows]` (attention's values, multiplied from the left by the probabilities).
    pub fn pack_f32_transposed(w: &[f32], rows: usize, cols: usize) -> Self {
        if amx::usable() {
            return Self::from_amx(cols, rows, amx::PackedAmx::transposed_f32(w, rows, cols));
        }
        // Element (c, j) of the weight is w[j][c].
        Self::pack_with(cols, rows, |i| bf16_bits(w[(i % rows) * cols + i / rows]))
    }

    /// Packs the row-major `[n, k]` bf16 bits of a weight.
    pub fn pack(w: &[u16], n: usize, k: usize) -> Self {
        Self::pack_with(n, k, |i| w[i])
    }

    /// [`PackedBf16::pack`] for the AVX512-BF16 kernel even where AMX runs the products (tests).
    pub fn pack_for_dot_products(w: &[u16], n: usize, k: usize) -> Self {
        Self::pack_as(n, k, |i| w[i], false)
    }

    /// Packs a weight `[n, k]` whose element `c * k + j` (row-major) has the bf16 bits `bits(c * k +
    /// j)`.
    fn pack_with(n: usize, k: usize, bits: impl Fn(usize) -> u16 + Sync) -> Self {
        Self::pack_as(n, k, bits, amx::usable())
    }

    /// [`PackedBf16::pack_with`] for AMX's tiles where `amx`, else for the AVX512-BF16 kernel.
    fn pack_as(n: usize, k: usize, bits: impl Fn(usize) -> u16 + Sync, amx: bool) -> Self {
        if amx {
            return Self::from_amx(n, k, amx::PackedAmx::pack_with(n, k, bits));
        }
        let kp = k.div_ceil(2);
        let mut data = vec![0u16; n.div_ceil(NR) * kp * NR * 2];
        for (p, panel) in data.chunks_mut((kp * NR * 2).max(1)).enumerate() {
            for c in 0..NR.min(n - p * NR) {
                let row = (p * NR + c) * k;
                for j in 0..k {
                    panel[(j / 2) * NR * 2 + c * 2 + j % 2] = bits(row + j);
                }
            }
        }
        let amx = None;
        PackedBf16 {
            n,
            k,
            kp,
            data,
            amx,
        }
    }

    /// A weight `[n, k]` packed for AMX's tiles (`t`).
    fn from_amx(n: usize, k: usize, t: amx::PackedAmx) -> Self {
        let (kp, data, amx) = (k.div_ceil(2), Vec::new(), Some(t));
        PackedBf16 {
            n,
            k,
            kp,
            data,
            amx,
        }
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes the packed weight holds.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2 + self.amx.as_ref().map_or(0, amx::PackedAmx::bytes)
    }

    /// Whether the products run on AMX's tiles ([`amx::usable`] when packed).
    pub fn on_amx(&self) -> bool {
        self.amx.is_some()
    }

    /// The weight as packed for AMX's tiles, where they run its products.
    pub(crate) fn amx_packed(&self) -> Option<&amx::PackedAmx> {
        self.amx.as_ref()
    }

    /// `x [m, k]` (f32, row-major) times the weight transposed: `[m, n]` f32, over candle's
    /// threads. An error on a CPU without the instructions ([`cpu_has_bf16`]) or for `x` of another
    /// size.
    pub fn matmul(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        let mut c = vec![0f32; m * self.n];
        let threads = candle_core::utils::get_num_threads();
        self.product_into(x, m, &mut c, threads)?;
        Ok(c)
    }

    /// [`PackedBf16::matmul`] into `c` (`[m, n]`, overwritten) on at most `threads` threads (1: this
    /// one, as the fused attention's tasks call it).
    pub fn product_into(
        &self,
        x: &[f32],
        m: usize,
        c: &mut [f32],
        threads: usize,
    ) -> candle_core::Result<()> {
        self.product_then(x, m, c, threads, Epilogue::default())
    }

    /// [`PackedBf16::product_into`], then `epi` on each tile of the output while it is in the
    /// core's cache: the bias added and the GELU taken there, not in passes of their own over the
    /// whole `[m, n]` output (the same operations in the same order: the same bits).
    pub fn product_then(
        &self,
        x: &[f32],
        m: usize,
        c: &mut [f32],
        threads: usize,
        epi: Epilogue<'_>,
    ) -> candle_core::Result<()> {
        if self.amx.is_none() && !cpu_has_bf16() {
            candle_core::bail!("the bf16 kernel needs AVX512-BF16, which this CPU lacks");
        }
        if epi.bias.is_some_and(|b| b.len() != self.n) {
            candle_core::bail!(
                "bf16 kernel: a bias of {} values for {} outputs",
                epi.bias.map_or(0, <[f32]>::len),
                self.n
            );
        }
        if x.len() != m * self.k || c.len() != m * self.n {
            candle_core::bail!(
                "bf16 kernel: {} and {} values are not [{m}, {}] and [{m}, {}]",
                x.len(),
                c.len(),
                self.k,
                self.n
            );
        }
        let panels = self.n.div_ceil(NR);
        if panels == 0 || m == 0 {
            return Ok(());
        }
        if self.kp == 0 {
            c.fill(0.0);
            for row in c.chunks_mut(self.n) {
                // SAFETY: `row` holds `n` values, the bias `n` where there is one (checked above).
                unsafe { epi.apply(row.as_mut_ptr(), (1, self.n), 0, self.n) };
            }
            return Ok(());
        }
        if let Some(t) = &self.amx {
            // SAFETY: f32 and `MaybeUninit<f32>` have one layout; only f32 values are written.
            let c = unsafe { &mut *(c as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
            t.product_then(x, m, c, threads, epi);
            return Ok(());
        }
        // The activations are rounded to bf16 a block of rows at a time: the copy stays one block's
        // (`MC x k` bf16), whatever the sequence length.
        for m0 in (0..m).step_by(MC) {
            let mc = MC.min(m - m0);
            let a = pairs(
                &x[m0 * self.k..(m0 + mc) * self.k],
                mc,
                self.k,
                self.kp,
                threads,
            );
            self.rows_of_pairs(
                &a,
                mc,
                &mut c[m0 * self.n..(m0 + mc) * self.n],
                threads,
                epi,
            );
        }
        Ok(())
    }

    /// [`PackedBf16::product_into`] of activations already rounded: `a`, `m` rows of
    /// `ceil(k / 2)` bf16 pairs (the low half of each `u32` the even feature, the odd feature
    /// past `k` zero: [`bf16_bits`]' rounding), as the attention's probabilities come.
    pub fn pairs_product_into(
        &self,
        a: &[u32],
        m: usize,
        c: &mut [f32],
        threads: usize,
    ) -> candle_core::Result<()> {
        if self.amx.is_none() && !cpu_has_bf16() {
            candle_core::bail!("the bf16 kernel needs AVX512-BF16, which this CPU lacks");
        }
        if a.len() != m * self.kp || c.len() != m * self.n {
            candle_core::bail!(
                "bf16 kernel: {} pairs and {} values are not [{m}, {}] and [{m}, {}]",
                a.len(),
                c.len(),
                self.kp,
                self.n
            );
        }
        if self.kp == 0 {
            c.fill(0.0);
            return Ok(());
        }
        if let Some(t) = &self.amx {
            t.pairs_product_into(a, m, c, threads);
            return Ok(());
        }
        for m0 in (0..m).step_by(MC) {
            let mc = MC.min(m - m0);
            let (a, c) = (
                &a[m0 * self.kp..(m0 + mc) * self.kp],
                &mut c[m0 * self.n..(m0 + mc) * self.n],
            );
            self.rows_of_pairs(a, mc, c, threads, Epilogue::default());
        }
        Ok(())
    }

    /// The product of `m` rows of pairs `a` into `c` (`[m, n]`), `epi` on each tile, its column
    /// panels split over `threads` threads (`a` and `c` checked by the caller).
    fn rows_of_pairs(&self, a: &[u32], m: usize, c: &mut [f32], threads: usize, epi: Epilogue<'_>) {
        let panels = self.n.div_ceil(NR);
        let threads = threads.clamp(1, panels.max(1));
        let per = panels.div_ceil(threads);
        let out = SendPtr(c.as_mut_ptr());
        let work = |t: usize| {
            let range = (t * per)..((t + 1) * per).min(panels);
            // SAFETY: threads write disjoint column panels of the `m` rows of `c`; the kernel
            // stays in bounds.
            unsafe { self.panels(a, m, range, out.get(), epi) };
        };
        if threads == 1 {
            work(0);
        } else {
            rayon::scope(|s| {
                for t in 0..threads {
                    s.spawn(move |_| work(t));
                }
            });
        }
    }

    /// Panels `range` of the product of the `m` rows `a` (bf16 pairs) into `c` (`[m, n]`), `epi`
    /// on each tile after its last block of input features (on x86_64 only: elsewhere the tile's
    /// and the epilogue's stubs are unreachable, as [`cpu_has_bf16`] is false).
    unsafe fn panels(
        &self,
        a: &[u32],
        m: usize,
        range: std::ops::Range<usize>,
        c: *mut f32,
        epi: Epilogue<'_>,
    ) {
        for q0 in (0..self.kp).step_by(KC) {
            let kc = KC.min(self.kp - q0);
            for p in range.clone() {
                let cols = NR.min(self.n - p * NR);
                let b = self.data.as_ptr().add((p * self.kp + q0) * NR * 2);
                for r0 in (0..m).step_by(MR) {
                    let tile = Tile {
                        a: a.as_ptr().add(r0 * self.kp + q0),
                        lda: self.kp,
                        b,
                        kc,
                        c: c.add(r0 * self.n + p * NR),
                        ldc: self.n,
                        cols,
                        first: q0 == 0,
                    };
                    let rows = MR.min(m - r0);
                    tile.run(rows);
                    if q0 + kc == self.kp && (epi.bias.is_some() || epi.gelu) {
                        epi.apply(tile.c, (rows, self.n), p * NR, cols);
                    }
                }
            }
        }
    }
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedBf16 [{}, {}]", self.n, self.k)
    }
}

/// What a product does to its output tile by tile ([`PackedBf16::product_then`]): add `bias` (one
/// value per output column), then take the tanh GELU (`nn::gelu`'s function).
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub gelu: bool,
}

impl Epilogue<'_> {
    /// On a tile of `rows` rows (stride `ld`) of `cols` values at `c` (output columns from
    /// `col`), on AVX-512's vectors (the kernel's CPUs have them). Its own function with the
    /// feature enabled: a closure passed to `pointwise::widest` was compiled apart from it, for
    /// SSE (measured 4x slower).
    ///
    /// # Safety
    /// The CPU has AVX-512F; each row of the tile holds `cols` values, and the bias (where there is
    /// one) `col + cols`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn apply(
        &self,
        c: *mut f32,
        (rows, ld): (usize, usize),
        col: usize,
        cols: usize,
    ) {
        use super::pointwise::gelu_tanh;
        let bias = self.bias.map(|b| &b[col..col + cols]);
        // SAFETY (each arm): the caller's guarantee.
        unsafe {
            match (bias, self.gelu) {
                (Some(b), true) => each(c, (rows, ld), cols, b, |x, b| gelu_tanh(x + b)),
                (Some(b), false) => each(c, (rows, ld), cols, b, |x, b| x + b),
                (None, true) => each(c, (rows, ld), cols, &[], |x, _| gelu_tanh(x)),
                (None, false) => {}
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) unsafe fn apply(&self, _: *mut f32, _: (usize, usize), _: usize, _: usize) {
        unreachable!("the bf16 kernel runs on x86_64 only")
    }
}

/// `x = f(x, b)` for the `cols` values of each of `rows` rows (stride `ld`) at `c`, `b` the bias
/// of the value's column (`bias` empty: 0), sixteen values at a time: a loop of fixed length the
/// compiler turns into one vector's work (a tile's row is 32 values, fewer than a vectorized loop
/// over the slice takes per iteration).
///
/// # Safety
/// Each row holds `cols` values; `bias` is empty or holds `cols`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn each(
    c: *mut f32,
    (rows, ld): (usize, usize),
    cols: usize,
    bias: &[f32],
    f: impl Fn(f32, f32) -> f32,
) {
    let zeros = [0f32; 16];
    let whole = cols / 16 * 16;
    for r in 0..rows {
        // SAFETY: the caller's guarantee.
        let row = unsafe { std::slice::from_raw_parts_mut(c.add(r * ld), cols) };
        for (j, xs) in row[..whole].chunks_exact_mut(16).enumerate() {
            let bs = bias.get(16 * j..16 * j + 16).unwrap_or(&zeros);
            for i in 0..16 {
                xs[i] = f(xs[i], bs[i]);
            }
        }
        for (j, x) in row[whole..].iter_mut().enumerate() {
            *x = f(*x, bias.get(whole + j).copied().unwrap_or(0.0));
        }
    }
}

/// A raw output pointer shared by the threads (each writes its own panels).
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);

impl SendPtr {
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// The bf16 bits of `v`, rounded to nearest even (a NaN stays a NaN).
pub fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// A linear layer `x W^T + bias`, then the GELU where `gelu` is set, on a packed bf16 weight: `x`
/// `[m, k]` f32 on the CPU, `bias` `[n]` f32; `[m, n]` f32. The bias and the GELU run on each
/// output tile as the product leaves it ([`Epilogue`]). No backward (the weight is packed).
pub fn linear(
    w: &PackedBf16,
    x: &candle_core::Tensor,
    bias: Option<&candle_core::Tensor>,
    gelu: bool,
) -> candle_core::Result<candle_core::Tensor> {
    let (m, k) = x.dims2()?;
    if k != w.k {
        candle_core::bail!("bf16 linear: input has {k} features, the weight {}", w.k);
    }
    let bias = f32_values(bias)?;
    let threads = candle_core::utils::get_num_threads();
    let epi = Epilogue {
        bias: bias.as_deref(),
        gelu,
    };
    let c = on_f32_rows(x, |x| match &w.amx {
        // On AMX the output is written whole before it is read: not zeroed first (167 MB at most).
        Some(t) if m > 0 && w.n > 0 && w.kp > 0 && epi.bias.is_none_or(|b| b.len() == w.n) => {
            let fill = |c: &mut [std::mem::MaybeUninit<f32>]| {
                t.product_then(x, m, c, threads, epi);
                Ok(())
            };
            // SAFETY: the product writes all `m * n` values (`PackedAmx::product_then`).
            unsafe { crate::alloc::written(m * w.n, fill) }
        }
        _ => {
            let mut c = vec![0f32; m * w.n];
            w.product_then(x, m, &mut c, threads, epi)?;
            Ok(c)
        }
    })?;
    candle_core::Tensor::from_vec(c, (m, w.n), &candle_core::Device::Cpu)
}

/// A feed-forward `gelu(x W1^T + b1) W2^T + b2` on two packed weights, `x` `[m, k]` f32 on the
/// CPU: on AMX's tiles, its hidden activations going from one product to the next as bf16 pairs
/// (`amx::feed_forward`: the same bits as [`linear`] twice). `None` where the weights are not
/// both packed for AMX (or do not chain).
pub fn feed_forward(
    (w1, b1): (&PackedBf16, Option<&candle_core::Tensor>),
    (w2, b2): (&PackedBf16, Option<&candle_core::Tensor>),
    x: &candle_core::Tensor,
) -> candle_core::Result<Option<candle_core::Tensor>> {
    let (Some(a1), Some(a2)) = (&w1.amx, &w2.amx) else {
        return Ok(None);
    };
    let m = x.dims2()?.0;
    let (b1, b2) = (f32_values(b1)?, f32_values(b2)?);
    let threads = candle_core::utils::get_num_threads();
    let y = on_f32_rows(x, |x| {
        let (first, second) = ((a1, b1.as_deref()), (a2, b2.as_deref()));
        Ok(amx::feed_forward(first, second, x, m, threads))
    })?;
    y.map(|y| candle_core::Tensor::from_vec(y, (m, w2.n), &candle_core::Device::Cpu))
        .transpose()
}

/// `f` on `x`'s values as f32, read in place (`x` converted first where it is not contiguous
/// f32).
pub(super) fn on_f32_rows<R>(
    x: &candle_core::Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let x = x.to_dtype(candle_core::DType::F32)?.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    else {
        candle_core::bail!("bf16 linear: f32 input on the CPU only");
    };
    f(&v[a..b])
}

/// A bias's values in f32, where there is one.
pub(super) fn f32_values(b: Option<&candle_core::Tensor>) -> candle_core::Result<Option<Vec<f32>>> {
    b.map(|b| b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>())
        .transpose()
}
