//! The Qwen-Image denoising loop: flow-matching Euler on the dynamic shift (stretched to the
//! scheduler's terminal sigma), true classifier-free guidance with the cond prediction's per-token
//! norm kept (`cond` then `uncond`, each its own cache scope), and the one-frame VAE decode.

use super::model::QwenImageModel;
use candle_core::{Tensor, D};
use magcache_core::{Decoded, Denoiser, GenerationPlan, Placement, Result};
use magcache_layers::autoencoder_kl::unpack_latents;
use magcache_layers::autoencoder_kl_wan::WanVae;
use magcache_layers::generation::{
    cfg_branches, euler_loop, flow_plan, guided_call, per_item, Generation, Stages, Steps,
};
use magcache_layers::scheduler::FlowSchedule;
use magcache_layers::stage::decode_stage;
use std::path::PathBuf;

/// What a prompted run decodes with.
pub struct QwenImageDecode {
    pub root: PathBuf,
    pub placement: Placement,
    /// The picture's size (the latent grid times the VAE's factor).
    pub height: usize,
    pub width: usize,
}

/// A built Qwen-Image run.
pub type QwenImagePipeline = Generation<QwenImageSteps>;

/// The Qwen-Image loop's inputs.
pub struct QwenImageSteps {
    pub schedule: FlowSchedule,
    /// Packed latents `[B, h'w', 64]` on the patch grid `grid`.
    pub latents: Tensor,
    pub grid: (usize, usize),
    /// `[B, L, joint_attention_dim]`.
    pub ctx: Tensor,
    /// True CFG: the negative embeddings and `true_cfg_scale`.
    pub negative: Option<(Tensor, f64)>,
    pub decode: Option<QwenImageDecode>,
    /// The prompt's (and negative prompt's) embeddings, reported with the pixels.
    pub embeds: Vec<(String, Tensor)>,
}

/// The scopes of a Qwen-Image generation: `cond`, and `uncond` with true CFG.
pub fn qwenimage_plan(schedule: &FlowSchedule, cfg: bool) -> GenerationPlan {
    let scheduler = "flow-euler, dynamic shift to a terminal sigma";
    flow_plan("qwen-image", scheduler, schedule, cfg_branches(cfg))
}

/// `u + s (c - u)` rescaled per token to the norm of `c` (L2 over the channels).
pub fn true_cfg(cond: &Tensor, uncond: &Tensor, scale: f64) -> Result<Tensor> {
    let comb = (uncond + ((cond - uncond)? * scale)?)?;
    let norm = |t: &Tensor| -> Result<Tensor> { Ok(t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?) };
    Ok(comb.broadcast_mul(&(norm(cond)? / norm(&comb)?)?)?)
}

impl Steps for QwenImageSteps {
    type Model = QwenImageModel;
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

    fn run(&self, model: &QwenImageModel, den: &mut Denoiser<'_>) -> Result<Tensor> {
        let b = self.latents.dim(0)?;
        let (neg, s) = match &self.negative {
            Some((n, s)) => (Some(n), *s),
            None => (None, 1.0),
        };
        euler_loop(
            den,
            &self.schedule,
            self.latents.clone(),
            |den, i, ts, lat| {
                let tt = per_item(ts / 1000.0, b, lat.device())?;
                guided_call(
                    den,
                    (i, ts as f64),
                    &self.ctx,
                    neg,
                    |ctx, cx| model.forward(lat, ctx, &tt, self.grid, cx),
                    |c, u| true_cfg(c, u, s),
                )
            },
        )
    }

    fn finish(&mut self, latents: &Tensor, stages: &mut Stages) -> Result<Option<Decoded>> {
        let Some(d) = &self.decode else {
            return Ok(None);
        };
        let pixels = decode_stage(stages, &d.root.join("vae"), |dir| {
            let vae = WanVae::load(dir, &d.placement.device, d.placement.dtype)?;
            let f = vae.config.spatial_scale();
            let z = unpack_latents(latents, d.height, d.width, f)?.unsqueeze(2)?;
            vae.decode_latents(&z)?.squeeze(1).map_err(Into::into)
        })?;
        Ok(Some(magcache_core::Decoded {
            pixels,
            inputs: self.embeds.clone(),
        }))
    }
}
