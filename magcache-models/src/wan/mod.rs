//! Wan2.1 / Wan2.2: model, loading, presets, pipeline, and the family registrations.

pub mod config;
pub mod load;
pub mod model;
pub mod pipeline;

use crate::inputs::InputFile;
use crate::published;
use crate::random::randn;
use candle_core::Tensor;
use config::WanConfig;
use magcache_core::config::{RunConfig, WeightsSpec};
use magcache_core::registry::ModelFamily;
use magcache_core::{Error, ModelInfo, Pipeline, Result};
use model::{WanModel, WAN_BLOCK};
use pipeline::{WanInputs, WanPipeline};
use std::path::Path;

/// A named architecture with its published calibration data.
pub struct WanPreset {
    pub name: &'static str,
    pub family: &'static str,
    pub config: fn() -> WanConfig,
    /// Published MagCache curve name in `published_curves.toml`.
    pub curve: Option<&'static str>,
    /// Published TeaCache coefficient set.
    pub tea: Option<&'static str>,
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

pub const WAN21_PRESETS: &[WanPreset] = &[
    WanPreset {
        name: "wan2.1-t2v-1.3b",
        family: "wan2.1",
        config: cfg_1_3b,
        curve: Some("wan21_t2v_1_3b"),
        tea: Some("wan21_t2v_1_3b"),
    },
    WanPreset {
        name: "wan2.1-t2v-14b",
        family: "wan2.1",
        config: cfg_14b,
        curve: Some("wan21_t2v_14b"),
        tea: None,
    },
];

/// The preset whose architecture matches a loaded config (for published curves), if any.
fn match_preset(presets: &'static [WanPreset], cfg: &WanConfig) -> Option<&'static WanPreset> {
    presets.iter().find(|p| (p.config)() == *cfg)
}

/// Converts a `[model.overrides]` TOML table to JSON.
pub fn overrides_json(cfg: &RunConfig) -> serde_json::Map<String, serde_json::Value> {
    match &cfg.model.overrides {
        Some(t) => serde_json::to_value(t)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default(),
        None => serde_json::Map::new(),
    }
}

/// Resolves a path of the run file against its folder.
pub fn resolve(base: &Path, p: &str) -> std::path::PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// One Wan model from a weights path or a preset; returns the model, its preset (if any) and a
/// description.
pub fn build_model(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    weights: Option<&str>,
    presets: &'static [WanPreset],
    seed_offset: u64,
) -> Result<(WanModel, Option<&'static WanPreset>, String)> {
    let overrides = overrides_json(cfg);
    if let Some(w) = weights {
        let path = resolve(base, w);
        let config = cfg.model.config.as_deref().map(|c| resolve(base, c));
        let loaded = load::load_wan(&path, config.as_deref(), &overrides, file)?;
        let preset = match_preset(presets, &loaded.config);
        let c = &loaded.config;
        let desc = format!(
            "{} ({:?} layout): {} blocks, dim {}, {} heads, in {} ch",
            path.display(),
            loaded.layout,
            c.num_layers,
            c.inner_dim(),
            c.num_attention_heads,
            c.in_channels
        );
        let model = WanModel::from_weights(loaded.config, &loaded.store)?;
        Ok((model, preset, desc))
    } else {
        let name = cfg
            .model
            .preset
            .as_deref()
            .expect("validated: weights or preset");
        let preset = presets.iter().find(|p| p.name == name).ok_or_else(|| {
            Error::config(
                file,
                "model.preset",
                format!(
                    "unknown preset `{name}` for family `{}` (known: {})",
                    cfg.model.family,
                    presets
                        .iter()
                        .map(|p| p.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
        let base_cfg = serde_json::to_value((preset.config)())
            .expect("serializable")
            .as_object()
            .cloned()
            .expect("object");
        let c = WanConfig::from_map(base_cfg, file, &overrides)?;
        let params = estimate_params(&c);
        let desc = format!(
            "preset {} (random init, seed {}): {} blocks, dim {}, {} heads, {:.2}B parameters",
            preset.name,
            cfg.model.seed + seed_offset,
            c.num_layers,
            c.inner_dim(),
            c.num_attention_heads,
            params as f64 / 1e9
        );
        let store = model::random_weights(&c, cfg.model.seed + seed_offset)?;
        let same_arch = (preset.config)() == c;
        Ok((
            WanModel::from_weights(c, &store)?,
            if same_arch { Some(preset) } else { None },
            desc,
        ))
    }
}

fn estimate_params(c: &WanConfig) -> usize {
    let d = c.inner_dim();
    c.num_layers * (8 * d * d + 2 * d * c.ffn_dim + 6 * d) + 6 * d * d + 2 * d * d + d * c.text_dim
}

/// Reads or draws the inputs of a Wan run and checks them against the model.
pub fn build_inputs(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    model: &WanModel,
    weights_dir: Option<&Path>,
) -> Result<WanInputs> {
    let c = &model.cfg;
    if let Some(f) = &cfg.inputs.file {
        let inp = InputFile::load(&resolve(base, f))?;
        let lat = inp.get(
            "latents_init",
            5,
            &format!("[B, {}, F, H, W] latents", c.in_channels),
        )?;
        if let Some(msg) = c.latent_shape_error(lat.dims()) {
            return Err(Error::inputs(&inp.path, "latents_init", msg));
        }
        let ld = lat.dims().to_vec();
        let text = |name: &str| -> Result<Tensor> {
            let t = inp.get(name, 3, &format!("[B, L, {}] text embeddings", c.text_dim))?;
            if t.dim(0)? != ld[0] || t.dim(2)? != c.text_dim {
                return Err(Error::inputs(
                    &inp.path,
                    name,
                    format!(
                        "has shape {:?}; expected [{}, L, {}]",
                        t.dims(),
                        ld[0],
                        c.text_dim
                    ),
                ));
            }
            Ok(t)
        };
        let cond = text("cond")?;
        let uncond = if inp.has("uncond") {
            Some(text("uncond")?)
        } else {
            None
        };
        if uncond.is_none() && cfg.sampling.guidance_scale.unwrap_or(5.0) > 1.0 {
            return Err(Error::inputs(&inp.path, "uncond", "missing: classifier-free guidance (guidance_scale > 1) needs the unconditional embeddings"));
        }
        return Ok(WanInputs {
            latents: lat,
            cond,
            uncond,
            first_frame: None,
        });
    }
    let seed = cfg.inputs.seed.unwrap_or(cfg.model.seed);
    let shape = cfg
        .inputs
        .latent_shape
        .clone()
        .unwrap_or_else(|| vec![1, c.in_channels, 3, 24, 40]);
    if let Some(msg) = c.latent_shape_error(&shape) {
        return Err(Error::config(file, "inputs.latent_shape", msg));
    }
    let latents = randn(seed.wrapping_add(1), &shape)?;
    if let Some(classes) = &cfg.inputs.classes {
        let (cond, uncond) = class_conditioning(file, weights_dir, classes, shape[0])?;
        return Ok(WanInputs {
            latents,
            cond,
            uncond: Some(uncond),
            first_frame: None,
        });
    }
    let l = cfg.inputs.text_len.unwrap_or(64);
    let cond = randn(seed.wrapping_add(2), &[shape[0], l, c.text_dim])?;
    let uncond = randn(seed.wrapping_add(3), &[shape[0], l, c.text_dim])?;
    Ok(WanInputs {
        latents,
        cond,
        uncond: Some(uncond),
        first_frame: None,
    })
}

/// Class conditioning from `class_embeddings.safetensors` beside the weights: rows `classes` for the
/// cond branch, the last row (the null class) for the uncond branch.
fn class_conditioning(
    file: &str,
    weights_dir: Option<&Path>,
    classes: &[usize],
    batch: usize,
) -> Result<(Tensor, Tensor)> {
    let dir = weights_dir.ok_or_else(|| {
        Error::config(
            file,
            "inputs.classes",
            "class conditioning needs `weights` (class_embeddings.safetensors beside them)",
        )
    })?;
    let path = dir.join("class_embeddings.safetensors");
    let inp = InputFile::load(&path)?;
    let table = inp.get("class_embeddings", 3, "[classes + 1, L, text_dim]")?;
    let rows = table.dim(0)?;
    if classes.len() != batch {
        return Err(Error::config(
            file,
            "inputs.classes",
            format!(
                "{} classes for a batch of {batch}: give one class per sample",
                classes.len()
            ),
        ));
    }
    if let Some(&bad) = classes.iter().find(|&&c| c + 1 >= rows) {
        return Err(Error::config(
            file,
            "inputs.classes",
            format!("class {bad} is out of range (0..{})", rows - 2),
        ));
    }
    let idx = Tensor::from_vec(
        classes.iter().map(|&c| c as u32).collect::<Vec<_>>(),
        classes.len(),
        &candle_core::Device::Cpu,
    )?;
    let cond = table.index_select(&idx, 0)?;
    let null = table.narrow(0, rows - 1, 1)?;
    let uncond = null.repeat((batch, 1, 1))?;
    Ok((cond, uncond))
}

fn info_for(family: &str, preset: Option<&WanPreset>) -> ModelInfo {
    let mut info = ModelInfo {
        family: family.to_string(),
        ..Default::default()
    };
    if let Some(p) = preset {
        info.variant = Some(p.name.to_string());
        info.mag_ratios = p.curve.and_then(|c| published::wan_curves(c, None).ok());
        info.tea_coefficients = p.tea.and_then(|t| published::tea_coefficients(t).ok());
    }
    info
}

fn build_wan21(cfg: &RunConfig, file: &str, base: &Path) -> Result<Box<dyn Pipeline>> {
    let weights = match &cfg.model.weights {
        Some(WeightsSpec::One(w)) => Some(w.as_str()),
        Some(WeightsSpec::Many(_)) => {
            return Err(Error::config(
                file,
                "model.weights",
                "wan2.1 takes one weights path (a list is for wan2.2's two experts)",
            ))
        }
        None => None,
    };
    if cfg.sampling.boundary_ratio.is_some() {
        return Err(Error::config(
            file,
            "sampling.boundary_ratio",
            "only wan2.2 (two experts) has an expert boundary",
        ));
    }
    let (model, preset, desc) = build_model(cfg, file, base, weights, WAN21_PRESETS, 0)?;
    let wdir = weights.map(|w| {
        let p = resolve(base, w);
        if p.is_dir() {
            p
        } else {
            p.parent().map(|x| x.to_path_buf()).unwrap_or_default()
        }
    });
    let inputs = build_inputs(cfg, file, base, &model, wdir.as_deref())?;
    let p = WanPipeline::new(
        "wan2.1",
        vec![model],
        None,
        cfg.sampling.steps,
        cfg.sampling.shift.unwrap_or(5.0),
        cfg.sampling.guidance_scale.unwrap_or(5.0),
        None,
        inputs,
        info_for("wan2.1", preset),
        desc,
    )?;
    Ok(Box::new(p))
}

inventory::submit! {
    ModelFamily {
        name: "wan2.1",
        description: "Wan2.1 text-to-video transformer (WanTransformer3DModel), flow-matching Euler with static shift, CFG",
        blocks: &[WAN_BLOCK],
        presets: &["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"],
        published: &["magcache wan21_t2v_1_3b", "magcache wan21_t2v_14b", "teacache wan21_t2v_1_3b"],
        build: build_wan21,
    }
}
