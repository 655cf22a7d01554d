//! Configuration: the `[cache]` strategy table (a typetag trait object picked by `strategy = "..."`)
//! and the whole run file. Unknown keys are errors everywhere.

use crate::cache::TimestepCache;
use crate::error::{Error, Result};
use crate::model::ModelInfo;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::path::{Path, PathBuf};

mod parse;
pub use parse::parse_toml;

/// The most sampler steps a run may ask for (`sampling.steps`).
pub const MAX_STEPS: usize = 100_000;

/// What a strategy config may consult when it builds its cache.
pub struct BuildEnv<'a> {
    /// The config file, for messages.
    pub file: &'a str,
    /// Directory relative paths in the config are resolved against.
    pub base_dir: &'a Path,
    /// The model the cache will run on: family, variant, published curves.
    pub model: &'a ModelInfo,
}

impl BuildEnv<'_> {
    pub fn resolve(&self, p: &str) -> PathBuf {
        let path = Path::new(p);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }
}

/// A strategy's configuration: the `[cache]` table. `strategy = "NAME"` selects the implementation.
#[typetag::serde(tag = "strategy")]
pub trait StrategyConfig: Debug + Send + Sync {
    /// Checks the values; errors name `file` and the key.
    fn validate(&self, file: &str) -> Result<()>;
    /// Builds the cache; `None` means no caching.
    fn build(&self, env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>>;
    /// The threshold the strategy's metric is compared with, if any (for reports and plots).
    fn threshold(&self) -> Option<f64> {
        None
    }
    /// What the strategy's per-call metric measures (plot labels).
    fn metric_name(&self) -> &'static str {
        "metric"
    }
    /// Whether the compared value accumulates over the reused calls since the last computed one
    /// (TeaCache, MagCache: the threshold bounds the sum), rather than being one call's alone
    /// (FBCache). Used to estimate the threshold a run would have needed.
    fn accumulates(&self) -> bool {
        false
    }
    /// Files the strategy reads (paths as written in the config), with their keys: outputs of the
    /// run must not overwrite them.
    fn input_files(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    /// Refuses keys that cannot apply to a `family` run of `experts` transformer models (e.g.
    /// per-expert curves on a one-model run); errors name `file` and the key. Families call it
    /// before any weights load.
    fn check_experts(&self, _file: &str, _family: &str, _experts: usize) -> Result<()> {
        Ok(())
    }
}

/// `strategy = "none"`: dense, no hooks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoCache {}

#[typetag::serde(name = "none")]
impl StrategyConfig for NoCache {
    fn validate(&self, _file: &str) -> Result<()> {
        Ok(())
    }
    fn build(&self, _env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>> {
        Ok(None)
    }
}

inventory::submit! {
    StrategyRegistration { name: "none", description: "no caching: every call computes every block (dense reference)", defaults: || Box::new(NoCache {}) }
}

/// `weights = "path"` or, for two experts, `weights = ["high", "low"]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum WeightsSpec {
    One(String),
    Many(Vec<String>),
}

impl ModelSection {
    /// The run's placement: [`crate::runtime::placement::Placement::open`] of `device` and
    /// `dtype`, with `gguf_repack` and `matmul_precision`.
    pub fn placement(&self, file: &str) -> Result<crate::runtime::placement::Placement> {
        let mut p = crate::runtime::placement::Placement::open(&self.device, &self.dtype, file)?;
        p.gguf_repack = self.gguf_repack;
        p.matmul_bf16 = crate::runtime::placement::matmul_bf16(&self.matmul_precision, &p, file)?;
        Ok(p)
    }
}

impl WeightsSpec {
    pub fn paths(&self) -> Vec<&str> {
        match self {
            WeightsSpec::One(s) => vec![s.as_str()],
            WeightsSpec::Many(v) => v.iter().map(|s| s.as_str()).collect(),
        }
    }
}

/// `[model]`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelSection {
    pub family: String,
    #[serde(default)]
    pub weights: Option<WeightsSpec>,
    /// `config.json` for a weights file that is not in a diffusers folder.
    #[serde(default)]
    pub config: Option<String>,
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub seed: u64,
    /// Any config.json field, applied over the preset or the loaded config.
    #[serde(default)]
    pub overrides: Option<toml::Table>,
    /// Weights' precision: `auto` (the default), `f32`, `bf16` or `f16` (see
    /// [`crate::runtime::placement`]). `auto` is resolved by the runner before the model loads: `f32`
    /// where the whole run fits by the size guard's estimate, else `bf16` ([`RunConfig::is_auto_dtype`]).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// `cpu`, `cuda`, `cuda:N`, `metal`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `none` (default) or `stream`: read each transformer block's weights from the checkpoint when
    /// it runs (see [`crate::Offload`]).
    #[serde(default = "default_offload")]
    pub offload: String,
    /// GGUF weights held on the CPU: `true` (default) lets candle repack Q4_K / Q6_K (and Q8_0 on
    /// AVX-512 VNNI or AVX-VNNI CPUs) matrices into SIMD tiles on their first product, kept beside
    /// the file's blocks (faster; a held Q8_0 file then takes about twice its size); `false`
    /// multiplies from the file's blocks (one copy, slower).
    #[serde(default = "default_true")]
    pub gguf_repack: bool,
    /// The linear layers' products with f32 weights: `f32` (default), or `bf16`: on a CPU with
    /// AVX512-BF16, the weights rounded to bf16 once at load and the products run on the CPU's
    /// bf16 units (PyTorch's `set_float32_matmul_precision("medium")`); refused elsewhere.
    #[serde(default = "default_matmul_precision")]
    pub matmul_precision: String,
    /// With a hub id as `weights`: the branch, tag or commit of the cached snapshot (default `main`).
    #[serde(default)]
    pub revision: Option<String>,
    /// `[[model.lora]]`: LoRA adapters merged into the transformer weights, stacked.
    #[serde(default)]
    pub lora: Vec<LoraTable>,
}

