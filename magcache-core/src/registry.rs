//! Registries filled at link time through `inventory`: model families and strategies.
//!
//! A crate that registers something must be referenced by the final binary or test, or the linker
//! drops its registrations (see `magcache_strategies::link()` and `magcache_models::link()`).

use crate::config::RunConfig;
use crate::error::Result;
use crate::metadata::BlockMetadata;
use crate::pipeline::Pipeline;
use std::collections::BTreeMap;
use std::path::Path;

/// The sampling a published or calibrated curve was measured on.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScheduleMeta {
    pub steps: usize,
    #[serde(default)]
    pub shift: Option<f64>,
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub boundary_ratio: Option<f64>,
    /// Sigmas of the calibrated steps, where known (enables `resample = "sigma"`).
    #[serde(default)]
    pub sigmas: Option<Vec<f64>>,
}

/// What a strategy may know about the model it runs on.
#[derive(Clone, Debug, Default)]
pub struct ModelInfo {
    pub family: String,
    /// Preset name, or the published variant the loaded weights were matched to, if any.
    pub variant: Option<String>,
    /// Published calibration data of the variant, one table per key. Each strategy owns a key (its
    /// name) and gives the table its own type ([`ModelInfo::published`]); neither core nor the
    /// models interpret it.
    pub published: BTreeMap<String, toml::Value>,
    /// The indicators the model's block chain offers ([`crate::BlockChain::indicator`] answers
    /// `Some` for these), so that a strategy that needs one can refuse the model before any weights
    /// load. Empty: the model lists none.
    pub indicators: Vec<crate::chain::Indicator>,
}

impl ModelInfo {
    /// The published table under `key`, typed by the reader. `Ok(None)` when there is none.
    pub fn published<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.published.get(key) {
            None => Ok(None),
            Some(v) => v.clone().try_into().map(Some).map_err(|e| {
                crate::error::Error::msg(format!(
                    "published `{key}` data of model family `{}`: {e}",
                    self.family
                ))
            }),
        }
    }
}

/// Builds a family's pipeline from a run config. `file` names the config for messages and `base_dir`
/// resolves its relative paths.
pub type BuildPipeline =
    fn(cfg: &RunConfig, file: &str, base_dir: &Path) -> Result<Box<dyn Pipeline>>;

/// The plan of a run and the model's info, without building the model (for `magcache plan`).
pub type PlanRun = fn(
    cfg: &RunConfig,
    file: &str,
    base_dir: &Path,
) -> Result<(crate::scope::GenerationPlan, ModelInfo)>;

/// A model family, registered by the models crate with `inventory::submit!`.
pub struct ModelFamily {
    /// `family = "..."` in the run file.
    pub name: &'static str,
    pub description: &'static str,
    /// The block kinds of its cache chain, in chain order of their first appearance.
    pub blocks: &'static [BlockMetadata],
    /// Preset names (`preset = "..."`).
    pub presets: &'static [&'static str],
    /// Names of the published MagCache curves and TeaCache coefficient sets it carries.
    pub published: &'static [&'static str],
    /// Whether `build` honours `offload = "stream"` (reads its blocks from the checkpoint as they
    /// run); the runner refuses the setting, naming `model.offload`, for a family that does not.
    pub streams: bool,
    pub build: BuildPipeline,
    pub plan: PlanRun,
}

inventory::collect!(ModelFamily);

/// One transformer's weights, generated tensor by tensor: `magcache export` writes a preset's seeded
/// random weights as a checkpoint without ever holding them all (a 14B preset is 28 GB in bf16).
pub struct GeneratedWeights {
    /// Subfolder of the export it goes to (`""`: the export folder itself).
    pub folder: String,
    /// Its `config.json`.
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Checkpoint names, shapes and stored dtypes, in writing order.
    pub tensors: Vec<(String, Vec<usize>, candle_core::DType)>,
    /// The tensor of a name and shape: the values the preset builds in a run.
    pub generate: GenerateTensor,
}

/// Makes one tensor of [`GeneratedWeights`] from its name and shape.
pub type GenerateTensor = Box<dyn Fn(&str, &[usize]) -> Result<candle_core::Tensor> + Send + Sync>;

/// A preset run's transformers as [`GeneratedWeights`] (one per expert).
pub type ExportWeights = fn(cfg: &RunConfig, file: &str) -> Result<Vec<GeneratedWeights>>;

/// A model family's preset exporter, registered beside its [`ModelFamily`] (a separate registration,
/// so that families without one need not name it).
pub struct PresetExport {
    pub family: &'static str,
    pub export: ExportWeights,
}

inventory::collect!(PresetExport);

/// A strategy, registered with `inventory::submit!` beside its typetag config.
pub struct StrategyRegistration {
    pub name: &'static str,
    pub description: &'static str,
    /// The strategy's default config: its keys and their defaults (`magcache list` shows them).
    pub defaults: fn() -> Box<dyn crate::config::StrategyConfig>,
}

impl StrategyRegistration {
    /// `key = default` of every key of the strategy's `[cache]` table (`strategy` aside), sorted by
    /// key; keys without a default show `-`.
    pub fn knobs(&self) -> Vec<(String, String)> {
        let v = serde_json::to_value((self.defaults)()).unwrap_or_default();
        let Some(map) = v.as_object() else {
            return Vec::new();
        };
        map.iter()
            .filter(|(k, _)| k.as_str() != "strategy")
            .map(|(k, v)| {
                let shown = if v.is_null() {
                    "-".to_string()
                } else {
                    v.to_string()
                };
                (k.clone(), shown)
            })
            .collect()
    }
}

inventory::collect!(StrategyRegistration);

/// Every registered family, by name.
pub fn families() -> Vec<&'static ModelFamily> {
    let mut v: Vec<_> = inventory::iter::<ModelFamily>.into_iter().collect();
    v.sort_by_key(|f| f.name);
    v
}

/// Every registered preset exporter.
pub fn exporters() -> Vec<&'static PresetExport> {
    inventory::iter::<PresetExport>.into_iter().collect()
}

pub fn family(name: &str) -> Option<&'static ModelFamily> {
    inventory::iter::<ModelFamily>
        .into_iter()
        .find(|f| f.name == name)
}

/// Every registered strategy, by name.
pub fn strategies() -> Vec<&'static StrategyRegistration> {
    let mut v: Vec<_> = inventory::iter::<StrategyRegistration>
        .into_iter()
        .collect();
    v.sort_by_key(|s| s.name);
    v
}
