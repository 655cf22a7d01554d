//! f32 matrix products of linear layers on AVX-512 with weights packed once at load (issue 45):
//! Intel's AVX-512 CPUs ran candle's gemm at 0.6-0.9x MKL's rate on a 720-token call's products,
//! and a whole f32 call at 0.70-0.88x PyTorch's (docs/benchmarks.md, "Intel Xeon with AMX").
//!
//! Written here rather than taken from a library: gemm (candle's) repacks the weight on every
//! product and blocks for its own shapes; oneDNN (`MAGCACHE_ONEDNN`, which still takes precedence
//! where set) is a system library the default build may not require. One micro-kernel: 12 rows of
//! activations by a panel of 32 output columns, 24 accumulators of the 32 vector registers, the
//! panel's two vectors loaded once a feature for 12 rows' FMAs, each taking its row's value as a
//! broadcast memory operand (the loop in `asm!`: the compiler broadcasts into a register first,
//! one instruction more a row, and measured slower).
//!
//! Layouts. The weight `[n, k]` is packed at load into panels of [`NR`] output columns, each panel
//! `[k][NR]` (zero past `n`); an f16 weight stays f16 there, widened a block at a time as a task
//! reaches it (`Panels`). A product copies each block of up to `MC` rows of activations (a
//! task's rows where rows are split between threads, below) into tiles of `MR` rows,
//! feature-major within a block of `KC` features (`[KC][MR]`, rows past `m` zero), once, in a
//! per-thread buffer kept from product to product. Each group of `GROUP` panels then runs against
//! the block: its output block (`MC x GROUP x NR` f32: 384 KB) stays in L2 across the blocks of
//! features, with the block of packed rows (`MC x KC`: 768 KB) that streams past each panel's
//! block (`KC x NR`: 32 KB), which stays in L1 (streaming the panels past a tile in L1 instead
//! measured no faster). Threads: where the rows make at least `MIN_TASKS` tasks of up to
//! `TASK_TILES` tiles a thread (over 2 304 rows on two threads), the rows are split between them,
//! each task packing its own rows and running all the panels against them with no wait on
//! another thread; fewer rows split each block's groups of panels between the threads (more,
//! smaller tasks, which balance a busy host's stalls better).
//! A linear layer's bias, and a feed-forward's GELU, run on each output tile after its last block
//! of features ([`Epilogue`], as the bf16 kernel does).
//!
//! Each output value is summed over the features in the same order whatever the threads: runs
//! are reproducible; they differ from gemm's in the last bits (another order of the sums).
//!
//! The f32 attention's two products run on the same micro-kernel where this one runs
//! (`nn/attention_f32.rs`: the scores transposed, read in place as the second product's rows).

use super::bf16_gemm::Epilogue;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Output columns per panel (two 16-lane accumulators a row).
pub const NR: usize = 32;
/// Rows of the micro-kernel.
pub(super) const MR: usize = 12;
// The kernel's `asm!` names one register pair per row.
const _: () = assert!(MR == 12);
/// Input features per cache block.
const KC: usize = 256;
/// Rows per block of activations: 64 tiles (the output block of a group stays in L2).
const MC: usize = 64 * MR;
/// Column panels per task.
const GROUP: usize = 4;
/// Most tiles of rows per task where rows are split between threads.
const TASK_TILES: usize = 32;
/// Fewest tasks a thread for rows to be split between threads (fewer: columns are, in more
/// tasks, which a busy host's stalls balance better).
const MIN_TASKS: usize = 4;

/// The variable that turns the kernel on or off.
pub const ENV: &str = "MAGCACHE_CPU_F32";

/// Whether f32 linear weights are packed for this kernel (and the f32 attention runs on it):
/// `MAGCACHE_CPU_F32=on` on a CPU with AVX-512F, and by default on Intel's CPUs with AVX-512F
/// (where it was measured: 1.1-1.4x gemm's products; AMD's Zen 4 and 5 ran gemm at MKL's rate,
/// so gemm stays there unless `on`).
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let var = crate::env::env_switch(ENV, "").ok().flatten();
        choice(var, cpu_has_avx512(), intel(&cpuinfo))
    })
}

/// [`available`]'s choice from the switch (`None`: unset), the CPU's AVX-512F and its vendor.
pub fn choice(switch: Option<bool>, avx512: bool, intel: bool) -> bool {
    avx512 && switch.unwrap_or(intel)
}