/// One `[[model.lora]]` table: an adapter file, its strength, and (two-expert families) the expert
/// it applies to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraTable {
    pub path: String,
    /// Multiplies the file's deltas (1.0; 0 disables the file; negative values are allowed).
    #[serde(default = "default_lora_scale")]
    pub scale: f64,
    /// `"high_noise"` or `"low_noise"`: required on two-expert families, refused elsewhere.
    #[serde(default)]
    pub expert: Option<String>,
}

fn default_lora_scale() -> f64 {
    1.0
}

fn default_matmul_precision() -> String {
    "f32".into()
}

fn default_true() -> bool {
    true
}

fn default_offload() -> String {
    "none".into()
}

fn default_device() -> String {
    "cpu".into()
}

fn default_dtype() -> String {
    crate::runtime::placement::AUTO_DTYPE.into()
}

/// `[inputs]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InputsSection {
    /// safetensors with `latents_init` and the conditioning tensors of the family.
    #[serde(default)]
    pub file: Option<String>,
    /// Shape of seeded random latents when no file is given.
    #[serde(default)]
    pub latent_shape: Option<Vec<usize>>,
    /// Text length of seeded random conditioning when no file is given.
    #[serde(default)]
    pub text_len: Option<usize>,
    /// Seed of random inputs (default: the model seed).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Prompted runs: the picture's height in pixels (default: the pipeline's).
    #[serde(default)]
    pub height: Option<usize>,
    /// Prompted runs: the picture's width in pixels (default: the pipeline's).
    #[serde(default)]
    pub width: Option<usize>,
}

/// `[prompt]`: a prompted run encodes its text and decodes its result (see the contract).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PromptSection {
    pub text: String,
    /// The negative prompt of classifier-free guidance (Wan; default empty).
    #[serde(default)]
    pub negative: Option<String>,
    /// Tokens the text is padded or cut to (default: the pipeline's, 512).
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
}

/// `[sampling]`
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SamplingSection {
    pub steps: usize,
    #[serde(default)]
    pub shift: Option<f64>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
}

/// A whole `RUN.toml`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunConfig {
    pub model: ModelSection,
    /// Absent: the conditioning comes from `[inputs]`.
    #[serde(default)]
    pub prompt: Option<PromptSection>,
    #[serde(default)]
    pub inputs: InputsSection,
    pub sampling: SamplingSection,
    /// Absent: no caching.
    #[serde(default)]
    pub cache: Option<Box<dyn StrategyConfig>>,
    /// The file's text, for the keys its family reads ([`RunConfig::family_keys`]) and the check that
    /// every key has an owner ([`crate::runtime::registry::ModelFamily::check_keys`]).
    #[serde(skip)]
    source: String,
}

