//! The `wan2.1` and `wan2.2` families: what tells them apart when a run resolves (name, presets,
//! weights paths) and the helpers of resolving (the registrations are in [`super::run`]).

use super::keys::WanKeys;
use super::presets::{WanPreset, WAN21_PRESETS, WAN22_PRESETS};
use magcache_core::runtime::config::{RunConfig, WeightsSpec};
use magcache_core::{Error, Result};
use magcache_layers::config_util::resolve;
use magcache_layers::scheduler::{
    choose_flow_sampler, pipeline_scheduler_config, FlowSampler, SamplerChoice,
};
use std::path::Path;

/// What tells wan2.1 and wan2.2 apart when a run resolves.
pub struct WanFamily {
    pub name: &'static str,
    pub presets: &'static [WanPreset],
    /// The checkpoint paths of a run (one per expert, relative to the run file; empty: a preset).
    pub paths: fn(&RunConfig, &str, &Path) -> Result<Vec<String>>,
    /// A single model of the family is TI2V (per-token timesteps).
    pub ti2v: bool,
}

/// Which family a [`super::run::WanRun`] resolves.
pub trait Variant {
    const FAMILY: WanFamily;
}

/// `family = "wan2.1"`.
pub struct Wan21;

/// `family = "wan2.2"`.
pub struct Wan22;

impl Variant for Wan21 {
    const FAMILY: WanFamily = WanFamily {
        name: "wan2.1",
        presets: WAN21_PRESETS,
        paths: wan21_paths,
        ti2v: false,
    };
}

impl Variant for Wan22 {
    const FAMILY: WanFamily = WanFamily {
        name: "wan2.2",
        presets: WAN22_PRESETS,
        paths: wan22_paths,
        ti2v: true,
    };
}

/// The folder class embeddings and other side files are looked up in.
pub(super) fn weights_dir(base: &Path, w: &str) -> std::path::PathBuf {
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
pub(super) fn wan_sampler(
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

/// The two Wan2.1 I2V-14B presets share one architecture (a loaded folder matches the 480P one): a
/// run 1280 pixels wide (or high) or more takes the 720P preset and its curves.
pub(super) fn preset_for_size(
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

/// `boundary_ratio` of a Wan2.2 pipeline folder's `model_index.json` (diffusers keeps it there), when
/// `model.weights` is such a folder.
pub(super) fn index_boundary_ratio(cfg: &RunConfig, base: &Path) -> Option<f64> {
    let Some(WeightsSpec::One(w)) = &cfg.model.weights else {
        return None;
    };
    let text = magcache_core::error::read_text(&resolve(base, w).join("model_index.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("boundary_ratio")?.as_f64()
}

/// The weights path of a wan2.1 run: `transformer/` of a diffusers pipeline folder, else as given.
fn wan21_paths(cfg: &RunConfig, file: &str, base: &Path) -> Result<Vec<String>> {
    Ok(match &cfg.model.weights {
        Some(WeightsSpec::One(w)) if resolve(base, w).join("transformer").is_dir() => {
            vec![Path::new(w).join("transformer").display().to_string()]
        }
        Some(WeightsSpec::One(w)) => vec![w.clone()],
        Some(WeightsSpec::Many(_)) => {
            return Err(Error::config(
                file,
                "model.weights",
                "wan2.1 takes one weights path (a list is for wan2.2's two experts)",
            ))
        }
        None => Vec::new(),
    })
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
            let second = dir.join("transformer_2").is_dir();
            if !second && dir.join("transformer").is_dir() && declares_second_expert(&dir)? {
                return Err(Error::config(
                    dir.join("model_index.json").display().to_string(),
                    "transformer_2",
                    format!(
                        "names a second expert, but {} is not a folder (an incomplete download or copy?)",
                        dir.join("transformer_2").display()
                    ),
                ));
            }
            match (dir.join("transformer").is_dir(), second) {
                (true, true) => vec![sub("transformer"), sub("transformer_2")],
                (true, false) => vec![sub("transformer")],
                _ => vec![w.clone()],
            }
        }
        None => Vec::new(),
    })
}

/// Whether the `model_index.json` of a pipeline folder (when it has one) declares `transformer_2`
/// as `[library, class]`: a Wan2.2 A14B folder, whose second expert must then be there (a run on
/// the first alone would be another model, silently).
fn declares_second_expert(dir: &Path) -> Result<bool> {
    let index = dir.join("model_index.json");
    if !index.is_file() {
        return Ok(false);
    }
    let shown = index.display().to_string();
    let v: serde_json::Value = serde_json::from_str(&magcache_core::error::read_text(&index)?)
        .map_err(|e| Error::config(&shown, "(document)", format!("invalid JSON: {e}")))?;
    Ok(magcache_layers::config_util::component(&v, &shown, "transformer_2")?.is_some())
}