/// Whether a `/proc/cpuinfo` text is an Intel CPU's.
pub fn intel(cpuinfo: &str) -> bool {
    magcache_core::runtime::placement::cpuinfo_field(cpuinfo, "vendor_id") == Some("GenuineIntel")
}

/// Refuses a `MAGCACHE_CPU_F32` other than `on` or `off`, and `on` on a CPU without AVX-512F (one
/// line naming it), before a command starts: [`available`] reads it deep in a run.
pub fn check_switch() -> magcache_core::Result<()> {
    let unset = "on for Intel CPUs with AVX-512F";
    let var = crate::env::env_switch(ENV, unset).map_err(magcache_core::Error::msg)?;
    if var == Some(true) && !cpu_has_avx512() {
        return Err(magcache_core::Error::msg(format!(
            "{ENV}=on: this CPU has no AVX-512F, which the f32 kernel needs"
        )));
    }
    Ok(())
}

/// The CPU's AVX-512F (the kernel's instructions).
pub fn cpu_has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An f32 or f16 weight `[n, k]` packed for the kernel.
#[derive(Clone)]
pub struct PackedF32 {
    n: usize,
    k: usize,
    /// `panels x k x NR` values, zero past `n`.
    data: Panels,
}

/// The panels' values. An f16 weight keeps its two bytes a value (half an f32 one's memory): each
/// block of a panel (`KC x NR`) is widened to f32 into a buffer in L1 as a task reaches it, then
/// runs against all the task's rows, so the products are f32's (sums in f32, as PyTorch's f16
/// products on a CPU). Not AVX512-FP16's own FMAs (`vfmadd231ph`): they sum in f16, 11 bits for
/// sums over thousands of features; nor AMX-FP16 (`tdpfp16ps`), which no CPU here had.
#[derive(Clone)]
enum Panels {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl std::fmt::Debug for PackedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dtype = match self.data {
            Panels::F32(_) => "f32",
            Panels::F16(_) => "f16",
        };
        write!(f, "PackedF32 [{}, {}] {dtype}", self.n, self.k)
    }
}

