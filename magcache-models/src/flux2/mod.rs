//! FLUX.2 klein (`Flux2KleinPipeline`): the transformer ([`model`], [`blocks`]), the Qwen3 text
//! side ([`magcache_text::qwen3`]), the latent batch-norm VAE ([`vae`]), FLUX.2's schedule
//! ([`magcache_layers::scheduler::flux2_schedule`]), prompted runs ([`prompted`]), the denoising loop
//! ([`pipeline`]) presets and sizes ([`family`]) and the resolved run with the registration ([`run`]).

pub mod blocks;
pub mod config;
pub mod family;
pub mod inputs;
pub mod load;
pub mod model;
pub mod pipeline;
pub mod prompted;
pub mod run;
pub mod vae;

pub use config::Flux2Config;
pub use family::FLUX2_PRESETS;
pub use model::{Flux2Model, Flux2Trace, FLUX2_DOUBLE, FLUX2_SINGLE};
pub use pipeline::Flux2Pipeline;
pub use vae::Flux2Vae;
