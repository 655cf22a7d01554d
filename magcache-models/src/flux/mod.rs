//! FLUX.1: model, loading (diffusers and BFL), the image VAE ([`vae`]), presets, the Euler sampler
//! with dynamic shift and embedded guidance, and the family registration.

pub mod config;
pub mod footprint;
pub mod load;
pub mod model;
pub mod prompted;
pub mod vae;

use crate::config_util::to_map;
use crate::config_util::{overrides_json, resolve};
use crate::inputs::InputFile;
use crate::published;
use crate::random::{randn, random_store};
use crate::scheduler::{flow_match_dynamic, flux_mu, FlowSchedule};
use candle_core::{Device, Tensor};
use config::FluxConfig;
use magcache_core::denoise::Observer;
use magcache_core::runtime::config::{RunConfig, WeightsSpec};
use magcache_core::runtime::registry::ModelFamily;
use magcache_core::{
    Branch, CacheHandle, Denoiser, Error, GenerationPlan, Indicator, ModelInfo, Pipeline, Result,
    StepsSpec,
};

use model::{FluxModel, FLUX_DOUBLE, FLUX_SINGLE};
use std::path::Path;

pub struct FluxPreset {
    pub name: &'static str,
    pub config: fn() -> FluxConfig,
}

fn dev() -> FluxConfig {
    FluxConfig::default()
}
fn schnell() -> FluxConfig {
    FluxConfig {
        guidance_embeds: false,
        ..FluxConfig::default()
    }
}

pub const FLUX_PRESETS: &[FluxPreset] = &[
    FluxPreset {
        name: "flux-dev",
        config: dev,
    },
    FluxPreset {
        name: "flux-schnell",
        config: schnell,
    },
];

/// Diffusers names and shapes of a FLUX model: the embeddings and head, then every block.
fn shapes(c: &FluxConfig) -> Vec<(String, Vec<usize>)> {
    let mut v = model::top_tensors(c);
    for i in 0..c.num_layers + c.num_single_layers {
        v.extend(model::block_tensors(c, i));
    }
    v
}

impl FluxInputs {
    /// The inputs on `dev`.
    pub fn to_device(self, dev: &Device) -> Result<Self> {
        Ok(FluxInputs {
            latents: self.latents.to_device(dev)?,
            ctx: self.ctx.to_device(dev)?,
            pooled: self.pooled.to_device(dev)?,
            img_ids: self.img_ids.to_device(dev)?,
            txt_ids: self.txt_ids.to_device(dev)?,
        })
    }
}

/// Conditioning of a FLUX generation (packed latents).
pub struct FluxInputs {
    /// `[B, seq, C]`
    pub latents: Tensor,
    /// `[B, L, joint_attention_dim]`
    pub ctx: Tensor,
    /// `[B, pooled_projection_dim]`
    pub pooled: Tensor,
    /// `[seq, 3]`, `[L, 3]`
    pub img_ids: Tensor,
    pub txt_ids: Tensor,
}

pub struct FluxPipeline {
    pub model: FluxModel,
    pub schedule: FlowSchedule,
    pub guidance: f64,
    pub inputs: FluxInputs,
    pub info: ModelInfo,
    pub description: String,
    /// Found while building; reported at the start of every generation.
    pub warnings: Vec<String>,
    /// Prompted runs (`[prompt]`): the pipeline folder and encoded prompt, decoded in `finish`.
    pub prompted: Option<prompted::Prompted>,
    cache: Option<CacheHandle>,
}