impl PackedF32 {
    /// Packs the row-major values of `w [n, k]`.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        let data = Panels::F32(pack_with(n, k, |c, j| w[c * k + j]));
        PackedF32 { n, k, data }
    }

    /// Packs the row-major f16 values of `w [n, k]`, kept in f16.
    pub fn pack_f16(w: &[half::f16], n: usize, k: usize) -> Self {
        let data = Panels::F16(pack_with(n, k, |c, j| w[c * k + j]));
        PackedF32 { n, k, data }
    }

    /// Whether the panels hold f16 values.
    pub fn is_f16(&self) -> bool {
        matches!(self.data, Panels::F16(_))
    }

    /// Packs an f32 or f16 weight `[n, k]` on the CPU (in its dtype), read in place; another
    /// dtype is converted to f32 first.
    pub fn from_tensor(w: &candle_core::Tensor) -> candle_core::Result<Self> {
        use candle_core::{CpuStorage, DType, Storage};
        let (n, k) = w.dims2()?;
        let to = match w.dtype() {
            DType::F16 => DType::F16,
            _ => DType::F32,
        };
        let w = w.to_dtype(to)?.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(Self::pack(&v[a..b], n, k)),
            (Storage::Cpu(CpuStorage::F16(v)), Some((a, b))) => Ok(Self::pack_f16(&v[a..b], n, k)),
            _ => candle_core::bail!("f32 packing: f32 or f16 weights on the CPU only"),
        }
    }

    /// The weight `[n, k]` as a plain tensor again, in its dtype (a differentiable run's product).
    pub fn unpack(&self) -> candle_core::Result<candle_core::Tensor> {
        let (n, k) = (self.n, self.k);
        let dev = &candle_core::Device::Cpu;
        match &self.data {
            Panels::F32(d) => candle_core::Tensor::from_vec(unpack(d, n, k), (n, k), dev),
            Panels::F16(d) => candle_core::Tensor::from_vec(unpack(d, n, k), (n, k), dev),
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
        match &self.data {
            Panels::F32(d) => d.len() * 4,
            Panels::F16(d) => d.len() * 2,
        }
    }

    /// `x [m, k]` (row-major) times the weight transposed into `c` (`[m, n]`, every value
    /// written), `epi` on each output tile, on at most `threads` threads.
    pub fn product_then(
        &self,
        x: &[f32],
        m: usize,
        c: &mut [MaybeUninit<f32>],
        threads: usize,
        epi: Epilogue<'_>,
    ) -> candle_core::Result<()> {
        if !cpu_has_avx512() {
            candle_core::bail!("the f32 kernel needs AVX-512F, which this CPU lacks");
        }
        let (n, k) = (self.n, self.k);
        if x.len() != m * k || c.len() != m * n || epi.bias.is_some_and(|b| b.len() != n) {
            candle_core::bail!(
                "f32 kernel: {} and {} values are not [{m}, {k}] and [{m}, {n}] (bias of {:?})",
                x.len(),
                c.len(),
                epi.bias.map(<[f32]>::len)
            );
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            for row in c.chunks_mut(n) {
                row.fill(MaybeUninit::new(0.0));
                // SAFETY: `row` holds `n` values, now written; the bias `n` (checked above); the
                // CPU has AVX-512F (checked above).
                unsafe { epi.apply(row.as_mut_ptr().cast(), (1, n), 0, n) };
            }
            return Ok(());
        }
        let out = super::bf16_gemm::SendPtr(c.as_mut_ptr().cast());
        let tiles = m.div_ceil(MR);
        // Tasks of up to `TASK_TILES` tiles, as many for each thread (0 threads: one).
        let tasks = threads.max(1) * tiles.div_ceil(threads.max(1) * TASK_TILES);
        if threads > 1 && tasks >= MIN_TASKS * threads {
            // Rows split between threads: each task packs its own rows and runs them against
            // every panel, no thread waiting for another's packing or block of rows.
            let per = tiles.div_ceil(tasks) * MR;
            let task = |m0: usize| {
                // SAFETY: tasks write disjoint rows, all their columns.
                unsafe { self.rows(x, (m0, per.min(m - m0)), out, epi, 1) };
            };
            let task = &task;
            rayon::scope(|s| {
                (0..m)
                    .step_by(per)
                    .for_each(|m0| s.spawn(move |_| task(m0)))
            });
            return Ok(());
        }
        for m0 in (0..m).step_by(MC) {
            // SAFETY: one call at a time, for rows `m0..m0 + mc` of the output.
            unsafe { self.rows(x, (m0, MC.min(m - m0)), out, epi, threads) };
        }
        Ok(())
    }

    /// Rows `m0..m0 + mc` of the output: the rows packed once, then each group of panels against
    /// them (tasks over `threads`).
    ///
    /// # Safety
    /// `out` is the `[m, n]` output, `x` the `[m, k]` input, `m0 + mc <= m`; no other thread
    /// writes these rows; the CPU has AVX-512F.
    unsafe fn rows(
        &self,
        x: &[f32],
        (m0, mc): (usize, usize),
        out: super::bf16_gemm::SendPtr,
        epi: Epilogue<'_>,
        threads: usize,
    ) {
        let k = self.k;
        let panels = self.n.div_ceil(NR);
        let groups = 0..panels.div_ceil(GROUP);
        let tiles = mc.div_ceil(MR);
        super::bf16_gemm::amx::with_rows(tiles * MR * k, |buf| {
            // SAFETY: u32 and f32 have one size and alignment; the buffer is only read as f32
            // after `pack_rows` wrote all of it.
            let a = unsafe { &mut *(buf as *mut [u32] as *mut [f32]) };
            pack_rows(&x[m0 * k..(m0 + mc) * k], mc, k, a, threads);
            let a = &*a;
            let work = |g: usize| {
                let range = g * GROUP..((g + 1) * GROUP).min(panels);
                // SAFETY: each task writes the columns of its own panels of rows `m0..m0 +
                // mc`; the kernel stays within them (rows and columns masked).
                unsafe { self.group(a, (m0, mc), range, out.get(), epi) };
            };
            if threads <= 1 || groups.len() <= 1 {
                groups.for_each(work);
            } else {
                let work = &work;
                rayon::scope(|s| groups.for_each(|g| s.spawn(move |_| work(g))));
            }
        });
    }

    /// Panels `range` of rows `m0..m0 + mc` of the output `c`, from the packed rows `a`.
    ///
    /// # Safety
    /// `a` holds the rows packed by [`pack_rows`]; `c` is `[m, n]` with `m0 + mc <= m`; no other
    /// thread writes these panels of these rows; the CPU has AVX-512F.
    unsafe fn group(
        &self,
        a: &[f32],
        (m0, mc): (usize, usize),
        range: std::ops::Range<usize>,
        c: *mut f32,
        epi: Epilogue<'_>,
    ) {
        let (n, k) = (self.n, self.k);
        let tiles = mc.div_ceil(MR);
        // An f16 panel's block widened to f32 (32 KB, in L1 while the rows stream past it), on
        // whole lines as the f32 panels are.
        #[repr(align(64))]
        struct Lines([f32; KC * NR]);
        impl Lines {
            fn zeroed() -> Self {
                Lines([0.0; KC * NR])
            }
        }
        let mut wide: Option<Lines> = None;
        for q0 in (0..k).step_by(KC) {
            let kc = KC.min(k - q0);
            let last = q0 + kc == k;
            for p in range.clone() {
                let cols = NR.min(n - p * NR);
                let at = (p * k + q0) * NR;
                let b = match &self.data {
                    Panels::F32(d) => d.as_ptr().add(at),
                    Panels::F16(d) => {
                        // Made on the first f16 block only: f32 panels need no buffer.
                        let wide = wide.get_or_insert_with(Lines::zeroed);
                        widen_f16(&d[at..at + kc * NR], &mut wide.0);
                        wide.0.as_ptr()
                    }
                };
                for t in 0..tiles {
                    let rows = MR.min(mc - t * MR);
                    let at = a.as_ptr().add(q0 * tiles * MR + t * kc * MR);
                    let ct = c.add((m0 + t * MR) * n + p * NR);
                    kernel((at, MR), b, kc, (ct, n), (rows, cols), q0 == 0);
                    if last && (epi.bias.is_some() || epi.gelu) {
                        epi.apply(ct, (rows, n), p * NR, cols);
                    }
                }
            }
        }
    }
}

