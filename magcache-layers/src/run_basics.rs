//! What a family's resolved run keeps besides its model, source and sizes: the run file's name, the
//! placement and offload, the seeds, the adapters with their paths resolved, and the warnings found
//! while resolving. Z-Image and Qwen-Image hold one in their `ResolvedRun`.

use candle_core::DType;
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
            warnings: Vec::new(),
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
