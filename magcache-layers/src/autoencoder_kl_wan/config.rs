//! `AutoencoderKLWan`'s `config.json`: sizes, latent statistics, and the Wan2.2 (TI2V-5B) VAE's
//! residual blocks and patchifying.

use crate::config_util::read_json;
use crate::vae_common::MAX_LAYERS;
use crate::vae_common::{positive, ConfigReader};
use magcache_core::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// `AutoencoderKLWan` configuration (`vae/config.json`), with diffusers' defaults for absent keys.
#[derive(Clone, Debug, PartialEq)]
pub struct WanVaeConfig {
    pub base_dim: usize,
    /// `decoder_base_dim`, or `base_dim` when the config leaves it null.
    pub decoder_base_dim: usize,
    pub z_dim: usize,
    pub dim_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_scales: Vec<f64>,
    pub temperal_downsample: Vec<bool>,
    pub latents_mean: Vec<f64>,
    pub latents_std: Vec<f64>,
    pub in_channels: usize,
    pub out_channels: usize,
    /// The Wan2.2 VAE: residual down/up blocks with `AvgDown3D` / `DupUp3D` shortcuts.
    pub is_residual: bool,
    /// Pixels folded into channels before the encoder (and unfolded after the decoder): `p x p`
    /// (Wan2.2 VAE 2; 1 = none, the config's null).
    pub patch_size: usize,
}

const DEFAULT_MEAN: [f64; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];
const DEFAULT_STD: [f64; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.9160,
];

impl WanVaeConfig {
    /// Reads `config.json`; errors name the file and the key.
    pub fn read(path: &Path) -> Result<Self> {
        let (json, shown) = read_json(path)?;
        Self::from_json(&json, &shown)
    }

    /// Parses an `AutoencoderKLWan` config object (`file` names it in errors).
    pub fn from_json(json: &Value, file: &str) -> Result<Self> {
        // Qwen-Image's `AutoencoderKLQwenImage` is this VAE (the Wan2.1 architecture) used on one frame.
        let class = match json.get("_class_name").and_then(|c| c.as_str()) {
            Some("AutoencoderKLQwenImage") => "AutoencoderKLQwenImage",
            _ => "AutoencoderKLWan",
        };
        let c = ConfigReader::new(json, file, class, "a Wan VAE")?;
        let is_residual = c.bool("is_residual", false)?;
        let patch_size = match c.get("patch_size") {
            None | Some(Value::Null) => 1,
            Some(_) => c.usize("patch_size", 1)?,
        };
        if patch_size == 0 {
            return Err(c.error("patch_size", "must be at least 1 (or null)"));
        }
        let base_dim = c.usize("base_dim", 96)?;
        let decoder_base_dim = match c.get("decoder_base_dim") {
            None | Some(Value::Null) => base_dim,
            Some(_) => c.usize("decoder_base_dim", base_dim)?,
        };
        let floats = |key: &str, default: &[f64]| -> Result<Vec<f64>> {
            Ok(c.nullable_list(key, |x| x.as_f64())?
                .unwrap_or_else(|| default.to_vec()))
        };
        let cfg = WanVaeConfig {
            base_dim,
            decoder_base_dim,
            z_dim: c.usize("z_dim", 16)?,
            dim_mult: c
                .list("dim_mult", positive)?
                .unwrap_or_else(|| vec![1, 2, 4, 4]),
            num_res_blocks: c.count("num_res_blocks", 2, MAX_LAYERS)?,
            attn_scales: c
                .nullable_list("attn_scales", |x| x.as_f64())?
                .unwrap_or_default(),
            temperal_downsample: c
                .list("temperal_downsample", |x| x.as_bool())?
                .unwrap_or_else(|| vec![false, true, true]),
            latents_mean: floats("latents_mean", &DEFAULT_MEAN)?,
            latents_std: floats("latents_std", &DEFAULT_STD)?,
            in_channels: c.usize("in_channels", 3)?,
            out_channels: c.usize("out_channels", 3)?,
            is_residual,
            patch_size,
        };
        cfg.validate(file)?;
        // The pipelines size latents by these two keys (defaults 8 and 4); they must be what the
        // architecture does.
        for (key, have) in [
            ("scale_factor_spatial", cfg.spatial_scale()),
            ("scale_factor_temporal", cfg.temporal_scale()),
        ] {
            if let Some(v) = c.get(key).filter(|v| !v.is_null()) {
                if v.as_u64() != Some(have as u64) {
                    return Err(c.error(
                        key,
                        format!(
                            "{v}, but dim_mult, temperal_downsample and patch_size give {have}"
                        ),
                    ));
                }
            }
        }
        Ok(cfg)
    }

