//! The `flux` family: checks, building a pipeline or a plan from a run file, preset export, and
//! the registrations.

use super::config::FluxConfig;
use magcache_core::runtime::config::{RunConfig, WeightsSpec};
use magcache_core::runtime::keys::{fields_of, FamilyKeys};
use magcache_core::runtime::registry::ModelFamily;
use magcache_core::{Error, GenerationPlan, ModelInfo, Pipeline, Result};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::config_util::to_map;
use magcache_layers::config_util::ModelConfig;
use magcache_layers::config_util::{overrides_json, resolve};
use magcache_layers::inputs::InputFile;
use magcache_layers::random::random_store;
use magcache_layers::scheduler::FluxShift;

use super::inputs::build_inputs;
use super::model::{FluxModel, FLUX_DOUBLE, FLUX_SINGLE};
use super::pipeline::{flux_plan, FluxPipeline, FluxSteps};
use super::presets::{flux_info, FLUX_PRESETS};
use super::{footprint, load, prompted};
use std::path::Path;

/// The key flux adds to `[sampling]`: `scheduler`, which may only name the one it has.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct FluxSamplingKeys {
    /// `"euler"` (dynamic shift), the only one.
    scheduler: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct FluxKeys {
    sampling: FluxSamplingKeys,
}

const FLUX_KEYS: &[FamilyKeys] = &[
    FamilyKeys {
        table: "sampling",
        keys: fields_of::<FluxSamplingKeys>,
        paths: &[],
    },
    magcache_layers::autoencoder_kl::FLUX_VAE_KEYS,
];

/// FLUX samples with Euler (dynamic shift) only.
fn check_flux_scheduler(cfg: &RunConfig, file: &str) -> Result<()> {
    let keys: FluxKeys = cfg.family_keys(file)?;
    match keys.sampling.scheduler.as_deref() {
        None | Some("euler") => Ok(()),
        Some(other) => Err(Error::config(
            file,
            "sampling.scheduler",
            format!("flux supports only \"euler\" (dynamic shift), not `{other}`"),
        )),
    }
}

/// The keys a flux run cannot use: errors naming them, before anything loads. (`shift` stays a
/// warning: configs written for diffusers carry one, see `tests/tests/config_compat.rs`.)
fn check_flux_keys(cfg: &RunConfig, file: &str, base: &Path) -> Result<()> {
    magcache_layers::config_util::check_applicable(cfg, file, "flux", 1)?;
    // `[vae]`: checked against the pipeline's VAE before the size guard reads it (without
    // `[prompt]`, an error naming the key: nothing is decoded).
    let root = match cfg.prompt {
        Some(_) => prompted::pipeline_root(cfg, file, base)?,
        None => std::path::PathBuf::new(),
    };
    magcache_layers::autoencoder_kl::run_tiling(cfg, file, &root)?;
    Ok(())
}

