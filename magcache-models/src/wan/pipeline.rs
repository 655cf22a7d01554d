//! The Wan denoising loop: flow-matching Euler or UniPC with static shift ([`FlowSampler`]),
//! classifier-free guidance with the cond call then the uncond call (each its own cache branch), one
//! or two experts.

pub use super::inputs::WanInputs;
use super::model::WanModel;
use candle_core::Tensor;
use magcache_core::denoise::Observer;
use magcache_core::{
    Branch, Error, GenerationPlan, ModelInfo, Pipeline, PipelineCommon, Result, StepsSpec,
};
use magcache_layers::scheduler::{flow_match_static, FlowSampler, FlowSchedule};

pub struct WanPipeline {
    pub family: String,
    /// `experts[0]` (high noise / only model), `experts[1]` (low noise).
    pub experts: Vec<WanModel>,
    pub boundary_ratio: Option<f64>,
    pub schedule: FlowSchedule,
    pub shift: f64,
    /// Euler (default of [`WanPipeline::new`]) or UniPC; see [`WanPipeline::with_sampler`].
    pub sampler: FlowSampler,
    pub guidance: f64,
    pub guidance_2: Option<f64>,
    pub inputs: WanInputs,
    /// Per-token timesteps (Wan2.2 TI2V `expand_timesteps`).
    pub expand_timesteps: bool,
    /// Description, model info, the build's warnings (reported at the start of every generation)
    /// and the cache.
    pub common: PipelineCommon,
    /// Prompted runs (`[prompt]`): the pipeline folder and encoded prompts, decoded in `finish`.
    pub prompted: Option<super::prompted::Prompted>,
    /// How many experts the pipeline was built with (`experts` is emptied by `release_models`).
    n_experts: usize,
}

impl WanPipeline {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        family: &str,
        experts: Vec<WanModel>,
        boundary_ratio: Option<f64>,
        steps: usize,
        shift: f64,
        guidance: f64,
        guidance_2: Option<f64>,
        inputs: WanInputs,
        info: ModelInfo,
        description: String,
    ) -> Result<Self> {
        if experts.is_empty() || experts.len() > 2 {
            return Err(Error::msg(format!(
                "a Wan pipeline has one or two experts, not {}",
                experts.len()
            )));
        }
        let inputs = match experts.first() {
            Some(m) => inputs.to_device(m.device())?,
            None => inputs,
        };
        let experts_len = experts.len();
        if experts.len() == 2 && boundary_ratio.is_none() {
            return Err(Error::msg(
                "two experts need `boundary_ratio` in [sampling]",
            ));
        }
        Ok(WanPipeline {
            family: family.to_string(),
            experts,
            boundary_ratio,
            schedule: flow_match_static(steps, shift),
            shift,
            sampler: FlowSampler::Euler { shift },
            guidance,
            guidance_2,
            inputs,
            common: PipelineCommon {
                description,
                info,
                ..Default::default()
            },
            expand_timesteps: false,
            prompted: None,
            n_experts: experts_len,
        })
    }

    /// Samples with `sampler` instead (same step count; the shift becomes the sampler's).
    pub fn with_sampler(mut self, sampler: FlowSampler) -> Result<Self> {
        self.schedule = sampler.schedule(self.schedule.steps())?;
        self.shift = sampler.shift();
        self.sampler = sampler;
        Ok(self)
    }

    /// The expert that runs timestep `t`: the high-noise expert for `t >= boundary * 1000`.
    pub fn expert_for(&self, t: f32) -> usize {
        expert_for(t, self.n_experts, self.boundary_ratio)
    }

    fn guidance_of(&self, expert: usize) -> f64 {
        if expert == 1 {
            self.guidance_2.unwrap_or(self.guidance)
        } else {
            self.guidance
        }
    }

    /// Classifier-free guidance runs on every step when the (high-noise) guidance scale is above 1, as
    /// in diffusers; the low-noise expert then uses `guidance_scale_2`.
    fn uses_cfg(&self) -> bool {
        self.guidance > 1.0 && self.inputs.uncond.is_some()
    }

    fn timestep_tensor(&self, t: f32, model: &WanModel) -> Result<Tensor> {
        let (b, _, f, h, w) = self.inputs.latents.dims5()?;
        if self.expand_timesteps {
            let [pt, ph, pw] = model.cfg.patch_size;
            let seq = (f / pt) * (h / ph) * (w / pw);
            let per_frame = (h / ph) * (w / pw);
            let clean = if self.inputs.first_frame.is_some() {
                per_frame
            } else {
                0
            };
            let mut v = vec![t; b * seq];
            // The first `clean` tokens of every sample.
            for sample in v.chunks_mut(seq.max(1)) {
                for x in sample.iter_mut().take(clean) {
                    *x = 0.0;
                }
            }
            Ok(Tensor::from_vec(v, (b, seq), self.inputs.latents.device())?)
        } else {
            Ok(Tensor::from_vec(
                vec![t; b],
                b,
                self.inputs.latents.device(),
            )?)
        }
    }
}

impl Pipeline for WanPipeline {
    fn common(&self) -> Option<&PipelineCommon> {
        Some(&self.common)
    }

    fn common_mut(&mut self) -> Option<&mut PipelineCommon> {
        Some(&mut self.common)
    }

    fn family(&self) -> &str {
        &self.family
    }