impl Pipeline for FluxPipeline {
    fn family(&self) -> &str {
        "flux"
    }
    fn describe(&self) -> String {
        self.description.clone()
    }
    fn plan(&self) -> GenerationPlan {
        flux_plan(&self.schedule)
    }
    fn model_info(&self) -> ModelInfo {
        self.info.clone()
    }
    fn set_cache(&mut self, cache: Option<CacheHandle>) -> Result<()> {
        self.cache = cache;
        Ok(())
    }
    /// Packed `[B, h*w, C]` -> `[B*C, h, w]` on the grid of `img_ids`.
    fn to_planes(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, seq, c) = latents.dims3()?;
        let ids = self.inputs.img_ids.to_vec2::<f32>()?;
        // Rows `[0, row, col]`; ids with fewer axes give no grid (one row of `seq` values).
        let extent = |axis: usize| {
            ids.iter()
                .map(|r| r.get(axis).map_or(0, |&v| v as usize))
                .max()
                .unwrap_or(0)
                .saturating_add(1)
        };
        let (h, w) = (extent(1), extent(2));
        if h.checked_mul(w) != Some(seq) {
            return Ok(latents
                .permute((0, 2, 1))?
                .contiguous()?
                .reshape((b * c, 1, seq))?);
        }
        Ok(latents
            .reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .reshape((b * c, h, w))?)
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    fn generate(&mut self, obs: &mut dyn Observer) -> Result<Tensor> {
        for w in &self.warnings {
            obs.warning(w);
        }
        let plan = self.plan();
        let mut den = Denoiser::start(&plan, self.cache.as_ref(), obs)?;
        let b = self.inputs.latents.dim(0)?;
        let dev = self.inputs.latents.device();
        let g = self
            .model
            .cfg
            .guidance_embeds
            .then(|| Tensor::from_vec(vec![self.guidance as f32; b], b, dev))
            .transpose()?;
        let mut lat = self.inputs.latents.clone();
        let inp = &self.inputs;
        for i in 0..self.schedule.steps() {
            let t = self.schedule.timesteps[i];
            let tt = Tensor::from_vec(vec![t / 1000.0; b], b, dev)?;
            let v = den.call(i, 0, Branch::Cond, t as f64, |cx| {
                self.model.forward(
                    &lat,
                    &inp.ctx,
                    &inp.pooled,
                    &tt,
                    &inp.img_ids,
                    &inp.txt_ids,
                    g.as_ref(),
                    cx,
                )
            })?;
            lat = (&lat + (v * self.schedule.dt(i) as f64)?)?;
            den.step_done(i, &lat)?;
        }
        Ok(lat)
    }

    fn finish(&mut self, latents: &Tensor) -> Result<Vec<(String, Tensor)>> {
        match &mut self.prompted {
            Some(p) => prompted::finish(p, latents),
            None => Ok(Vec::new()),
        }
    }

    fn stages(&self) -> Vec<magcache_core::runtime::progress::StageTime> {
        self.prompted
            .as_ref()
            .map(|p| p.stages.clone())
            .unwrap_or_default()
    }
}

/// The one scope of a FLUX generation (no CFG: guidance is embedded).
pub fn flux_plan(schedule: &FlowSchedule) -> GenerationPlan {
    let steps = schedule.steps();
    let sigmas: Vec<f64> = schedule.sigmas[..steps].iter().map(|&s| s as f64).collect();
    GenerationPlan::from_steps(&StepsSpec {
        family: "flux",
        scheduler: "flow-euler, dynamic shift",
        sigmas: &sigmas,
        branches: &[Branch::Cond],
        ..Default::default()
    })
}

/// Position ids of a packed `h x w` image grid: `[0, row, col]`.
pub fn image_ids(h: usize, w: usize) -> Result<Tensor> {
    let n = h
        .checked_mul(w)
        .and_then(|n| n.checked_mul(3))
        .ok_or_else(|| Error::msg(format!("image grid {h}x{w} is too large")))?;
    let mut v = Vec::with_capacity(n);
    for r in 0..h {
        for c in 0..w {
            v.extend_from_slice(&[0.0f32, r as f32, c as f32]);
        }
    }
    Ok(Tensor::from_vec(v, (h * w, 3), &Device::Cpu)?)
}

