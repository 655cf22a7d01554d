//! Scratch memory for oneDNN's executions, kept per calling thread and reused.
//!
//! Each primitive runs with the caller's scratch (user scratchpad mode: a primitive may run on two
//! threads at once). A fresh allocation per product was first used: past the allocator's
//! threshold that is a new mapping whose pages fault in on every product (the bf16 products'
//! copies of weight panels are tens of MB at 4 680 tokens). The buffer of the largest product
//! a thread has run stays with it instead.

use std::cell::RefCell;
use std::ffi::c_void;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a page-aligned scratch of `bytes` (null when 0): this thread's buffer, grown as
/// needed, or a fresh one if this thread's is in use (a nested call).
pub(super) fn with<T>(bytes: usize, f: impl FnOnce(*mut c_void) -> T) -> T {
    if bytes == 0 {
        return f(std::ptr::null_mut());
    }
    let need = bytes + 4096;
    let aligned = |buf: &mut Vec<u8>| -> *mut c_void {
        if buf.capacity() < need {
            // Not zeroed: oneDNN writes its scratch before reading it.
            *buf = Vec::with_capacity(need);
        }
        let at = buf.as_ptr().align_offset(4096);
        // SAFETY: `at < 4096`: inside the capacity, which outlives the call.
        unsafe { buf.as_mut_ptr().add(at) as *mut c_void }
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            let ptr = aligned(&mut buf);
            f(ptr)
        }
        Err(_) => {
            let mut buf = Vec::new();
            let ptr = aligned(&mut buf);
            f(ptr)
        }
    })
}
