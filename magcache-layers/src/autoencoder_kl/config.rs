//! `AutoencoderKL`'s `config.json`, and the sizes of a BFL `ae.safetensors` read from its tensors.

use crate::config_util::read_json;
use crate::vae_common::MAX_LAYERS;
use crate::vae_common::{positive, ConfigReader};
use crate::weights::count_blocks;
use crate::weights::WeightStore;
use magcache_core::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// BFL's `AutoEncoderParams` for FLUX.1-dev and -schnell (no config file ships with `ae.safetensors`).
const BFL_GROUPS: usize = 32;
const BFL_SCALE: f64 = 0.3611;
const BFL_SHIFT: f64 = 0.1159;
/// The released FLUX.1 `vae/config.json`'s `sample_size`, taken for BFL's file (which has no config).
const BFL_SAMPLE_SIZE: usize = 1024;
/// `AutoencoderKL`'s default `sample_size`.
const DIFFUSERS_SAMPLE_SIZE: usize = 32;

/// `AutoencoderKL` configuration (`vae/config.json`), with diffusers' defaults for absent keys.
#[derive(Clone, Debug, PartialEq)]
pub struct FluxVaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    /// `shift_factor` (null / absent: 0).
    pub shift_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    /// diffusers pipelines run such a VAE in f32 when asked for f16 (f16 overflows in it).
    pub force_upcast: bool,
    /// `sample_size` (pixels; a list's first entry, as diffusers reads it): the tile size of
    /// `enable_tiling` ([`super::FluxTiling`]); 1024 in the released FLUX.1 and FLUX.2 VAEs.
    pub sample_size: usize,
}

impl FluxVaeConfig {
    /// Reads `config.json`; errors name the file and the key.
    pub fn read(path: &Path) -> Result<Self> {
        let (json, shown) = read_json(path)?;
        Self::from_json(&json, &shown)
    }