    fn plan(&self) -> GenerationPlan {
        wan_plan(
            &self.family,
            self.n_experts,
            self.boundary_ratio,
            &self.schedule,
            self.sampler.name(),
            self.shift,
            self.uses_cfg(),
        )
    }

    fn to_planes(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, c, f, h, w) = latents.dims5()?;
        Ok(latents.reshape((b * c * f, h, w))?)
    }

    fn hook_registries(&mut self) -> Vec<&mut magcache_core::HookRegistry> {
        self.experts
            .iter_mut()
            .map(|m| &mut m.blocks.hooks)
            .collect()
    }

    fn generate(&mut self, obs: &mut dyn Observer) -> Result<Tensor> {
        if self.experts.len() != self.n_experts {
            return Err(Error::msg(
                "wan: the transformer was released after the last generation (release_models): build the pipeline again to generate",
            ));
        }
        let plan = self.plan();
        let mut den = self.common.start(&plan, obs)?;
        let mut lat = self.inputs.latents.clone();
        let mut stepper = self.sampler.stepper(&self.schedule)?;
        if let Some(ff) = &self.inputs.first_frame {
            lat = replace_first_frame(&lat, ff)?;
        }
        let uncond = match (&self.inputs.uncond, self.uses_cfg()) {
            (Some(u), true) => Some(u),
            _ => None,
        };
        for i in 0..self.schedule.steps() {
            let t = self.schedule.timesteps[i];
            let e = self.expert_for(t);
            let model = self.experts.get(e).ok_or_else(|| {
                Error::msg(format!(
                    "wan: step {i} needs expert {e}, which is not loaded"
                ))
            })?;
            let tt = self.timestep_tensor(t, model)?;
            let input = match &self.inputs.condition {
                Some(c) => Tensor::cat(&[&lat, c], 1)?,
                None => lat.clone(),
            };
            let mut call = |branch: Branch, ctx: &Tensor| {
                den.call(i, e, branch, t as f64, |cx| {
                    model.forward_inner(&input, &tt, ctx, self.inputs.image.as_ref(), cx, None)
                })
            };
            let cond = call(Branch::Cond, &self.inputs.cond)?;
            let pred = match uncond {
                Some(u) => {
                    let pu = call(Branch::Uncond, u)?;
                    (&pu + ((cond - &pu)? * self.guidance_of(e))?)?
                }
                None => cond,
            };
            lat = stepper.step(i, &pred, &lat)?;
            if let Some(ff) = &self.inputs.first_frame {
                lat = replace_first_frame(&lat, ff)?;
            }
            den.step_done(i, &lat)?;
        }
        Ok(lat)
    }

    fn release_models(&mut self) {
        self.experts.clear();
    }

    fn finish(&mut self, latents: &Tensor) -> Result<Option<magcache_core::Decoded>> {
        match &mut self.prompted {
            Some(p) => super::prompted::finish(p, latents).map(Some),
            None => Ok(None),
        }
    }

    /// 16 fps as Wan's examples export their videos; 24 for Wan2.2 TI2V-5B (per-token timesteps),
    /// whose examples export at 24.
    fn frame_rate(&self) -> Option<u32> {
        Some(if self.expand_timesteps { 24 } else { 16 })
    }

    fn stages(&self) -> Vec<magcache_core::runtime::progress::StageTime> {
        self.prompted
            .as_ref()
            .map(|p| p.stages.clone())
            .unwrap_or_default()
    }
}

/// The expert that runs timestep `t`: the high-noise expert (0) for `t >= boundary * 1000`, the
/// low-noise expert (1) below (diffusers' rule); always 0 for one model.
pub fn expert_for(t: f32, n_experts: usize, boundary_ratio: Option<f64>) -> usize {
    match boundary_ratio {
        Some(b) if n_experts == 2 && (t as f64) < b * 1000.0 => 1,
        _ => 0,
    }
}

/// The scopes of a Wan generation: every expert that runs at least one step, times cond (and uncond
/// with CFG), each with the steps it runs. `scheduler` is the sampler's name
/// ([`FlowSampler::name`]: `flow-euler` or `unipc`).
pub fn wan_plan(
    family: &str,
    n_experts: usize,
    boundary_ratio: Option<f64>,
    schedule: &FlowSchedule,
    scheduler: &str,
    shift: f64,
    cfg: bool,
) -> GenerationPlan {
    let steps = schedule.steps();
    let sigmas: Vec<f64> = schedule.sigmas[..steps].iter().map(|&s| s as f64).collect();
    let experts: Vec<usize> = schedule.timesteps[..steps]
        .iter()
        .map(|&t| expert_for(t, n_experts, boundary_ratio))
        .collect();
    let branches: &[Branch] = if cfg {
        &[Branch::Cond, Branch::Uncond]
    } else {
        &[Branch::Cond]
    };
    GenerationPlan::from_steps(&StepsSpec {
        family,
        scheduler,
        shift: Some(shift),
        boundary_ratio: if n_experts == 2 { boundary_ratio } else { None },
        sigmas: &sigmas,
        experts: &experts,
        branches,
    })
}

/// Puts the conditioning frame `[B, C, 1, H, W]` in place of latent frame 0.
fn replace_first_frame(lat: &Tensor, ff: &Tensor) -> Result<Tensor> {
    let f = lat.dim(2)?;
    if f == 1 {
        return Ok(ff.clone());
    }
    Ok(Tensor::cat(&[ff, &lat.narrow(2, 1, f - 1)?], 2)?)
}
