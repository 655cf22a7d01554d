//! The Wan architectures we know by name, with their published calibration data.

use super::config::WanConfig;
use crate::published;
use magcache_core::runtime::config::RunConfig;
use magcache_core::{Error, Indicator, ModelInfo, Result};

/// A named architecture with its published calibration data.
pub struct WanPreset {
    pub name: &'static str,
    pub family: &'static str,
    pub config: fn() -> WanConfig,
    /// Published MagCache curve name in `published_curves.toml`.
    pub curve: Option<&'static str>,
    /// Published TeaCache coefficient set.
    pub tea: Option<&'static str>,
    /// Number of transformers (2: high-noise and low-noise experts).
    pub experts: usize,
    /// Default expert boundary (two experts).
    pub boundary_ratio: Option<f64>,
    /// Steps of the published curve that belong to the high-noise expert (two experts).
    pub curve_high_steps: Option<usize>,
    /// One timestep per token (Wan2.2 TI2V).
    pub expand_timesteps: bool,
    /// The published MagCache curve of image-to-video runs, where it differs from `curve` (TI2V-5B's
    /// text and image modes were calibrated separately).
    pub curve_i2v: Option<&'static str>,
}

fn cfg_1_3b() -> WanConfig {
    WanConfig {
        num_attention_heads: 12,
        attention_head_dim: 128,
        ffn_dim: 8960,
        num_layers: 30,
        ..WanConfig::default()
    }
}
fn cfg_14b() -> WanConfig {
    WanConfig::default()
}
fn cfg_i2v_a14b() -> WanConfig {
    WanConfig {
        in_channels: 36,
        ..WanConfig::default()
    }
}
/// Wan2.1 I2V-14B (480P and 720P share it): 36 input channels, CLIP ViT-H/14 image attention.
fn cfg_i2v_14b() -> WanConfig {
    WanConfig {
        in_channels: 36,
        image_dim: Some(1280),
        added_kv_proj_dim: Some(5120),
        ..WanConfig::default()
    }
}
fn cfg_ti2v_5b() -> WanConfig {
    WanConfig {
        num_attention_heads: 24,
        attention_head_dim: 128,
        ffn_dim: 14336,
        num_layers: 30,
        in_channels: 48,
        out_channels: 48,
        ..WanConfig::default()
    }
}

const fn single(
    name: &'static str,
    config: fn() -> WanConfig,
    curve: Option<&'static str>,
    tea: Option<&'static str>,
) -> WanPreset {
    WanPreset {
        name,
        family: "wan2.1",
        config,
        curve,
        tea,
        experts: 1,
        boundary_ratio: None,
        curve_high_steps: None,
        expand_timesteps: false,
        curve_i2v: None,
    }
}

pub const WAN21_PRESETS: &[WanPreset] = &[
    single(
        "wan2.1-t2v-1.3b",
        cfg_1_3b,
        Some("wan21_t2v_1_3b"),
        Some("wan21_t2v_1_3b"),
    ),
    // TeaCache's published 14B T2V coefficients (they were in the data, unused, until the check of
    // the published lists against the data found them).
    single(
        "wan2.1-t2v-14b",
        cfg_14b,
        Some("wan21_t2v_14b"),
        Some("wan21_t2v_14b"),
    ),
    // The same architecture at two resolutions, calibrated apart (shift 3 at 480P, 5 at 720P): a
    // loaded folder matches the 480P one; runs of 720 lines or more take the 720P curves.
    single(
        "wan2.1-i2v-14b-480p",
        cfg_i2v_14b,
        Some("wan21_i2v_14b_480p"),
        Some("wan21_i2v_14b_480p"),
    ),
    single(
        "wan2.1-i2v-14b-720p",
        cfg_i2v_14b,
        Some("wan21_i2v_14b_720p"),
        Some("wan21_i2v_14b_720p"),
    ),
];

/// Wan2.2: the A14B models are two 14B experts; the published curves span both experts
/// (26 of 40 steps high-noise for T2V at shift 12, 15 of 40 for I2V at shift 5).
pub const WAN22_PRESETS: &[WanPreset] = &[
    WanPreset {
        name: "wan2.2-t2v-a14b",
        family: "wan2.2",
        config: cfg_14b,
        curve: Some("wan22_t2v_a14b"),
        tea: None,
        experts: 2,
        boundary_ratio: Some(0.875),
        curve_high_steps: Some(26),
        expand_timesteps: false,
        curve_i2v: None,
    },
    WanPreset {
        name: "wan2.2-i2v-a14b",
        family: "wan2.2",
        config: cfg_i2v_a14b,
        curve: Some("wan22_i2v_a14b"),
        tea: None,
        experts: 2,
        boundary_ratio: Some(0.9),
        curve_high_steps: Some(15),
        expand_timesteps: false,
        curve_i2v: None,
    },
    WanPreset {
        name: "wan2.2-ti2v-5b",
        family: "wan2.2",
        config: cfg_ti2v_5b,
        curve: Some("wan22_ti2v_5b_t2v"),
        tea: None,
        experts: 1,
        boundary_ratio: None,
        curve_high_steps: None,
        expand_timesteps: true,
        curve_i2v: Some("wan22_ti2v_5b_i2v"),
    },
];

/// The preset `name` of the run's family, or an error naming `model.preset` and the known ones.
pub(crate) fn find_preset(
    cfg: &RunConfig,
    file: &str,
    presets: &'static [WanPreset],
    name: &str,
) -> Result<&'static WanPreset> {
    presets.iter().find(|p| p.name == name).ok_or_else(|| {
        let known: Vec<&str> = presets.iter().map(|p| p.name).collect();
        Error::config(
            file,
            "model.preset",
            format!(
                "unknown preset `{name}` for family `{}` (known: {})",
                cfg.model.family,
                known.join(", ")
            ),
        )
    })
}

/// The preset whose architecture matches a loaded config (for published curves), if any.
pub(crate) fn match_preset(
    presets: &'static [WanPreset],
    cfg: &WanConfig,
) -> Option<&'static WanPreset> {
    presets.iter().find(|p| (p.config)() == *cfg)
}

/// What strategies may know of a Wan run: the family, the preset and its published tables (of a
/// text-to-video run, `image` false, or an image-to-video run: a preset with an image-to-video
/// curve of its own gives that one to image runs).
pub(crate) fn info_for_mode(family: &str, preset: Option<&WanPreset>, image: bool) -> ModelInfo {
    let mut info = ModelInfo {
        family: family.to_string(),
        indicators: vec![
            Indicator::TimestepEmbedding,
            Indicator::TimestepModulation,
            Indicator::InputLatents,
        ],
        ..Default::default()
    };
    // TeaCache's Wan coefficients are fit on the time embedding (the 6*dim projection with
    // ret_steps); without a preset no coefficients are known.
    let tea = published::teacache(
        preset.and_then(|p| p.tea),
        Indicator::TimestepEmbedding,
        Indicator::TimestepModulation,
    );
    if let Ok(t) = tea {
        info.published.insert("teacache".into(), t);
    }
    if let Some(p) = preset {
        info.variant = Some(p.name.to_string());
        let curve = if image {
            p.curve_i2v.or(p.curve)
        } else {
            p.curve
        };
        if let Some(Ok(m)) = curve.map(|c| published::magcache(c, true, p.curve_high_steps)) {
            info.published.insert("magcache".into(), m);
        }
    }
    info
}
