//! The bf16 products on AMX's tiles (`tdpbf16ps`: a 16 x 16 f32 tile += a 16 x 32 bf16 tile
//! times a 32 x 16 one), where the CPU has AMX and Linux lets this process use it
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), unless `MAGCACHE_AMX=off`.
//!
//! Written here, with stable `asm!` (the AMX intrinsics are unstable in Rust 1.95): each block of
//! 32 x 32 outputs is four accumulator tiles fed by two tiles of activations and two of weights
//! (all eight tile registers) per 32 input features. Operands start on 64-byte lines and their
//! rows are whole lines: AMX's tile rows are 64 bytes, and a row 16 bytes past a line took two
//! (a tile load ran 13 ns aligned, 26 ns unaligned on the AMX Xeon measured; docs/benchmarks.md).
//!
//! Layouts. The weight `[n, k]` is packed once at load into panels of 32 output columns; for each
//! pair of input features (`k` padded with zeros to a multiple of 32 features) a panel holds its 32
//! columns' pairs, one `u32` (`(w[c][2q], w[c][2q + 1])` as bf16) a column: 128 bytes a pair. A
//! step of 16 pairs is two weight tiles, columns 0-15 and 16-31, their rows 128 bytes apart (two
//! contiguous 1 KB tiles instead ran level within the host's noise). The activations are rounded to
//! bf16 pairs per product into rows of whole lines (the padded pair count), their row count padded
//! to 32 with zero rows.
//!
//! Loop order (per task, a range of panels: about four tasks a thread): the input pairs in blocks
//! of `KC` (256), the panels in groups of `NB` (16; the group's block of weights, 512 KB, stays in
//! L2), every 32 rows of activations (their block, 32 KB, in L1), each panel of the group. Outputs
//! are accumulated in place across blocks of pairs; a block of outputs past the last row or column
//! runs on a scratch tile and is copied out.

use super::{Epilogue, SendPtr, NR};

#[path = "bf16_amx_ffn.rs"]
mod ffn;
pub(crate) use ffn::feed_forward;
use std::sync::OnceLock;

/// Input pairs per cache block (512 features).
const KC: usize = 256;
/// Panels per group (their block of `KC` pairs: 16 x 32 KB).
const NB: usize = 16;
/// Rows of activations rounded to bf16 at a time (their copy: `ROWS x k` bf16 at most).
const ROWS: usize = 1024;
/// Pairs per tile row (64 bytes).
const STEP: usize = 16;

/// The variable that turns the AMX products off (`off`) where the CPU has AMX.
pub const ENV: &str = "MAGCACHE_AMX";

/// Whether the bf16 products run on AMX's tiles: the CPU has `amx_bf16` and `amx_tile`,
/// `MAGCACHE_AMX` is not `off`, and Linux granted this process the tiles' state (asked once). A
/// CPU with AMX whose kernel refuses it prints one note and runs without.
pub fn usable() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let var = std::env::var(ENV).unwrap_or_default();
        if var.eq_ignore_ascii_case("off") || !cpu_has_amx() {
            return false;
        }
        match request_tiles() {
            Ok(()) => true,
            Err(e) => {
                eprintln!(
                    "note: this CPU has AMX, but Linux refused this process its tiles ({e}): bf16 products run without them"
                );
                false
            }
        }
    })
}

/// Refuses a `MAGCACHE_AMX` other than `on` or `off` (one line naming it), before a command
/// starts: [`usable`] reads it deep in a run.
pub fn check_switch() -> magcache_core::Result<()> {
    let unset = "on where the CPU has AMX";
    crate::env::env_switch(ENV, unset).map_err(magcache_core::Error::msg)?;
    Ok(())
}

/// The CPU's `amx_bf16` flag in `/proc/cpuinfo` (listed only where the kernel supports the tiles'
/// state; AMX-BF16 comes with AMX-TILE), read once: core's check, which the allocator's default
/// follows too.
pub use magcache_core::runtime::placement::cpu_has_amx;

/// Asks Linux for the tiles' state (`ARCH_REQ_XCOMP_PERM` for `XFEATURE_XTILEDATA`): once per
/// process, for all its threads.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tiles() -> Result<(), String> {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with two integer arguments.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    match r {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error().to_string()),
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tiles() -> Result<(), String> {
    Err("AMX is used on Linux only".into())
}

