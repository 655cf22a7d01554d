//! The FLUX denoising loop: Euler with dynamic shift, embedded guidance, one cache scope.

use candle_core::Tensor;
use magcache_core::denoise::Observer;
use magcache_core::PipelineCommon;
use magcache_core::{Branch, GenerationPlan, Pipeline, Result, StepsSpec};
use magcache_layers::scheduler::FlowSchedule;

use super::inputs::FluxInputs;
use super::model::FluxModel;
use super::prompted;

pub struct FluxPipeline {
    /// The transformer; `None` after [`Pipeline::release_models`] (a later generation is refused).
    pub model: Option<FluxModel>,
    pub schedule: FlowSchedule,
    pub guidance: f64,
    pub inputs: FluxInputs,
    /// Description, model info, the build's warnings and the cache.
    pub common: PipelineCommon,
    /// Prompted runs (`[prompt]`): the pipeline folder and encoded prompt, decoded in `finish`.
    pub prompted: Option<prompted::Prompted>,
}

impl Pipeline for FluxPipeline {
    fn common(&self) -> Option<&PipelineCommon> {
        Some(&self.common)
    }
    fn common_mut(&mut self) -> Option<&mut PipelineCommon> {
        Some(&mut self.common)
    }
    fn plan(&self) -> GenerationPlan {
        flux_plan(&self.schedule)
    }
    /// Packed `[B, h*w, C]` -> `[B*C, h, w]` on the grid of `img_ids`.
    fn to_planes(&self, latents: &Tensor) -> Result<Tensor> {
        magcache_layers::autoencoder_kl::packed_to_planes(latents, &self.inputs.img_ids)
    }

    fn hook_registries(&mut self) -> Vec<&mut magcache_core::HookRegistry> {
        self.model.iter_mut().map(|m| &mut m.blocks.hooks).collect()
    }

    fn generate(&mut self, obs: &mut dyn Observer) -> Result<Tensor> {
        let model = self.model.as_ref().ok_or_else(|| {
            magcache_core::Error::msg(
                "flux: the transformer was released after the last generation (release_models): build the pipeline again to generate",
            )
        })?;
        let plan = self.plan();
        let mut den = self.common.start(&plan, obs)?;
        let b = self.inputs.latents.dim(0)?;
        let dev = self.inputs.latents.device();
        let g = model
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
                model.forward(
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

    /// Frees the transformer before the VAE decode (FLUX.1-dev's 24 GB in bf16).
    fn release_models(&mut self) {
        self.model = None;
    }

    fn finish(&mut self, latents: &Tensor) -> Result<Option<magcache_core::Decoded>> {
        match &mut self.prompted {
            Some(p) => prompted::finish(p, latents).map(Some),
            None => Ok(None),
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
