//! `Flux2Transformer2DModel` configuration (diffusers `config.json`), with overrides.

use magcache_core::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The diffusers class this config describes.
pub const FLUX2_CLASS: &str = "Flux2Transformer2DModel";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flux2Config {
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub timestep_guidance_channels: usize,
    pub mlp_ratio: f64,
    pub axes_dims_rope: Vec<usize>,
    pub rope_theta: f64,
    pub eps: f64,
    pub guidance_embeds: bool,
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

const FIELDS: &[&str] = &[
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "timestep_guidance_channels",
    "mlp_ratio",
    "axes_dims_rope",
    "rope_theta",
    "eps",
    "guidance_embeds",
];

impl Flux2Config {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads
            .saturating_mul(self.attention_head_dim)
    }
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
    /// The SwiGLU hidden width: `int(inner_dim * mlp_ratio)` (the input projections are twice it).
    pub fn mlp_hidden(&self) -> usize {
        (self.inner_dim() as f64 * self.mlp_ratio) as usize
    }
    /// Blocks of the cache chain: double-stream, then single-stream.
    pub fn num_blocks(&self) -> usize {
        self.num_layers.saturating_add(self.num_single_layers)
    }

    /// From a base and a map of diffusers fields (keys starting with `_` are metadata), then
    /// overrides (unknown keys are errors naming the file or `model.overrides.KEY`).
    pub fn from_map(
        base: Flux2Config,
        obj: &Map<String, Value>,
        file: &str,
        overrides: &Map<String, Value>,
    ) -> Result<Self> {
        if let Some(c) = obj.get("_class_name").and_then(|v| v.as_str()) {
            if c != FLUX2_CLASS {
                return Err(Error::config(
                    file,
                    "_class_name",
                    format!("`{c}` is not a FLUX.2 transformer (expected {FLUX2_CLASS})"),
                ));
            }
        }
        let cfg = magcache_layers::config_util::merge_config(
            &base,
            obj,
            overrides,
            file,
            FIELDS,
            FLUX2_CLASS,
        )?;
        cfg.check(file)?;
        Ok(cfg)
    }

    /// Reads a transformer `config.json`; errors name the file and key.
    pub fn read(path: &std::path::Path, overrides: &Map<String, Value>) -> Result<Self> {
        let shown = path.display().to_string();
        let text = magcache_core::error::read_text(path)?;
        magcache_core::files::record_read(path);
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&shown, "(document)", format!("invalid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::config(&shown, "(document)", "expected a JSON object"))?;
        Self::from_map(Flux2Config::default(), obj, &shown, overrides)
    }

    pub fn check(&self, file: &str) -> Result<()> {
        for (k, v) in [
            ("in_channels", self.in_channels),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            (
                "timestep_guidance_channels",
                self.timestep_guidance_channels,
            ),
        ] {
            if v == 0 {
                return Err(Error::config(file, k, "must be at least 1"));
            }
        }
        if self.num_blocks() == 0 {
            return Err(Error::config(
                file,
                "num_layers",
                "the model needs at least one block (num_layers + num_single_layers)",
            ));
        }
        if self.patch_size != 1 {
            return Err(Error::config(
                file,
                "patch_size",
                "only patch_size 1 (the pipeline packs 2x2 latents itself) is supported",
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
        if self.axes_dims_rope.iter().sum::<usize>() != self.attention_head_dim
            || self.axes_dims_rope.iter().any(|d| !d.is_multiple_of(2))
        {
            return Err(Error::config(
                file,
                "axes_dims_rope",
                format!(
                    "{:?} must be even and sum to attention_head_dim {}",
                    self.axes_dims_rope, self.attention_head_dim
                ),
            ));
        }
        Ok(())
    }
}