    pub(super) fn validate(&self, file: &str) -> Result<()> {
        let positive = [
            ("base_dim", self.base_dim),
            ("decoder_base_dim", self.decoder_base_dim),
            ("z_dim", self.z_dim),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(Error::config(file, k, "must be positive"));
            }
        }
        if self.dim_mult.is_empty() {
            return Err(Error::config(
                file,
                "dim_mult",
                "empty: need at least one stage",
            ));
        }
        if self.temperal_downsample.len() + 1 != self.dim_mult.len() {
            return Err(Error::config(
                file,
                "temperal_downsample",
                format!(
                    "has {} entries; expected one per downsampling stage, len(dim_mult) - 1 = {}",
                    self.temperal_downsample.len(),
                    self.dim_mult.len() - 1
                ),
            ));
        }
        // The decoder halves the channels at every upsampler (`upsample_out_dim = dim // 2`).
        let last = self.decoder_base_dim * self.dim_mult[self.dim_mult.len() - 1];
        if self.dim_mult.len() > 1 && last < 2 {
            return Err(Error::config(
                file,
                "decoder_base_dim",
                "too small: the decoder's upsamplers halve the channel count",
            ));
        }
        for (k, v) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if v.len() != self.z_dim {
                return Err(Error::config(
                    file,
                    k,
                    format!("has {} values; expected z_dim = {}", v.len(), self.z_dim),
                ));
            }
        }
        let p2 = self.patch_size * self.patch_size;
        for (k, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
        ] {
            if !v.is_multiple_of(p2) {
                return Err(Error::config(
                    file,
                    k,
                    format!("{v} is not a multiple of patch_size^2 = {p2}"),
                ));
            }
        }
        if self.latents_std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(Error::config(
                file,
                "latents_std",
                "every value must be finite and non-zero",
            ));
        }
        Ok(())
    }

    /// Spatial downsampling factor (2 per stage but the last, times the patch: 8 for the released
    /// Wan2.1 VAE, 16 for the Wan2.2 one).
    pub fn spatial_scale(&self) -> usize {
        1usize
            .checked_shl(self.dim_mult.len().saturating_sub(1) as u32)
            .unwrap_or(usize::MAX)
            .saturating_mul(self.patch_size)
    }

    /// Channels the encoder takes and the decoder gives (`in_channels` / `out_channels` are the
    /// patchified ones: the Wan2.2 VAE's 12 are 3 colours x 2 x 2).
    pub fn pixel_channels(&self) -> (usize, usize) {
        let p2 = self.patch_size * self.patch_size;
        (self.in_channels / p2, self.out_channels / p2)
    }

    /// Temporal downsampling factor (4 for the released VAE).
    pub fn temporal_scale(&self) -> usize {
        1usize
            .checked_shl(self.temperal_downsample.iter().filter(|&&t| t).count() as u32)
            .unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Result<WanVaeConfig> {
        let text = format!(
            r#"{{"_class_name": "AutoencoderKLWan", "base_dim": 4, "z_dim": 2, "dim_mult": [1, 2],
                "temperal_downsample": [true], "latents_mean": [0.0, 1.0], "latents_std": [1.0, 2.0]{extra}}}"#
        );
        WanVaeConfig::from_json(&serde_json::from_str(&text).unwrap(), "vae/config.json")
    }

    #[test]
    fn config_reads_sizes_and_the_wan22_keys() {
        let c = cfg("").unwrap();
        assert_eq!(c.decoder_base_dim, 4);
        assert_eq!(c.spatial_scale(), 2);
        assert_eq!(c.temporal_scale(), 2);
        assert!(!c.is_residual);
        let c = cfg(r#", "is_residual": true, "patch_size": 2, "in_channels": 12, "out_channels": 12, "scale_factor_spatial": 4"#).unwrap();
        assert!(c.is_residual);
        assert_eq!((c.spatial_scale(), c.pixel_channels()), (4, (3, 3)));
        let e = cfg(r#", "patch_size": 2"#).unwrap_err().to_string();
        assert!(e.starts_with("vae/config.json: in_channels:"), "{e}");
        let e = cfg(r#", "scale_factor_spatial": 8"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("vae/config.json: scale_factor_spatial:"),
            "{e}"
        );
        assert!(cfg(r#", "patch_size": null"#).is_ok());
        let e = cfg(r#", "latents_std": [1.0]"#).unwrap_err().to_string();
        assert!(e.contains("latents_std"), "{e}");
        // 10^10 blocks a stage: refused at once, not sized one block at a time.
        let e = cfg(r#", "num_res_blocks": 10000000000"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("vae/config.json: num_res_blocks:"), "{e}");
    }
}
