//! `QwenImageTransformer2DModel` configuration (diffusers `config.json`), with overrides.

use magcache_core::{Error, Result};
use magcache_layers::config_util::ModelConfig;
use serde::{Deserialize, Serialize};

/// The diffusers class this config describes.
pub const QWENIMAGE_CLASS: &str = "QwenImageTransformer2DModel";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QwenImageConfig {
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub guidance_embeds: bool,
    pub axes_dims_rope: Vec<usize>,
    /// Unused by the model (kept so released configs read).
    pub pooled_projection_dim: Option<usize>,
    /// Later variants' keys (Qwen-Image-Edit-2511 and on); only their defaults are supported.
    pub zero_cond_t: bool,
    pub use_additional_t_cond: bool,
    pub use_layer3d_rope: bool,
}

impl Default for QwenImageConfig {
    /// Qwen-Image (20B), as released.
    fn default() -> Self {
        QwenImageConfig {
            patch_size: 2,
            in_channels: 64,
            out_channels: Some(16),
            num_layers: 60,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 3584,
            guidance_embeds: false,
            axes_dims_rope: vec![16, 56, 56],
            pooled_projection_dim: Some(768),
            zero_cond_t: false,
            use_additional_t_cond: false,
            use_layer3d_rope: false,
        }
    }
}

impl QwenImageConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads
            .saturating_mul(self.attention_head_dim)
    }
    /// Channels of the transformer's output tokens: `patch^2 * out_channels`.
    pub fn out_tokens(&self) -> usize {
        self.patch_size
            .saturating_mul(self.patch_size)
            .saturating_mul(self.out_channels.unwrap_or(self.in_channels))
    }
}

impl ModelConfig for QwenImageConfig {
    const CLASS: &'static str = QWENIMAGE_CLASS;
    const KIND: &'static str = "a Qwen-Image transformer";

    fn check(&self, file: &str) -> Result<()> {
        magcache_layers::positive_fields!(file, self,
        in_channels num_layers attention_head_dim num_attention_heads joint_attention_dim)?;
        if self.patch_size != 2
            || self.in_channels != 4 * self.out_channels.unwrap_or(self.in_channels / 4)
        {
            return Err(Error::config(
                file,
                "patch_size",
                "only patch_size 2 with in_channels = 4 x out_channels (the pipeline packs 2x2 latents) is supported",
            ));
        }
        for (k, on) in [
            ("guidance_embeds", self.guidance_embeds),
            ("zero_cond_t", self.zero_cond_t),
            ("use_additional_t_cond", self.use_additional_t_cond),
            ("use_layer3d_rope", self.use_layer3d_rope),
        ] {
            if on {
                return Err(Error::config(
                    file,
                    k,
                    "true is not supported yet (Qwen-Image and Qwen-Image-2512 set it false)",
                ));
            }
        }
        if self.axes_dims_rope.len() != 3
            || self.axes_dims_rope.iter().sum::<usize>() != self.attention_head_dim
            || self.axes_dims_rope.iter().any(|d| !d.is_multiple_of(2))
        {
            return Err(Error::config(
                file,
                "axes_dims_rope",
                format!(
                    "{:?} must be three even sizes summing to attention_head_dim {}",
                    self.axes_dims_rope, self.attention_head_dim
                ),
            ));
        }
        Ok(())
    }
}
