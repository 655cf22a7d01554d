//! # magcache-models
//!
//! The model families, each a folder that is its blocks, its tensor names and its pipeline, built
//! on `magcache-layers` (weights, layers, schedulers, VAEs) and `magcache-text` (text encoders);
//! no family imports another. Each family registers itself with `inventory` ([`magcache_core::ModelFamily`]):
//! block metadata, presets and published calibration data. Models know nothing of a strategy's
//! maths: they hand their block chain to the call's cache ([`magcache_core::CallCx::run_chain`]) and
//! run each block through their [`magcache_core::HookRegistry`], which the runner reaches through
//! `Pipeline::hook_registries` (`magcache calibrate --blocks` probes every block).

pub mod flux;
pub mod flux2;
pub mod published;
pub mod qwenimage;
pub mod wan;
pub mod zimage;

/// Call this from a binary or test that reaches the families only through the registry: it keeps
/// the linker from dropping this crate's `inventory` registrations.
#[inline(never)]
pub fn link() {
    std::hint::black_box(wan::WAN21_PRESETS.len());
}
