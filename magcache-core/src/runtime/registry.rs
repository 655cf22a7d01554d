//! Registries filled at link time through `inventory`: model families and strategies.
//!
//! A crate that registers something must be referenced by the final binary or test, or the linker
//! drops its registrations (see `magcache_strategies::link()` and `magcache_models::link()`).

use crate::error::{Error, Result};
use crate::metadata::BlockMetadata;
pub use crate::model::{ModelInfo, ScheduleMeta};
use crate::runtime::config::RunConfig;
pub use crate::runtime::config::StrategyRegistration;
pub use crate::runtime::keys::{fields_of, FamilyKeys};
use crate::runtime::pipeline::Pipeline;
use std::path::Path;

/// The keys of a run file's `[serve]` table (`magcache serve`; other commands ignore them).
pub const SERVE_KEYS: &[&str] = &["id", "host", "port", "api_key", "max_queue", "allow_hosts"];

/// Builds a family's pipeline from a run config. `file` names the config for messages and `base_dir`
/// resolves its relative paths.
pub type BuildPipeline =
    fn(cfg: &RunConfig, file: &str, base_dir: &Path) -> Result<Box<dyn Pipeline>>;

/// The plan of a run, the model's info and what resolving the run file found, without building
/// the model (for `magcache plan`).
pub type PlanRun = fn(cfg: &RunConfig, file: &str, base_dir: &Path) -> Result<RunPlan>;

/// What [`PlanRun`] gives: the generation's cache scopes, what strategies may know of the model,
/// and the warnings a run of the file would report at its start (settings the family does not use,
/// sizes it rounds), so that `magcache plan` says them too.
#[derive(Clone, Debug, Default)]
pub struct RunPlan {
    pub plan: crate::scope::GenerationPlan,
    pub info: ModelInfo,
    pub warnings: Vec<String>,
}

impl RunPlan {
    /// A plan and the model's info, with no warnings.
    pub fn new(plan: crate::scope::GenerationPlan, info: ModelInfo) -> Self {
        RunPlan {
            plan,
            info,
            warnings: Vec::new(),
        }
    }
}

/// The size guard's estimate of each stage of a run (`"encode text"`, `"transformer and decode"`,
/// ...), in the order they run, without loading anything (for `magcache plan` and `dtype = "auto"`).
pub type EstimateRun = fn(
    cfg: &RunConfig,
    file: &str,
    base_dir: &Path,
) -> Result<Vec<(String, crate::runtime::guard::Footprint)>>;

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
    /// The keys it adds to the run file's tables beyond core's (its typed structs, read with
    /// [`RunConfig::family_keys`]); the runner refuses keys that neither core nor the family owns.
    pub keys: &'static [FamilyKeys],
    /// Whether `build` honours `offload = "stream"` (reads its blocks from the checkpoint as they
    /// run); the runner refuses the setting, naming `model.offload`, for a family that does not.
    pub streams: bool,
    pub build: BuildPipeline,
    pub plan: PlanRun,
    /// Each stage's memory estimate ([`EstimateRun`]); `None`: the family gives none (`plan`
    /// prints no memory table for it).
    pub estimate: Option<EstimateRun>,
}

impl ModelFamily {
    /// Refuses a file this family's own keys name (`files_in`) that is there but not a regular
    /// file (a FIFO, a folder, a dangling link), naming the key.
    pub fn check_files(&self, cfg: &RunConfig, file: &str, base: &std::path::Path) -> Result<()> {
        for (key, p) in self.files_in(cfg) {
            crate::error::check_named_file(file, base, &key, &p, false)?;
        }
        Ok(())
    }

    /// The files this family's own keys name in the run file `cfg` (`table.key`, the value as written), for
    /// the runner's list of a run's inputs.
    pub fn files_in(&self, cfg: &RunConfig) -> Vec<(String, String)> {
        let family = self;
        let Ok(doc) = cfg.source().parse::<toml::Table>() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for fk in family.keys {
            for key in fk.paths {
                if let Some(v) = doc
                    .get(fk.table)
                    .and_then(|t| t.get(*key))
                    .and_then(|v| v.as_str())
                {
                    out.push((format!("{}.{key}", fk.table), v.to_string()));
                }
            }
        }
        out
    }

    /// Refuses the first key of the run file `cfg` that neither core nor this family owns (its
    /// [`crate::runtime::keys::FamilyKeys`]), naming the file, line and key, and the families that
    /// do own it. The runner calls it as soon as the family is known.
    pub fn check_keys(&self, cfg: &RunConfig, file: &str) -> Result<()> {
        use crate::runtime::config::{InputsSection, ModelSection, PromptSection, SamplingSection};
        let family = self;
        let doc: toml::Table = cfg.source().parse().map_err(|e: toml::de::Error| {
            Error::config(file, "(document)", e.message().to_string())
        })?;
        let core = [
            ("model", Some(fields_of::<ModelSection>())),
            ("prompt", Some(fields_of::<PromptSection>())),
            ("inputs", Some(fields_of::<InputsSection>())),
            ("sampling", Some(fields_of::<SamplingSection>())),
            ("cache", None),
            // `magcache serve`'s options for this run file (docs/serve.md); other commands ignore it.
            ("serve", Some(SERVE_KEYS)),
        ];
        crate::runtime::keys::Owners {
            core: &core,
            family: family.name,
            family_keys: family.keys,
            others: families().iter().map(|f| (f.name, f.keys)).collect(),
        }
        .check(&doc, cfg.source(), file)
    }
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

/// A preset run's transformers as [`GeneratedWeights`] (one per expert); `base_dir` resolves the
/// run file's relative paths (its LoRA adapters, merged into the weights written).
pub type ExportWeights =
    fn(cfg: &RunConfig, file: &str, base_dir: &Path) -> Result<Vec<GeneratedWeights>>;

/// A model family's preset exporter, registered beside its [`ModelFamily`] (a separate registration,
/// so that families without one need not name it).
pub struct PresetExport {
    pub family: &'static str,
    pub export: ExportWeights,
    /// The `general.architecture` of GGUF files of this family (`magcache export --gguf`);
    /// `None`: no GGUF export.
    pub gguf: Option<&'static str>,
}

inventory::collect!(PresetExport);

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
