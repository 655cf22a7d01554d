//! The FLUX denoising loop: Euler with dynamic shift, embedded guidance, one cache scope.

use candle_core::Tensor;
use magcache_core::{Branch, Decoded, Denoiser, GenerationPlan, Result};
use magcache_layers::generation::{
    cfg_branches, euler_loop, flow_plan, per_item, Generation, Stages, Steps,
};
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
        magcache_layers::autoencoder_kl::packed_to_planes(latents, &self.inputs.img_ids)
    }

    fn run(&self, model: &FluxModel, den: &mut Denoiser<'_>) -> Result<Tensor> {
        let inp = &self.inputs;
        let (b, dev) = (inp.latents.dim(0)?, inp.latents.device());
        let g = model.cfg.guidance_embeds;
        let g = g
            .then(|| per_item(self.guidance as f32, b, dev))
            .transpose()?;
        euler_loop(
            den,
            &self.schedule,
            inp.latents.clone(),
            |den, i, t, lat| {
                let tt = per_item(t / 1000.0, b, dev)?;
                den.call(i, 0, Branch::Cond, t as f64, |cx| {
                    let (ids, g) = ((&inp.img_ids, &inp.txt_ids), g.as_ref());
                    model.forward(lat, &inp.ctx, &inp.pooled, &tt, ids.0, ids.1, g, cx)
                })
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

/// The one scope of a FLUX generation (no CFG: guidance is embedded).
pub fn flux_plan(schedule: &FlowSchedule) -> GenerationPlan {
    flow_plan(
        "flux",
        "flow-euler, dynamic shift",
        schedule,
        cfg_branches(false),
    )
}
