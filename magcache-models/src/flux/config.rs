//! `FluxTransformer2DModel` configuration (diffusers `config.json`), with overrides.

use magcache_core::Result;
use magcache_layers::config_util::ModelConfig;
use serde::{Deserialize, Serialize};

magcache_layers::packed_dit_config! {
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct FluxConfig {
        pub pooled_projection_dim: usize,
        pub guidance_embeds: bool,
    }
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

impl ModelConfig for FluxConfig {
    const CLASS: &'static str = "FluxTransformer2DModel";
    const KIND: &'static str = "a FLUX.1 transformer";

    fn check(&self, file: &str) -> Result<()> {
        magcache_layers::positive_fields!(file, self,
        in_channels num_layers attention_head_dim num_attention_heads joint_attention_dim pooled_projection_dim)?;
        self.check_packing(file)
    }
}
