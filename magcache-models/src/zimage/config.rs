//! `ZImageTransformer2DModel` configuration (diffusers `config.json`), with overrides.

use magcache_core::{Error, Result};
use magcache_layers::config_util::ModelConfig;
use serde::{Deserialize, Serialize};

/// The diffusers class this config describes.
pub const ZIMAGE_CLASS: &str = "ZImageTransformer2DModel";

/// Width of the timestep MLP's hidden layer: fixed by the model class, in no config.
pub const T_MLP_HIDDEN: usize = 1024;
/// Channels of the timestep sinusoid (fixed by the model class).
pub const T_FREQ_CHANNELS: usize = 256;
/// Image and caption tokens are padded to a multiple of this many rows (fixed by the class).
pub const SEQ_MULTI_OF: usize = 32;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZImageConfig {
    pub all_patch_size: Vec<usize>,
    pub all_f_patch_size: Vec<usize>,
    pub in_channels: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_refiner_layers: usize,
    pub n_heads: usize,
    /// Unused by diffusers (plain multi-head attention); kept so released configs read.
    pub n_kv_heads: usize,
    pub norm_eps: f64,
    pub qk_norm: bool,
    pub cap_feat_dim: usize,
    pub rope_theta: f64,
    pub t_scale: f64,
    pub axes_dims: Vec<usize>,
    pub axes_lens: Vec<usize>,
}

impl Default for ZImageConfig {
    /// Z-Image-Turbo (6B), as released.
    fn default() -> Self {
        ZImageConfig {
            all_patch_size: vec![2],
            all_f_patch_size: vec![1],
            in_channels: 16,
            dim: 3840,
            n_layers: 30,
            n_refiner_layers: 2,
            n_heads: 30,
            n_kv_heads: 30,
            norm_eps: 1e-5,
            qk_norm: true,
            cap_feat_dim: 2560,
            rope_theta: 256.0,
            t_scale: 1000.0,
            axes_dims: vec![32, 48, 48],
            axes_lens: vec![1536, 512, 512],
        }
    }
}

impl ZImageConfig {
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads.max(1)
    }
    /// The conditioning width: `min(dim, 256)`.
    pub fn adaln_dim(&self) -> usize {
        self.dim.min(256)
    }
    /// The SwiGLU hidden width: `int(dim / 3 * 8)`.
    pub fn ffn_hidden(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0) as usize
    }
    /// The spatial patch (2): the pipeline's call uses `patch_size=2, f_patch_size=1`.
    pub fn patch(&self) -> usize {
        2
    }
    /// Channels of one patch token: `2 * 2 * 1 * in_channels`.
    pub fn patch_channels(&self) -> usize {
        self.in_channels.saturating_mul(4)
    }
}

impl ModelConfig for ZImageConfig {
    const CLASS: &'static str = ZIMAGE_CLASS;
    const KIND: &'static str = "a Z-Image transformer";

    fn check(&self, file: &str) -> Result<()> {
        magcache_layers::positive_fields!(file, self, in_channels dim n_heads cap_feat_dim n_layers)?;
        if !self.dim.is_multiple_of(self.n_heads) {
            return Err(Error::config(
                file,
                "n_heads",
                format!("{} does not divide dim {}", self.n_heads, self.dim),
            ));
        }
        if !self.all_patch_size.contains(&2) || !self.all_f_patch_size.contains(&1) {
            return Err(Error::config(
                file,
                "all_patch_size",
                "the pipeline calls the transformer with patch 2 and frame patch 1: the config has no `2-1` embedder",
            ));
        }
        for (k, v) in [
            ("norm_eps", self.norm_eps),
            ("rope_theta", self.rope_theta),
            ("t_scale", self.t_scale),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::config(file, k, "must be positive"));
            }
        }
        if self.axes_dims.len() != 3
            || self.axes_lens.len() != 3
            || self.axes_dims.iter().sum::<usize>() != self.head_dim()
            || self.axes_dims.iter().any(|d| !d.is_multiple_of(2))
        {
            return Err(Error::config(
                file,
                "axes_dims",
                format!(
                    "{:?} (lengths {:?}) must be three even sizes summing to the head dim {} (dim / n_heads)",
                    self.axes_dims,
                    self.axes_lens,
                    self.head_dim()
                ),
            ));
        }
        if !self.qk_norm {
            return Err(Error::config(
                file,
                "qk_norm",
                "only qk_norm = true (every released Z-Image model) is supported",
            ));
        }
        Ok(())
    }
}
