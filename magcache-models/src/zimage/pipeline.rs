//! The Z-Image denoising loop: flow-matching Euler on the scheduler's shift, the transformer's
//! reversed time, and classifier-free guidance as one batched `[cond; uncond]` call per step (the
//! reference's), so one cache scope (`inference`) decides once per call.

use super::model::ZImageModel;
use candle_core::{DType, Tensor};
use magcache_core::{Branch, Decoded, Denoiser, GenerationPlan, Placement, Result};
use magcache_layers::autoencoder_kl::{FluxTiling, FluxVae};
use magcache_layers::generation::{euler_loop, flow_plan, per_item, Generation, Stages, Steps};
use magcache_layers::scheduler::FlowSchedule;
use magcache_layers::stage::decode_stage;
use std::path::PathBuf;

/// What a run decodes with: the pipeline folder's `vae/`, and the embeddings to report.
pub struct ZImageDecode {
    pub root: PathBuf,
    pub placement: Placement,
    pub tiling: Option<FluxTiling>,
}

/// A built Z-Image run.
pub type ZImagePipeline = Generation<ZImageSteps>;

/// The Z-Image loop's inputs.
pub struct ZImageSteps {
    pub schedule: FlowSchedule,
    /// The scheduler's static shift (for the plan's description).
    pub shift: f64,
    /// Initial latents `[B, C, h, w]` (unpacked).
    pub latents: Tensor,
    /// Each item's caption `[n, cap_feat_dim]` (the prompt's, one per latent).
    pub caps: Vec<Tensor>,
    /// With classifier-free guidance: the negative captions and the scale.
    pub negative: Option<(Vec<Tensor>, f64)>,
    /// Prompted runs: decoded in `finish`.
    pub decode: Option<ZImageDecode>,
}

/// The scopes of a Z-Image generation: one per step, `inference` (cond and uncond batched).
pub fn zimage_plan(schedule: &FlowSchedule, shift: f64) -> GenerationPlan {
    let scheduler = format!("flow-euler, static shift {shift}");
    flow_plan("z-image", &scheduler, schedule, &[Branch::Batched])
}

impl ZImageSteps {
    /// One step's velocity: the batched call, then the guidance `pos + g (pos - neg)`.
    fn velocity(
        &self,
        model: &ZImageModel,
        den: &mut Denoiser<'_>,
        i: usize,
        lat: &Tensor,
    ) -> Result<Tensor> {
        let ts = self.schedule.timesteps[i];
        let b = lat.dim(0)?;
        let (x, caps) = match &self.negative {
            Some((neg, _)) => (
                Tensor::cat(&[lat, lat], 0)?,
                [self.caps.clone(), neg.clone()].concat(),
            ),
            None => (lat.clone(), self.caps.clone()),
        };
        let n = x.dim(0)?;
        // The transformer's time runs the other way: 0 at pure noise.
        let t = (1000f32 - ts) / 1000f32;
        let tt = per_item(t, n, lat.device())?;
        let out = den.call(i, 0, Branch::Batched, ts as f64, |cx| {
            model.forward(&x, &caps, &tt, cx)
        })?;
        Ok(match &self.negative {
            Some((_, g)) => {
                let pos = out.narrow(0, 0, b)?;
                let neg = out.narrow(0, b, b)?;
                (&pos + ((&pos - neg)? * *g)?)?
            }
            None => out,
        })
    }
}

impl Steps for ZImageSteps {
    type Model = ZImageModel;
    fn plan(&self) -> GenerationPlan {
        zimage_plan(&self.schedule, self.shift)
    }
    /// `[B, C, h, w]` -> `[B*C, h, w]`.
    fn to_planes(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = latents.dims4()?;
        Ok(latents.reshape((b * c, h, w))?)
    }

    fn run(&self, model: &ZImageModel, den: &mut Denoiser<'_>) -> Result<Tensor> {
        let lat = self.latents.to_dtype(DType::F32)?;
        euler_loop(den, &self.schedule, lat, |den, i, _, lat| {
            // The model predicts minus the velocity: Euler on `-v`.
            Ok(self.velocity(model, den, i, lat)?.neg()?)
        })
    }

    fn finish(&mut self, latents: &Tensor, stages: &mut Stages) -> Result<Option<Decoded>> {
        let Some(d) = &self.decode else {
            return Ok(None);
        };
        let pixels = decode_stage(stages, &d.root.join("vae"), |dir| {
            let mut vae = FluxVae::load(dir, &d.placement.device, d.placement.dtype)?;
            vae.set_tiling(d.tiling)?;
            vae.decode_latents(latents)
        })?;
        let mut inputs = vec![("prompt_embeds".to_string(), self.caps[0].unsqueeze(0)?)];
        if let Some((neg, _)) = &self.negative {
            inputs.push(("negative_prompt_embeds".to_string(), neg[0].unsqueeze(0)?));
        }
        Ok(Some(magcache_core::Decoded { pixels, inputs }))
    }
}
