//! A global allocator that can start every allocation of [`LARGE`] bytes or more on a 64-byte
//! line, as PyTorch's CPU allocator starts its tensors: a matrix row that begins on a cache line is
//! read in whole lines by the products' vector and tile loads (AVX-512's 64 bytes, AMX's 64-byte
//! tile rows) where one 16 bytes past a line boundary, which is where glibc's `malloc` leaves large
//! blocks, straddles two lines on every load.
//!
//! [`LineAlloc`] is C's allocator (`malloc`, `calloc`, `realloc`, `posix_memalign`, `free`) on
//! Unix, with large blocks aligned while [`set`] has it so. Every block, aligned or not, comes from
//! that one allocator and goes back with `free`, which POSIX defines for all of them, so switching
//! at any time is sound. Elsewhere it is Rust's system allocator, and aligning is refused.
//!
//! A binary opts in: `#[global_allocator] static A: magcache_layers::alloc::LineAlloc =
//! magcache_layers::alloc::LineAlloc;`. `magcache` does, aligned where the CPU has AMX unless
//! `MAGCACHE_LINE_ALLOC=off`, and elsewhere only with `MAGCACHE_LINE_ALLOC=on`
//! ([`switch_from_env`]): on an AMX Xeon oneDNN's products of a whole call ran 1.15-1.42x faster
//! on aligned operands, on the Zen 5 they ran level either way (docs/benchmarks.md). The
//! `bf16_gemm` example aligns unless `BF16_GEMM_ALIGN=off`.
//! Aligned large blocks are zeroed by a pass of their own (`calloc` cannot align) and grown by
//! moving them.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, Ordering};

/// Allocations of at least this many bytes are aligned to [`LINE`] while switched on.
pub const LARGE: usize = 4096;
/// The alignment of large allocations: one cache line.
pub const LINE: usize = 64;
/// Blocks of at least this many bytes are also asked to be backed by 2 MB pages while
/// [`set_huge`] has it so (Linux: `madvise(MADV_HUGEPAGE)`, which the kernel's
/// `transparent_hugepage` setting `madvise` or `always` honours).
pub const HUGE: usize = 4 << 20;
/// The alignment of blocks asked for 2 MB pages: one page.
pub const HUGE_PAGE: usize = 2 << 20;
/// The variable [`switch_from_env`] reads for [`set_huge`]: `on` or `off` (unset: as
/// `MAGCACHE_LINE_ALLOC`'s choice).
pub const HUGE_PAGES_ENV: &str = "MAGCACHE_HUGE_PAGES";
/// The variable [`switch_from_env`] reads: `on` or `off` (unset: on where the CPU has AMX).
pub const LINE_ALLOC_ENV: &str = "MAGCACHE_LINE_ALLOC";

static ALIGN_LARGE: AtomicBool = AtomicBool::new(false);
static HUGE_PAGES: AtomicBool = AtomicBool::new(false);

/// Whether blocks of [`HUGE`] bytes or more start on a 2 MB page and are advised to the kernel as
/// such (while large blocks are aligned: [`set`]). On a VM a fresh block's first touch faults a
/// page at a time: a 4 680-token Wan FFN's 167 MB output took 512 times fewer faults in 2 MB
/// pages, and its bf16 product on AMX ran 2.9x faster with them in one round, 1.1-1.5x in the next
/// (docs/benchmarks.md). Linux only (elsewhere `on` is an error).
pub fn set_huge(on: bool) -> Result<(), String> {
    if on && !cfg!(target_os = "linux") {
        return Err(format!("{HUGE_PAGES_ENV}=on: only on Linux"));
    }
    HUGE_PAGES.store(on, Ordering::Relaxed);
    Ok(())
}

/// Whether large blocks are aligned from now on (Unix only: elsewhere `on` is an error).
pub fn set(on: bool) -> Result<(), String> {
    if on && !cfg!(unix) {
        return Err(format!("{LINE_ALLOC_ENV}=on: only on Unix systems"));
    }
    ALIGN_LARGE.store(on, Ordering::Relaxed);
    Ok(())
}

