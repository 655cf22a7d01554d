//! FLUX presets (seeded random weights at the released sizes) and what strategies may know of a
//! FLUX run (published MagCache curve and TeaCache coefficients).

use super::config::FluxConfig;
use crate::published;
use magcache_core::{Indicator, ModelInfo};

pub struct FluxPreset {
    pub name: &'static str,
    pub config: fn() -> FluxConfig,
}

fn dev() -> FluxConfig {
    FluxConfig::default()
}
fn schnell() -> FluxConfig {
    FluxConfig {
        guidance_embeds: false,
        ..FluxConfig::default()
    }
}

pub const FLUX_PRESETS: &[FluxPreset] = &[
    FluxPreset {
        name: "flux-dev",
        config: dev,
    },
    FluxPreset {
        name: "flux-schnell",
        config: schnell,
    },
];

pub(super) fn flux_info(preset: Option<&str>) -> ModelInfo {
    let mut info = ModelInfo {
        family: "flux".into(),
        variant: preset.map(String::from),
        indicators: vec![Indicator::TimestepEmbedding, Indicator::ModulatedInput],
        ..Default::default()
    };
    // The MagCache curve and the TeaCache coefficients (fit on the first double block's modulated
    // input) published for FLUX.1-dev.
    if let Ok(m) = published::magcache("flux_dev", false, None) {
        info.published.insert("magcache".into(), m);
    }
    if let Ok(t) = published::teacache(
        Some("flux_dev"),
        Indicator::ModulatedInput,
        Indicator::ModulatedInput,
    ) {
        info.published.insert("teacache".into(), t);
    }
    info
}
