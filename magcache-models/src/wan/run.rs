//! A wan2.1 / wan2.2 run file resolved once into a [`WanRun`] (the Wan keys, each expert's
//! checkpoint and config or the preset, the sampler, guidance, the expert boundary, the pipeline
//! folder, placement and each stage's estimate) before anything loads; building is then the stages
//! in turn (encode the text and the first frame, load the experts, the inputs; the decode runs in
//! `finish`).

use super::config::WanConfig;
use super::family::{
    index_boundary_ratio, preset_for_size, wan_sampler, weights_dir, Variant, Wan21, Wan22,
};
use super::i2v::PipelineIndex;
use super::inputs::build_inputs;
use super::keys::{WanKeys, WAN_KEYS};
use super::load;
use super::model::{self, WanModel, WAN_BLOCK};
use super::pipeline::{self, WanPipeline};
use super::presets::{find_preset, info_for_mode, match_preset, WanPreset};
use super::prompted;
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::guard::Footprint;
use magcache_core::runtime::registry::ModelFamily;
use magcache_core::runtime::resolved::ResolvedRun;
use magcache_core::{Error, GenerationPlan, ModelInfo, Pipeline, Result};
use magcache_layers::autoencoder_kl_wan::WanVaeConfig;
use magcache_layers::chain_model::ChainModel;
use magcache_layers::config_util::{overrides_json, preset_name, resolve, to_map};
use magcache_layers::footprint::add_plan;
use magcache_layers::run_basics::RunBasics;
use magcache_layers::scheduler::FlowSampler;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

/// The transformer class of Wan checkpoints' configs.
pub(super) const WAN_CLASS: &str = "WanTransformer3DModel";

/// A wan2.1 or wan2.2 run file resolved before anything loads.
pub struct WanRun<V> {
    /// Every table of the run file but `[cache]`.
    pub(super) cfg: RunConfig,
    /// The run file, placement (opened when a stage needs it), offload, seeds, each expert's
    /// adapters and the warnings.
    pub(super) run: RunBasics,
    pub(super) base: PathBuf,
    pub(super) keys: WanKeys,
    /// Each expert's checkpoint, relative to the run file as given; empty: a preset.
    pub(super) paths: Vec<String>,
    /// Each expert's architecture, from its config (or the preset's, overrides applied).
    pub(super) configs: Vec<WanConfig>,
    /// The preset run, or the preset the checkpoints' config matches (for published curves).
    pub(super) preset: Option<&'static WanPreset>,
    pub(super) sampler: FlowSampler,
    pub(super) guidance: f64,
    /// Two experts: where the high-noise expert hands over.
    pub(super) boundary: Option<f64>,
    /// Prompted runs: the pipeline folder and its `model_index.json`.
    pub(super) root: Option<(PathBuf, PipelineIndex)>,
    /// Per-token timesteps (Wan2.2 TI2V).
    pub(super) expand: bool,
    /// The size guard's estimate of each stage, in the order they run.
    estimates: Vec<(String, Footprint)>,
    variant: PhantomData<V>,
}

