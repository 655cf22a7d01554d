//! What a family's resolved run keeps besides its model, source and sizes: the run file's name, the
//! placement and offload, the seeds, the adapters with their paths resolved, and the warnings found
//! while resolving. Z-Image and Qwen-Image hold one in their `ResolvedRun`.

use candle_core::{DType, Tensor};
use magcache_core::runtime::config::{LoraTable, ModelSection, RunConfig};
use magcache_core::{Offload, Placement, Result};
use std::cell::OnceCell;
use std::path::Path;

pub struct RunBasics {
    /// The run file, as messages name it.
    pub file: String,
    pub steps: usize,
    /// The weights' dtype (`model.dtype`; `auto` is resolved by the runner before building).
    pub dtype: DType,
    /// Whether `model.device` is the CPU (estimates need no device opened).
    pub on_cpu: bool,
    /// `[model]`, to open the placement when a stage first needs it.
    model: ModelSection,
    placement: OnceCell<Placement>,
    pub offload: Offload,
    /// The inputs' seed (latents, seeded captions): `inputs.seed`, else `model.seed`.
    pub seed: u64,
    /// A preset's weights' seed (`model.seed`).
    pub model_seed: u64,
    /// `[[model.lora]]` of each expert (one for a one-model family), paths resolved against the
    /// run file's folder.
    loras: Vec<Vec<LoraTable>>,
    /// Found while resolving; the pipeline reports them at every generation.
    pub warnings: Vec<String>,
}

impl RunBasics {
    /// Reads the shared keys of `cfg` (`family` names the family in messages).
    pub fn read(cfg: &RunConfig, file: &str, base: &Path, family: &str) -> Result<Self> {
        Self::read_experts(cfg, file, base, family, 1)
    }

    /// [`RunBasics::read`] of a family of `experts` transformer models: each expert's adapters
    /// (`expert = "high_noise"` or `"low_noise"` on two).
    pub fn read_experts(
        cfg: &RunConfig,
        file: &str,
        base: &Path,
        family: &str,
        experts: usize,
    ) -> Result<Self> {
        let resolved = |t: &LoraTable| LoraTable {
            path: crate::config_util::resolve(base, &t.path)
                .display()
                .to_string(),
            ..t.clone()
        };
        let loras = (0..experts.max(1))
            .map(|e| {
                let tables = crate::lora::tables_for(&cfg.model.lora, file, family, experts, e)?;
                Ok(tables.into_iter().map(resolved).collect())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RunBasics {
            file: file.to_string(),
            steps: cfg.sampling.steps,
            dtype: magcache_core::runtime::placement::parse_dtype(&cfg.model.dtype, file)?,
            on_cpu: matches!(
                magcache_core::runtime::placement::parse_device(&cfg.model.device, file)?,
                magcache_core::runtime::placement::DeviceSpec::Cpu
            ),
            model: cfg.model.clone(),
            placement: OnceCell::new(),
            offload: magcache_core::runtime::placement::parse_offload(&cfg.model.offload, file)?,
            seed: cfg.inputs.seed.unwrap_or(cfg.model.seed),
            model_seed: cfg.model.seed,
            loras,
            warnings: gguf_repack_warning(cfg, file, base).into_iter().collect(),
        })
    }

    /// The device and dtype, opened the first time a stage needs them (never by `plan` or an
    /// estimate: a run file for a GPU plans on a machine without one).
    pub fn placement(&self) -> Result<&Placement> {
        if let Some(p) = self.placement.get() {
            return Ok(p);
        }
        let p = self.model.placement(&self.file)?;
        Ok(self.placement.get_or_init(|| p))
    }

    /// The weights' dtype as the size guard names it (`f32`, `f16`, `bf16`).
    pub fn dtype_name(&self) -> &'static str {
        match self.dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            _ => "bf16",
        }
    }

    /// The adapters of expert `e` (0 for a one-model family).
    pub fn loras(&self, e: usize) -> Vec<&LoraTable> {
        self.loras
            .get(e)
            .map(|t| t.iter().collect())
            .unwrap_or_default()
    }

    /// Whether the blocks stream from the checkpoint.
    pub fn streamed(&self) -> bool {
        self.offload == Offload::Stream
    }

    /// Where the weights came from, as a description starts: `{path}: ` for a folder, else
    /// `preset NAME (random init, seed S): `.
    pub fn source_label(&self, path: Option<&Path>, preset: Option<&str>) -> String {
        match (path, preset) {
            (Some(p), _) => format!("{}: ", p.display()),
            (None, p) => format!(
                "preset {} (random init, seed {}): ",
                p.unwrap_or("?"),
                self.model_seed
            ),
        }
    }
}

