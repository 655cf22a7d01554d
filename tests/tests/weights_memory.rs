//! A checkpoint tensor is read into its own vector: reading it allocates its size once, not twice
//! (a byte buffer and then the tensor built from it held UMT5-XXL's 4.2 GB f32 embedding twice).
//!
//! One test in this binary: the counter is process-wide, so no other test may run beside it.

use candle_core::{Device, Tensor};
use magcache_layers::weights::WeightStore;
use magcache_tests::{heap_peak_of, CountingAlloc};

#[global_allocator]
static A: CountingAlloc = CountingAlloc;

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
    let (peak, w) = heap_peak_of(|| store.get_shape("w", &[1024, n / 1024]).unwrap());
    let size = n * 4;
    assert!(
        peak < size + size / 10,
        "reading a {size}-byte tensor peaked at {peak} bytes"
    );
    // And the values are the file's.
    let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
}