fn build_inputs(cfg: &RunConfig, file: &str, base: &Path, c: &FluxConfig) -> Result<FluxInputs> {
    if let Some(f) = &cfg.inputs.file {
        let inp = InputFile::load(&resolve(base, f))?;
        let lat = inp.get(
            "latents_init",
            3,
            &format!("[B, seq, {}] packed latents", c.in_channels),
        )?;
        let (b, seq, ch) = lat.dims3()?;
        if ch != c.in_channels {
            return Err(Error::inputs(
                &inp.path,
                "latents_init",
                format!(
                    "has shape {:?}; the model takes {} channels",
                    lat.dims(),
                    c.in_channels
                ),
            ));
        }
        let ctx = inp.get(
            "encoder_hidden_states",
            3,
            &format!("[B, L, {}]", c.joint_attention_dim),
        )?;
        if ctx.dim(0)? != b || ctx.dim(2)? != c.joint_attention_dim {
            return Err(Error::inputs(
                &inp.path,
                "encoder_hidden_states",
                format!(
                    "has shape {:?}; expected [{b}, L, {}]",
                    ctx.dims(),
                    c.joint_attention_dim
                ),
            ));
        }
        let pooled = inp.get(
            "pooled_projections",
            2,
            &format!("[B, {}]", c.pooled_projection_dim),
        )?;
        if pooled.dims() != [b, c.pooled_projection_dim] {
            return Err(Error::inputs(
                &inp.path,
                "pooled_projections",
                format!(
                    "has shape {:?}; expected [{b}, {}]",
                    pooled.dims(),
                    c.pooled_projection_dim
                ),
            ));
        }
        let n_axes = c.axes_dims_rope.len();
        let ids = |name: &str, n: usize| -> Result<Tensor> {
            let mut t = inp.get(name, 2, &format!("[{n}, {n_axes}] position ids"))?;
            if t.rank() == 3 {
                t = t.get(0)?;
            }
            if t.dims() != [n, n_axes] {
                return Err(Error::inputs(
                    &inp.path,
                    name,
                    format!("has shape {:?}; expected [{n}, {n_axes}]", t.dims()),
                ));
            }
            Ok(t)
        };
        let img_ids = ids("img_ids", seq)?;
        let txt_ids = ids("txt_ids", ctx.dim(1)?)?;
        return Ok(FluxInputs {
            latents: lat,
            ctx,
            pooled,
            img_ids,
            txt_ids,
        });
    }
    // Random inputs: latent_shape = [B, C, H, W] of unpacked latents (C * 4 = in_channels), packed 2x2.
    let seed = cfg.inputs.seed.unwrap_or(cfg.model.seed);
    let shape = cfg
        .inputs
        .latent_shape
        .clone()
        .unwrap_or_else(|| vec![1, c.in_channels / 4, 64, 64]);
    if shape.len() != 4
        || shape[1].checked_mul(4) != Some(c.in_channels)
        || !shape[2].is_multiple_of(2)
        || !shape[3].is_multiple_of(2)
    {
        return Err(Error::config(
            file,
            "inputs.latent_shape",
            format!("{shape:?} is not [B, {}, H, W] with even H and W (FLUX packs 2x2 latents into {} channels)", c.in_channels / 4, c.in_channels),
        ));
    }
    let (b, h, w) = (shape[0], shape[2] / 2, shape[3] / 2);
    let seq = h.checked_mul(w).ok_or_else(|| {
        Error::config(
            file,
            "inputs.latent_shape",
            format!("{shape:?} is too large"),
        )
    })?;
    let l = cfg.inputs.text_len.unwrap_or(64);
    Ok(FluxInputs {
        latents: randn(seed.wrapping_add(1), &[b, seq, c.in_channels])?,
        ctx: randn(seed.wrapping_add(2), &[b, l, c.joint_attention_dim])?,
        pooled: randn(seed.wrapping_add(3), &[b, c.pooled_projection_dim])?,
        img_ids: image_ids(h, w)?,
        txt_ids: Tensor::zeros(
            (l, c.axes_dims_rope.len()),
            candle_core::DType::F32,
            &Device::Cpu,
        )?,
    })
}

fn flux_info(preset: Option<&str>) -> ModelInfo {
    let mut info = ModelInfo {
        family: "flux".into(),
        variant: preset.map(String::from),
        indicators: vec![Indicator::TimestepEmbedding, Indicator::ModulatedInput],
        ..Default::default()
    };
    // The MagCache curve and the TeaCache coefficients (fit on the first double block's modulated
    // input) published for FLUX.1-dev.
    if let Ok(m) = published::magcache("flux_dev", false, None) {
        info.published.insert("magcache".into(), m);
    }
    if let Ok(t) = published::teacache(
        Some("flux_dev"),
        Indicator::ModulatedInput,
        Indicator::ModulatedInput,
    ) {
        info.published.insert("teacache".into(), t);
    }
    info
}

