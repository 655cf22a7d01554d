//! The `wan2.1` and `wan2.2` families: building models and pipelines from a run config, planning
//! without weights, and their registrations.

use super::config::WanConfig;
use super::inputs::build_inputs;
use super::keys::{WanKeys, WAN_KEYS};
use super::load;
use super::model::{self, WanModel, WAN_BLOCK};
use super::pipeline::{self, WanPipeline};
use super::presets::{
    find_preset, info_for, info_for_mode, match_preset, WanPreset, WAN21_PRESETS, WAN22_PRESETS,
};
use super::prompted;
use magcache_core::runtime::config::{LoraTable, RunConfig, WeightsSpec};
use magcache_core::runtime::registry::ModelFamily;
use magcache_core::{Error, GenerationPlan, ModelInfo, Pipeline, Result};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::config_util::{overrides_json, resolve, to_map};
use magcache_layers::scheduler::{
    choose_flow_sampler, pipeline_scheduler_config, FlowSampler, SamplerChoice,
};
use std::path::Path;

/// One Wan model from a weights path or a preset; returns the model, its preset (if any), a
/// description and the warnings of loading (checkpoint tensors the model did not use). A checkpoint
/// block the model does not build is an error.
pub fn build_model(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    weights: Option<&str>,
    presets: &'static [WanPreset],
    seed_offset: u64,
    lora: &[&LoraTable],
) -> Result<BuiltModel> {
    let overrides = overrides_json(cfg);
    let placement = cfg.model.placement(file)?;
    if let Some(w) = weights {
        let path = resolve(base, w);
        let config = cfg.model.config.as_deref().map(|c| resolve(base, c));
        let mut loaded = load::load_wan(&path, config.as_deref(), &overrides, file)?;
        loaded.store.set_placement(placement.clone());
        let mut lora_warnings = magcache_layers::lora::apply_tables(
            &mut loaded.store,
            lora,
            base,
            &load::WanLoraNames,
        )?;
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
        let layers = loaded.config.num_layers;
        let store = std::sync::Arc::new(loaded.store);
        let offload = magcache_core::runtime::placement::parse_offload(&cfg.model.offload, file)?;
        let model = WanModel::placed(loaded.config, store.clone(), offload)?;
        let desc = if model.is_streamed() {
            format!("{desc}, blocks streamed from the checkpoint")
        } else {
            desc
        };
        let warning = store.check_unused(file, |_| {
            magcache_layers::config_util::depth_key(&overrides, "num_layers", layers)
        })?;
        lora_warnings.extend(warning);
        Ok((model, preset, desc, lora_warnings))
    } else {
        let name = magcache_layers::config_util::preset_name(cfg, file)?;
        let preset = find_preset(cfg, file, presets, name)?;
        let base_cfg = to_map(&(preset.config)(), "WanTransformer3DModel")?;
        let c = WanConfig::from_map(base_cfg, file, &overrides)?;
        let params = super::footprint::wan_params(&c).0.unwrap_or(u64::MAX);
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
        let lora_warnings =
            magcache_layers::lora::apply_tables(&mut store, lora, base, &load::WanLoraNames)?;
        // A shrunk preset (overrides) keeps the preset's published curves: the curve shape belongs
        // to the model family and sampler far more than to the exact depth.
        Ok((
            WanModel::from_weights(c, &store)?,
            Some(preset),
            desc,
            lora_warnings,
        ))
    }
}

