//! The FLUX.2 klein denoising loop: flow-matching Euler on FLUX.2's schedule; distilled folders
//! one transformer call per step (`cond`), base folders classifier-free guidance (`cond` then
//! `uncond`, each its own cache scope).

pub use super::inputs::Flux2Inputs;
use super::model::Flux2Model;
use super::prompted;
use candle_core::Tensor;
use magcache_core::denoise::Observer;
use magcache_core::PipelineCommon;
use magcache_core::{Branch, GenerationPlan, Pipeline, Result, StepsSpec};
use magcache_layers::scheduler::FlowSchedule;

pub struct Flux2Pipeline {
    /// The transformer; `None` after [`Pipeline::release_models`] (a later generation is refused).
    pub model: Option<Flux2Model>,
    pub schedule: FlowSchedule,
    /// `Some(scale)`: classifier-free guidance with the negative embeddings.
    pub cfg_scale: Option<f64>,
    /// The embedded guidance of models with a guidance embedder (FLUX.2-dev presets).
    pub guidance: f64,
    pub inputs: Flux2Inputs,
    /// Description, model info, the build's warnings and the cache.
    pub common: PipelineCommon,
    pub prompted: Option<prompted::Prompted>,
}

impl Pipeline for Flux2Pipeline {
    fn common(&self) -> Option<&PipelineCommon> {
        Some(&self.common)
    }
    fn common_mut(&mut self) -> Option<&mut PipelineCommon> {
        Some(&mut self.common)
    }
    fn plan(&self) -> GenerationPlan {
        flux2_plan(&self.schedule, self.cfg_scale.is_some())
    }
    fn to_planes(&self, latents: &Tensor) -> Result<Tensor> {
        magcache_layers::autoencoder_kl::packed_to_planes(latents, &self.inputs.img_ids)
    }
    fn hook_registries(&mut self) -> Vec<&mut magcache_core::HookRegistry> {
        self.model.iter_mut().map(|m| &mut m.blocks.hooks).collect()
    }

    fn generate(&mut self, obs: &mut dyn Observer) -> Result<Tensor> {
        let model = self.model.as_ref().ok_or_else(|| {
            magcache_core::Error::msg(
                "flux2: the transformer was released after the last generation (release_models): build the pipeline again to generate",
            )
        })?;
        let plan = self.plan();
        let mut den = self.common.start(&plan, obs)?;
        let inp = &self.inputs;
        let b = inp.latents.dim(0)?;
        let dev = inp.latents.device();
        let g = model
            .cfg
            .guidance_embeds
            .then(|| Tensor::from_vec(vec![self.guidance as f32; b], b, dev))
            .transpose()?;
        let mut lat = inp.latents.clone();
        for i in 0..self.schedule.steps() {
            let t = self.schedule.timesteps[i];
            let tt = Tensor::from_vec(vec![t / 1000.0; b], b, dev)?;
            let call = |ctx: &Tensor, lat: &Tensor, cx: &magcache_core::CallCx<'_>| {
                model.forward(lat, ctx, &tt, &inp.img_ids, &inp.txt_ids, g.as_ref(), cx)
            };
            let v = den.call(i, 0, Branch::Cond, t as f64, |cx| call(&inp.ctx, &lat, cx))?;
            let v = match (self.cfg_scale, &inp.neg_ctx) {
                (Some(s), Some(neg)) => {
                    let vu = den.call(i, 0, Branch::Uncond, t as f64, |cx| call(neg, &lat, cx))?;
                    (&vu + ((v - &vu)? * s)?)?
                }
                _ => v,
            };
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

/// The scopes of a FLUX.2 generation: `cond`, and `uncond` with classifier-free guidance.
pub fn flux2_plan(schedule: &FlowSchedule, cfg: bool) -> GenerationPlan {
    let steps = schedule.steps();
    let sigmas: Vec<f64> = schedule.sigmas[..steps].iter().map(|&s| s as f64).collect();
    let branches: &[Branch] = if cfg {
        &[Branch::Cond, Branch::Uncond]
    } else {
        &[Branch::Cond]
    };
    GenerationPlan::from_steps(&StepsSpec {
        family: "flux2",
        scheduler: "flow-euler, FLUX.2 empirical mu",
        sigmas: &sigmas,
        branches,
        ..Default::default()
    })
}
