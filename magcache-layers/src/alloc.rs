//! A global allocator that starts every allocation of [`LARGE`] bytes or more on a 64-byte line,
//! as PyTorch's CPU allocator starts its tensors: a matrix row that begins on a cache line is read
//! in whole lines by the products' vector and tile loads (AVX-512's 64 bytes, AMX's 64-byte tile
//! rows) where one 16 bytes past a line boundary, which is where glibc's `malloc` leaves large
//! blocks, straddles two lines on every load. Smaller allocations are the system's as they are.
//!
//! A binary opts in: `#[global_allocator] static A: magcache_layers::alloc::LineAlloc =
//! magcache_layers::alloc::LineAlloc;`, as the `bf16_gemm` example does (`BF16_GEMM_ALIGN=off` for
//! the A/B). `magcache` installs [`Switched`], off unless `MAGCACHE_LINE_ALLOC=on`
//! ([`switch_from_env`]): on the Zen 5 the products ran level with and without it
//! (docs/benchmarks.md), and on AMX, where a tile row that straddles two lines may cost more, it
//! is not measured yet.

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations of at least this many bytes are aligned to [`LINE`].
pub const LARGE: usize = 4096;
/// The alignment of large allocations: one cache line.
pub const LINE: usize = 64;

/// The system allocator, with large allocations aligned to [`LINE`] bytes.
pub struct LineAlloc;

/// The layout `l` is served with: aligned to a line when large.
fn served(l: Layout) -> Layout {
    if l.size() >= LARGE && l.align() < LINE {
        Layout::from_size_align(l.size(), LINE).unwrap_or(l)
    } else {
        l
    }
}

// SAFETY: every block is allocated and freed by `System` with one layout, `served` of the caller's
// (a function of its size and alignment alone, so the same at the free as at the allocation);
// a block whose served alignment changes with its new size is moved by hand.
unsafe impl GlobalAlloc for LineAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: as the caller's layout (non-zero size), with an alignment no smaller.
        unsafe { System.alloc(served(l)) }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(served(l)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, l: Layout) {
        // SAFETY: `ptr` came from `System` with `served(l)`.
        unsafe { System.dealloc(ptr, served(l)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let old = served(l);
        // SAFETY: the caller's promise: `new_size`, rounded to `l.align()`, does not overflow.
        let new = served(unsafe { Layout::from_size_align_unchecked(new_size, l.align()) });
        if old.align() == new.align() {
            // SAFETY: `ptr` came from `System` with `old`, whose alignment the new block keeps.
            return unsafe { System.realloc(ptr, old, new_size) };
        }
        // SAFETY: a fresh block of `new`; the old one holds `l.size()` bytes and is freed as it was
        // allocated.
        unsafe {
            let moved = System.alloc(new);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(ptr, moved, l.size().min(new_size));
                System.dealloc(ptr, old);
            }
            moved
        }
    }
}

/// The variable that switches [`Switched`] to [`LineAlloc`]: `on` or `off` (unset: off).
pub const LINE_ALLOC_ENV: &str = "MAGCACHE_LINE_ALLOC";

static SWITCHED_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The system's allocator, or [`LineAlloc`] once [`switch_from_env`] has read
/// `MAGCACHE_LINE_ALLOC=on`. Blocks taken before the switch are freed through `free` either way
/// (on Unix the system's allocator frees every alignment so), which is why it switches on Unix only.
pub struct Switched;

/// Reads `MAGCACHE_LINE_ALLOC` and switches [`Switched`] accordingly; call it first in `main`.
/// Another value than `on` or `off` is an error naming the variable. On other systems than Unix
/// `on` is an error too.
pub fn switch_from_env() -> Result<(), String> {
    let on = match std::env::var(LINE_ALLOC_ENV).as_deref() {
        Err(_) | Ok("off") => false,
        Ok("on") => true,
        Ok(other) => {
            return Err(format!(
                "{LINE_ALLOC_ENV}={other:?}: expected on or off (unset: off)"
            ))
        }
    };
    if on && !cfg!(unix) {
        return Err(format!("{LINE_ALLOC_ENV}=on: only on Unix systems"));
    }
    SWITCHED_ON.store(on, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

fn switched_on() -> bool {
    SWITCHED_ON.load(std::sync::atomic::Ordering::Relaxed)
}

// SAFETY: before the switch every block is the system's; after it, `LineAlloc` frees the earlier
// blocks with `free` through `System` (Unix: any alignment), and reallocates them by moving.
unsafe impl GlobalAlloc for Switched {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's layout, passed on.
        unsafe {
            match switched_on() {
                true => LineAlloc.alloc(l),
                false => System.alloc(l),
            }
        }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            match switched_on() {
                true => LineAlloc.alloc_zeroed(l),
                false => System.alloc_zeroed(l),
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe {
            match switched_on() {
                true => LineAlloc.dealloc(ptr, l),
                false => System.dealloc(ptr, l),
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        unsafe {
            match switched_on() {
                true => LineAlloc.realloc(ptr, l, new_size),
                false => System.realloc(ptr, l, new_size),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large blocks start on a line, small ones keep their own alignment, and a block that grows
    /// or shrinks across [`LARGE`] keeps its bytes and gets the alignment of its new size.
    #[test]
    fn large_blocks_start_on_a_line_and_keep_their_bytes_across_sizes() {
        let a = LineAlloc;
        // SAFETY: each block is used within its layout and freed with the layout it has then.
        unsafe {
            for size in [LARGE, LARGE + 4, 3 << 20, 100_001] {
                let l = Layout::from_size_align(size, 4).unwrap();
                let p = a.alloc(l);
                assert!(!p.is_null());
                assert_eq!(p as usize % LINE, 0, "{size} bytes");
                a.dealloc(p, l);
            }
            let small = Layout::from_size_align(24, 8).unwrap();
            let p = a.alloc(small);
            assert_eq!(p as usize % 8, 0);
            a.dealloc(p, small);
            // Across the threshold, both ways, with the bytes kept.
            let l = Layout::from_size_align(100, 4).unwrap();
            let p = a.alloc(l);
            for i in 0..100 {
                *p.add(i) = i as u8;
            }
            let q = a.realloc(p, l, LARGE * 3);
            assert_eq!(q as usize % LINE, 0);
            assert!((0..100).all(|i| *q.add(i) == i as u8));
            let big = Layout::from_size_align(LARGE * 3, 4).unwrap();
            let r = a.realloc(q, big, 50);
            assert!((0..50).all(|i| *r.add(i) == i as u8));
            a.dealloc(r, Layout::from_size_align(50, 4).unwrap());
        }
    }
}