/// A built Wan model: the model, its preset (if any), a description and its load warnings.
pub type BuiltModel = (WanModel, Option<&'static WanPreset>, String, Vec<String>);

/// Refuses a run that cannot fit in memory ([`super::footprint::wan_footprint`]) and a shift whose
/// schedule is not finite, before anything is built.
fn guard(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    paths: &[String],
    presets: &'static [WanPreset],
    family: &str,
    sampler: &FlowSampler,
) -> Result<()> {
    // The denoising and the decode after it (the transformers freed first) must each fit.
    let (denoise, decode) =
        super::footprint::wan_footprint(cfg, file, base, paths, presets, family)?;
    denoise.check(file)?;
    if let Some(d) = decode {
        d.check(file)?;
    }
    sampler.check_schedule(&sampler.schedule(cfg.sampling.steps)?, file)
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

/// The sampler of a Wan run (see [`choose_flow_sampler`]): `[sampling] scheduler` and
/// `scheduler_config`, the scheduler of the pipeline folder the first weights path lies in, and
/// `default_shift` when neither the run nor a scheduler config gives a shift.
pub fn wan_sampler(
    cfg: &RunConfig,
    keys: &WanKeys,
    file: &str,
    base: &Path,
    weights: Option<&str>,
    default_shift: f64,
) -> Result<FlowSampler> {
    let s = &keys.sampling;
    let choice = SamplerChoice {
        scheduler: s.scheduler.as_deref(),
        scheduler_config: s.scheduler_config.as_deref().map(|p| resolve(base, p)),
        pipeline_config: weights.and_then(|w| pipeline_scheduler_config(&resolve(base, w))),
        shift: cfg.sampling.shift,
        default_shift,
    };
    choose_flow_sampler(&choice, file)
}

fn build_wan21(cfg: &RunConfig, file: &str, base: &Path) -> Result<Box<dyn Pipeline>> {
    magcache_layers::config_util::require_weights_or_preset(cfg, file)?;
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
    let keys = WanKeys::read(cfg, file)?;
    keys.check_applicable(cfg, file, "wan2.1", 1)?;
    let sampler = wan_sampler(cfg, &keys, file, base, weights, 5.0)?;
    let guidance = cfg.sampling.guidance_scale.unwrap_or(5.0);
    let tpath = weights.map(|w| wan21_path(base, w));
    let weights = tpath.as_deref();
    let paths: Vec<String> = weights.iter().map(|w| w.to_string()).collect();
    let root = match &cfg.prompt {
        Some(_) => Some(prompted::pipeline_root(cfg, file, base)?),
        None => None,
    };
    // The size guard first: a prompted run's latents and text come from its [inputs] and [prompt].
    guard(cfg, file, base, &paths, WAN21_PRESETS, "wan2.1", &sampler)?;
    // Prompted: the text is encoded (and its encoder freed) before the transformer loads, then the
    // image of an image-to-video run (CLIP, VAE encode).
    let prompted = match &root {
        Some((root, index)) => Some(encode_prompted(
            cfg,
            file,
            base,
            (root.as_path(), index),
            &paths,
            guidance > 1.0,
        )?),
        None => None,
    };
    let lora = magcache_layers::lora::tables_for(&cfg.model.lora, file, "wan2.1", 1, 0)?;
    let (model, preset, desc, warnings) =
        build_model(cfg, file, base, weights, WAN21_PRESETS, 0, &lora)?;
    let inputs = match &prompted {
        Some(p) => prompted::inputs(cfg, file, base, &model, p)?,
        None => build_inputs(
            cfg,
            file,
            base,
            &model,
            weights.map(|w| weights_dir(base, w)).as_deref(),
        )?,
    };
    let preset = preset_for_size(cfg, preset);
    let mut p = WanPipeline::new(
        "wan2.1",
        vec![model],
        None,
        cfg.sampling.steps,
        sampler.shift(),
        guidance,
        None,
        inputs,
        info_for("wan2.1", preset),
        desc,
    )?
    .with_sampler(sampler)?;
    p.common.warnings = warnings;
    p.prompted = prompted;
    Ok(Box::new(p))
}

/// Wan2.2: `weights = [high, low]`, a pipeline folder with `transformer/` and `transformer_2/`, or one
/// model (TI2V-5B); or a preset.
fn build_wan22(cfg: &RunConfig, file: &str, base: &Path) -> Result<Box<dyn Pipeline>> {
    magcache_layers::config_util::require_weights_or_preset(cfg, file)?;
    let keys = WanKeys::read(cfg, file)?;
    let paths = wan22_paths(cfg, file, base)?;
    let single = match paths.len() {
        0 => {
            let name = cfg.model.preset.as_deref().unwrap_or_default();
            WAN22_PRESETS
                .iter()
                .find(|p| p.name == name)
                .is_none_or(|p| p.experts == 1)
        }
        n => n == 1,
    };
    keys.check_applicable(cfg, file, "wan2.2", if single { 1 } else { 2 })?;
    let sampler = wan_sampler(
        cfg,
        &keys,
        file,
        base,
        paths.first().map(|p| p.as_str()),
        if single { 5.0 } else { 12.0 },
    )?;
    let root = match &cfg.prompt {
        Some(_) => Some(prompted::pipeline_root(cfg, file, base)?),
        None => None,
    };
    guard(cfg, file, base, &paths, WAN22_PRESETS, "wan2.2", &sampler)?;
    // Prompted: the text is encoded (and its encoder freed) before the transformers load, then the
    // image of an image-to-video run (VAE encode).
    let prompted = match &root {
        Some((root, index)) => {
            let g = cfg
                .sampling
                .guidance_scale
                .unwrap_or(if paths.len() == 1 { 5.0 } else { 4.0 });
            let g2 = keys.sampling.guidance_scale_2.unwrap_or(g);
            Some(encode_prompted(
                cfg,
                file,
                base,
                (root.as_path(), index),
                &paths,
                g > 1.0 || g2 > 1.0,
            )?)
        }
        None => None,
    };
    let mut experts = Vec::new();
    let mut descs = Vec::new();
    let mut warnings = Vec::new();
    let mut preset = None;
    if paths.is_empty() {
        let name = cfg.model.preset.as_deref().unwrap_or_default();
        let p = WAN22_PRESETS.iter().find(|p| p.name == name);
        let n = p.map(|p| p.experts).unwrap_or(1);
        for e in 0..n {
            let lora = magcache_layers::lora::tables_for(&cfg.model.lora, file, "wan2.2", n, e)?;
            let (m, pr, d, ws) =
                build_model(cfg, file, base, None, WAN22_PRESETS, e as u64, &lora)?;
            warnings.extend(ws);
            preset = pr;
            experts.push(m);
            descs.push(d);
        }
    } else {
        for (e, w) in paths.iter().enumerate() {
            let lora =
                magcache_layers::lora::tables_for(&cfg.model.lora, file, "wan2.2", paths.len(), e)?;
            let (m, pr, d, ws) = build_model(cfg, file, base, Some(w), WAN22_PRESETS, 0, &lora)?;
            preset = pr;
            warnings.extend(ws);
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
    let boundary = keys
        .sampling
        .boundary_ratio
        .or(index_boundary_ratio(cfg, base))
        .or(preset.and_then(|p| p.boundary_ratio));
    if experts.len() == 2 && boundary.is_none() {
        return Err(Error::config(file, "sampling.boundary_ratio", "two experts need the boundary between them (e.g. 0.875 for T2V-A14B, 0.9 for I2V-A14B)"));
    }
    // A pipeline folder's index says (TI2V-5B: `expand_timesteps: true`); otherwise one model is TI2V.
    let expand = match &root {
        Some((_, index)) => index.expand_timesteps,
        None => experts.len() == 1,
    };
    let wdir = paths.first().map(|w| weights_dir(base, w));
    let first = experts
        .first()
        .ok_or_else(|| Error::config(file, "model.weights", "no model to run"))?;
    let inputs = match &prompted {
        Some(p) => prompted::inputs(cfg, file, base, first, p)?,
        None => build_inputs(cfg, file, base, first, wdir.as_deref())?,
    };
    let mut p = WanPipeline::new(
        "wan2.2",
        experts,
        boundary,
        cfg.sampling.steps,
        sampler.shift(),
        cfg.sampling
            .guidance_scale
            .unwrap_or(if expand { 5.0 } else { 4.0 }),
        keys.sampling.guidance_scale_2,
        inputs,
        info_for_mode(
            "wan2.2",
            preset,
            prompted.as_ref().is_some_and(|p| p.image.is_some()),
        ),
        descs.join(" | "),
    )?
    .with_sampler(sampler)?;
    p.expand_timesteps = expand;
    p.common.warnings = warnings;
    p.prompted = prompted;
    Ok(Box::new(p))
}

/// The two Wan2.1 I2V-14B presets share one architecture (a loaded folder matches the 480P one): a
/// run 1280 pixels wide (or high) or more takes the 720P preset and its curves.
fn preset_for_size(
    cfg: &RunConfig,
    preset: Option<&'static WanPreset>,
) -> Option<&'static WanPreset> {
    let long = cfg
        .inputs
        .height
        .unwrap_or(0)
        .max(cfg.inputs.width.unwrap_or(0));
    match preset {
        Some(p) if p.name == "wan2.1-i2v-14b-480p" && long >= 1280 => WAN21_PRESETS
            .iter()
            .find(|q| q.name == "wan2.1-i2v-14b-720p"),
        other => other,
    }
}

/// A prompted run's stages before the transformers: the prompts (UMT5, freed), then the image of an
/// image-to-video run (CLIP when the first transformer has `image_dim`, the VAE encode).
fn encode_prompted(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    (root, index): (&Path, &super::i2v::PipelineIndex),
    paths: &[String],
    guidance: bool,
) -> Result<prompted::Prompted> {
    let mut p = prompted::encode(cfg, file, root, guidance)?;
    let clip = first_config(cfg, file, base, paths)?.is_some_and(|c| c.image_dim.is_some());
    prompted::encode_image(cfg, file, base, index, clip, &mut p)?;
    Ok(p)
}

/// The config of the first transformer of a run's weights paths (configs only); `None` for presets.
fn first_config(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    paths: &[String],
) -> Result<Option<WanConfig>> {
    let Some(first) = paths.first() else {
        return Ok(None);
    };
    let explicit = cfg.model.config.as_deref().map(|c| resolve(base, c));
    Ok(Some(load::read_wan_config(
        &resolve(base, first),
        explicit.as_deref(),
        &overrides_json(cfg),
        file,
    )?))
}

/// `boundary_ratio` of a Wan2.2 pipeline folder's `model_index.json` (diffusers keeps it there), when
/// `model.weights` is such a folder.
fn index_boundary_ratio(cfg: &RunConfig, base: &Path) -> Option<f64> {
    let Some(WeightsSpec::One(w)) = &cfg.model.weights else {
        return None;
    };
    let text = magcache_core::error::read_text(&resolve(base, w).join("model_index.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("boundary_ratio")?.as_f64()
}

/// The weights path of a wan2.1 model: `transformer/` of a diffusers pipeline folder, else as given.
fn wan21_path(base: &Path, w: &str) -> String {
    if resolve(base, w).join("transformer").is_dir() {
        Path::new(w).join("transformer").display().to_string()
    } else {
        w.to_string()
    }
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
    magcache_layers::config_util::require_weights_or_preset(cfg, file)?;
    let (paths, presets) = paths_and_presets(cfg, file, base, family)?;
    let keys = WanKeys::read(cfg, file)?;
    let (n, preset) = wan_arch(cfg, file, base, &paths, presets)?;
    keys.check_applicable(cfg, file, family, n)?;
    let boundary = keys
        .sampling
        .boundary_ratio
        .or(index_boundary_ratio(cfg, base))
        .or(preset.and_then(|p| p.boundary_ratio));
    let single = n == 1;
    let default_shift = if family == "wan2.2" && !single {
        12.0
    } else {
        5.0
    };
    let sampler = wan_sampler(
        cfg,
        &keys,
        file,
        base,
        paths.first().map(|p| p.as_str()),
        default_shift,
    )?;
    let guidance = cfg
        .sampling
        .guidance_scale
        .unwrap_or(if family == "wan2.2" && !single {
            4.0
        } else {
            5.0
        });
    let mut fp = magcache_core::runtime::guard::Footprint::default();
    magcache_layers::footprint::add_plan(
        &mut fp,
        cfg.sampling.steps,
        if guidance > 1.0 { 2 } else { 1 },
    );
    fp.check(file)?;
    let schedule = sampler.schedule(cfg.sampling.steps)?;
    sampler.check_schedule(&schedule, file)?;
    Ok((
        pipeline::wan_plan(
            family,
            n,
            boundary,
            &schedule,
            sampler.name(),
            sampler.shift(),
            guidance > 1.0,
        ),
        info_for_mode(
            family,
            preset_for_size(cfg, preset),
            keys.inputs.image.is_some(),
        ),
    ))
}

/// The checkpoint paths of a run (empty: a preset) and the family's presets.
fn paths_and_presets(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    family: &str,
) -> Result<(Vec<String>, &'static [WanPreset])> {
    Ok(if family == "wan2.2" {
        (wan22_paths(cfg, file, base)?, WAN22_PRESETS)
    } else {
        (
            cfg.model
                .weights
                .as_ref()
                .map(|w| w.paths().iter().map(|s| wan21_path(base, s)).collect())
                .unwrap_or_default(),
            WAN21_PRESETS,
        )
    })
}

/// The size guard's estimate per stage: the text encoder (prompted runs), the transformer(s) with
/// the denoising's activations, then the VAE decode (the transformers freed before it).
fn estimate_wan(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    family: &str,
) -> Result<Vec<(String, magcache_core::runtime::guard::Footprint)>> {
    let (paths, presets) = paths_and_presets(cfg, file, base, family)?;
    let mut out = Vec::new();
    if cfg.prompt.is_some() {
        let (root, _) = prompted::pipeline_root(cfg, file, base)?;
        out.push((
            "encode text".to_string(),
            prompted::text_footprint(cfg, file, &root)?,
        ));
    }
    let (denoise, decode) =
        super::footprint::wan_footprint(cfg, file, base, &paths, presets, family)?;
    out.push(("denoise".to_string(), denoise));
    if let Some(d) = decode {
        out.push(("decode".to_string(), d));
    }
    Ok(out)
}

fn estimate_wan21(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
) -> Result<Vec<(String, magcache_core::runtime::guard::Footprint)>> {
    estimate_wan(cfg, file, base, "wan2.1")
}

fn estimate_wan22(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
) -> Result<Vec<(String, magcache_core::runtime::guard::Footprint)>> {
    estimate_wan(cfg, file, base, "wan2.2")
}

fn plan_wan21(cfg: &RunConfig, file: &str, base: &Path) -> Result<(GenerationPlan, ModelInfo)> {
    plan_wan(cfg, file, base, "wan2.1")
}

fn plan_wan22(cfg: &RunConfig, file: &str, base: &Path) -> Result<(GenerationPlan, ModelInfo)> {
    plan_wan(cfg, file, base, "wan2.2")
}

/// A Wan preset run's transformers, generated tensor by tensor (`magcache export`): one folder, or
/// `transformer` and `transformer_2` for the two experts of an A14B preset (the order `weights`
/// lists them in), each seeded as the preset run seeds it.
fn export_wan(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    presets: &'static [WanPreset],
    family: &str,
) -> Result<Vec<magcache_core::GeneratedWeights>> {
    let overrides = overrides_json(cfg);
    let name = magcache_layers::config_util::preset_name(cfg, file)?;
    let preset = find_preset(cfg, file, presets, name)?;
    let base_cfg = to_map(&(preset.config)(), "WanTransformer3DModel")?;
    let c = WanConfig::from_map(base_cfg, file, &overrides)?;
    let dtype = magcache_core::runtime::placement::parse_dtype(&cfg.model.dtype, file)?;
    let mut config = to_map(&c, "WanTransformer3DModel")?;
    config.insert("_class_name".into(), "WanTransformer3DModel".into());
    let n = preset.experts.max(1);
    let shapes = model::WanModel::shapes(&c)?;
    // A `[prompt]` (`magcache export --pipeline`) asks for a pipeline folder: the transformer under
    // `transformer/`, the released text encoder and VAE beside it (text-to-video presets with the
    // Wan2.1 VAE only).
    let pipeline = cfg.prompt.is_some();
    if pipeline && (c.out_channels != 16 || c.image_dim.is_some()) {
        return Err(magcache_core::Error::config(
            file,
            "model.preset",
            format!(
                "--pipeline writes the text-to-video presets' folders (the Wan2.1 VAE: 16 latent channels, no image encoder); `{name}` is not one: export its transformer without --pipeline"
            ),
        ));
    }
    let mut out = (0..n)
        .map(|e| {
            let folder = match (n, e) {
                (1, _) if !pipeline => "",
                (_, 0) => "transformer",
                _ => "transformer_2",
            };
            let g = magcache_layers::random::generated(
                folder,
                config.clone(),
                cfg.model.seed + e as u64,
                shapes.clone(),
                c.inner_dim(),
                dtype,
            );
            let lora = magcache_layers::lora::tables_for(&cfg.model.lora, file, family, n, e)?;
            magcache_layers::lora::merged(g, &lora, base, &load::WanLoraNames)
        })
        .collect::<Result<Vec<_>>>()?;
    if pipeline {
        out.extend(super::pipeline_export::pipeline_parts(
            cfg.model.seed,
            dtype,
        )?);
    }
    Ok(out)
}

fn export_wan21(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
) -> Result<Vec<magcache_core::GeneratedWeights>> {
    export_wan(cfg, file, base, WAN21_PRESETS, "wan2.1")
}

fn export_wan22(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
) -> Result<Vec<magcache_core::GeneratedWeights>> {
    export_wan(cfg, file, base, WAN22_PRESETS, "wan2.2")
}

inventory::submit! {
    magcache_core::PresetExport { family: "wan2.1", export: export_wan21, gguf: Some("wan") }
}

inventory::submit! {
    magcache_core::PresetExport { family: "wan2.2", export: export_wan22, gguf: Some("wan") }
}

inventory::submit! {
    ModelFamily {
        name: "wan2.1",
        description: "Wan2.1 text-to-video and image-to-video (CLIP image attention) transformer (WanTransformer3DModel), flow-matching Euler with static shift, CFG",
        blocks: &[WAN_BLOCK],
        presets: &["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p"],
        published: &["magcache wan21_t2v_1_3b", "magcache wan21_t2v_14b", "magcache wan21_i2v_14b_480p", "magcache wan21_i2v_14b_720p", "teacache wan21_t2v_1_3b", "teacache wan21_t2v_14b", "teacache wan21_i2v_14b_480p", "teacache wan21_i2v_14b_720p"],
        keys: WAN_KEYS,
        streams: true,
        build: build_wan21,
        plan: plan_wan21,
        estimate: Some(estimate_wan21),
    }
}

inventory::submit! {
    ModelFamily {
        name: "wan2.2",
        description: "Wan2.2: A14B dual-expert (high-noise `transformer` for t >= boundary*1000, low-noise `transformer_2` below) and TI2V-5B (per-token timesteps)",
        blocks: &[WAN_BLOCK],
        presets: &["wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"],
        published: &["magcache wan22_t2v_a14b", "magcache wan22_i2v_a14b", "magcache wan22_ti2v_5b_t2v", "magcache wan22_ti2v_5b_i2v"],
        keys: WAN_KEYS,
        streams: true,
        build: build_wan22,
        plan: plan_wan22,
        estimate: Some(estimate_wan22),
    }
}
