//! The Qwen-Image denoising loop: flow-matching Euler on the dynamic shift (stretched to the
//! scheduler's terminal sigma), true classifier-free guidance with the cond prediction's per-token
//! norm kept (`cond` then `uncond`, each its own cache scope), and the one-frame VAE decode.

use super::model::QwenImageModel;
use candle_core::{Tensor, D};
use magcache_core::denoise::Observer;
use magcache_core::runtime::progress::Stage;
use magcache_core::PipelineCommon;
use magcache_core::{Branch, Error, GenerationPlan, Pipeline, Placement, Result, StepsSpec};
use magcache_layers::autoencoder_kl::unpack_latents;
use magcache_layers::autoencoder_kl_wan::WanVae;
use magcache_layers::scheduler::FlowSchedule;
use std::path::PathBuf;

/// What a prompted run decodes with.
pub struct QwenImageDecode {
    pub root: PathBuf,
    pub placement: Placement,
    /// The picture's size (the latent grid times the VAE's factor).
    pub height: usize,
    pub width: usize,
}

pub struct QwenImagePipeline {
    pub model: Option<QwenImageModel>,
    pub schedule: FlowSchedule,
    /// Packed latents `[B, h'w', 64]` on the patch grid `grid`.
    pub latents: Tensor,
    pub grid: (usize, usize),
    /// `[B, L, joint_attention_dim]`.
    pub ctx: Tensor,
    /// True CFG: the negative embeddings and `true_cfg_scale`.
    pub negative: Option<(Tensor, f64)>,
    /// Description, model info, warnings, stage times and the cache.
    pub common: PipelineCommon,
    pub decode: Option<QwenImageDecode>,
    /// The prompt's (and negative prompt's) embeddings, reported with the pixels.
    pub embeds: Vec<(String, Tensor)>,
}

/// The scopes of a Qwen-Image generation: `cond`, and `uncond` with true CFG.
pub fn qwenimage_plan(schedule: &FlowSchedule, cfg: bool) -> GenerationPlan {
    let steps = schedule.steps();
    let sigmas: Vec<f64> = schedule.sigmas[..steps].iter().map(|&s| s as f64).collect();
    let branches: &[Branch] = if cfg {
        &[Branch::Cond, Branch::Uncond]
    } else {
        &[Branch::Cond]
    };
    GenerationPlan::from_steps(&StepsSpec {
        family: "qwen-image",
        scheduler: "flow-euler, dynamic shift to a terminal sigma",
        sigmas: &sigmas,
        branches,
        ..Default::default()
    })
}

/// `u + s (c - u)` rescaled per token to the norm of `c` (L2 over the channels).
pub fn true_cfg(cond: &Tensor, uncond: &Tensor, scale: f64) -> Result<Tensor> {
    let comb = (uncond + ((cond - uncond)? * scale)?)?;
    let norm = |t: &Tensor| -> Result<Tensor> { Ok(t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?) };
    Ok(comb.broadcast_mul(&(norm(cond)? / norm(&comb)?)?)?)
}

impl Pipeline for QwenImagePipeline {
    fn common(&self) -> Option<&PipelineCommon> {
        Some(&self.common)
    }
    fn common_mut(&mut self) -> Option<&mut PipelineCommon> {
        Some(&mut self.common)
    }
    fn plan(&self) -> GenerationPlan {
        qwenimage_plan(&self.schedule, self.negative.is_some())
    }
    /// Packed `[B, h'w', 4C]` -> `[B*C, 2h', 2w']`.
    fn to_planes(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, _, pc) = latents.dims3()?;
        let (hp, wp) = self.grid;
        let u = unpack_latents(latents, hp * 16, wp * 16, 8)?;
        Ok(u.reshape((b * (pc / 4), 2 * hp, 2 * wp))?)
    }
    fn hook_registries(&mut self) -> Vec<&mut magcache_core::HookRegistry> {
        self.model.iter_mut().map(|m| &mut m.blocks.hooks).collect()
    }

    fn generate(&mut self, obs: &mut dyn Observer) -> Result<Tensor> {
        let model = self.model.as_ref().ok_or_else(|| {
            Error::msg("qwen-image: the transformer was released after the last generation (release_models): build the pipeline again to generate")
        })?;
        let plan = self.plan();
        let mut den = self.common.start(&plan, obs)?;
        let mut lat = self.latents.clone();
        let b = lat.dim(0)?;
        for i in 0..self.schedule.steps() {
            let ts = self.schedule.timesteps[i];
            let tt = Tensor::from_vec(vec![ts / 1000.0; b], b, lat.device())?;
            let call = |ctx: &Tensor, lat: &Tensor, cx: &magcache_core::CallCx<'_>| {
                model.forward(lat, ctx, &tt, self.grid, cx)
            };
            let v = den.call(i, 0, Branch::Cond, ts as f64, |cx| {
                call(&self.ctx, &lat, cx)
            })?;
            let v = match &self.negative {
                Some((neg, s)) => {
                    let vu = den.call(i, 0, Branch::Uncond, ts as f64, |cx| call(neg, &lat, cx))?;
                    true_cfg(&v, &vu, *s)?
                }
                None => v,
            };
            lat = (&lat + (v * self.schedule.dt(i) as f64)?)?;
            den.step_done(i, &lat)?;
        }
        Ok(lat)
    }

    fn release_models(&mut self) {
        self.model = None;
    }

    fn finish(&mut self, latents: &Tensor) -> Result<Option<magcache_core::Decoded>> {
        let Some(d) = &self.decode else {
            return Ok(None);
        };
        let stage = Stage::begin("decode");
        let vae_dir = d.root.join("vae");
        let vae = WanVae::load(&vae_dir, &d.placement.device, d.placement.dtype)?;
        let z =
            unpack_latents(latents, d.height, d.width, vae.config.spatial_scale())?.unsqueeze(2)?;
        let pixels = vae.decode_latents(&z)?.squeeze(1)?;
        drop(vae);
        magcache_layers::stage::check_stage(
            &pixels,
            "the VAE decode",
            &format!("the decoded pixels (from {})", vae_dir.display()),
        )?;
        self.common.stages.push(stage.end());
        Ok(Some(magcache_core::Decoded {
            pixels,
            inputs: self.embeds.clone(),
        }))
    }
}
