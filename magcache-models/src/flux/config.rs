//! `FluxTransformer2DModel` configuration (diffusers `config.json`), with overrides.

use magcache_core::Result;
use magcache_layers::config_util::ModelConfig;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FluxConfig {
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub pooled_projection_dim: usize,
    pub guidance_embeds: bool,
    pub axes_dims_rope: Vec<usize>,
}

impl Default for FluxConfig {
    /// FLUX.1-dev.
    fn default() -> Self {
        FluxConfig {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: vec![16, 56, 56],
        }
    }
}

const FIELDS: &[&str] = &[
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
    "axes_dims_rope",
];

impl FluxConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads
            .saturating_mul(self.attention_head_dim)
    }
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
}

impl ModelConfig for FluxConfig {
    const CLASS: &'static str = "FluxTransformer2DModel";
    const KIND: &'static str = "a FLUX.1 transformer";
    const FIELDS: &'static [&'static str] = FIELDS;

    fn check(&self, file: &str) -> Result<()> {
        magcache_layers::positive_fields!(file, self,
        in_channels num_layers attention_head_dim num_attention_heads joint_attention_dim pooled_projection_dim)?;
        magcache_layers::config_util::check_packed_rope(
            file,
            self.patch_size,
            &self.axes_dims_rope,
            self.attention_head_dim,
        )?;
        Ok(())
    }
}
