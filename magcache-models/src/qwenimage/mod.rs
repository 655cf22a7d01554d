//! Qwen-Image (`QwenImagePipeline`): the double-stream MMDiT ([`model`]), the Qwen2.5-VL text side
//! ([`magcache_text::qwenimage`]), the Wan-architecture VAE on one frame, a run file resolved once
//! ([`family`]) and built stage by stage ([`build`]), and the true-CFG loop ([`pipeline`]).

pub mod build;
pub mod config;
pub mod family;
pub mod lora;
pub mod model;
pub mod pipeline;

pub use config::QwenImageConfig;
pub use family::{QwenImageRun, QWENIMAGE_PRESETS};
pub use model::{QwenImageModel, QwenImageTrace, QWENIMAGE_BLOCK};
pub use pipeline::QwenImagePipeline;