/// A weight `[n, k]` whose element `(c, j)` is `get(c, j)` in panels (`panels x k x NR`, zero past
/// `n`), panels over candle's threads where it is large (each panel written in order).
fn pack_with<T: Copy + Default + Send + Sync>(
    n: usize,
    k: usize,
    get: impl Fn(usize, usize) -> T + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let mut data = vec![T::default(); n.div_ceil(NR) * k * NR];
    let one = |(p, panel): (usize, &mut [T])| {
        let cols = NR.min(n - p * NR);
        for (j, out) in panel.chunks_exact_mut(NR).enumerate() {
            for (c, v) in out.iter_mut().take(cols).enumerate() {
                *v = get(p * NR + c, j);
            }
        }
    };
    let len = (k * NR).max(1);
    if candle_core::utils::get_num_threads() > 1 && n * k >= 1 << 16 {
        data.par_chunks_mut(len).enumerate().for_each(one);
    } else {
        data.chunks_mut(len).enumerate().for_each(one);
    }
    data
}

/// The row-major `[n, k]` values of panels packed by [`pack_with`].
fn unpack<T: Copy + Default>(data: &[T], n: usize, k: usize) -> Vec<T> {
    let mut w = vec![T::default(); n * k];
    for (i, row) in w.chunks_mut(k.max(1)).enumerate().take(n) {
        let (p, c) = (i / NR, i % NR);
        for (j, v) in row.iter_mut().enumerate() {
            *v = data[(p * k + j) * NR + c];
        }
    }
    w
}

/// Widens `src` into `dst` (as many values; a multiple of 16), 16 at a time. Not `half`'s slice
/// conversion: 8 at a time through F16C, it took a 12-row product on f16 weights from 70-88 GFLOP/s
/// to 25-58 (the widening weighs most where few rows share each block).
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    for (s, d) in src.chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
        let h = _mm256_loadu_si256(s.as_ptr().cast());
        _mm512_storeu_ps(d.as_mut_ptr(), _mm512_cvtph_ps(h));
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn widen_f16(_: &[half::f16], _: &mut [f32]) {
    unreachable!("the f32 kernel runs on x86_64 only")
}