/// FLUX samples with Euler (dynamic shift) only.
fn check_flux_scheduler(cfg: &RunConfig, file: &str) -> Result<()> {
    if cfg.sampling.scheduler_config.is_some() {
        return Err(Error::config(
            file,
            "sampling.scheduler_config",
            "flux samples with flow-matching Euler (dynamic shift); scheduler configs are read by Wan's UniPC only",
        ));
    }
    match cfg.sampling.scheduler.as_deref() {
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
fn check_flux_keys(cfg: &RunConfig, file: &str) -> Result<()> {
    crate::config_util::check_applicable(cfg, file, "flux", 1, false)
}

fn build_flux(cfg: &RunConfig, file: &str, base: &Path) -> Result<Box<dyn Pipeline>> {
    crate::config_util::require_weights_or_preset(cfg, file)?;
    check_flux_scheduler(cfg, file)?;
    check_flux_keys(cfg, file)?;
    let mut warnings = Vec::new();
    if let Some(shift) = cfg.sampling.shift {
        warnings.push(format!(
            "{file}: sampling.shift = {shift} is not used by flux: it shifts dynamically from the image length (mu)"
        ));
    }
    let overrides = overrides_json(cfg);
    let placement = magcache_core::Placement::open(&cfg.model.device, &cfg.model.dtype, file)?;
    // Prompted: the text is encoded (and both encoders freed) before the transformer loads.
    let prompted = match &cfg.prompt {
        Some(_) => {
            let root = prompted::pipeline_root(cfg, file, base)?;
            Some(prompted::encode(cfg, file, &root)?)
        }
        None => None,
    };
    let (model, desc, variant) = match &cfg.model.weights {
        Some(WeightsSpec::One(w)) => {
            let path = transformer_dir(resolve(base, w));
            let config = cfg.model.config.as_deref().map(|c| resolve(base, c));
            // Opening the checkpoint reads its headers only (FLUX's config may come from the
            // tensors); then the whole run must fit.
            let mut l = load::load_flux(&path, config.as_deref(), &overrides, file)?;
            footprint::flux_footprint(cfg, base, &l.config, None).check(file)?;
            l.store.set_placement(placement.clone());
            let c = &l.config;
            let desc = format!(
                "{} ({:?} layout): {}+{} blocks, dim {}, {} heads",
                path.display(),
                l.layout,
                c.num_layers,
                c.num_single_layers,
                c.inner_dim(),
                c.num_attention_heads
            );
            let variant = FLUX_PRESETS
                .iter()
                .find(|p| (p.config)() == l.config)
                .map(|p| p.name);
            let (n_double, n_single) = (l.config.num_layers, l.config.num_single_layers);
            let store = std::sync::Arc::new(l.store);
            let model =
                match magcache_core::runtime::placement::parse_offload(&cfg.model.offload, file)? {
                    magcache_core::Offload::None => FluxModel::from_weights(l.config, &store)?,
                    magcache_core::Offload::Stream => FluxModel::streamed(l.config, store.clone())?,
                };
            let desc = if model.is_streamed() {
                format!("{desc}, blocks streamed from the checkpoint")
            } else {
                desc
            };
            let unused = store.check_unused(file, |prefix| {
                if prefix == "single_transformer_blocks" {
                    crate::config_util::depth_key(&overrides, "num_single_layers", n_single)
                } else {
                    crate::config_util::depth_key(&overrides, "num_layers", n_double)
                }
            })?;
            warnings.extend(unused);
            (model, desc, variant)
        }
        Some(WeightsSpec::Many(_)) => {
            return Err(Error::config(
                file,
                "model.weights",
                "flux takes one weights path",
            ))
        }
        None => {
            let name = crate::config_util::preset_name(cfg, file)?;
            let p = FLUX_PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
                Error::config(file, "model.preset", format!("unknown preset `{name}` for family `flux` (known: flux-dev, flux-schnell)"))
            })?;
            let base_cfg = to_map(&(p.config)(), "FluxTransformer2DModel")?;
            let c = FluxConfig::from_map(FluxConfig::default(), &base_cfg, file, &overrides)?;
            footprint::flux_footprint(cfg, base, &c, Some(&base_cfg)).check(file)?;
            let desc = format!(
                "preset {} (random init, seed {}): {}+{} blocks, dim {}, {} heads",
                p.name,
                cfg.model.seed,
                c.num_layers,
                c.num_single_layers,
                c.inner_dim(),
                c.num_attention_heads
            );
            let mut store =
                random_store(cfg.model.seed, shapes(&c), c.inner_dim(), placement.dtype)?;
            store.set_placement(placement.clone());
            (FluxModel::from_weights(c, &store)?, desc, Some(p.name))
        }
    };
    let inputs = match &prompted {
        Some(p) => prompted::inputs(cfg, file, base, &model.cfg, p)?,
        None => build_inputs(cfg, file, base, &model.cfg)?.to_device(&placement.device)?,
    };
    let mu = flux_mu(inputs.latents.dim(1)?);
    let schedule = flow_match_dynamic(cfg.sampling.steps, mu);
    schedule.check(file, "inputs.latent_shape", mu)?;
    Ok(Box::new(FluxPipeline {
        schedule,
        guidance: cfg.sampling.guidance_scale.unwrap_or(3.5),
        inputs,
        info: flux_info(variant),
        description: desc,
        warnings,
        model,
        prompted,
        cache: None,
    }))
}