/// Reads `MAGCACHE_LINE_ALLOC` and [`set`]s it ([`line_alloc_choice`]); call it first in `main`.
/// Another value than `on` or `off` is an error naming the variable (the default is applied all
/// the same).
pub fn switch_from_env() -> Result<(), String> {
    let var = crate::env::env_switch(LINE_ALLOC_ENV, "on where the CPU has AMX, else off");
    let set_to = var.as_ref().ok().copied().flatten();
    let aligned = line_alloc_choice(set_to, magcache_core::runtime::placement::cpu_has_amx);
    set(aligned)?;
    let huge = crate::env::env_switch(HUGE_PAGES_ENV, "as MAGCACHE_LINE_ALLOC's choice");
    let huge_to = huge.as_ref().ok().copied().flatten();
    set_huge(cfg!(target_os = "linux") && huge_to.unwrap_or(aligned))?;
    var.map(|_| ())?;
    huge.map(|_| ())
}

/// Whether large blocks are aligned: the variable's `on` or `off` where set; unset, where the CPU
/// has AMX (`amx`, asked only then), whose 64-byte tile rows read an operand row that starts 16
/// bytes past a line in two lines each (oneDNN's products of a whole 720-token Wan call ran
/// 1.15-1.42x faster aligned on an AMX Xeon, 2026-11-28); elsewhere not (level on a Zen 5, and
/// aligned zeroed blocks lose `calloc`'s zero pages).
pub fn line_alloc_choice(var: Option<bool>, amx: impl FnOnce() -> bool) -> bool {
    var.unwrap_or_else(amx)
}

/// C's allocator on Unix, large blocks on 64-byte lines while [`set`] so; Rust's system allocator
/// elsewhere.
pub struct LineAlloc;

/// The alignment a block of layout `l` gets now: `l`'s own, or a line for a large block while
/// switched on.
#[cfg(unix)]
fn alignment(l: Layout) -> usize {
    match l.size() >= LARGE && ALIGN_LARGE.load(Ordering::Relaxed) {
        true => l.align().max(LINE),
        false => l.align(),
    }
}

/// `malloc`'s own alignment (glibc: 16 on 64-bit systems; 8 is what C guarantees for `double`,
/// kept low so that larger ones go through `posix_memalign`).
#[cfg(unix)]
const MALLOC_ALIGN: usize = 2 * std::mem::size_of::<usize>();

#[cfg(unix)]
// SAFETY: every block comes from C's allocator (`malloc`, `calloc`, `realloc` or
// `posix_memalign`) with at least the layout's alignment and size, and goes back through `free`
// (directly, or inside `realloc`), which POSIX defines for each of them.
unsafe impl GlobalAlloc for LineAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let align = alignment(l);
        if align <= MALLOC_ALIGN && align <= l.size() {
            // SAFETY: a plain C allocation of a non-zero size.
            return unsafe { libc::malloc(l.size()) }.cast();
        }
        let mut out: *mut libc::c_void = std::ptr::null_mut();
        // `posix_memalign` wants a multiple of the pointer size (a power of two, as every
        // `Layout` alignment is).
        let align = align.max(std::mem::size_of::<usize>());
        let huge = l.size() >= HUGE && align >= LINE && HUGE_PAGES.load(Ordering::Relaxed);
        let align = if huge { align.max(HUGE_PAGE) } else { align };
        // SAFETY: an out-pointer and a valid alignment.
        match unsafe { libc::posix_memalign(&mut out, align, l.size()) } {
            0 => {
                #[cfg(target_os = "linux")]
                if huge {
                    // SAFETY: advice on whole pages of the block just had (advice alone: the
                    // block's contents and mapping stay; an error leaves 4 KB pages).
                    unsafe {
                        libc::madvise(out, l.size() / HUGE_PAGE * HUGE_PAGE, libc::MADV_HUGEPAGE)
                    };
                }
                out.cast()
            }
            _ => std::ptr::null_mut(),
        }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let align = alignment(l);
        if align <= MALLOC_ALIGN && align <= l.size() {
            // SAFETY: a plain C allocation of a non-zero size.
            return unsafe { libc::calloc(l.size(), 1) }.cast();
        }
        // SAFETY: as `alloc`; the block holds `l.size()` bytes.
        unsafe {
            let p = self.alloc(l);
            if !p.is_null() {
                std::ptr::write_bytes(p, 0, l.size());
            }
            p
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _l: Layout) {
        // SAFETY: `ptr` came from C's allocator (above).
        unsafe { libc::free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's promise: `new_size` rounded to `l.align()` does not overflow.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, l.align()) };
        let align = alignment(new);
        if align <= MALLOC_ALIGN && align <= new_size {
            // SAFETY: `ptr` came from C's allocator; `realloc` keeps `malloc`'s alignment.
            return unsafe { libc::realloc(ptr.cast(), new_size) }.cast();
        }
        // SAFETY: a fresh block of the new layout; the old one holds `l.size()` bytes and is freed
        // once copied (kept where the new one cannot be had, as `realloc` does).
        unsafe {
            let moved = self.alloc(new);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(ptr, moved, l.size().min(new_size));
                libc::free(ptr.cast());
            }
            moved
        }
    }
}