/// Copies `mc` rows of `x` (`[mc, k]`) into tiles of `MR` rows, each block of `KC` features
/// feature-major (`[kc][MR]`; block `q0` starts at `q0 * tiles * MR`, its tile `t` at `t * kc *
/// MR` within it), rows past `mc` zero; over `threads` threads by tiles.
fn pack_rows(x: &[f32], mc: usize, k: usize, a: &mut [f32], threads: usize) {
    let tiles = mc.div_ceil(MR);
    let one = |t: usize, a: super::bf16_gemm::SendPtr| {
        let rows = MR.min(mc - t * MR);
        for q0 in (0..k).step_by(KC) {
            let kc = KC.min(k - q0);
            let base = q0 * tiles * MR + t * kc * MR;
            // SAFETY: the tile's block is `kc * MR` values from `base`, inside the buffer
            // (`tiles * MR * k` values); tasks write disjoint tiles.
            let dst = unsafe { std::slice::from_raw_parts_mut(a.get().add(base), kc * MR) };
            if rows < MR {
                dst.fill(0.0);
            }
            // Feature-major writes, one feature's row values after another (12 read streams).
            let src: [&[f32]; MR] = std::array::from_fn(|r| {
                let row = t * MR + r.min(rows - 1);
                &x[row * k + q0..row * k + q0 + kc]
            });
            for (q, out) in dst.chunks_exact_mut(MR).enumerate() {
                for (o, s) in out.iter_mut().zip(&src).take(rows) {
                    *o = s[q];
                }
            }
        }
    };
    let out = super::bf16_gemm::SendPtr(a.as_mut_ptr());
    if threads <= 1 || tiles < 4 {
        (0..tiles).for_each(|t| one(t, out));
    } else {
        let per = tiles.div_ceil(2 * threads);
        let one = &one;
        rayon::scope(|s| {
            for t0 in (0..tiles).step_by(per) {
                s.spawn(move |_| (t0..(t0 + per).min(tiles)).for_each(|t| one(t, out)));
            }
        });
    }
}

