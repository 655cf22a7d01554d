//! The [`Pipeline`] of a one-transformer family, written once: a family gives its loop
//! ([`Steps`]: the plan, the loop over a [`ChainModel`], the decode) and [`Generation`] holds the
//! transformer (released before the decode), the reporting state and the hooks.

use crate::chain_model::ChainModel;
use crate::scheduler::FlowSchedule;
use candle_core::Tensor;
use magcache_core::denoise::{Denoiser, Observer};
use magcache_core::runtime::progress::StageTime;
use magcache_core::{
    Branch, CallCx, Decoded, Error, GenerationPlan, HookRegistry, Pipeline, PipelineCommon, Result,
    StepsSpec,
};

/// The stages outside the loop, as they ran.
pub type Stages = Vec<StageTime>;

/// One family's denoising loop over its transformer `Model`.
pub trait Steps {
    type Model: ChainModel;
    /// The generation's cache scopes and steps.
    fn plan(&self) -> GenerationPlan;
    /// The final latents as 2-D planes `[N, H, W]` ([`Pipeline::to_planes`]).
    fn to_planes(&self, latents: &Tensor) -> Result<Tensor>;
    /// The whole loop, every transformer call through `den`; the final latents.
    fn run(&self, model: &Self::Model, den: &mut Denoiser<'_>) -> Result<Tensor>;
    /// A prompted run's decode after the loop (its time pushed to `stages`); `None` without one.
    fn finish(
        &mut self,
        _latents: &Tensor,
        _stages: &mut Vec<StageTime>,
    ) -> Result<Option<Decoded>> {
        Ok(None)
    }
}

/// A built pipeline: the family's loop, its transformer and what every pipeline reports.
pub struct Generation<S: Steps> {
    pub steps: S,
    /// `None` after [`Pipeline::release_models`] (a later generation is refused).
    pub model: Option<S::Model>,
    /// Description, model info, warnings, stage times and the cache.
    pub common: PipelineCommon,
}

impl<S: Steps> Pipeline for Generation<S> {
    fn common(&self) -> Option<&PipelineCommon> {
        Some(&self.common)
    }
    fn common_mut(&mut self) -> Option<&mut PipelineCommon> {
        Some(&mut self.common)
    }
    fn plan(&self) -> GenerationPlan {
        self.steps.plan()
    }
    fn to_planes(&self, latents: &Tensor) -> Result<Tensor> {
        self.steps.to_planes(latents)
    }
    fn hook_registries(&mut self) -> Vec<&mut HookRegistry> {
        self.model.iter_mut().map(|m| m.hooks()).collect()
    }
    fn generate(&mut self, obs: &mut dyn Observer) -> Result<Tensor> {
        let model = self.model.as_ref().ok_or_else(|| {
            Error::msg(format!(
                "{}: the transformer was released after the last generation (release_models): build the pipeline again to generate",
                S::Model::FAMILY
            ))
        })?;
        let plan = self.steps.plan();
        let mut den = self.common.start(&plan, obs)?;
        self.steps.run(model, &mut den)
    }
    /// Frees the transformer before the decode.
    fn release_models(&mut self) {
        self.model = None;
    }
    fn finish(&mut self, latents: &Tensor) -> Result<Option<Decoded>> {
        self.steps.finish(latents, &mut self.common.stages)
    }
}

/// The scopes of a flow-matching generation on `schedule`: `cond`, and `uncond` with
/// classifier-free guidance run as a second call (`branches` overrides both, e.g. one batched call).
pub fn flow_plan(
    family: &str,
    scheduler: &str,
    schedule: &FlowSchedule,
    branches: &[Branch],
) -> GenerationPlan {
    let steps = schedule.steps();
    // One sigma per step (the sampler refuses a schedule without its final one).
    let sigmas: Vec<f64> = schedule
        .sigmas
        .iter()
        .take(steps)
        .map(|&s| s as f64)
        .collect();
    GenerationPlan::from_steps(&StepsSpec {
        family,
        scheduler,
        sigmas: &sigmas,
        branches,
        ..Default::default()
    })
}

/// `[cond]`, or `[cond, uncond]` with classifier-free guidance as a second call.
pub fn cfg_branches(cfg: bool) -> &'static [Branch] {
    if cfg {
        &[Branch::Cond, Branch::Uncond]
    } else {
        &[Branch::Cond]
    }
}

/// One step's prediction at step `i` (time `t`): the `cond` call on `ctx`, and with a `negative`
/// context also the `uncond` call, the two combined by `guide(cond, uncond)`.
pub fn guided_call(
    den: &mut Denoiser<'_>,
    (i, t): (usize, f64),
    ctx: &Tensor,
    negative: Option<&Tensor>,
    call: impl Fn(&Tensor, &CallCx<'_>) -> Result<Tensor>,
    guide: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let v = den.call(i, 0, Branch::Cond, t, |cx| call(ctx, cx))?;
    match negative {
        Some(neg) => {
            let vu = den.call(i, 0, Branch::Uncond, t, |cx| call(neg, cx))?;
            guide(&v, &vu)
        }
        None => Ok(v),
    }
}

/// `[b]` copies of `v` (a call's time or embedded guidance for every batch item).
pub fn per_item(v: f32, b: usize, dev: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(vec![v; b], b, dev)?)
}

/// Flow-matching Euler over `schedule` from `latents`: each step's velocity from
/// `velocity(den, i, timestep, lat)`, then `lat + v * dt` reported to `den`; the final latents.
pub fn euler_loop(
    den: &mut Denoiser<'_>,
    schedule: &FlowSchedule,
    latents: Tensor,
    mut velocity: impl FnMut(&mut Denoiser<'_>, usize, f32, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    schedule.check_lengths()?;
    let mut lat = latents;
    for (i, &t) in schedule.timesteps.iter().enumerate() {
        let v = velocity(den, i, t, &lat)?;
        lat = (&lat + (v * schedule.dt(i) as f64)?)?;
        den.step_done(i, &lat)?;
    }
    Ok(lat)
}
