//! The FLUX denoising loop: Euler with dynamic shift, embedded guidance, one cache scope.

use candle_core::Tensor;
use magcache_core::{Branch, Decoded, Denoiser, GenerationPlan, Result};
use magcache_layers::generation::{cfg_branches, euler_loop, flow_plan, Generation, Stages, Steps};
use magcache_layers::scheduler::FlowSchedule;

use super::inputs::FluxInputs;
use super::model::FluxModel;
use super::prompted;

/// A built FLUX.1 run.
pub type FluxPipeline = Generation<FluxSteps>;

/// The FLUX.1 loop's inputs.
pub struct FluxSteps {
    pub schedule: FlowSchedule,
    pub guidance: f64,
    pub inputs: FluxInputs,
    /// Prompted runs (`[prompt]`): the pipeline folder and encoded prompt, decoded in `finish`.
    pub prompted: Option<prompted::Prompted>,
}

impl Steps for FluxSteps {
    type Model = FluxModel;
    fn plan(&self) -> GenerationPlan {
        flux_plan(&self.schedule)
    }
    /// Packed `[B, h*w, C]` -> `[B*C, h, w]` on the grid of `img_ids`.
    fn to_planes(&self, latents: &Tensor) -> Result<Tensor> {
        self.inputs.packed.to_planes(latents)
    }

    fn run(&self, model: &FluxModel, den: &mut Denoiser<'_>) -> Result<Tensor> {
        let (inp, pooled) = (&self.inputs.packed, &self.inputs.pooled);
        let g = inp.guidance(model.cfg.guidance_embeds, self.guidance)?;
        let start = inp.latents.clone();
        euler_loop(den, &self.schedule, start, |den, i, t, lat| {
            let tt = inp.timestep(t)?;
            let call = inp.call(lat, &inp.ctx, &tt, g.as_ref());
            den.call(i, 0, Branch::Cond, t as f64, |cx| {
                model.forward(&call, pooled, cx, None)
            })
        })
    }

    fn finish(&mut self, latents: &Tensor, stages: &mut Stages) -> Result<Option<Decoded>> {
        match &self.prompted {
            Some(p) => prompted::finish(p, latents, stages).map(Some),
            None => Ok(None),
        }
    }
}

/// The one scope of a FLUX generation (no CFG: guidance is embedded).
pub fn flux_plan(schedule: &FlowSchedule) -> GenerationPlan {
    flow_plan(
        "flux",
        "flow-euler, dynamic shift",
        schedule,
        cfg_branches(false),
    )
}