/// One tile: the packed rows `a` (feature `q`'s `MR` row values at `a + q * lda`) against the
/// panel block `b` (`[kc][NR]`), into the first `rows` rows and `cols` columns of `c` (stride
/// `ldc`), added to what `c` holds unless `first`. All `MR` rows are read whatever `rows`.
///
/// # Safety
/// `a` and `b` hold `kc` features; `c` holds the rows and columns written; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn kernel(
    (a, lda): (*const f32, usize),
    b: *const f32,
    kc: usize,
    (c, ldc): (*mut f32, usize),
    (rows, cols): (usize, usize),
    first: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    if kc > 0 {
        // The loop is in `asm!` for a form the compiler does not choose: each FMA takes its
        // row's value as a broadcast memory operand (`{1to16}`) where the compiler broadcasts it
        // into a register for the row's two FMAs; one instruction fewer a row, and the kernel
        // ran 1.06-1.09x faster in cache (docs/benchmarks.md, 2026-11-29).
        // SAFETY: reads `kc` features of `a` (`MR` values at `a + q * lda`) and `kc * NR` values
        // of `b`, which the caller guarantees; writes only the named registers; `kc > 0`.
        std::arch::asm!(
            "2:",
            "vmovups zmm24, [{b}]",
            "vmovups zmm25, [{b} + 64]",
            "vfmadd231ps zmm0, zmm24, dword ptr [{a}]{{1to16}}",
            "vfmadd231ps zmm1, zmm25, dword ptr [{a}]{{1to16}}",
            "vfmadd231ps zmm2, zmm24, dword ptr [{a} + 4]{{1to16}}",
            "vfmadd231ps zmm3, zmm25, dword ptr [{a} + 4]{{1to16}}",
            "vfmadd231ps zmm4, zmm24, dword ptr [{a} + 8]{{1to16}}",
            "vfmadd231ps zmm5, zmm25, dword ptr [{a} + 8]{{1to16}}",
            "vfmadd231ps zmm6, zmm24, dword ptr [{a} + 12]{{1to16}}",
            "vfmadd231ps zmm7, zmm25, dword ptr [{a} + 12]{{1to16}}",
            "vfmadd231ps zmm8, zmm24, dword ptr [{a} + 16]{{1to16}}",
            "vfmadd231ps zmm9, zmm25, dword ptr [{a} + 16]{{1to16}}",
            "vfmadd231ps zmm10, zmm24, dword ptr [{a} + 20]{{1to16}}",
            "vfmadd231ps zmm11, zmm25, dword ptr [{a} + 20]{{1to16}}",
            "vfmadd231ps zmm12, zmm24, dword ptr [{a} + 24]{{1to16}}",
            "vfmadd231ps zmm13, zmm25, dword ptr [{a} + 24]{{1to16}}",
            "vfmadd231ps zmm14, zmm24, dword ptr [{a} + 28]{{1to16}}",
            "vfmadd231ps zmm15, zmm25, dword ptr [{a} + 28]{{1to16}}",
            "vfmadd231ps zmm16, zmm24, dword ptr [{a} + 32]{{1to16}}",
            "vfmadd231ps zmm17, zmm25, dword ptr [{a} + 32]{{1to16}}",
            "vfmadd231ps zmm18, zmm24, dword ptr [{a} + 36]{{1to16}}",
            "vfmadd231ps zmm19, zmm25, dword ptr [{a} + 36]{{1to16}}",
            "vfmadd231ps zmm20, zmm24, dword ptr [{a} + 40]{{1to16}}",
            "vfmadd231ps zmm21, zmm25, dword ptr [{a} + 40]{{1to16}}",
            "vfmadd231ps zmm22, zmm24, dword ptr [{a} + 44]{{1to16}}",
            "vfmadd231ps zmm23, zmm25, dword ptr [{a} + 44]{{1to16}}",
            "add {a}, {lda}",
            "sub {b}, -128",
            "dec {n}",
            "jnz 2b",
            a = inout(reg) a => _,
            b = inout(reg) b => _,
            n = inout(reg) kc => _,
            lda = in(reg) lda * 4,
            inout("zmm0") acc[0][0], inout("zmm1") acc[0][1],
            inout("zmm2") acc[1][0], inout("zmm3") acc[1][1],
            inout("zmm4") acc[2][0], inout("zmm5") acc[2][1],
            inout("zmm6") acc[3][0], inout("zmm7") acc[3][1],
            inout("zmm8") acc[4][0], inout("zmm9") acc[4][1],
            inout("zmm10") acc[5][0], inout("zmm11") acc[5][1],
            inout("zmm12") acc[6][0], inout("zmm13") acc[6][1],
            inout("zmm14") acc[7][0], inout("zmm15") acc[7][1],
            inout("zmm16") acc[8][0], inout("zmm17") acc[8][1],
            inout("zmm18") acc[9][0], inout("zmm19") acc[9][1],
            inout("zmm20") acc[10][0], inout("zmm21") acc[10][1],
            inout("zmm22") acc[11][0], inout("zmm23") acc[11][1],
            out("zmm24") _,
            out("zmm25") _,
            options(nostack, readonly),
        );
    }
    let mask = |n: usize| -> __mmask16 { ((1u32 << n) - 1) as __mmask16 };
    let masks = [mask(cols.min(16)), mask(cols.saturating_sub(16))];
    for (r, acc) in acc.iter().enumerate().take(rows) {
        let cr = c.add(r * ldc);
        for (h, (&v, &mk)) in acc.iter().zip(&masks).enumerate() {
            let at = cr.add(16 * h);
            let v = if first {
                v
            } else {
                _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, at))
            };
            _mm512_mask_storeu_ps(at, mk, v);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn kernel(
    _: (*const f32, usize),
    _: *const f32,
    _: usize,
    _: (*mut f32, usize),
    _: (usize, usize),
    _: bool,
) {
    unreachable!("the f32 kernel runs on x86_64 only")
}

/// A linear layer `x W^T + bias`, then the GELU where `gelu` is set, on a packed f32 weight: `x`
/// `[m, k]` on the CPU (f32 after conversion), `bias` `[n]`; `[m, n]` f32. No backward.
pub fn linear(
    w: &PackedF32,
    x: &candle_core::Tensor,
    bias: Option<&candle_core::Tensor>,
    gelu: bool,
) -> candle_core::Result<candle_core::Tensor> {
    let (m, k) = x.dims2()?;
    if k != w.k {
        candle_core::bail!("f32 linear: input has {k} features, the weight {}", w.k);
    }
    let bias = super::bf16_gemm::f32_values(bias)?;
    let epi = Epilogue {
        bias: bias.as_deref(),
        gelu,
    };
    let threads = candle_core::utils::get_num_threads();
    let c = super::bf16_gemm::on_f32_rows(x, |x| {
        // SAFETY: the product writes all `m * n` values where it returns `Ok`.
        unsafe { crate::alloc::written(m * w.n, |c| w.product_then(x, m, c, threads, epi)) }
    })?;
    candle_core::Tensor::from_vec(c, (m, w.n), &candle_core::Device::Cpu)
}