/// One 64-byte line of `u32`s: the unit of [`Lines`].
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u32; 16]);

/// `len` zeroed `u32`s starting on a 64-byte line.
#[derive(Clone)]
pub(super) struct Lines {
    lines: Vec<Line>,
    len: usize,
}

impl Lines {
    fn zeroed(len: usize) -> Self {
        Lines {
            lines: vec![Line([0; 16]); len.div_ceil(16)],
            len,
        }
    }

    fn as_slice(&self) -> &[u32] {
        // SAFETY: the lines hold at least `len` u32s, contiguous (`Line` is `[u32; 16]`, no
        // padding).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u32>(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u32] {
        // SAFETY: as `as_slice`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u32>(), self.len) }
    }
}

/// A weight `[n, k]` packed for the tiles (the module's doc has the layout).
#[derive(Clone)]
pub(crate) struct PackedAmx {
    n: usize,
    k: usize,
    /// Input pairs, padded to a multiple of [`STEP`].
    kp: usize,
    data: Lines,
}

impl PackedAmx {
    /// Packs a weight `[n, k]` whose element `c * k + j` has the bf16 bits `bits(c * k + j)`.
    pub(super) fn pack_with(n: usize, k: usize, bits: impl Fn(usize) -> u16 + Sync) -> Self {
        use rayon::prelude::*;
        let kp = k.div_ceil(2).next_multiple_of(STEP);
        let panels = n.div_ceil(NR);
        let mut data = Lines::zeroed(panels * kp * NR);
        data.as_mut_slice()
            .par_chunks_mut((kp * NR).max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..NR.min(n - p * NR) {
                    let row = (p * NR + c) * k;
                    for q in 0..k.div_ceil(2) {
                        let lo = bits(row + 2 * q) as u32;
                        let hi = match 2 * q + 1 < k {
                            true => bits(row + 2 * q + 1) as u32,
                            false => 0,
                        };
                        panel[q * NR + c] = lo | (hi << 16);
                    }
                }
            });
        PackedAmx { n, k, kp, data }
    }

    /// The weight `[cols, rows]` whose element `(c, j)` is `w[j][c]` (`w [rows, cols]`, f32,
    /// rounded to bf16): the attention's values, read a pair of rows at a time (each pair of
    /// input features is two rows of `w`), not an element at a time across rows.
    pub(super) fn transposed_f32(w: &[f32], rows: usize, cols: usize) -> Self {
        use super::bf16_bits;
        let (n, k) = (cols, rows);
        let kp = k.div_ceil(2).next_multiple_of(STEP);
        let mut data = Lines::zeroed(n.div_ceil(NR) * kp * NR);
        for (p, panel) in data.as_mut_slice().chunks_mut((kp * NR).max(1)).enumerate() {
            let (c0, width) = (p * NR, NR.min(n - p * NR));
            for (q, out) in panel.chunks_mut(NR).take(k.div_ceil(2)).enumerate() {
                let lo = &w[2 * q * cols + c0..2 * q * cols + c0 + width];
                let hi = w.get((2 * q + 1) * cols + c0..(2 * q + 1) * cols + c0 + width);
                for (i, o) in out[..width].iter_mut().enumerate() {
                    let h = hi.map_or(0, |h| bf16_bits(h[i]) as u32);
                    *o = bf16_bits(lo[i]) as u32 | (h << 16);
                }
            }
        }
        PackedAmx { n, k, kp, data }
    }

    /// Input pairs a row of activations holds for this weight: `ceil(k / 2)` padded to 16.
    pub(crate) fn row_pairs(&self) -> usize {
        self.kp
    }

    /// On this thread's tiles: `c` (a row every `ldc` values) = the `rows` rows of pairs `a` (a
    /// multiple of 32, a row every `lda` pairs, a multiple of 16; best on a 64-byte line) times
    /// the weight's panels `panels` (32 output columns each, `c`'s columns from 0) over its input
    /// pairs `q0 .. q0 + 16 * steps` (`q0` a multiple of 16), added to what `c` holds where `add`.
    /// The attention's products, a block of keys at a time. Panics where a size would read or
    /// write out of bounds; nothing where AMX is not usable (`false`).
    pub(crate) fn tile_product(
        &self,
        (a, lda, rows): (&[u32], usize, usize),
        panels: std::ops::Range<usize>,
        (q0, steps): (usize, usize),
        (c, ldc): (&mut [f32], usize),
        add: bool,
    ) -> bool {
        assert!(rows % 32 == 0 && lda % STEP == 0 && q0 % STEP == 0);
        assert!(q0 + steps * STEP <= self.kp && steps * STEP <= lda);
        assert!(a.len() >= rows * lda && panels.end <= self.n.div_ceil(NR));
        assert!(
            ldc >= panels.len() * NR && c.len() >= rows.saturating_sub(1) * ldc + panels.len() * NR
        );
        if !usable() {
            return false;
        }
        // SAFETY: AMX is usable; the asserts keep every tile inside `a`, the weight and `c`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            tiles::configure();
            for (i, p) in panels.enumerate() {
                let b = self
                    .data
                    .as_slice()
                    .as_ptr()
                    .add(p * self.kp * NR + q0 * NR);
                for r0 in (0..rows).step_by(32) {
                    let block = tiles::Block {
                        a: a.as_ptr().add(r0 * lda),
                        lda: lda * 4,
                        b,
                        steps,
                    };
                    block.run(c.as_mut_ptr().add(r0 * ldc + i * NR), ldc * 4, add);
                }
            }
            tiles::release();
        }
        cfg!(target_arch = "x86_64")
    }

    /// Bytes the packed weight holds.
    pub(super) fn bytes(&self) -> usize {
        self.data.len * 4
    }

    /// `x [m, k]` (f32, `k > 0`: the caller fills the output of none) times the weight transposed
    /// into `c` (`[m, n]`, every value written, none read before: `c` may come uninitialized),
    /// `epi` on each block of outputs after its last input, over `threads` threads (sizes checked
    /// by the caller).
    pub(super) fn product_then(
        &self,
        x: &[f32],
        m: usize,
        c: &mut [std::mem::MaybeUninit<f32>],
        threads: usize,
        epi: Epilogue<'_>,
    ) {
        let k = self.k;
        debug_assert!(k > 0);
        with_rows(ROWS.min(m).next_multiple_of(32) * self.kp, |a| {
            for m0 in (0..m).step_by(ROWS) {
                let rows = ROWS.min(m - m0);
                let a = &mut a[..rows.next_multiple_of(32) * self.kp];
                super::bf16_pairs::pairs_into(
                    &x[m0 * k..(m0 + rows) * k],
                    (rows, k),
                    (&mut *a, self.kp),
                    threads,
                );
                // The padding: the pairs past `k` in each row (zero in the weight, but any bits
                // here could be a NaN) and the rows past `rows`.
                if self.kp > k.div_ceil(2) {
                    for row in a.chunks_mut(self.kp).take(rows) {
                        row[k.div_ceil(2)..].fill(0);
                    }
                }
                a[rows * self.kp..].fill(0);
                let c = &mut c[m0 * self.n..(m0 + rows) * self.n];
                self.rows(a, rows, c, threads, epi);
            }
        });
    }

    /// The product of `m` rows of bf16 pairs `a` (`[m, ceil(k / 2)]`, as the attention's
    /// probabilities come) into `c` (`[m, n]`, overwritten), over `threads` threads.
    pub(super) fn pairs_product_into(&self, a: &[u32], m: usize, c: &mut [f32], threads: usize) {
        // SAFETY: f32 and `MaybeUninit<f32>` have one layout; only f32 values are written.
        let c = unsafe { &mut *(c as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
        let kp = self.k.div_ceil(2);
        with_rows(ROWS.min(m).next_multiple_of(32) * self.kp, |lines| {
            for m0 in (0..m).step_by(ROWS) {
                let rows = ROWS.min(m - m0);
                let lines = &mut lines[..rows.next_multiple_of(32) * self.kp];
                lines.fill(0);
                for (src, dst) in a[m0 * kp..(m0 + rows) * kp]
                    .chunks(kp.max(1))
                    .zip(lines.chunks_mut(self.kp))
                {
                    dst[..kp].copy_from_slice(src);
                }
                let c = &mut c[m0 * self.n..(m0 + rows) * self.n];
                self.rows(lines, rows, c, threads, Epilogue::default());
            }
        });
    }

    /// The product of the `m` rows in `a` (rows of `self.kp` pairs, padded to 32 rows) into `c`,
    /// the panels split over `threads` threads.
    fn rows(
        &self,
        a: &[u32],
        m: usize,
        c: &mut [std::mem::MaybeUninit<f32>],
        threads: usize,
        epi: Epilogue<'_>,
    ) {
        let out = SendPtr(c.as_mut_ptr().cast::<f32>());
        split_panels(self.n.div_ceil(NR), threads, |range| {
            // SAFETY: AMX is usable (the callers pack only then); tasks write disjoint column
            // panels of the `m` rows of `c`, each value before reading it (the first block of
            // pairs stores, later ones load and add); every tile stays inside `a`, the weight and
            // `c` (edges on a scratch tile).
            unsafe { self.panels(a, m, range, out.get(), epi) };
        });
    }

    /// Panels `range` of the product into `c`, on this thread's tiles (configured here, released
    /// at the end).
    #[cfg(target_arch = "x86_64")]
    unsafe fn panels(
        &self,
        a: &[u32],
        m: usize,
        range: std::ops::Range<usize>,
        c: *mut f32,
        epi: Epilogue<'_>,
    ) {
        let n = self.n;
        let mut scratch = Scratch([0f32; 32 * 32]);
        tiles::configure();
        for q0 in (0..self.kp).step_by(KC) {
            let steps = KC.min(self.kp - q0) / STEP;
            let last = q0 + steps * STEP == self.kp;
            for g0 in range.clone().step_by(NB) {
                for r0 in (0..m).step_by(32) {
                    let rows = 32.min(m - r0);
                    let a = a.as_ptr().add(r0 * self.kp + q0);
                    for p in g0..(g0 + NB).min(range.end) {
                        let b = self
                            .data
                            .as_slice()
                            .as_ptr()
                            .add(p * self.kp * NR + q0 * NR);
                        let cols = NR.min(n - p * NR);
                        let at = c.add(r0 * n + p * NR);
                        let block = tiles::Block {
                            a,
                            lda: self.kp * 4,
                            b,
                            steps,
                        };
                        if rows == 32 && cols == NR {
                            block.run(at, n * 4, q0 > 0);
                        } else {
                            let s = scratch.0.as_mut_ptr();
                            if q0 > 0 {
                                for r in 0..rows {
                                    std::ptr::copy_nonoverlapping(
                                        at.add(r * n),
                                        s.add(r * 32),
                                        cols,
                                    );
                                }
                            }
                            block.run(s, 32 * 4, q0 > 0);
                            for r in 0..rows {
                                std::ptr::copy_nonoverlapping(s.add(r * 32), at.add(r * n), cols);
                            }
                        }
                        if last && (epi.bias.is_some() || epi.gelu) {
                            epi.apply(at, (rows, n), p * NR, cols);
                        }
                    }
                }
            }
        }
        tiles::release();
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn panels(
        &self,
        _: &[u32],
        _: usize,
        _: std::ops::Range<usize>,
        _: *mut f32,
        _: Epilogue<'_>,
    ) {
        unreachable!("AMX runs on x86_64 only")
    }
}

/// `work` on ranges of `panels` covering them once: all on this thread where `threads` is 1, else
/// about four tasks a thread on rayon's pool, taken as threads come free, so that a thread the
/// host slows (a VM's vCPU) leaves its share to the others rather than holding the product up.
fn split_panels(panels: usize, threads: usize, work: impl Fn(std::ops::Range<usize>) + Sync) {
    if threads <= 1 || panels <= 1 {
        return work(0..panels);
    }
    let per = panels.div_ceil(4 * threads);
    let work = &work;
    rayon::scope(|s| {
        for p0 in (0..panels).step_by(per) {
            s.spawn(move |_| work(p0..(p0 + per).min(panels)));
        }
    });
}

/// `f` on `len` `u32`s starting on a 64-byte line (their values left from before): this thread's
/// buffer, kept from product to product and grown as needed (a fresh block of several MB a product
/// faulted its pages in each time), or a fresh one where this thread's is in use.
pub(crate) fn with_rows<R>(len: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    thread_local! {
        static ROWS_BUF: std::cell::RefCell<Lines> = std::cell::RefCell::new(Lines::zeroed(0));
    }
    ROWS_BUF.with(|buf| match buf.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len < len {
                *buf = Lines::zeroed(len);
            }
            f(&mut buf.as_mut_slice()[..len])
        }
        Err(_) => f(Lines::zeroed(len).as_mut_slice()),
    })
}