/// `transformer/` of a diffusers pipeline folder, else the path as given.
fn transformer_dir(path: std::path::PathBuf) -> std::path::PathBuf {
    let t = path.join("transformer");
    if t.is_dir() {
        t
    } else {
        path
    }
}

/// The plan without building the model: the image length (for `mu`) comes from the inputs.
fn plan_flux(cfg: &RunConfig, file: &str, base: &Path) -> Result<(GenerationPlan, ModelInfo)> {
    crate::config_util::require_weights_or_preset(cfg, file)?;
    check_flux_scheduler(cfg, file)?;
    check_flux_keys(cfg, file)?;
    let mut fp = magcache_core::runtime::guard::Footprint::default();
    crate::footprint::add_plan(&mut fp, cfg.sampling.steps, 1);
    fp.check(file)?;
    let seq = match (&cfg.prompt, &cfg.inputs.file) {
        (Some(_), _) => {
            let root = prompted::pipeline_root(cfg, file, base)?;
            prompted::image_seq_len(cfg, file, &root)?
        }
        (None, Some(f)) => InputFile::load(&resolve(base, f))?
            .get("latents_init", 3, "[B, seq, C] packed latents")?
            .dim(1)?,
        (None, None) => {
            let s = cfg
                .inputs
                .latent_shape
                .clone()
                .unwrap_or_else(|| vec![1, 16, 64, 64]);
            if s.len() != 4 {
                return Err(Error::config(
                    file,
                    "inputs.latent_shape",
                    format!("{s:?} is not [B, C, H, W]"),
                ));
            }
            (s[2] / 2).saturating_mul(s[3] / 2)
        }
    };
    let variant = cfg
        .model
        .preset
        .as_deref()
        .and_then(|n| FLUX_PRESETS.iter().find(|p| p.name == n))
        .map(|p| p.name);
    Ok((
        flux_plan(&flow_match_dynamic(cfg.sampling.steps, flux_mu(seq))),
        flux_info(variant),
    ))
}

/// A FLUX preset run's transformer, generated tensor by tensor (`magcache export`).
fn export_flux(cfg: &RunConfig, file: &str) -> Result<Vec<magcache_core::GeneratedWeights>> {
    let overrides = overrides_json(cfg);
    let name = crate::config_util::preset_name(cfg, file)?;
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
    let c = FluxConfig::from_map(FluxConfig::default(), &base_cfg, file, &overrides)?;
    let dtype = magcache_core::runtime::placement::parse_dtype(&cfg.model.dtype, file)?;
    let mut config = to_map(&c, "FluxTransformer2DModel")?;
    config.insert("_class_name".into(), "FluxTransformer2DModel".into());
    Ok(vec![crate::random::generated(
        "",
        config,
        cfg.model.seed,
        shapes(&c),
        c.inner_dim(),
        dtype,
    )])
}

inventory::submit! {
    magcache_core::PresetExport { family: "flux", export: export_flux }
}

inventory::submit! {
    ModelFamily {
        name: "flux",
        description: "FLUX.1 (FluxTransformer2DModel): double- then single-stream blocks in one cache chain, Euler with dynamic shift, embedded guidance",
        blocks: &[FLUX_DOUBLE, FLUX_SINGLE],
        presets: &["flux-dev", "flux-schnell"],
        published: &["magcache flux_dev", "teacache flux_dev"],
        streams: true,
        build: build_flux,
        plan: plan_flux,
    }
}