#[cfg(not(unix))]
// SAFETY: Rust's system allocator, passed through.
unsafe impl GlobalAlloc for LineAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: passed through.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: passed through.
        unsafe { std::alloc::System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, l: Layout) {
        // SAFETY: passed through.
        unsafe { std::alloc::System.dealloc(ptr, l) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: passed through.
        unsafe { std::alloc::System.realloc(ptr, l, new_size) }
    }
}

/// A fresh vector of `len` f32 values that `fill` writes whole, not zeroed first (a product's
/// output, up to 167 MB, written before it is read).
///
/// # Safety
/// Where `fill` returns `Ok` it has written every one of the `len` values it is handed.
pub(crate) unsafe fn written(
    len: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]) -> candle_core::Result<()>,
) -> candle_core::Result<Vec<f32>> {
    let mut c = Vec::with_capacity(len);
    fill(&mut c.spare_capacity_mut()[..len])?;
    // SAFETY: `fill` wrote all `len` values (the caller's promise).
    unsafe { c.set_len(len) };
    Ok(c)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// The variable decides where set; unset, CPUs with AMX align and others do not.
    #[test]
    fn the_line_alloc_default_follows_amx() {
        assert!(line_alloc_choice(None, || true));
        assert!(!line_alloc_choice(None, || false));
        assert!(!line_alloc_choice(Some(false), || true));
        assert!(line_alloc_choice(Some(true), || false));
    }

    /// Switched on, large blocks start on a line and small ones keep their alignment; blocks keep
    /// their bytes through reallocations across [`LARGE`] both ways and across the switch both
    /// ways; zeroed blocks are zero; and a block taken before a switch is freed after it. (The
    /// switch is the process's: this is the only test that touches it, and it leaves it off.)
    #[test]
    fn blocks_keep_their_bytes_and_alignment_across_sizes_and_the_switch() {
        let a = LineAlloc;
        let lay = |size: usize| Layout::from_size_align(size, 4).unwrap();
        // SAFETY: each block is used within its layout and freed with the layout it has then.
        unsafe {
            let before = a.alloc(lay(LARGE * 2));
            *before = 7;
            set(true).unwrap();
            for size in [LARGE, LARGE + 4, 3 << 20, 100_001] {
                let p = a.alloc(lay(size));
                assert_eq!(p as usize % LINE, 0, "{size} bytes");
                a.dealloc(p, lay(size));
                let z = a.alloc_zeroed(lay(size));
                assert_eq!(z as usize % LINE, 0, "{size} bytes, zeroed");
                assert!((0..size).all(|i| *z.add(i) == 0));
                a.dealloc(z, lay(size));
            }
            let over = Layout::from_size_align(24, 128).unwrap();
            let p = a.alloc(over);
            assert_eq!(p as usize % 128, 0);
            a.dealloc(p, over);
            let p = a.alloc(lay(100));
            for i in 0..100 {
                *p.add(i) = i as u8;
            }
            let q = a.realloc(p, lay(100), LARGE * 3);
            assert_eq!(q as usize % LINE, 0);
            assert!((0..100).all(|i| *q.add(i) == i as u8));
            // The block taken before the switch, grown after it: moved onto a line.
            let grown = a.realloc(before, lay(LARGE * 2), LARGE * 4);
            assert_eq!(grown as usize % LINE, 0);
            assert_eq!(*grown, 7);
            set(false).unwrap();
            // After switching off: shrunk, grown, and freed by `free`.
            let r = a.realloc(q, lay(LARGE * 3), 50);
            assert!((0..50).all(|i| *r.add(i) == i as u8));
            a.dealloc(r, lay(50));
            let g = a.realloc(grown, lay(LARGE * 4), LARGE * 8);
            assert_eq!(*g, 7);
            a.dealloc(g, lay(LARGE * 8));
        }
    }
}
