//! A flux2 run file resolved once into a [`Flux2Run`] (the transformer's source and config,
//! the pipeline folder, guidance, placement) before anything loads; building is then the stages in
//! turn (encode text, load the transformer, the inputs; the decode runs in `finish`).

use super::config::{Flux2Config, FLUX2_CLASS};
use super::family::{
    distilled, flux2_info, footprint, plain_inputs, preset, preset_config, run_dims, with_template,
    Flux2Preset, FLUX2_PRESETS,
};
use super::load::{flux2_config, open_flux2};
use super::model::{Flux2Model, FLUX2_DOUBLE, FLUX2_SINGLE};
use super::pipeline::{flux2_plan, Flux2Pipeline, Flux2Steps};
use super::prompted::{self, DEFAULT_GUIDANCE};
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::guard::Footprint;
use magcache_core::runtime::registry::ModelFamily;
use magcache_core::runtime::resolved::{export_run, ResolvedRun};
use magcache_core::{Error, GenerationPlan, ModelInfo, Pipeline, Result};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::config_util::{overrides_json, resolve, single_weights, to_map};
use magcache_layers::footprint::{add_plan, weights_knob};
use magcache_layers::random::random_store;
use magcache_layers::run_basics::RunSpec;
use magcache_layers::scheduler::flux2_schedule;
use std::path::Path;

/// Where a flux2 run's transformer comes from.
enum Source {
    /// A diffusers checkpoint (`transformer/` folder or weights file).
    Checkpoint(std::path::PathBuf),
    Preset(&'static Flux2Preset),
}

/// A flux2 run file resolved before anything loads.
pub struct Flux2Run {
    spec: RunSpec<Source, Flux2Config>,
    /// The size guard's knob for the weights.
    knob: String,
    distilled: bool,
    cfg_on: bool,
}

impl Flux2Run {
    /// Reads and checks the run file's keys and the transformer's config (no weight opened).
    fn read(cfg: &RunConfig, file: &str, base: &Path) -> Result<Self> {
        magcache_layers::config_util::require_weights_or_preset(cfg, file)?;
        magcache_layers::config_util::check_applicable(cfg, file, "flux2", 1)?;
        if cfg.prompt.is_none() {
            // `[vae]` without `[prompt]`: an error naming the key (nothing is decoded).
            magcache_layers::autoencoder_kl::run_tiling(cfg, file, Path::new(""))?;
        }
        if !cfg.model.lora.is_empty() {
            return Err(Error::config(
                file,
                "model.lora",
                "flux2 does not take LoRA adapters yet",
            ));
        }
        let mut warnings = Vec::new();
        if let Some(shift) = cfg.sampling.shift {
            warnings.push(format!(
                "{file}: sampling.shift = {shift} is not used by flux2: its schedule's mu comes from the image length and the step count"
            ));
        }
        let overrides = overrides_json(cfg);
        let distilled = distilled(cfg, file, base)?;
        let cfg_on = !distilled && cfg.sampling.guidance_scale.unwrap_or(DEFAULT_GUIDANCE) > 1.0;
        if let (Some(p), true) = (&cfg.prompt, distilled) {
            if p.negative.as_deref().is_some_and(|n| !n.is_empty()) {
                warnings.push(format!(
                    "{file}: prompt.negative is not used: the pipeline folder is step-distilled (one call per step, no classifier-free guidance)"
                ));
            }
        }
        let (source, transformer, knob) = match single_weights(cfg, file, "flux2")? {
            Some(w) => {
                let config = cfg.model.config.as_deref().map(|c| resolve(base, c));
                let (dir, c) =
                    flux2_config(&resolve(base, w), config.as_deref(), &overrides, file)?;
                (Source::Checkpoint(dir), c, "model.weights".to_string())
            }
            None => {
                let p = preset(cfg, file)?;
                let knob = weights_knob(&to_map(&(p.config)(), FLUX2_CLASS)?, &overrides);
                (Source::Preset(p), preset_config(p, cfg, file)?, knob)
            }
        };
        if let (true, Some(g), false) = (
            distilled,
            cfg.sampling.guidance_scale,
            transformer.guidance_embeds,
        ) {
            warnings.push(format!(
                "{file}: sampling.guidance_scale = {g} is not used: the model is step-distilled (one call per step, no classifier-free guidance) and embeds no guidance"
            ));
        }
        let root = match &cfg.prompt {
            Some(_) => Some(prompted::pipeline_root(cfg, file, base)?.0),
            None => None,
        };
        if let Some(r) = &root {
            warnings.extend(prompted::size_warning(cfg, file, r)?);
        }
        let parts = (source, transformer);
        let spec = RunSpec::new((cfg, file, base), "flux2", parts, root, warnings)?;
        Ok(Flux2Run {
            spec,
            knob,
            distilled,
            cfg_on,
        })
    }