impl RunBasics {
    /// A preset's transformer of config `c` for `magcache export` (`None` when the run is not a
    /// preset): the seeded tensors (`width` the model width they are drawn for), with the run's
    /// adapters merged.
    pub fn export_preset<M: crate::chain_model::ChainModel>(
        &self,
        preset: bool,
        c: &M::Config,
        width: usize,
        names: &dyn crate::lora::LoraNames,
    ) -> Result<Option<Vec<magcache_core::GeneratedWeights>>>
    where
        M::Config: crate::config_util::ModelConfig,
    {
        use crate::config_util::ModelConfig;
        if !preset {
            return Ok(None);
        }
        let class = <M::Config as ModelConfig>::CLASS;
        let mut config = crate::config_util::to_map(c, class)?;
        config.insert("_class_name".into(), class.into());
        let g = crate::random::generated(
            "",
            config,
            self.model_seed,
            M::shapes(c)?,
            width,
            self.dtype,
        );
        Ok(Some(vec![crate::lora::merged(
            g,
            &self.loras(0),
            Path::new(""),
            names,
        )?]))
    }
}

impl RunBasics {
    /// The transformer of a one-model run: the checkpoint in `dir`, or without one a preset's
    /// seeded weights (`width` the model width they are drawn for); the run's adapters merged,
    /// the model built held or streamed as `model.offload` says; with the adapters' warnings and
    /// the checkpoint's unused tensors (`depth`: the config key and value that set the number of
    /// blocks, for that message).
    pub fn model<M: crate::chain_model::ChainModel>(
        &self,
        dir: Option<&Path>,
        cfg: M::Config,
        width: usize,
        names: &dyn crate::lora::LoraNames,
        depth: (&str, usize),
    ) -> Result<(M, Vec<String>)> {
        let mut store = match dir {
            Some(dir) => crate::weights::WeightStore::load_checkpoint(dir)?,
            None => {
                crate::random::random_store(self.model_seed, M::shapes(&cfg)?, width, self.dtype)?
            }
        };
        let mut warnings =
            crate::lora::apply_tables(&mut store, &self.loras(0), Path::new(""), names)?;
        store.set_placement(self.placement()?.clone());
        let store = std::sync::Arc::new(store);
        let model = M::placed(cfg, store.clone(), self.offload)?;
        let overrides = serde_json::Map::new();
        warnings.extend(store.check_unused(&self.file, |_| {
            crate::config_util::depth_key(&overrides, depth.0, depth.1)
        })?);
        Ok((model, warnings))
    }
}

/// A run file being resolved: the document, its path as messages show it, and the folder its
/// relative paths start from.
pub type RunAt<'a> = (&'a RunConfig, &'a str, &'a Path);

/// Where an image run's parts come from: a released pipeline folder (its root and what the family
/// read of it, `F`), a transformer folder without a pipeline (inputs from `[inputs]`, nothing
/// decoded), or a preset `P` (seeded random weights at a released size).
pub enum ImageSource<F, P> {
    Folder(std::path::PathBuf, F),
    Transformer(std::path::PathBuf),
    Preset(P),
}

