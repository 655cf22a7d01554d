//! Wan2.1 / Wan2.2: model, loading, presets, pipeline, and the family registrations.

pub mod config;
pub mod load;
pub mod model;
pub mod pipeline;
pub mod vae;

use crate::config_util::to_map;
use crate::inputs::InputFile;
use crate::published;
use crate::random::randn;
use crate::scheduler::flow_match_static;
use candle_core::Tensor;
use config::WanConfig;
use magcache_core::config::{RunConfig, WeightsSpec};
use magcache_core::registry::ModelFamily;
use magcache_core::{Error, GenerationPlan, Indicator, ModelInfo, Pipeline, Result};
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
    /// Number of transformers (2: high-noise and low-noise experts).
    pub experts: usize,
    /// Default expert boundary (two experts).
    pub boundary_ratio: Option<f64>,
    /// Steps of the published curve that belong to the high-noise expert (two experts).
    pub curve_high_steps: Option<usize>,
    /// One timestep per token (Wan2.2 TI2V).
    pub expand_timesteps: bool,
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
    }
}

pub const WAN21_PRESETS: &[WanPreset] = &[
    single(
        "wan2.1-t2v-1.3b",
        cfg_1_3b,
        Some("wan21_t2v_1_3b"),
        Some("wan21_t2v_1_3b"),
    ),
    single("wan2.1-t2v-14b", cfg_14b, Some("wan21_t2v_14b"), None),
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
    },
    WanPreset {
        name: "wan2.2-ti2v-5b",
        family: "wan2.2",
        config: cfg_ti2v_5b,
        curve: None,
        tea: None,
        experts: 1,
        boundary_ratio: None,
        curve_high_steps: None,
        expand_timesteps: true,
    },
];