    fn dims(&self) -> Option<(usize, usize, usize)> {
        run_dims(
            &self.spec.cfg,
            &self.spec.run.file,
            &self.spec.base,
            &self.spec.transformer,
        )
    }

    /// The transformer (held, or streamed from a checkpoint), its description and preset name,
    /// and the checkpoint's unused tensors.
    fn model(&self) -> Result<(Flux2Model, String, Option<&'static str>, Vec<String>)> {
        let c = self.spec.transformer.clone();
        let sizes = c.sizes();
        let p = match &self.spec.source {
            Source::Preset(p) => p,
            Source::Checkpoint(dir) => {
                let mut store = open_flux2(dir)?;
                store.set_placement(self.spec.run.placement()?.clone());
                let store = std::sync::Arc::new(store);
                let model = Flux2Model::placed(c.clone(), store.clone(), self.spec.run.offload)?;
                let mode = if self.cfg_on {
                    ", classifier-free guidance"
                } else {
                    ", distilled"
                };
                let streamed = if model.is_streamed() {
                    ", blocks streamed from the checkpoint"
                } else {
                    ""
                };
                let desc = format!("{}: {sizes}{mode}{streamed}", dir.display());
                let depth = (c.num_layers, c.num_single_layers);
                let unused = store.check_unused(&self.spec.run.file, |prefix| {
                    magcache_layers::config_util::double_single_depth(
                        &self.spec.overrides,
                        prefix,
                        depth,
                    )
                })?;
                let variant = FLUX2_PRESETS
                    .iter()
                    .find(|p| (p.config)() == c && p.distilled == self.distilled)
                    .map(|p| p.name);
                return Ok((model, desc, variant, unused.into_iter().collect()));
            }
        };
        let seed = self.spec.cfg.model.seed;
        let desc = format!("preset {} (random init, seed {seed}): {sizes}", p.name);
        let dtype = self.spec.run.dtype;
        let mut store = random_store(seed, Flux2Model::shapes(&c)?, c.inner_dim(), dtype)?;
        store.set_placement(self.spec.run.placement()?.clone());
        Ok((
            Flux2Model::from_weights(c, &store)?,
            desc,
            Some(p.name),
            Vec::new(),
        ))
    }
}

impl ResolvedRun for Flux2Run {
    fn resolve(cfg: &RunConfig, file: &str, base: &Path) -> Result<Self> {
        Self::read(cfg, file, base)
    }

    fn warnings(&self) -> Vec<String> {
        self.spec.run.warnings.clone()
    }

    /// The plan: the image length (for `mu`) from the run file and headers.
    fn plan(&self) -> Result<(GenerationPlan, ModelInfo)> {
        let mut fp = Footprint::default();
        add_plan(&mut fp, self.spec.cfg.sampling.steps, 2);
        fp.check(&self.spec.run.file)?;
        // Drawn latents are checked as the build checks them: plan refuses what run refuses.
        if self.spec.cfg.prompt.is_none() && self.spec.cfg.inputs.file.is_none() {
            let c = self.spec.transformer.in_channels;
            let (_, s) = magcache_layers::inputs::drawn(&self.spec.cfg, &[1, c / 4, 128, 128]);
            magcache_layers::inputs::packed_drawn_shape(&s, c, "FLUX.2", &self.spec.run.file)?;
        }
        let (_, seq, _) = self.dims().ok_or_else(|| {
            Error::config(
                &self.spec.run.file,
                "inputs",
                "cannot tell the image length (inputs.height/width, latent_shape or the inputs file)",
            )
        })?;
        let variant = match &self.spec.source {
            Source::Preset(p) => Some(p.name),
            Source::Checkpoint(_) => None,
        };
        let schedule = flux2_schedule(self.spec.cfg.sampling.steps, seq).0;
        Ok((flux2_plan(&schedule, self.cfg_on), flux2_info(variant)))
    }