fn build_flux(cfg: &RunConfig, file: &str, base: &Path) -> Result<Box<dyn Pipeline>> {
    magcache_layers::config_util::require_weights_or_preset(cfg, file)?;
    check_flux_scheduler(cfg, file)?;
    check_flux_keys(cfg, file, base)?;
    let mut warnings = Vec::new();
    if let Some(shift) = cfg.sampling.shift {
        warnings.push(format!(
            "{file}: sampling.shift = {shift} is not used by flux: it shifts dynamically from the image length (mu)"
        ));
    }
    let overrides = overrides_json(cfg);
    let placement = cfg.model.placement(file)?;
    let root = match &cfg.prompt {
        Some(_) => Some(prompted::pipeline_root(cfg, file, base)?),
        None => None,
    };
    // Opening the checkpoint reads its headers only (FLUX's config may come from the tensors);
    // then the whole run must fit, before anything (the text encoders included) loads.
    let opened = match &cfg.model.weights {
        Some(WeightsSpec::One(w)) => {
            let path = magcache_layers::config_util::transformer_dir(&resolve(base, w));
            let config = cfg.model.config.as_deref().map(|c| resolve(base, c));
            let l = load::load_flux(&path, config.as_deref(), &overrides, file)?;
            footprint::flux_footprint(cfg, base, &l.config, None).check(file)?;
            // The decode after it (the transformer freed first) must fit too.
            if let Some(d) = footprint::flux_decode_footprint(cfg, base) {
                d.check(file)?;
            }
            Some((path, l))
        }
        _ => None,
    };
    // Prompted: the text is encoded (and both encoders freed) before the transformer loads.
    let mut prompted = match &root {
        Some(root) => Some(prompted::encode(cfg, file, root)?),
        None => None,
    };
    let (model, desc, variant) = match (&cfg.model.weights, opened) {
        (Some(WeightsSpec::One(_)), Some((path, mut l))) => {
            l.store.set_placement(placement.clone());
            warnings.extend(apply_lora(cfg, file, base, &mut l.store, &l.config)?);
            let c = &l.config;
            let desc = format!(
                "{} ({:?} layout): {}+{} blocks, dim {}, {} heads",
                path.display(),
                l.layout,
                c.num_layers,
                c.num_single_layers,
                c.inner_dim(),
                c.num_attention_heads
            );
            let variant = FLUX_PRESETS
                .iter()
                .find(|p| (p.config)() == l.config)
                .map(|p| p.name);
            let depth = (l.config.num_layers, l.config.num_single_layers);
            let store = std::sync::Arc::new(l.store);
            let offload =
                magcache_core::runtime::placement::parse_offload(&cfg.model.offload, file)?;
            let model = FluxModel::placed(l.config, store.clone(), offload)?;
            let streamed = ", blocks streamed from the checkpoint";
            let desc = format!("{desc}{}", if model.is_streamed() { streamed } else { "" });
            let unused = store.check_unused(file, |prefix| {
                magcache_layers::config_util::double_single_depth(&overrides, prefix, depth)
            })?;
            warnings.extend(unused);
            (model, desc, variant)
        }
        (Some(WeightsSpec::Many(_)), _) => {
            return Err(Error::config(
                file,
                "model.weights",
                "flux takes one weights path",
            ))
        }
        (Some(WeightsSpec::One(_)), None) => {
            return Err(Error::msg("internal: flux weights were not opened"))
        }
        (None, _) => {
            let (p, base_cfg, c) = flux_preset(cfg, file, &overrides)?;
            footprint::flux_footprint(cfg, base, &c, Some(&base_cfg)).check(file)?;
            let desc = format!(
                "preset {} (random init, seed {}): {}+{} blocks, dim {}, {} heads",
                p.name,
                cfg.model.seed,
                c.num_layers,
                c.num_single_layers,
                c.inner_dim(),
                c.num_attention_heads
            );
            let mut store = random_store(
                cfg.model.seed,
                FluxModel::shapes(&c)?,
                c.inner_dim(),
                placement.dtype,
            )?;
            store.set_placement(placement.clone());
            warnings.extend(apply_lora(cfg, file, base, &mut store, &c)?);
            (FluxModel::from_weights(c, &store)?, desc, Some(p.name))
        }
    };
    let inputs = match &prompted {
        Some(p) => prompted::inputs(cfg, file, base, &model.cfg, p)?,
        None => build_inputs(cfg, file, base, &model.cfg)?.to_device(&placement.device)?,
    };
    // The pipeline folder's scheduler (FLUX.1-dev's dynamic shift without one).
    let (schedule, mu) =
        FluxShift::for_run(cfg, base)?.schedule(cfg.sampling.steps, inputs.latents.dim(1)?);
    schedule.check(file, "inputs.latent_shape", mu)?;
    let mut common = magcache_core::PipelineCommon::new(desc, flux_info(variant), warnings);
    if let Some(p) = &mut prompted {
        common.stages = std::mem::take(&mut p.stages);
    }
    Ok(Box::new(FluxPipeline {
        steps: FluxSteps {
            schedule,
            guidance: cfg.sampling.guidance_scale.unwrap_or(3.5),
            inputs,
            prompted,
        },
        model: Some(model),
        common,
    }))
}

/// The run's preset: its entry, its config fields and the config with `[model.overrides]`.
fn flux_preset(
    cfg: &RunConfig,
    file: &str,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<(
    &'static super::presets::FluxPreset,
    serde_json::Map<String, serde_json::Value>,
    FluxConfig,
)> {
    let name = magcache_layers::config_util::preset_name(cfg, file)?;
    let p = FLUX_PRESETS
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| {
            Error::config(
                file,
                "model.preset",
                format!(
                    "unknown preset `{name}` for family `flux` (known: flux-dev, flux-schnell)"
                ),
            )
        })?;
    let base_cfg = to_map(&(p.config)(), "FluxTransformer2DModel")?;
    let c = FluxConfig::from_map(FluxConfig::default(), &base_cfg, file, overrides)?;
    Ok((p, base_cfg, c))
}

/// Adds the run's `[[model.lora]]` adapters to `store` (FLUX has one model: no `expert`).
fn apply_lora(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    store: &mut magcache_layers::weights::WeightStore,
    c: &FluxConfig,
) -> Result<Vec<String>> {
    let tables = magcache_layers::lora::tables_for(&cfg.model.lora, file, "flux", 1, 0)?;
    let d = c.inner_dim();
    // A single block's MLP is 4 x the inner dimension (`SingleBlock::load`).
    let names = load::FluxLoraNames { d, mlp: 4 * d };
    magcache_layers::lora::apply_tables(store, &tables, base, &names)
}