impl<V: Variant> WanRun<V> {
    fn family(&self) -> &'static str {
        V::FAMILY.name
    }

    fn file(&self) -> &str {
        &self.run.file
    }

    /// Each expert's config (checkpoints: read without touching the weights) and the preset.
    fn architecture(
        cfg: &RunConfig,
        file: &str,
        base: &Path,
        paths: &[String],
    ) -> Result<(Vec<WanConfig>, Option<&'static WanPreset>)> {
        let presets = V::FAMILY.presets;
        let overrides = overrides_json(cfg);
        if paths.is_empty() {
            let p = find_preset(cfg, file, presets, preset_name(cfg, file)?)?;
            let c = WanConfig::from_map(to_map(&(p.config)(), WAN_CLASS)?, file, &overrides)?;
            return Ok((vec![c; p.experts.max(1)], Some(p)));
        }
        let explicit = cfg.model.config.as_deref().map(|c| resolve(base, c));
        let configs = paths
            .iter()
            .map(|w| {
                load::read_wan_config(&resolve(base, w), explicit.as_deref(), &overrides, file)
            })
            .collect::<Result<Vec<_>>>()?;
        let preset = match_preset(presets, &configs[0]).filter(|p| p.experts.max(1) == paths.len());
        Ok((configs, preset))
    }

    /// The number of experts a run has, read from the preset before any config.
    fn experts(cfg: &RunConfig, file: &str, paths: &[String]) -> Result<usize> {
        Ok(match paths.len() {
            0 => find_preset(cfg, file, V::FAMILY.presets, preset_name(cfg, file)?)?
                .experts
                .max(1),
            n => n,
        })
    }

    /// The text-to-video or image-to-video info (published curves) of `preset`.
    fn info(&self, preset: Option<&'static WanPreset>) -> ModelInfo {
        info_for_mode(
            self.family(),
            preset_for_size(&self.cfg, preset),
            self.keys.inputs.image.is_some(),
        )
    }

    /// One expert (`e`): loaded from its checkpoint or drawn from the preset's seed (`model.seed +
    /// e`), its adapters merged, held or streamed; with its description and warnings (the adapters'
    /// and the checkpoint's unused tensors).
    fn expert(&self, e: usize) -> Result<(WanModel, String, Vec<String>)> {
        let (file, placement) = (self.file(), self.run.placement()?);
        let lora = self.run.loras(e);
        let names = &load::WanLoraNames;
        let Some(w) = self.paths.get(e) else {
            let c = self.configs[e].clone();
            let seed = self.run.model_seed + e as u64;
            let params = c.params().0.unwrap_or(u64::MAX);
            let desc = format!(
                "preset {} (random init, seed {seed}): {} blocks, dim {}, {} heads, {:.2}B parameters",
                self.preset.map_or("?", |p| p.name),
                c.num_layers,
                c.inner_dim(),
                c.num_attention_heads,
                params as f64 / 1e9
            );
            let mut store = model::random_weights(&c, seed, placement.dtype)?;
            store.set_placement(placement.clone());
            let warnings =
                magcache_layers::lora::apply_tables(&mut store, &lora, Path::new(""), names)?;
            return Ok((WanModel::from_weights(c, &store)?, desc, warnings));
        };
        let path = resolve(&self.base, w);
        let config = self
            .cfg
            .model
            .config
            .as_deref()
            .map(|c| resolve(&self.base, c));
        let overrides = overrides_json(&self.cfg);
        let mut loaded = load::load_wan(&path, config.as_deref(), &overrides, file)?;
        loaded.store.set_placement(placement.clone());
        let mut warnings =
            magcache_layers::lora::apply_tables(&mut loaded.store, &lora, Path::new(""), names)?;
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
        let layers = c.num_layers;
        let store = std::sync::Arc::new(loaded.store);
        let model = WanModel::placed(loaded.config, store.clone(), self.run.offload)?;
        let desc = if model.is_streamed() {
            format!("{desc}, blocks streamed from the checkpoint")
        } else {
            desc
        };
        warnings.extend(store.check_unused(file, |_| {
            magcache_layers::config_util::depth_key(&overrides, "num_layers", layers)
        })?);
        Ok((model, desc, warnings))
    }

    /// A prompted run's stages before the transformers: the prompts (UMT5, freed), then the
    /// image of an image-to-video run (CLIP when the transformer has `image_dim`, the VAE encode).
    fn encode(&self, root: &Path, index: &PipelineIndex) -> Result<prompted::Prompted> {
        let (cfg, file) = (&self.cfg, self.file());
        let g2 = self.keys.sampling.guidance_scale_2.unwrap_or(self.guidance);
        let keys = (cfg, &self.keys, file);
        let mut p = prompted::encode(keys, root, self.guidance > 1.0 || g2 > 1.0)?;
        // Presets have no pipeline folder: a prompted run's configs are its checkpoints'.
        let clip = !self.paths.is_empty() && self.configs[0].image_dim.is_some();
        prompted::encode_image(keys, &self.base, index, clip, &mut p)?;
        Ok(p)
    }

    /// The experts, built in turn, and the preset their architecture matches.
    fn experts_built(&self) -> Result<(Vec<WanModel>, Vec<String>, Vec<String>)> {
        let (mut experts, mut descs, mut warnings) = (Vec::new(), Vec::new(), Vec::new());
        for e in 0..self.configs.len() {
            let (m, d, w) = self.expert(e)?;
            experts.push(m);
            descs.push(d);
            warnings.extend(w);
        }
        if experts.len() == 2 && experts[0].cfg != experts[1].cfg {
            return Err(Error::config(
                self.file(),
                "model.weights",
                "the two experts have different architectures",
            ));
        }
        Ok((experts, descs, warnings))
    }
}