    /// Parses an `AutoencoderKL` config object (`file` names it in errors).
    pub fn from_json(json: &Value, file: &str) -> Result<Self> {
        let c = ConfigReader::new(json, file, "AutoencoderKL", "an image VAE")?;
        if let Some(a) = c.get("act_fn") {
            if a.as_str() != Some("silu") {
                return Err(c.error("act_fn", format!("{a} is not supported (only \"silu\")")));
            }
        }
        let block_out_channels = c
            .list("block_out_channels", positive)?
            .unwrap_or_else(|| vec![64]);
        for (key, want) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            if let Some(types) = c.list(key, |x| x.as_str().map(String::from))? {
                if let Some(t) = types.iter().find(|t| t.as_str() != want) {
                    return Err(c.error(key, format!("`{t}` is not supported (only {want})")));
                }
                if types.len() != block_out_channels.len() {
                    return Err(c.error(
                        key,
                        format!(
                            "has {} entries; block_out_channels has {}",
                            types.len(),
                            block_out_channels.len()
                        ),
                    ));
                }
            }
        }
        let cfg = FluxVaeConfig {
            in_channels: c.usize("in_channels", 3)?,
            out_channels: c.usize("out_channels", 3)?,
            latent_channels: c.usize("latent_channels", 4)?,
            block_out_channels,
            layers_per_block: c.count("layers_per_block", 1, MAX_LAYERS)?,
            norm_num_groups: c.usize("norm_num_groups", 32)?,
            scaling_factor: c.float("scaling_factor", 0.18215)?,
            shift_factor: c.float("shift_factor", 0.0)?,
            use_quant_conv: c.bool("use_quant_conv", true)?,
            use_post_quant_conv: c.bool("use_post_quant_conv", true)?,
            mid_block_add_attention: c.bool("mid_block_add_attention", true)?,
            force_upcast: c.bool("force_upcast", true)?,
            sample_size: match c.get("sample_size") {
                Some(v @ Value::Array(_)) => c
                    .list("sample_size", positive)?
                    .and_then(|l| l.first().copied())
                    .ok_or_else(|| c.error("sample_size", format!("{v} has no entries")))?,
                _ => c.usize("sample_size", DIFFUSERS_SAMPLE_SIZE)?,
            },
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Checks the sizes fit together; errors name `file` and the key.
    pub fn validate(&self, file: &str) -> Result<()> {
        for (k, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
            ("norm_num_groups", self.norm_num_groups),
            ("sample_size", self.sample_size),
        ] {
            if v == 0 {
                return Err(Error::config(file, k, "must be positive"));
            }
        }
        if self.block_out_channels.is_empty() || self.block_out_channels.len() > 16 {
            return Err(Error::config(
                file,
                "block_out_channels",
                format!(
                    "has {} entries; expected 1 to 16 stages",
                    self.block_out_channels.len()
                ),
            ));
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || c % self.norm_num_groups != 0)
        {
            return Err(Error::config(
                file,
                "norm_num_groups",
                format!(
                    "{} does not divide block_out_channels entry {c} (GroupNorm needs whole groups)",
                    self.norm_num_groups
                ),
            ));
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return Err(Error::config(
                file,
                "scaling_factor",
                format!("{} must be finite and non-zero", self.scaling_factor),
            ));
        }
        if !self.shift_factor.is_finite() {
            return Err(Error::config(file, "shift_factor", "must be finite"));
        }
        Ok(())
    }

    /// Pixels per latent along each side: `2^(len(block_out_channels) - 1)` (8 for FLUX.1).
    pub fn vae_scale_factor(&self) -> usize {
        1usize << (self.block_out_channels.len().saturating_sub(1))
    }

    /// The configuration of BFL-layout tensors (already renamed to diffusers names): channels and
    /// depth from the tensor shapes, groups and scale/shift from BFL's FLUX.1 `AutoEncoderParams`
    /// (32, 0.3611, 0.1159), quant convs and the mid-block attention by presence.
    pub fn from_bfl_tensors(store: &WeightStore) -> Result<Self> {
        let shape = |name: &str| -> Result<Vec<usize>> {
            store.shape(name).ok_or_else(|| {
                Error::weights(
                    &store.origin,
                    name,
                    "missing from the BFL autoencoder checkpoint (its sizes are read from this tensor)",
                )
            })
        };
        let dim = |name: &str, axis: usize| -> Result<usize> {
            shape(name)?.get(axis).copied().ok_or_else(|| {
                Error::weights(
                    &store.origin,
                    name,
                    "has too few dimensions for a conv weight",
                )
            })
        };
        let numbered = |prefix: &str| count_blocks(store, prefix);
        let levels = numbered("encoder.down_blocks.");
        let block_out_channels = (0..levels)
            .map(|i| {
                dim(
                    &format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"),
                    0,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg = FluxVaeConfig {
            in_channels: dim("encoder.conv_in.weight", 1)?,
            out_channels: dim("decoder.conv_out.weight", 0)?,
            latent_channels: dim("decoder.conv_in.weight", 1)?,
            block_out_channels,
            layers_per_block: numbered("encoder.down_blocks.0.resnets."),
            norm_num_groups: BFL_GROUPS,
            scaling_factor: BFL_SCALE,
            shift_factor: BFL_SHIFT,
            use_quant_conv: store.contains("quant_conv.weight"),
            use_post_quant_conv: store.contains("post_quant_conv.weight"),
            mid_block_add_attention: store.contains("decoder.mid_block.attentions.0.to_q.weight"),
            force_upcast: true,
            sample_size: BFL_SAMPLE_SIZE,
        };
        cfg.validate(&format!(
            "{} (sizes inferred from its tensors)",
            store.origin
        ))?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_key() {
        let parse = |extra: &str| {
            let text = format!(
                r#"{{"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "norm_num_groups": 4{extra}}}"#
            );
            FluxVaeConfig::from_json(&serde_json::from_str(&text).unwrap(), "vae/config.json")
        };
        let c = parse("").unwrap();
        assert_eq!(c.vae_scale_factor(), 2);
        assert!(c.use_quant_conv && c.mid_block_add_attention);
        assert_eq!(c.shift_factor, 0.0);
        for (extra, key) in [
            (r#", "norm_num_groups": 3"#, "norm_num_groups"),
            (r#", "act_fn": "gelu""#, "act_fn"),
            (
                r#", "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]"#,
                "down_block_types",
            ),
            (
                r#", "up_block_types": ["UpDecoderBlock2D"]"#,
                "up_block_types",
            ),
            (r#", "scaling_factor": 0"#, "scaling_factor"),
            (r#", "layers_per_block": -1"#, "layers_per_block"),
            // 10^10 layers: refused at once, not sized one layer at a time.
            (r#", "layers_per_block": 10000000000"#, "layers_per_block"),
            (r#", "_class_name": "AutoencoderKLWan""#, "_class_name"),
        ] {
            let e = parse(extra).unwrap_err().to_string();
            assert!(e.starts_with(&format!("vae/config.json: {key}:")), "{e}");
        }
    }
}