impl RunConfig {
    /// The run file's text as read (for checks that walk its tables, e.g.
    /// [`crate::runtime::registry::ModelFamily::check_keys`]).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// A copy of every table but `[cache]` (the strategy's, which no family reads): what a
    /// family's resolved run keeps of its run file.
    pub fn without_cache(&self) -> RunConfig {
        RunConfig {
            model: self.model.clone(),
            prompt: self.prompt.clone(),
            inputs: self.inputs.clone(),
            sampling: self.sampling.clone(),
            cache: None,
            source: self.source.clone(),
        }
    }

    /// Whether `model.dtype` is `auto`, which the runner resolves before building the model.
    pub fn is_auto_dtype(&self) -> bool {
        self.model.dtype == crate::runtime::placement::AUTO_DTYPE
    }
}

impl RunConfig {
    /// Reads and validates a run file.
    pub fn load(path: &Path) -> Result<RunConfig> {
        let file = path.display().to_string();
        let text = crate::error::read_text(path)?;
        let mut cfg = RunConfig::parse(&text, &file)?;
        cfg.validate(&file)?;
        let base = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        cfg.resolve_hub_ids(&file, base, &crate::runtime::hub::cache_root())?;
        cfg.check_named_files(&file, base)?;
        Ok(cfg)
    }

    /// Replaces every `weights` entry that is a Hugging Face hub id (`owner/name`, not a path that
    /// exists beside the run file) by its snapshot folder in the cache `root` (absolute), at
    /// `model.revision`. A `revision` without a hub id is an error.
    pub fn resolve_hub_ids(&mut self, file: &str, base: &Path, root: &Path) -> Result<()> {
        use crate::runtime::hub::{looks_like_repo_id, snapshot};
        let revision = self.model.revision.clone();
        let mut any = false;
        let mut one = |w: &mut String, key: &str| -> Result<()> {
            let p = Path::new(w.as_str());
            if p.is_absolute() || base.join(p).exists() || !looks_like_repo_id(w) {
                return Ok(());
            }
            let snap = snapshot(root, w, revision.as_deref(), file, key)?;
            *w = snap.display().to_string();
            any = true;
            Ok(())
        };
        match &mut self.model.weights {
            Some(WeightsSpec::One(w)) => one(w, "model.weights")?,
            Some(WeightsSpec::Many(ws)) => {
                for (i, w) in ws.iter_mut().enumerate() {
                    one(w, &format!("model.weights[{i}]"))?;
                }
            }
            None => {}
        }
        if revision.is_some() && !any {
            return Err(Error::config(
                file,
                "model.revision",
                "applies to a Hugging Face hub id in `weights` (owner/name); these weights are local paths",
            ));
        }
        Ok(())
    }

    /// Parses a run file's text (`file` names it in messages); keeps the text for the family's
    /// keys. Does not validate.
    pub fn parse(text: &str, file: &str) -> Result<RunConfig> {
        let mut cfg = parse_toml::<RunConfig>(text, file)?;
        cfg.source = text.to_string();
        Ok(cfg)
    }

    /// The keys a family adds to the run file, read as the family's own typed struct `T` (its
    /// tables as fields, e.g. `sampling: WanSampling`; missing tables and keys take `T`'s
    /// defaults). Keys of core and of the other tables are ignored here: [`crate::runtime::registry::ModelFamily::check_keys`]
    /// refuses keys nobody owns. Type errors name the file, line and key.
    pub fn family_keys<T: serde::de::DeserializeOwned>(&self, file: &str) -> Result<T> {
        parse_toml::<T>(&self.source, file)
    }

