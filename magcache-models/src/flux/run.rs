//! A flux run file resolved once into a [`FluxRun`] (the checkpoint opened, headers only, or the
//! preset; the pipeline folder, placement) before anything loads; building is then the stages in
//! turn (encode text, load the transformer, the inputs; the decode runs in `finish`).

use super::config::FluxConfig;
use super::family::{apply_lora, check_flux_keys, check_flux_scheduler, flux_preset, FLUX_KEYS};
use super::inputs::build_inputs;
use super::load::{self, LoadedFlux};
use super::model::{FluxModel, FLUX_DOUBLE, FLUX_SINGLE};
use super::pipeline::{flux_plan, FluxPipeline, FluxSteps};
use super::presets::{flux_info, FluxPreset, FLUX_PRESETS};
use super::{footprint, prompted};
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::guard::Footprint;
use magcache_core::runtime::registry::ModelFamily;
use magcache_core::runtime::resolved::{export_run, ResolvedRun};
use magcache_core::{GenerationPlan, ModelInfo, Pipeline, Result};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::config_util::{overrides_json, resolve, single_weights, to_map};
use magcache_layers::inputs::InputFile;
use magcache_layers::run_basics::RunSpec;
use magcache_layers::scheduler::FluxShift;
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::path::{Path, PathBuf};

/// Where a flux run's transformer comes from.
enum Source {
    /// A checkpoint (diffusers or BFL, safetensors or GGUF), opened at resolve (headers only: its
    /// config may come from the tensors); `build` takes the store.
    Checkpoint {
        path: PathBuf,
        opened: RefCell<Option<Box<LoadedFlux>>>,
    },
    /// A preset and its config fields (before `[model.overrides]`).
    Preset(&'static FluxPreset, Map<String, Value>),
}

/// A flux run file resolved before anything loads.
pub struct FluxRun {
    spec: RunSpec<Source, FluxConfig>,
}

impl ResolvedRun for FluxRun {
    fn resolve(cfg: &RunConfig, file: &str, base: &Path) -> Result<Self> {
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
        let (source, transformer) = match single_weights(cfg, file, "flux")? {
            Some(w) => {
                let path = magcache_layers::config_util::transformer_dir(&resolve(base, w));
                let config = cfg.model.config.as_deref().map(|c| resolve(base, c));
                let l = load::load_flux(&path, config.as_deref(), &overrides, file)?;
                let c = l.config.clone();
                let opened = RefCell::new(Some(Box::new(l)));
                (Source::Checkpoint { path, opened }, c)
            }
            None => {
                let (p, base_cfg, c) = flux_preset(cfg, file, &overrides)?;
                (Source::Preset(p, base_cfg), c)
            }
        };
        let root = match &cfg.prompt {
            Some(_) => Some(prompted::pipeline_root(cfg, file, base)?),
            None => None,
        };
        let parts = (source, transformer);
        let spec = RunSpec::new((cfg, file, base), "flux", parts, root, warnings)?;
        Ok(FluxRun { spec })
    }

    fn warnings(&self) -> Vec<String> {
        self.spec.run.warnings.clone()
    }

    /// The plan: the image length (for `mu`) from the inputs.
    fn plan(&self) -> Result<(GenerationPlan, ModelInfo)> {
        let (cfg, file) = (&self.spec.cfg, self.spec.run.file.as_str());
        let mut fp = Footprint::default();
        magcache_layers::footprint::add_plan(&mut fp, cfg.sampling.steps, 1);
        fp.check(file)?;
        let seq = match (&self.spec.root, &cfg.inputs.file) {
            (Some(root), _) => prompted::image_seq_len(cfg, file, root)?,
            (None, Some(f)) => InputFile::load(&resolve(&self.spec.base, f))?
                .get("latents_init", 3, "[B, seq, C] packed latents")?
                .dim(1)?,
            (None, None) => {
                let c = self.spec.transformer.in_channels;
                let (_, s) = magcache_layers::inputs::drawn(cfg, &[1, c / 4, 64, 64]);
                let (_, h, w) = magcache_layers::inputs::packed_drawn_shape(&s, c, "FLUX", file)?;
                (h / 2).saturating_mul(w / 2)
            }
        };
        let variant = match &self.spec.source {
            Source::Preset(p, _) => Some(p.name),
            Source::Checkpoint { .. } => None,
        };
        let shift = FluxShift::for_run(cfg, &self.spec.base)?;
        let schedule = shift.schedule(cfg.sampling.steps, seq).0;
        Ok((flux_plan(&schedule), flux_info(variant)))
    }

    /// The text encoders (prompted runs), the transformer with the denoising's activations, and
    /// the VAE decode (the transformer freed first). Configs and checkpoint headers only.
    fn estimate(&self) -> Vec<(String, Footprint)> {
        let (cfg, base) = (&self.spec.cfg, self.spec.base.as_path());
        let mut out = Vec::new();
        if let Some(root) = &self.spec.root {
            if let Ok(fp) = prompted::text_footprint(cfg, &self.spec.run.file, root) {
                out.push(("encode text".to_string(), fp));
            }
        }
        let base_cfg = match &self.spec.source {
            Source::Preset(_, m) => Some(m),
            Source::Checkpoint { .. } => None,
        };
        let fp = footprint::flux_footprint(cfg, base, &self.spec.transformer, base_cfg);
        out.push(("denoise".to_string(), fp));
        if let Some(d) = footprint::flux_decode_footprint(cfg, base) {
            out.push(("decode".to_string(), d));
        }
        out
    }