/// One block of 32 x 32 outputs, on a 64-byte line (rows of 32 f32: two lines).
#[repr(C, align(64))]
struct Scratch([f32; 32 * 32]);

#[cfg(target_arch = "x86_64")]
mod tiles {
    use super::{NR, STEP};
    use std::arch::asm;

    /// The tiles' configuration (palette 1): eight tiles of 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    /// Loads the configuration on this thread's tiles.
    ///
    /// # Safety
    /// AMX is usable in this process ([`super::usable`]).
    pub(super) unsafe fn configure() {
        let mut cfg = Config {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.bytes_per_row[t] = 64;
            cfg.rows[t] = 16;
        }
        // SAFETY: the caller's guarantee; `cfg` is a valid palette-1 configuration.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly)) };
    }

    /// Returns the tiles to their initial state (so that switching threads saves none of them).
    ///
    /// # Safety
    /// As [`configure`].
    pub(super) unsafe fn release() {
        // SAFETY: the caller's guarantee.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// 32 rows of activations (bf16 pairs from `a`, a row every `lda` bytes) by one panel of
    /// weights from `b` (its tiles for `steps` steps of 16 pairs), into 32 x 32 outputs.
    pub(super) struct Block {
        pub a: *const u32,
        pub lda: usize,
        pub b: *const u32,
        pub steps: usize,
    }

    impl Block {
        /// The block into `c` (a row every `ldc` bytes), added to what `c` holds where `add`.
        ///
        /// # Safety
        /// The tiles are configured ([`configure`]); `a` holds 32 rows of `16 * steps` pairs at
        /// stride `lda`, `b` `steps` steps of 16 rows of 32 pairs, `c` 32 rows of 32 f32 at stride
        /// `ldc`.
        pub(super) unsafe fn run(&self, c: *mut f32, ldc: usize, add: bool) {
            let c1 = c.wrapping_add(16 * ldc / 4);
            // SAFETY (each block): the caller's guarantee; tmm0-3 hold the outputs (rows 0-15
            // and 16-31, columns 0-15 and 16-31), tmm4-5 the activations, tmm6-7 the weights.
            unsafe {
                if add {
                    asm!(
                        "tileloadd tmm0, [{c0} + {s}*1]",
                        "tileloadd tmm1, [{c0} + {s}*1 + 64]",
                        "tileloadd tmm2, [{c1} + {s}*1]",
                        "tileloadd tmm3, [{c1} + {s}*1 + 64]",
                        c0 = in(reg) c, c1 = in(reg) c1, s = in(reg) ldc,
                        options(nostack, readonly),
                    );
                } else {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem),
                    );
                }
                let (mut a0, mut a1, mut b) =
                    (self.a, self.a.wrapping_add(16 * self.lda / 4), self.b);
                for _ in 0..self.steps {
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm6, [{b} + {sb}*1]",
                        "tileloadd tmm7, [{b} + {sb}*1 + 64]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0, a1 = in(reg) a1, b = in(reg) b,
                        sa = in(reg) self.lda, sb = in(reg) 128usize,
                        options(nostack, readonly),
                    );
                    a0 = a0.add(STEP);
                    a1 = a1.add(STEP);
                    b = b.add(STEP * NR);
                }
                asm!(
                    "tilestored [{c0} + {s}*1], tmm0",
                    "tilestored [{c0} + {s}*1 + 64], tmm1",
                    "tilestored [{c1} + {s}*1], tmm2",
                    "tilestored [{c1} + {s}*1 + 64], tmm3",
                    c0 = in(reg) c, c1 = in(reg) c1, s = in(reg) ldc,
                    options(nostack),
                );
            }
        }
    }
}