    /// Range checks that the types alone do not express ([`MAX_STEPS`] steps at most).
    pub fn validate(&self, file: &str) -> Result<()> {
        // No sampler runs more than a few thousand steps; past the bound, the plan alone (a
        // table per call) would claim memory the size guard does not weigh.
        if !(1..=MAX_STEPS).contains(&self.sampling.steps) {
            return Err(Error::config(
                file,
                "sampling.steps",
                format!("must be 1..={MAX_STEPS}, got {}", self.sampling.steps),
            ));
        }
        // A model config holds no NaN or infinity, and JSON (the configs' form) has none: such an
        // override would reach the model as `null`, named nowhere.
        if let Some(t) = &self.model.overrides {
            if let Some((k, v)) = non_finite(t, "model.overrides") {
                return Err(Error::config(
                    file,
                    k,
                    format!("must be a finite number, got {v}"),
                ));
            }
        }
        if let Some(s) = self.sampling.shift {
            if !(s.is_finite() && s > 0.0) {
                return Err(Error::config(
                    file,
                    "sampling.shift",
                    format!("must be a positive number, got {s}"),
                ));
            }
        }
        if let Some(g) = self.sampling.guidance_scale {
            if !g.is_finite() {
                return Err(Error::config(
                    file,
                    "sampling.guidance_scale",
                    format!("must be finite, got {g}"),
                ));
            }
        }
        for (i, l) in self.model.lora.iter().enumerate() {
            if !l.scale.is_finite() {
                return Err(Error::config(
                    file,
                    format!("model.lora[{i}].scale"),
                    format!("must be finite, got {}", l.scale),
                ));
            }
            if let Some(e) = &l.expert {
                if e != "high_noise" && e != "low_noise" {
                    return Err(Error::config(
                        file,
                        format!("model.lora[{i}].expert"),
                        format!("must be \"high_noise\" or \"low_noise\", got `{e}`"),
                    ));
                }
            }
        }
        crate::runtime::placement::parse_dtype(&self.model.dtype, file)?;
        crate::runtime::placement::parse_device(&self.model.device, file)?;
        let offload = crate::runtime::placement::parse_offload(&self.model.offload, file)?;
        if offload == crate::Offload::Stream && self.model.weights.is_none() {
            return Err(Error::config(
                file,
                "model.offload",
                "\"stream\" reads blocks from a checkpoint, and a preset has none: give `weights`, or write the preset once with `magcache export` (from a run file without offload = \"stream\") and give that folder as `weights`",
            ));
        }
        if self.model.weights.is_some() && self.model.preset.is_some() {
            return Err(Error::config(
                file,
                "model.preset",
                "give either `weights` or `preset`, not both",
            ));
        }
        if let Some(shape) = &self.inputs.latent_shape {
            if shape.is_empty() || shape.contains(&0) {
                return Err(Error::config(
                    file,
                    "inputs.latent_shape",
                    format!("every dimension must be positive, got {shape:?}"),
                ));
            }
        }
        if self.inputs.text_len == Some(0) {
            return Err(Error::config(file, "inputs.text_len", "must be at least 1"));
        }
        self.validate_inputs(file)?;
        if let Some(c) = &self.cache {
            c.validate(file)?;
        }
        Ok(())
    }