    fn build(&self) -> Result<Box<dyn Pipeline>> {
        let (cfg, file, base) = (
            &self.spec.cfg,
            self.spec.run.file.as_str(),
            self.spec.base.as_path(),
        );
        // Prompted: the text is encoded (and both encoders freed) before the transformer loads.
        let mut prompted = match &self.spec.root {
            Some(root) => Some(prompted::encode(cfg, file, root)?),
            None => None,
        };
        let (model, desc, variant, mut warnings) = self.model()?;
        warnings.splice(0..0, self.spec.run.warnings.iter().cloned());
        let placement = self.spec.run.placement()?;
        let inputs = match &prompted {
            Some(p) => prompted::inputs((cfg, file, base), &model.cfg, p)?,
            None => build_inputs(cfg, file, base, &model.cfg)?.to_device(&placement.device)?,
        };
        // The pipeline folder's scheduler (FLUX.1-dev's dynamic shift without one).
        let (schedule, mu) = FluxShift::for_run(cfg, base)?
            .schedule(cfg.sampling.steps, inputs.packed.latents.dim(1)?);
        schedule.check(file, "inputs.latent_shape", mu)?;
        if let Some(p) = &mut prompted {
            warnings.append(&mut p.warnings);
        }
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

    /// A preset run's transformer, generated tensor by tensor, adapters merged (`magcache export`).
    fn export(&self) -> Result<Option<Vec<magcache_core::GeneratedWeights>>> {
        if !matches!(self.spec.source, Source::Preset(..)) {
            return Ok(None);
        }
        let (cfg, file, c) = (
            &self.spec.cfg,
            self.spec.run.file.as_str(),
            &self.spec.transformer,
        );
        let dtype = self.spec.run.dtype;
        let mut config = to_map(c, "FluxTransformer2DModel")?;
        config.insert("_class_name".into(), "FluxTransformer2DModel".into());
        let seed = cfg.model.seed;
        let g = magcache_layers::random::generated(
            "",
            config,
            seed,
            FluxModel::shapes(c)?,
            c.inner_dim(),
            dtype,
        );
        let tables = magcache_layers::lora::tables_for(&cfg.model.lora, file, "flux", 1, 0)?;
        let d = c.inner_dim();
        let names = load::FluxLoraNames { d, mlp: 4 * d };
        let merged = magcache_layers::lora::merged(g, &tables, &self.spec.base, &names)?;
        Ok(Some(vec![merged]))
    }
}

impl FluxRun {
    /// The transformer (held, or streamed from the checkpoint) with the adapters merged, its
    /// description and preset name, and the warnings (adapters, unused tensors).
    #[allow(clippy::type_complexity)]
    fn model(&self) -> Result<(FluxModel, String, Option<&'static str>, Vec<String>)> {
        let (cfg, file, base) = (
            &self.spec.cfg,
            self.spec.run.file.as_str(),
            self.spec.base.as_path(),
        );
        let placement = self.spec.run.placement()?;
        let c = self.spec.transformer.clone();
        let sizes = c.sizes();
        let (path, opened) = match &self.spec.source {
            Source::Checkpoint { path, opened } => (path, opened),
            Source::Preset(p, _) => {
                let seed = cfg.model.seed;
                let desc = format!("preset {} (random init, seed {seed}): {sizes}", p.name);
                let dtype = placement.dtype;
                let mut store = magcache_layers::random::random_store(
                    seed,
                    FluxModel::shapes(&c)?,
                    c.inner_dim(),
                    dtype,
                )?;
                store.set_placement(placement.clone());
                let warnings = apply_lora(cfg, file, base, &mut store, &c)?;
                return Ok((
                    FluxModel::from_weights(c, &store)?,
                    desc,
                    Some(p.name),
                    warnings,
                ));
            }
        };
        // Built once per resolve: a second build opens the checkpoint again.
        let taken = opened.borrow_mut().take();
        let mut l = match taken {
            Some(l) => *l,
            None => {
                let config = cfg.model.config.as_deref().map(|c| resolve(base, c));
                load::load_flux(path, config.as_deref(), &self.spec.overrides, file)?
            }
        };
        l.store.set_placement(placement.clone());
        let mut warnings = apply_lora(cfg, file, base, &mut l.store, &l.config)?;
        let desc = format!("{} ({:?} layout): {sizes}", path.display(), l.layout);
        let variant = FLUX_PRESETS
            .iter()
            .find(|p| (p.config)() == l.config)
            .map(|p| p.name);
        let depth = (c.num_layers, c.num_single_layers);
        let store = std::sync::Arc::new(l.store);
        let model = FluxModel::placed(l.config, store.clone(), self.spec.run.offload)?;
        let streamed = ", blocks streamed from the checkpoint";
        let desc = format!("{desc}{}", if model.is_streamed() { streamed } else { "" });
        warnings.extend(store.check_unused(file, |prefix| {
            magcache_layers::config_util::double_single_depth(&self.spec.overrides, prefix, depth)
        })?);
        Ok((model, desc, variant, warnings))
    }
}

inventory::submit! {
    // FLUX GGUF files carry BFL names (config inference reads them); diffusers names would need a
    // config.json: no GGUF export yet.
    magcache_core::PresetExport { family: "flux", export: export_run::<FluxRun>, gguf: None }
}

inventory::submit! {
    ModelFamily {
        name: "flux",
        description: "FLUX.1 (FluxTransformer2DModel): double- then single-stream blocks in one cache chain, Euler with dynamic shift, embedded guidance",
        blocks: &[FLUX_DOUBLE, FLUX_SINGLE],
        presets: &["flux-dev", "flux-schnell"],
        published: &["magcache flux_dev", "teacache flux_dev"],
        keys: FLUX_KEYS,
        ..ModelFamily::resolved::<FluxRun>()
    }
}
