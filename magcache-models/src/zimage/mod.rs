//! Z-Image and Z-Image-Turbo (`ZImagePipeline`): the transformer ([`model`], [`blocks`]), the Qwen3
//! text side ([`magcache_text::qwen_chat`]), FLUX's `AutoencoderKL`, a run file resolved once
//! ([`family`]) and built stage by stage ([`build`]), and the denoising loop ([`pipeline`]).

pub mod blocks;
pub mod build;
pub mod config;
pub mod family;
pub mod lora;
pub mod model;
pub mod pipeline;

pub use config::ZImageConfig;
pub use family::{ZImageRun, ZIMAGE_PRESETS};
pub use model::{ZImageModel, ZImageTrace, ZIMAGE_LAYER};
pub use pipeline::ZImagePipeline;