impl<V: Variant> ResolvedRun for WanRun<V> {
    fn resolve(cfg: &RunConfig, file: &str, base: &Path) -> Result<Self> {
        let family = V::FAMILY.name;
        magcache_layers::config_util::require_weights_or_preset(cfg, file)?;
        let paths = (V::FAMILY.paths)(cfg, file, base)?;
        let keys = WanKeys::read(cfg, file)?;
        let n = Self::experts(cfg, file, &paths)?;
        keys.check_applicable(cfg, file, family, n)?;
        let two = n == 2;
        let default_shift = if two { 12.0 } else { 5.0 };
        let sampler = wan_sampler(
            cfg,
            &keys,
            file,
            base,
            paths.first().map(String::as_str),
            default_shift,
        )?;
        let guidance = cfg
            .sampling
            .guidance_scale
            .unwrap_or(if two { 4.0 } else { 5.0 });
        let root = match &cfg.prompt {
            Some(_) => Some(prompted::pipeline_root(cfg, &keys, file, base)?),
            None => None,
        };
        let (configs, preset) = Self::architecture(cfg, file, base, &paths)?;
        let boundary = keys
            .sampling
            .boundary_ratio
            .or(index_boundary_ratio(cfg, base))
            .or(preset.and_then(|p| p.boundary_ratio))
            .filter(|_| two);
        if two && boundary.is_none() {
            return Err(Error::config(file, "sampling.boundary_ratio", "two experts need the boundary between them (e.g. 0.875 for T2V-A14B, 0.9 for I2V-A14B)"));
        }
        // A pipeline folder's index says (TI2V-5B: `expand_timesteps: true`); otherwise one wan2.2
        // model is TI2V.
        let expand = V::FAMILY.ti2v
            && match &root {
                Some((_, index)) => index.expand_timesteps,
                None => n == 1,
            };
        let mut run = WanRun {
            cfg: cfg.without_cache(),
            run: RunBasics::read_experts(cfg, file, base, family, n)?,
            base: base.to_path_buf(),
            keys,
            paths,
            configs,
            preset,
            sampler,
            guidance,
            boundary,
            root,
            expand,
            estimates: Vec::new(),
            variant: PhantomData,
        };
        run.estimates = run.stage_estimates()?;
        Ok(run)
    }

    fn warnings(&self) -> Vec<String> {
        self.run.warnings.clone()
    }

    fn plan(&self) -> Result<(GenerationPlan, ModelInfo)> {
        let steps = self.run.steps;
        let mut fp = Footprint::default();
        add_plan(&mut fp, steps, if self.guidance > 1.0 { 2 } else { 1 });
        fp.check(self.file())?;
        let schedule = self.sampler.schedule(steps)?;
        self.sampler.check_schedule(&schedule, self.file())?;
        // Drawn latents are checked as the build checks them: plan refuses what run refuses.
        let drawn = self.root.is_none() && self.cfg.inputs.file.is_none();
        if let (true, Some(shape), Some(c)) =
            (drawn, &self.cfg.inputs.latent_shape, self.configs.first())
        {
            if let Some(msg) = c.latents_config().latent_shape_error(shape) {
                return Err(Error::config(self.file(), "inputs.latent_shape", msg));
            }
        }
        // A prompted run's video size against the VAE's and the transformer's grids, as the build
        // checks it: a server refuses a request's size before queueing it.
        if let (Some((root, _)), Some(c)) = (&self.root, self.configs.first()) {
            let vae = WanVaeConfig::read(&root.join("vae").join("config.json"))?;
            prompted::latent_shape((&self.cfg, &self.keys, self.file()), c, &vae)?;
        }
        let plan = pipeline::wan_plan(
            self.family(),
            self.configs.len(),
            self.boundary,
            &schedule,
            self.sampler.name(),
            self.sampler.shift(),
            self.guidance > 1.0,
        );
        Ok((plan, self.info(self.preset)))
    }

    fn estimate(&self) -> Vec<(String, Footprint)> {
        self.estimates.clone()
    }

