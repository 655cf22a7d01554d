//! The `flux` family: checks, building a pipeline or a plan from a run file, preset export, and
//! the registrations.

use super::config::FluxConfig;
use super::presets::FLUX_PRESETS;
use super::{load, prompted};
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::keys::{fields_of, FamilyKeys};
use magcache_core::{Error, Result};
use magcache_layers::config_util::to_map;
use magcache_layers::config_util::ModelConfig;
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

pub(super) const FLUX_KEYS: &[FamilyKeys] = &[
    FamilyKeys {
        table: "sampling",
        keys: fields_of::<FluxSamplingKeys>,
        paths: &[],
    },
    magcache_layers::autoencoder_kl::FLUX_VAE_KEYS,
];

/// FLUX samples with Euler (dynamic shift) only.
pub(super) fn check_flux_scheduler(cfg: &RunConfig, file: &str) -> Result<()> {
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
pub(super) fn check_flux_keys(cfg: &RunConfig, file: &str, base: &Path) -> Result<()> {
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

/// The run's preset: its entry, its config fields and the config with `[model.overrides]`.
pub(super) fn flux_preset(
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
pub(super) fn apply_lora(
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