/// The plan without building the model: the image length (for `mu`) comes from the inputs.
fn plan_flux(cfg: &RunConfig, file: &str, base: &Path) -> Result<(GenerationPlan, ModelInfo)> {
    magcache_layers::config_util::require_weights_or_preset(cfg, file)?;
    check_flux_scheduler(cfg, file)?;
    check_flux_keys(cfg, file, base)?;
    let mut fp = magcache_core::runtime::guard::Footprint::default();
    magcache_layers::footprint::add_plan(&mut fp, cfg.sampling.steps, 1);
    fp.check(file)?;
    let seq = match (&cfg.prompt, &cfg.inputs.file) {
        (Some(_), _) => {
            let root = prompted::pipeline_root(cfg, file, base)?;
            prompted::image_seq_len(cfg, file, &root)?
        }
        (None, Some(f)) => InputFile::load(&resolve(base, f))?
            .get("latents_init", 3, "[B, seq, C] packed latents")?
            .dim(1)?,
        (None, None) => {
            let s = cfg
                .inputs
                .latent_shape
                .clone()
                .unwrap_or_else(|| vec![1, 16, 64, 64]);
            if s.len() != 4 {
                return Err(Error::config(
                    file,
                    "inputs.latent_shape",
                    format!("{s:?} is not [B, C, H, W]"),
                ));
            }
            (s[2] / 2).saturating_mul(s[3] / 2)
        }
    };
    let variant = cfg
        .model
        .preset
        .as_deref()
        .and_then(|n| FLUX_PRESETS.iter().find(|p| p.name == n))
        .map(|p| p.name);
    Ok((
        flux_plan(
            &FluxShift::for_run(cfg, base)?
                .schedule(cfg.sampling.steps, seq)
                .0,
        ),
        flux_info(variant),
    ))
}

/// A FLUX preset run's transformer, generated tensor by tensor (`magcache export`).
fn export_flux(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
) -> Result<Vec<magcache_core::GeneratedWeights>> {
    let overrides = overrides_json(cfg);
    let (_, _, c) = flux_preset(cfg, file, &overrides)?;
    let dtype = magcache_core::runtime::placement::parse_dtype(&cfg.model.dtype, file)?;
    let mut config = to_map(&c, "FluxTransformer2DModel")?;
    config.insert("_class_name".into(), "FluxTransformer2DModel".into());
    let g = magcache_layers::random::generated(
        "",
        config,
        cfg.model.seed,
        FluxModel::shapes(&c)?,
        c.inner_dim(),
        dtype,
    );
    let tables = magcache_layers::lora::tables_for(&cfg.model.lora, file, "flux", 1, 0)?;
    let d = c.inner_dim();
    let names = load::FluxLoraNames { d, mlp: 4 * d };
    Ok(vec![magcache_layers::lora::merged(
        g, &tables, base, &names,
    )?])
}

inventory::submit! {
    // FLUX GGUF files carry BFL names (config inference reads them); diffusers names would need a
    // config.json: no GGUF export yet.
    magcache_core::PresetExport { family: "flux", export: export_flux, gguf: None }
}

inventory::submit! {
    ModelFamily {
        name: "flux",
        description: "FLUX.1 (FluxTransformer2DModel): double- then single-stream blocks in one cache chain, Euler with dynamic shift, embedded guidance",
        blocks: &[FLUX_DOUBLE, FLUX_SINGLE],
        presets: &["flux-dev", "flux-schnell"],
        published: &["magcache flux_dev", "teacache flux_dev"],
        keys: FLUX_KEYS,
        streams: true,
        build: build_flux,
        plan: plan_flux,
        estimate: Some(estimate_flux),
    }
}

/// The size guard's estimate per stage, as `build_flux` checks them: the text encoders (prompted
/// runs), then the transformer with the denoising's activations and the VAE decode (held
/// together). Reads configs and checkpoint headers only.
fn estimate_flux(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
) -> Result<Vec<(String, magcache_core::runtime::guard::Footprint)>> {
    magcache_layers::config_util::require_weights_or_preset(cfg, file)?;
    let overrides = overrides_json(cfg);
    let mut out = Vec::new();
    if cfg.prompt.is_some() {
        let root = prompted::pipeline_root(cfg, file, base)?;
        out.push((
            "encode text".to_string(),
            prompted::text_footprint(cfg, file, &root)?,
        ));
    }
    let fp = match &cfg.model.weights {
        Some(WeightsSpec::One(w)) => {
            let path = magcache_layers::config_util::transformer_dir(&resolve(base, w));
            let config = cfg.model.config.as_deref().map(|c| resolve(base, c));
            let l = load::load_flux(&path, config.as_deref(), &overrides, file)?;
            footprint::flux_footprint(cfg, base, &l.config, None)
        }
        Some(WeightsSpec::Many(_)) => {
            return Err(Error::config(
                file,
                "model.weights",
                "flux takes one weights path",
            ))
        }
        None => {
            let (_, base_cfg, c) = flux_preset(cfg, file, &overrides)?;
            footprint::flux_footprint(cfg, base, &c, Some(&base_cfg))
        }
    };
    out.push(("denoise".to_string(), fp));
    if let Some(d) = footprint::flux_decode_footprint(cfg, base) {
        out.push(("decode".to_string(), d));
    }
    Ok(out)
}