    /// The `[inputs]` keys against `[prompt]`: sizes of seeded runs do not apply to prompted
    /// ones and the other way round.
    fn validate_inputs(&self, file: &str) -> Result<()> {
        let i = &self.inputs;
        match &self.prompt {
            Some(p) => {
                for (key, set) in [
                    ("inputs.latent_shape", i.latent_shape.is_some()),
                    ("inputs.text_len", i.text_len.is_some()),
                ] {
                    if set {
                        return Err(Error::config(
                            file,
                            key,
                            "does not apply to a prompted run (`[prompt]`): the size comes from inputs.height/width (and the family's keys) and the text from the prompt",
                        ));
                    }
                }
                if p.max_sequence_length == Some(0) {
                    return Err(Error::config(
                        file,
                        "prompt.max_sequence_length",
                        "must be at least 1",
                    ));
                }
                if self.model.weights.is_none() {
                    return Err(Error::config(
                        file,
                        "model.weights",
                        "a prompted run needs a diffusers pipeline folder (model_index.json beside tokenizer/, text_encoder/, transformer/, vae/, scheduler/)",
                    ));
                }
                for (key, v) in [("inputs.height", i.height), ("inputs.width", i.width)] {
                    if v == Some(0) {
                        return Err(Error::config(file, key, "must be at least 1"));
                    }
                }
            }
            None => {
                for (key, set) in [
                    ("inputs.height", i.height.is_some()),
                    ("inputs.width", i.width.is_some()),
                ] {
                    if set {
                        return Err(Error::config(
                            file,
                            key,
                            "applies only to prompted runs (a `[prompt]` table); without one the size is inputs.latent_shape or the inputs file's",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The cache config, or `none`.
    pub fn strategy(&self) -> &dyn StrategyConfig {
        static NONE: NoCache = NoCache {};
        self.cache.as_deref().unwrap_or(&NONE)
    }
}

/// The first NaN or infinite float in `t` (nested tables and arrays too), with its dotted key.
fn non_finite(t: &toml::Table, prefix: &str) -> Option<(String, f64)> {
    fn walk(v: &toml::Value, key: String) -> Option<(String, f64)> {
        match v {
            toml::Value::Float(f) if !f.is_finite() => Some((key, *f)),
            toml::Value::Table(t) => t.iter().find_map(|(k, v)| walk(v, format!("{key}.{k}"))),
            toml::Value::Array(a) => a
                .iter()
                .enumerate()
                .find_map(|(i, v)| walk(v, format!("{key}[{i}]"))),
            _ => None,
        }
    }
    t.iter().find_map(|(k, v)| walk(v, format!("{prefix}.{k}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[model]\nfamily = \"wan2.1\"\npreset = \"x\"\n[sampling]\nsteps = 4\n";

    fn no_pipeline(
        _: &RunConfig,
        _: &str,
        _: &Path,
    ) -> Result<Box<dyn crate::runtime::pipeline::Pipeline>> {
        Err(Error::msg("no pipeline"))
    }

    fn no_plan(_: &RunConfig, _: &str, _: &Path) -> Result<crate::runtime::registry::RunPlan> {
        Err(Error::msg("no plan"))
    }

    #[test]
    fn unknown_key_names_table_and_key() {
        let family = crate::runtime::registry::ModelFamily {
            name: "plain",
            description: "",
            blocks: &[],
            presets: &[],
            published: &[],
            keys: &[],
            streams: false,
            build: no_pipeline,
            plan: no_plan,
            estimate: None,
        };
        let cfg = RunConfig::parse(BASE, "run.toml").unwrap();
        family.check_keys(&cfg, "run.toml").unwrap();
        let text = format!("{BASE}bogus = 1\n");
        let cfg = RunConfig::parse(&text, "run.toml").unwrap();
        let err = family.check_keys(&cfg, "run.toml").unwrap_err().to_string();
        assert!(err.contains("run.toml:6"), "{err}");
        assert!(err.contains("sampling.bogus"), "{err}");
    }

    #[test]
    fn none_strategy_and_unknown_strategy() {
        let ok =
            parse_toml::<RunConfig>(&format!("{BASE}[cache]\nstrategy = \"none\"\n"), "f").unwrap();
        assert!(ok
            .strategy()
            .build(&BuildEnv {
                file: "f",
                base_dir: Path::new("."),
                model: &ModelInfo::default()
            })
            .unwrap()
            .is_none());
        let err = parse_toml::<RunConfig>(&format!("{BASE}[cache]\nstrategy = \"warp\"\n"), "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("warp") && err.contains("link()"), "{err}");
        let err =
            parse_toml::<RunConfig>(&format!("{BASE}[cache]\nstrategy = \"none\"\nx = 1\n"), "f")
                .unwrap_err()
                .to_string();
        assert!(err.contains('x'), "{err}");
        // A misspelt `strategy` is named as the key meant, not only as a missing field.
        let err = parse_toml::<RunConfig>(
            &format!("{BASE}[cache]\n# strategy = \"magcache\"\nstrateg = 1\nstratgey = \"none\"\nthreshold = 0.1\n"),
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cache.strategy") && err.contains("the table has `strateg`"),
            "{err}"
        );
        assert_eq!(parse::edit_distance("strategy", "strategy"), 0);
        assert_eq!(parse::edit_distance("stratgey", "strategy"), 2);
        assert!(parse::edit_distance("profile", "threshold") > 2);
    }

    #[test]
    fn missing_table_is_named() {
        let err = parse_toml::<RunConfig>("[model]\nfamily = \"wan2.1\"\n", "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("f: sampling: missing"), "{err}");
        assert!(!err.contains("model.sampling"), "{err}");
    }

    #[test]
    fn zero_steps_or_past_the_bound_is_an_error() {
        for steps in ["0", "100001", "10000000"] {
            let text = BASE.replace("steps = 4", &format!("steps = {steps}"));
            let cfg = parse_toml::<RunConfig>(&text, "f").unwrap();
            let err = cfg.validate("f").unwrap_err().to_string();
            assert!(err.contains("sampling.steps: must be 1..=100000"), "{err}");
        }
    }
}

/// A strategy, registered with `inventory::submit!` beside its typetag config.
pub struct StrategyRegistration {
    pub name: &'static str,
    pub description: &'static str,
    /// The strategy's default config: its keys and their defaults (`magcache list` shows them).
    pub defaults: fn() -> Box<dyn StrategyConfig>,
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