/// The preset `name` of the run's family, or an error naming `model.preset` and the known ones.
fn find_preset(
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
    let placement = magcache_core::Placement::open(&cfg.model.device, &cfg.model.dtype, file)?;
    if let Some(w) = weights {
        let path = resolve(base, w);
        let config = cfg.model.config.as_deref().map(|c| resolve(base, c));
        let mut loaded = load::load_wan(&path, config.as_deref(), &overrides, file)?;
        loaded.store.set_placement(placement.clone());
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
        let name = crate::config_util::preset_name(cfg, file)?;
        let preset = find_preset(cfg, file, presets, name)?;
        let base_cfg = to_map(&(preset.config)(), "WanTransformer3DModel")?;
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
        let mut store = model::random_weights(&c, cfg.model.seed + seed_offset, placement.dtype)?;
        store.set_placement(placement.clone());
        // A shrunk preset (overrides) keeps the preset's published curves: the curve shape belongs
        // to the model family and sampler far more than to the exact depth.
        Ok((WanModel::from_weights(c, &store)?, Some(preset), desc))
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
    // Image-conditioned experts (Wan2.2 I2V, 36 channels) take the latents plus `in - out` condition
    // channels; the latents themselves have `out_channels`.
    let extra = c.in_channels.saturating_sub(c.out_channels);
    let latent_cfg = WanConfig {
        in_channels: c.in_channels - extra,
        ..c.clone()
    };
    if let Some(f) = &cfg.inputs.file {
        let inp = InputFile::load(&resolve(base, f))?;
        let lat = inp.get(
            "latents_init",
            5,
            &format!("[B, {}, F, H, W] latents", c.in_channels),
        )?;
        if let Some(msg) = latent_cfg.latent_shape_error(lat.dims()) {
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
        let condition = if extra > 0 {
            let t = inp.get(
                "condition",
                5,
                &format!("[B, {extra}, F, H, W] image condition (mask + image latents)"),
            )?;
            let want = [ld[0], extra, ld[2], ld[3], ld[4]];
            if t.dims() != want {
                return Err(Error::inputs(
                    &inp.path,
                    "condition",
                    format!("has shape {:?}; expected {want:?}", t.dims()),
                ));
            }
            Some(t)
        } else {
            None
        };
        let first_frame = if inp.has("image_latents") {
            let t = inp.get(
                "image_latents",
                5,
                "[B, C, 1, H, W] latents of the conditioning image",
            )?;
            let want = [ld[0], ld[1], 1, ld[3], ld[4]];
            if t.dims() != want {
                return Err(Error::inputs(
                    &inp.path,
                    "image_latents",
                    format!("has shape {:?}; expected {want:?}", t.dims()),
                ));
            }
            Some(t)
        } else {
            None
        };
        return Ok(WanInputs {
            latents: lat,
            cond,
            uncond,
            condition,
            first_frame,
        });
    }
    let seed = cfg.inputs.seed.unwrap_or(cfg.model.seed);
    let shape = cfg
        .inputs
        .latent_shape
        .clone()
        .unwrap_or_else(|| vec![1, latent_cfg.in_channels, 3, 24, 40]);
    if let Some(msg) = latent_cfg.latent_shape_error(&shape) {
        return Err(Error::config(file, "inputs.latent_shape", msg));
    }
    let latents = randn(seed.wrapping_add(1), &shape)?;
    let condition = if extra > 0 {
        Some(randn(
            seed.wrapping_add(4),
            &[shape[0], extra, shape[2], shape[3], shape[4]],
        )?)
    } else {
        None
    };
    let (cond, uncond) = match &cfg.inputs.classes {
        Some(classes) => class_conditioning(file, weights_dir, classes, shape[0])?,
        None => {
            let l = cfg.inputs.text_len.unwrap_or(64);
            (
                randn(seed.wrapping_add(2), &[shape[0], l, c.text_dim])?,
                randn(seed.wrapping_add(3), &[shape[0], l, c.text_dim])?,
            )
        }
    };
    Ok(WanInputs {
        latents,
        cond,
        uncond: Some(uncond),
        condition,
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
    if rows < 2 {
        return Err(Error::inputs(
            &inp.path,
            "class_embeddings",
            format!("has {rows} row(s); expected at least 2 (one per class, then the null class)"),
        ));
    }
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
        if let Some(Ok(m)) = p
            .curve
            .map(|c| published::magcache(c, true, p.curve_high_steps))
        {
            info.published.insert("magcache".into(), m);
        }
    }
    info
}

/// The folder class embeddings and other side files are looked up in.
fn weights_dir(base: &Path, w: &str) -> std::path::PathBuf {
    let p = resolve(base, w);
    if p.is_dir() {
        p
    } else {
        p.parent().map(|x| x.to_path_buf()).unwrap_or_default()
    }
}

fn build_wan21(cfg: &RunConfig, file: &str, base: &Path) -> Result<Box<dyn Pipeline>> {
    crate::config_util::require_weights_or_preset(cfg, file)?;
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
    if cfg.sampling.boundary_ratio.is_some() || cfg.sampling.guidance_scale_2.is_some() {
        return Err(Error::config(
            file,
            "sampling.boundary_ratio",
            "only wan2.2 (two experts) has an expert boundary and a second guidance scale",
        ));
    }
    let (model, preset, desc) = build_model(cfg, file, base, weights, WAN21_PRESETS, 0)?;
    let inputs = build_inputs(
        cfg,
        file,
        base,
        &model,
        weights.map(|w| weights_dir(base, w)).as_deref(),
    )?;
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

/// Wan2.2: `weights = [high, low]`, a pipeline folder with `transformer/` and `transformer_2/`, or one
/// model (TI2V-5B); or a preset.
fn build_wan22(cfg: &RunConfig, file: &str, base: &Path) -> Result<Box<dyn Pipeline>> {
    crate::config_util::require_weights_or_preset(cfg, file)?;
    let paths = wan22_paths(cfg, file, base)?;
    let mut experts = Vec::new();
    let mut descs = Vec::new();
    let mut preset = None;
    if paths.is_empty() {
        let name = cfg.model.preset.as_deref().unwrap_or_default();
        let p = WAN22_PRESETS.iter().find(|p| p.name == name);
        let n = p.map(|p| p.experts).unwrap_or(1);
        for e in 0..n {
            let (m, pr, d) = build_model(cfg, file, base, None, WAN22_PRESETS, e as u64)?;
            preset = pr;
            experts.push(m);
            descs.push(d);
        }
    } else {
        for w in &paths {
            let (m, pr, d) = build_model(cfg, file, base, Some(w), WAN22_PRESETS, 0)?;
            preset = pr;
            experts.push(m);
            descs.push(d);
        }
        // A single loaded model matches the TI2V preset; two loaded experts match an A14B preset.
        preset = preset.filter(|p| p.experts == experts.len());
    }
    if experts.len() == 2 && experts[0].cfg != experts[1].cfg {
        return Err(Error::config(
            file,
            "model.weights",
            "the two experts have different architectures",
        ));
    }
    let boundary = cfg
        .sampling
        .boundary_ratio
        .or(preset.and_then(|p| p.boundary_ratio));
    if experts.len() == 2 && boundary.is_none() {
        return Err(Error::config(file, "sampling.boundary_ratio", "two experts need the boundary between them (e.g. 0.875 for T2V-A14B, 0.9 for I2V-A14B)"));
    }
    if experts.len() == 1 && cfg.sampling.boundary_ratio.is_some() {
        return Err(Error::config(
            file,
            "sampling.boundary_ratio",
            "a single-model wan2.2 (TI2V) has no expert boundary",
        ));
    }
    let expand = experts.len() == 1;
    let wdir = paths.first().map(|w| weights_dir(base, w));
    let first = experts
        .first()
        .ok_or_else(|| Error::config(file, "model.weights", "no model to run"))?;
    let inputs = build_inputs(cfg, file, base, first, wdir.as_deref())?;
    let mut p = WanPipeline::new(
        "wan2.2",
        experts,
        boundary,
        cfg.sampling.steps,
        cfg.sampling
            .shift
            .unwrap_or(if expand { 5.0 } else { 12.0 }),
        cfg.sampling
            .guidance_scale
            .unwrap_or(if expand { 5.0 } else { 4.0 }),
        cfg.sampling.guidance_scale_2,
        inputs,
        info_for("wan2.2", preset),
        descs.join(" | "),
    )?;
    p.expand_timesteps = expand;
    Ok(Box::new(p))
}

/// The weights paths of a wan2.2 run: `[high, low]`, a pipeline folder's `transformer/` (and
/// `transformer_2/`), or one model.
fn wan22_paths(cfg: &RunConfig, file: &str, base: &Path) -> Result<Vec<String>> {
    Ok(match &cfg.model.weights {
        Some(WeightsSpec::Many(v)) => {
            if v.len() != 2 {
                return Err(Error::config(
                    file,
                    "model.weights",
                    format!(
                        "wan2.2 takes [high_noise, low_noise] weights, got {} paths",
                        v.len()
                    ),
                ));
            }
            v.clone()
        }
        Some(WeightsSpec::One(w)) => {
            // Sub-paths stay relative to the run file, like `w` itself (resolved once, later).
            let dir = resolve(base, w);
            let sub = |n: &str| Path::new(w).join(n).display().to_string();
            match (
                dir.join("transformer").is_dir(),
                dir.join("transformer_2").is_dir(),
            ) {
                (true, true) => vec![sub("transformer"), sub("transformer_2")],
                (true, false) => vec![sub("transformer")],
                _ => vec![w.clone()],
            }
        }
        None => Vec::new(),
    })
}

/// `(experts, preset)` of a run, reading only configs.
fn wan_arch(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    paths: &[String],
    presets: &'static [WanPreset],
) -> Result<(usize, Option<&'static WanPreset>)> {
    let Some(first) = paths.first() else {
        let name = cfg.model.preset.as_deref().unwrap_or_default();
        let p = find_preset(cfg, file, presets, name)?;
        return Ok((p.experts, Some(p)));
    };
    let c = load::read_wan_config(
        &resolve(base, first),
        cfg.model
            .config
            .as_deref()
            .map(|c| resolve(base, c))
            .as_deref(),
        &overrides_json(cfg),
        file,
    )?;
    Ok((
        paths.len(),
        match_preset(presets, &c).filter(|p| p.experts == paths.len()),
    ))
}

fn plan_wan(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    family: &str,
) -> Result<(GenerationPlan, ModelInfo)> {
    crate::config_util::require_weights_or_preset(cfg, file)?;
    let (paths, presets) = if family == "wan2.2" {
        (wan22_paths(cfg, file, base)?, WAN22_PRESETS)
    } else {
        (
            cfg.model
                .weights
                .as_ref()
                .map(|w| w.paths().iter().map(|s| s.to_string()).collect())
                .unwrap_or_default(),
            WAN21_PRESETS,
        )
    };
    let (n, preset) = wan_arch(cfg, file, base, &paths, presets)?;
    let boundary = cfg
        .sampling
        .boundary_ratio
        .or(preset.and_then(|p| p.boundary_ratio));
    let single = n == 1;
    let shift = cfg
        .sampling
        .shift
        .unwrap_or(if family == "wan2.2" && !single {
            12.0
        } else {
            5.0
        });
    let guidance = cfg
        .sampling
        .guidance_scale
        .unwrap_or(if family == "wan2.2" && !single {
            4.0
        } else {
            5.0
        });
    let schedule = flow_match_static(cfg.sampling.steps, shift);
    Ok((
        pipeline::wan_plan(family, n, boundary, &schedule, shift, guidance > 1.0),
        info_for(family, preset),
    ))
}

fn plan_wan21(cfg: &RunConfig, file: &str, base: &Path) -> Result<(GenerationPlan, ModelInfo)> {
    plan_wan(cfg, file, base, "wan2.1")
}

fn plan_wan22(cfg: &RunConfig, file: &str, base: &Path) -> Result<(GenerationPlan, ModelInfo)> {
    plan_wan(cfg, file, base, "wan2.2")
}

inventory::submit! {
    ModelFamily {
        name: "wan2.1",
        description: "Wan2.1 text-to-video transformer (WanTransformer3DModel), flow-matching Euler with static shift, CFG",
        blocks: &[WAN_BLOCK],
        presets: &["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"],
        published: &["magcache wan21_t2v_1_3b", "magcache wan21_t2v_14b", "teacache wan21_t2v_1_3b"],
        build: build_wan21,
        plan: plan_wan21,
    }
}

inventory::submit! {
    ModelFamily {
        name: "wan2.2",
        description: "Wan2.2: A14B dual-expert (high-noise `transformer` for t >= boundary*1000, low-noise `transformer_2` below) and TI2V-5B (per-token timesteps)",
        blocks: &[WAN_BLOCK],
        presets: &["wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"],
        published: &["magcache wan22_t2v_a14b", "magcache wan22_i2v_a14b"],
        build: build_wan22,
        plan: plan_wan22,
    }
}
