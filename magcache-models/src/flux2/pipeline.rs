//! The FLUX.2 klein denoising loop: flow-matching Euler on FLUX.2's schedule; distilled folders
//! one transformer call per step (`cond`), base folders classifier-free guidance (`cond` then
//! `uncond`, each its own cache scope).

pub use super::inputs::Flux2Inputs;
use super::model::Flux2Model;
use super::prompted;
use candle_core::Tensor;
use magcache_core::{CallCx, Decoded, Denoiser, GenerationPlan, Result};
use magcache_layers::generation::{
    cfg_branches, euler_loop, flow_plan, guided_call, Generation, Stages, Steps,
};
use magcache_layers::scheduler::FlowSchedule;

/// A built FLUX.2 run.
pub type Flux2Pipeline = Generation<Flux2Steps>;

/// The FLUX.2 loop's inputs.
pub struct Flux2Steps {
    pub schedule: FlowSchedule,
    /// `Some(scale)`: classifier-free guidance with the negative embeddings.
    pub cfg_scale: Option<f64>,
    /// The embedded guidance of models with a guidance embedder (FLUX.2-dev presets).
    pub guidance: f64,
    pub inputs: Flux2Inputs,
    pub prompted: Option<prompted::Prompted>,
}

impl Steps for Flux2Steps {
    type Model = Flux2Model;
    fn plan(&self) -> GenerationPlan {
        flux2_plan(&self.schedule, self.cfg_scale.is_some())
    }
    fn to_planes(&self, latents: &Tensor) -> Result<Tensor> {
        self.inputs.packed.to_planes(latents)
    }

    fn run(&self, model: &Flux2Model, den: &mut Denoiser<'_>) -> Result<Tensor> {
        let inp = &self.inputs.packed;
        let g = inp.guidance(model.cfg.guidance_embeds, self.guidance)?;
        let (neg, s) = match (self.cfg_scale, &self.inputs.neg_ctx) {
            (Some(s), Some(neg)) => (Some(neg), s),
            _ => (None, 1.0),
        };
        euler_loop(
            den,
            &self.schedule,
            inp.latents.clone(),
            |den, i, t, lat| {
                let tt = inp.timestep(t)?;
                let forward = |ctx: &Tensor, cx: &CallCx<'_>| {
                    model.forward(&inp.call(lat, ctx, &tt, g.as_ref()), cx, None)
                };
                let guide = |v: &Tensor, vu: &Tensor| Ok((vu + ((v - vu)? * s)?)?);
                guided_call(den, (i, t as f64), &inp.ctx, neg, forward, guide)
            },
        )
    }

    fn finish(&mut self, latents: &Tensor, stages: &mut Stages) -> Result<Option<Decoded>> {
        match &self.prompted {
            Some(p) => prompted::finish(p, latents, stages).map(Some),
            None => Ok(None),
        }
    }
}

/// The scopes of a FLUX.2 generation: `cond`, and `uncond` with classifier-free guidance.
pub fn flux2_plan(schedule: &FlowSchedule, cfg: bool) -> GenerationPlan {
    let scheduler = "flow-euler, FLUX.2 empirical mu";
    flow_plan("flux2", scheduler, schedule, cfg_branches(cfg))
}
