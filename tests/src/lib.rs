//! Helpers for the cross-crate integration tests: fixture paths, tensor comparison, reference loops.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// Keeps the strategies' and models' registrations linked into every test binary.
pub fn link_all() {
    magcache_strategies::link();
    magcache_models::link();
}

/// `tests/fixtures/...` of this repository.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

pub fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).expect("fixture")
}

pub fn load_json(rel: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).expect("fixture json"))
        .expect("json")
}

/// Largest absolute difference; panics on shape mismatch.
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
