//! `Flux2Transformer2DModel` configuration (diffusers `config.json`), with overrides.

use magcache_core::{Error, Result};
use magcache_layers::config_util::ModelConfig;
use serde::{Deserialize, Serialize};

/// The diffusers class this config describes.
pub const FLUX2_CLASS: &str = "Flux2Transformer2DModel";

magcache_layers::packed_dit_config! {
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct Flux2Config {
        pub timestep_guidance_channels: usize,
        pub mlp_ratio: f64,
        pub rope_theta: f64,
        pub eps: f64,
        pub guidance_embeds: bool,
    }
}

impl Default for Flux2Config {
    /// FLUX.2 klein 4B.
    fn default() -> Self {
        Flux2Config {
            patch_size: 1,
            in_channels: 128,
            out_channels: None,
            num_layers: 5,
            num_single_layers: 20,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 7680,
            timestep_guidance_channels: 256,
            mlp_ratio: 3.0,
            axes_dims_rope: vec![32, 32, 32, 32],
            rope_theta: 2000.0,
            eps: 1e-6,
            guidance_embeds: false,
        }
    }
}

impl Flux2Config {
    /// The SwiGLU hidden width: `int(inner_dim * mlp_ratio)` (the input projections are twice it).
    pub fn mlp_hidden(&self) -> usize {
        (self.inner_dim() as f64 * self.mlp_ratio) as usize
    }
    /// Blocks of the cache chain: double-stream, then single-stream.
    pub fn num_blocks(&self) -> usize {
        self.num_layers.saturating_add(self.num_single_layers)
    }
}

impl ModelConfig for Flux2Config {
    const CLASS: &'static str = FLUX2_CLASS;
    const KIND: &'static str = "a FLUX.2 transformer";

    fn check(&self, file: &str) -> Result<()> {
        magcache_layers::positive_fields!(file, self,
        in_channels attention_head_dim num_attention_heads joint_attention_dim timestep_guidance_channels)?;
        if self.num_blocks() == 0 {
            return Err(Error::config(
                file,
                "num_layers",
                "the model needs at least one block (num_layers + num_single_layers)",
            ));
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) || self.mlp_hidden() == 0 {
            return Err(Error::config(file, "mlp_ratio", "must be positive"));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::config(file, "rope_theta", "must be positive"));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::config(file, "eps", "must be positive"));
        }
        if !self.timestep_guidance_channels.is_multiple_of(2) {
            return Err(Error::config(
                file,
                "timestep_guidance_channels",
                "must be even (cosines and sines)",
            ));
        }
        self.check_packing(file)
    }
}