    fn estimate(&self) -> Vec<(String, Footprint)> {
        let (c, knob) = (&self.spec.transformer, self.knob.clone());
        let fp = footprint(&self.spec.cfg, c, knob, self.dims());
        vec![("transformer".to_string(), fp)]
    }

    fn build(&self) -> Result<Box<dyn Pipeline>> {
        let (cfg, file, base) = (
            &self.spec.cfg,
            self.spec.run.file.as_str(),
            self.spec.base.as_path(),
        );
        // Prompted: the text is encoded (and the encoder freed) before the transformer loads.
        let prompted = match &self.spec.root {
            Some(r) => Some(prompted::encode(cfg, file, r, self.cfg_on)?),
            None => None,
        };
        let (model, desc, variant, unused) = self.model()?;
        let mut warnings = self.spec.run.warnings.clone();
        warnings.extend(unused);
        let inputs = match &prompted {
            Some(p) => prompted::inputs((cfg, file, base), &model.cfg, p)?,
            None => plain_inputs(cfg, file, base, &model.cfg, self.cfg_on)?
                .to_device(&self.spec.run.placement()?.device)?,
        };
        let guidance = cfg.sampling.guidance_scale.unwrap_or(DEFAULT_GUIDANCE);
        let cfg_scale = (self.cfg_on && inputs.neg_ctx.is_some()).then_some(guidance);
        let (schedule, mu) = flux2_schedule(cfg.sampling.steps, inputs.packed.latents.dim(1)?);
        schedule.check(file, "inputs.height/width", mu)?;
        let description = with_template(desc, prompted.as_ref());
        let mut common =
            magcache_core::PipelineCommon::new(description, flux2_info(variant), warnings);
        let mut prompted = prompted;
        if let Some(p) = &mut prompted {
            common.stages = std::mem::take(&mut p.stages);
        }
        Ok(Box::new(Flux2Pipeline {
            steps: Flux2Steps {
                schedule,
                cfg_scale,
                guidance,
                inputs,
                prompted,
            },
            model: Some(model),
            common,
        }))
    }

    /// A preset run's transformer, generated tensor by tensor (`magcache export`).
    fn export(&self) -> Result<Option<Vec<magcache_core::GeneratedWeights>>> {
        if !matches!(self.spec.source, Source::Preset(_)) {
            return Ok(None);
        }
        let c = &self.spec.transformer;
        let mut config = to_map(c, FLUX2_CLASS)?;
        config.insert("_class_name".into(), FLUX2_CLASS.into());
        Ok(Some(vec![magcache_layers::random::generated(
            "",
            config,
            self.spec.cfg.model.seed,
            Flux2Model::shapes(c)?,
            c.inner_dim(),
            self.spec.run.dtype,
        )]))
    }
}

inventory::submit! {
    magcache_core::PresetExport { family: "flux2", export: export_run::<Flux2Run>, gguf: None }
}

inventory::submit! {
    ModelFamily {
        name: "flux2",
        description: "FLUX.2 [klein] (Flux2Transformer2DModel, Qwen3 text, AutoencoderKLFlux2): double- then single-stream blocks in one cache chain, Euler with FLUX.2's empirical mu; distilled or CFG",
        blocks: &[FLUX2_DOUBLE, FLUX2_SINGLE],
        presets: &["flux2-klein-4b", "flux2-klein-base-4b", "flux2-dev"],
        keys: &[magcache_layers::autoencoder_kl::FLUX_VAE_KEYS],
        ..ModelFamily::resolved::<Flux2Run>()
    }
}
