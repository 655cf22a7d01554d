//! # magcache-models
//!
//! candle implementations of the diffusion transformers, their checkpoint loaders, schedulers
//! (flow-matching Euler in [`scheduler`], UniPC in [`unipc`]) and
//! denoising loops. Each family registers itself with `inventory` ([`magcache_core::ModelFamily`]):
//! block metadata, presets and published calibration data. Models know nothing of a strategy's
//! maths: they hand their block chain to the call's cache ([`magcache_core::CallCx::run_chain`]) and
//! run each block through their [`magcache_core::HookRegistry`], which the runner reaches through
//! `Pipeline::hook_registries` (`magcache calibrate --blocks` probes every block).

pub mod config_util;
pub mod flux;
pub mod flux2;
pub mod footprint;
pub mod inputs;
pub mod lora;
pub mod mmdit;
pub mod nn;
pub mod picture;
pub mod published;
pub mod random;
pub mod scheduler;
pub mod text;
pub mod unipc;
pub(crate) mod vae_common;
pub(crate) mod vae_tiles;
pub mod wan;
pub mod weights;

/// Call this from a binary or test that reaches the families only through the registry: it keeps
/// the linker from dropping this crate's `inventory` registrations.
#[inline(never)]
pub fn link() {
    std::hint::black_box(wan::WAN21_PRESETS.len());
}