    fn build(&self) -> Result<Box<dyn Pipeline>> {
        let (cfg, file, base) = (&self.cfg, self.file(), self.base.as_path());
        let steps = self.run.steps;
        self.sampler
            .check_schedule(&self.sampler.schedule(steps)?, file)?;
        // Prompted: the text is encoded (and its encoder freed) before the transformers load,
        // then the image of an image-to-video run.
        let prompted = match &self.root {
            Some((root, index)) => Some(self.encode(root, index)?),
            None => None,
        };
        let (experts, descs, mut warnings) = self.experts_built()?;
        // A loaded checkpoint's architecture (an original layout's image attention is told by
        // its tensors) picks the preset of published curves.
        let preset = match self.paths.is_empty() {
            true => self.preset,
            false => match_preset(V::FAMILY.presets, &experts[0].cfg)
                .filter(|p| p.experts.max(1) == experts.len()),
        };
        let inputs = match &prompted {
            Some(p) => prompted::inputs((cfg, &self.keys, file), base, &experts[0], p)?,
            None => {
                let wdir = self.paths.first().map(|w| weights_dir(base, w));
                let classes = self.keys.inputs.classes.as_deref();
                build_inputs((cfg, file, base), &experts[0], wdir.as_deref(), classes)?
            }
        };
        let mut p = WanPipeline::new(
            self.family(),
            experts,
            self.boundary,
            steps,
            self.sampler.shift(),
            self.guidance,
            self.keys.sampling.guidance_scale_2,
            inputs,
            self.info(preset),
            descs.join(" | "),
        )?
        .with_sampler(self.sampler.clone())?;
        p.expand_timesteps = self.expand;
        let mut all = self.run.warnings.clone();
        all.append(&mut warnings);
        p.common.warnings = all;
        p.prompted = prompted;
        Ok(Box::new(p))
    }
}

impl<V: Variant> WanRun<V> {
    /// A preset run's transformers, generated tensor by tensor (`magcache export`): one folder, or
    /// `transformer` and `transformer_2` for the two experts of an A14B preset (the order
    /// `weights` lists them in), each seeded as the preset run seeds it, with its adapters
    /// merged; with `[prompt]` (`magcache export --pipeline`) a whole pipeline folder: the
    /// transformers under `transformer/`, the released text encoder and VAE beside them
    /// (text-to-video presets with the Wan2.1 VAE only).
    pub fn export_preset(
        cfg: &RunConfig,
        file: &str,
        base: &Path,
    ) -> Result<Vec<magcache_core::GeneratedWeights>> {
        let (configs, preset) = Self::architecture(cfg, file, base, &[])?;
        let run = RunBasics::read_experts(cfg, file, base, V::FAMILY.name, configs.len())?;
        let c = &configs[0];
        let pipeline = cfg.prompt.is_some();
        if pipeline && (c.out_channels != 16 || c.image_dim.is_some()) {
            return Err(Error::config(
                file,
                "model.preset",
                format!(
                    "--pipeline writes the text-to-video presets' folders (the Wan2.1 VAE: 16 latent channels, no image encoder); `{}` is not one: export its transformer without --pipeline",
                    preset.map_or("?", |p| p.name)
                ),
            ));
        }
        let mut config = to_map(c, WAN_CLASS)?;
        config.insert("_class_name".into(), WAN_CLASS.into());
        let (n, shapes) = (configs.len(), WanModel::shapes(c)?);
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
                    run.model_seed + e as u64,
                    shapes.clone(),
                    c.inner_dim(),
                    run.dtype,
                );
                magcache_layers::lora::merged(g, &run.loras(e), Path::new(""), &load::WanLoraNames)
            })
            .collect::<Result<Vec<_>>>()?;
        if pipeline {
            let parts = super::pipeline_export::pipeline_parts(run.model_seed, run.dtype)?;
            out.extend(parts);
        }
        Ok(out)
    }
}

inventory::submit! {
    magcache_core::PresetExport { family: "wan2.1", export: WanRun::<Wan21>::export_preset, gguf: Some("wan") }
}

inventory::submit! {
    magcache_core::PresetExport { family: "wan2.2", export: WanRun::<Wan22>::export_preset, gguf: Some("wan") }
}

inventory::submit! {
    ModelFamily {
        name: "wan2.1",
        description: "Wan2.1 text-to-video and image-to-video (CLIP image attention) transformer (WanTransformer3DModel), flow-matching Euler with static shift, CFG",
        blocks: &[WAN_BLOCK],
        presets: &["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p"],
        published: &["magcache wan21_t2v_1_3b", "magcache wan21_t2v_14b", "magcache wan21_i2v_14b_480p", "magcache wan21_i2v_14b_720p", "teacache wan21_t2v_1_3b", "teacache wan21_t2v_14b", "teacache wan21_i2v_14b_480p", "teacache wan21_i2v_14b_720p"],
        keys: WAN_KEYS,
        ..ModelFamily::resolved::<WanRun<Wan21>>()
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
        ..ModelFamily::resolved::<WanRun<Wan22>>()
    }
}
