//! Helpers shared by the strategies' integration tests.
#![allow(dead_code)]

use magcache_core::candle_core::{Device, Tensor};
use magcache_core::{Branch, ScopeKey};

pub const COND: ScopeKey = ScopeKey::new(0, Branch::Cond);
pub const UNCOND: ScopeKey = ScopeKey::new(0, Branch::Uncond);

/// A vector tensor.
pub fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

/// A vector tensor's values.
pub fn v(t: &Tensor) -> Vec<f32> {
    t.to_vec1::<f32>().unwrap()
}