impl<F, P: Copy> ImageSource<F, P> {
    /// The folder the weights come from (a pipeline's root or a transformer folder).
    pub fn path(&self) -> Option<&Path> {
        match self {
            ImageSource::Folder(root, _) => Some(root),
            ImageSource::Transformer(dir) => Some(dir),
            ImageSource::Preset(_) => None,
        }
    }

    /// The transformer's checkpoint folder; `None` for a preset.
    pub fn weights_dir(&self) -> Option<std::path::PathBuf> {
        match self {
            ImageSource::Folder(root, _) => Some(root.join("transformer")),
            ImageSource::Transformer(dir) => Some(dir.clone()),
            ImageSource::Preset(_) => None,
        }
    }

    /// The pipeline folder's root and what was read of it.
    pub fn folder(&self) -> Option<(&Path, &F)> {
        match self {
            ImageSource::Folder(root, f) => Some((root, f)),
            _ => None,
        }
    }

    /// The preset, when the run has one.
    pub fn preset(&self) -> Option<P> {
        match self {
            ImageSource::Preset(p) => Some(*p),
            _ => None,
        }
    }
}

/// The sub-folders of a one-text-encoder image pipeline as released (Z-Image, Qwen-Image).
pub const IMAGE_PIPELINE_PARTS: &[&str] = &[
    "tokenizer",
    "text_encoder",
    "transformer",
    "vae",
    "scheduler",
];

