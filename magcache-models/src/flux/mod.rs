//! FLUX.1: model, loading (diffusers and BFL), presets (its VAE is the shared
//! `magcache_layers::autoencoder_kl`), inputs, the Euler
//! sampler with dynamic shift and embedded guidance ([`pipeline`]), the family's keys and checks
//! ([`family`]) and the resolved run with the registration ([`run`]).

pub mod blocks;
pub mod config;
pub mod family;
pub mod footprint;
pub mod inputs;
pub mod load;
pub mod model;
pub mod pipeline;
pub mod presets;
pub mod prompted;
pub mod run;

pub use inputs::{image_ids, FluxInputs};
pub use pipeline::{flux_plan, FluxPipeline};
pub use presets::{FluxPreset, FLUX_PRESETS};
