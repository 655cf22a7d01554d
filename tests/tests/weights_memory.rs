//! A checkpoint tensor is read into its own vector: reading it allocates its size once, not twice
//! (a byte buffer and then the tensor built from it held UMT5-XXL's 4.2 GB f32 embedding twice).
//!
//! One test in this binary: the counter is process-wide, so no other test may run beside it.

use candle_core::{Device, Tensor};
use magcache_models::weights::WeightStore;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn an_f32_tensor_is_read_with_one_allocation_of_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let n = 1 << 22; // 16 MiB of f32
    let t = Tensor::arange(0f32, n as f32, &Device::Cpu)
        .unwrap()
        .reshape((1024, n / 1024))
        .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("w".to_string(), t.clone())]),
        &path,
    )
    .unwrap();
    drop(t);
    let store = WeightStore::load_checkpoint(&path).unwrap();
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let w = store.get_shape("w", &[1024, n / 1024]).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let size = n * 4;
    assert!(
        peak < size + size / 10,
        "reading a {size}-byte tensor peaked at {peak} bytes"
    );
    // And the values are the file's.
    let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
}