impl<F, P: Copy> ImageSource<F, P> {
    /// The run's source and transformer config, read from its configs only: a transformer folder's
    /// `config.json`; a pipeline folder of `kind` (`_class_name` exactly `class`) with what
    /// `folder(root)` reads of it and its scheduler's shift; or the preset `preset(name)` finds,
    /// with the config's defaults (the family's released size). The shift is `None` where no
    /// scheduler config was read.
    pub fn resolve<C: crate::config_util::ModelConfig>(
        (cfg, file, base): RunAt<'_>,
        (kind, class): (&crate::config_util::PipelineKind<'_>, &str),
        folder: impl FnOnce(&Path) -> Result<F>,
        preset: impl FnOnce(&str) -> Result<P>,
    ) -> Result<(Self, C, Option<crate::scheduler::FluxShift>)> {
        use crate::config_util::{overrides_json, run_source, RunSource};
        let overrides = overrides_json(cfg);
        Ok(match run_source(cfg, file, base, kind, class)? {
            RunSource::Transformer(dir) => {
                let t = C::read(&dir.join("config.json"), &overrides)?;
                (ImageSource::Transformer(dir), t, None)
            }
            RunSource::Pipeline(root) => {
                let (t, shift) = pipeline_transformer(&root, &overrides)?;
                let f = folder(&root)?;
                (ImageSource::Folder(root, f), t, Some(shift))
            }
            RunSource::Preset(name) => {
                let p = preset(&name)?;
                let t = crate::config_util::preset_config(C::default(), file, &overrides)?;
                (ImageSource::Preset(p), t, None)
            }
        })
    }
}

/// What a one-transformer image family resolves a run file to before anything loads; the family
/// keeps its own grid and prompt beside it.
pub struct ImageRun<F, P, C> {
    /// The run file, placement, seeds, adapters and warnings.
    pub run: RunBasics,
    pub source: ImageSource<F, P>,
    /// The transformer's config.
    pub transformer: C,
    /// The schedule's shift.
    pub shift: crate::scheduler::FluxShift,
    /// Items in the batch.
    pub batch: usize,
    /// Text rows (an upper bound for prompted runs).
    pub text_len: usize,
    /// `Some(scale)`: classifier-free guidance.
    pub cfg_scale: Option<f64>,
    /// The inputs file whose `latents_init` starts the run.
    pub latents_file: Option<std::path::PathBuf>,
}

/// An image run's `(batch, latents file, text rows)`.
pub type ImageSizes = (usize, Option<std::path::PathBuf>, usize);

impl<F, P, C> ImageRun<F, P, C> {
    /// Put together from the resolved parts.
    pub fn new(
        run: RunBasics,
        (source, transformer, shift): (ImageSource<F, P>, C, crate::scheduler::FluxShift),
        (batch, latents_file, text_len): ImageSizes,
        cfg_scale: Option<f64>,
    ) -> Self {
        ImageRun {
            run,
            source,
            transformer,
            shift,
            batch,
            text_len,
            cfg_scale,
            latents_file,
        }
    }
}

/// What a pipeline folder's `transformer/config.json` and `scheduler/scheduler_config.json` say.
fn pipeline_transformer<C: crate::config_util::ModelConfig>(
    root: &std::path::Path,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<(C, crate::scheduler::FluxShift)> {
    let t = C::read(&root.join("transformer").join("config.json"), overrides)?;
    let shift =
        crate::scheduler::FluxShift::load(&root.join("scheduler").join("scheduler_config.json"))?;
    Ok((t, shift))
}

impl<F, P: Copy, C: Clone> ImageRun<F, P, C> {
    /// The transformer: the source's checkpoint or a preset's seeded weights ([`RunBasics::model`]).
    pub fn model<M: crate::chain_model::ChainModel<Config = C>>(
        &self,
        width: usize,
        names: &dyn crate::lora::LoraNames,
        depth: (&str, usize),
    ) -> Result<(M, Vec<String>)> {
        let dir = self.source.weights_dir();
        let c = self.transformer.clone();
        self.run.model(dir.as_deref(), c, width, names, depth)
    }

    /// The initial latents on the run's device: `latents_init` (of `rank`, `what` for messages)
    /// from the inputs file, or noise of `shape` seeded from the run.
    pub fn latents(&self, (rank, what): (usize, &str), shape: &[usize]) -> Result<Tensor> {
        let l = match &self.latents_file {
            Some(p) => crate::inputs::InputFile::load(p)?
                .get("latents_init", rank, what)?
                .to_dtype(DType::F32)?,
            None => {
                let (file, seed) = (&self.run.file, self.run.seed);
                crate::random::randn_for(file, "inputs.height/width", seed, shape)?
            }
        };
        Ok(l.to_device(&self.run.placement()?.device)?)
    }

    /// The flow-matching schedule for `image_tokens` (the shift's `mu` checked, naming `key`).
    pub fn schedule(
        &self,
        image_tokens: usize,
        key: &str,
    ) -> Result<crate::scheduler::FlowSchedule> {
        let (s, mu) = self.shift.schedule(self.run.steps, image_tokens);
        s.check(&self.run.file, key, mu)?;
        Ok(s)
    }

    /// What building starts from: the run's warnings with the checkpoint's `unused` tensors, and
    /// the description's start (where the weights come from).
    pub fn build_start(&self, unused: Vec<String>, preset: Option<&str>) -> (Vec<String>, String) {
        let mut warnings = self.run.warnings.clone();
        warnings.extend(unused);
        (warnings, self.run.source_label(self.source.path(), preset))
    }
}

/// The stages the size guard checks for an image run: the text encoder's (prompted runs), then
/// the transformer's with the decode.
pub fn image_estimate(
    text: Option<magcache_core::runtime::guard::Footprint>,
    transformer: magcache_core::runtime::guard::Footprint,
) -> Vec<(String, magcache_core::runtime::guard::Footprint)> {
    let text = text.map(|t| ("encode text".to_string(), t));
    let rest = ("transformer and decode".to_string(), transformer);
    text.into_iter().chain([rest]).collect()
}

/// A prompted run's text stage as the size guard sees it: `prompt.max_sequence_length` (else
/// `default`), the run's dtype and whether `offload = "stream"` streams the encoder.
pub fn text_stage(cfg: &RunConfig, file: &str, default: usize) -> Result<(usize, DType, bool)> {
    use magcache_core::runtime::placement::{parse_dtype, parse_offload};
    let max_len = cfg
        .prompt
        .as_ref()
        .and_then(|p| p.max_sequence_length)
        .unwrap_or(default);
    let streamed = parse_offload(&cfg.model.offload, file)? == Offload::Stream;
    Ok((max_len, parse_dtype(&cfg.model.dtype, file)?, streamed))
}

/// `model.gguf_repack = false` where no weights file is a GGUF (a preset, safetensors, a folder):
/// the key has nothing to act on, said rather than ignored.
fn gguf_repack_warning(cfg: &RunConfig, file: &str, base: &Path) -> Option<String> {
    if cfg.model.gguf_repack {
        return None;
    }
    let paths = cfg
        .model
        .weights
        .as_ref()
        .map(|w| w.paths())
        .unwrap_or_default();
    let gguf = paths
        .iter()
        .any(|w| crate::weights::gguf::is_gguf(&crate::config_util::resolve(base, w)));
    (!gguf).then(|| {
        format!(
            "{file}: model.gguf_repack = false is not used: the weights are not a GGUF file (it applies to GGUF weights held on the CPU)"
        )
    })
}

/// What a family resolves a run file to when it keeps the file itself (FLUX.1, FLUX.2): the run
/// file without `[cache]`, its basics, where the transformer comes from (`S`) and its config
/// (`C`), the `[model.overrides]`, and the pipeline folder of a prompted run.
pub struct RunSpec<S, C> {
    /// Every table of the run file but `[cache]`.
    pub cfg: RunConfig,
    /// The run file, placement (opened when a stage needs it), offload, seeds and warnings.
    pub run: RunBasics,
    /// The folder the run file's relative paths start from.
    pub base: std::path::PathBuf,
    pub source: S,
    pub transformer: C,
    pub overrides: serde_json::Map<String, serde_json::Value>,
    /// Prompted runs: the pipeline folder.
    pub root: Option<std::path::PathBuf>,
}

impl<S, C> RunSpec<S, C> {
    /// Puts the resolved parts together; `warnings` are the family's own (the run's basics read
    /// now, for `family`).
    pub fn new(
        (cfg, file, base): RunAt<'_>,
        family: &str,
        (source, transformer): (S, C),
        root: Option<std::path::PathBuf>,
        warnings: Vec<String>,
    ) -> Result<Self> {
        let mut run = RunBasics::read(cfg, file, base, family)?;
        run.warnings.extend(warnings);
        Ok(RunSpec {
            cfg: cfg.without_cache(),
            run,
            base: base.to_path_buf(),
            source,
            transformer,
            overrides: crate::config_util::overrides_json(cfg),
            root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(model: &str) -> RunConfig {
        let text = format!("[model]\nfamily = \"wan2.1\"\n{model}\n[sampling]\nsteps = 2\n");
        RunConfig::parse(&text, "run.toml").unwrap()
    }

    /// `gguf_repack = false` is said to do nothing where no weights file is a GGUF, and is quiet
    /// where one is (or where the key keeps its default).
    #[test]
    fn gguf_repack_off_without_a_gguf_is_said() {
        let base = Path::new("/runs");
        for (model, said) in [
            ("preset = \"wan2.1-t2v-1.3b\"\ngguf_repack = false", true),
            ("weights = \"folder\"\ngguf_repack = false", true),
            ("weights = \"model.safetensors\"\ngguf_repack = false", true),
            ("weights = \"wan-Q8_0.GGUF\"\ngguf_repack = false", false),
            (
                "weights = [\"a.gguf\", \"b.gguf\"]\ngguf_repack = false",
                false,
            ),
            ("weights = \"folder\"", false),
        ] {
            let w = gguf_repack_warning(&cfg(model), "run.toml", base);
            assert_eq!(w.is_some(), said, "{model}: {w:?}");
            if let Some(w) = w {
                assert!(
                    w.starts_with("run.toml: model.gguf_repack = false is not used"),
                    "{w}"
                );
            }
        }
    }
}
