//! What a FLUX.2 transformer call is given besides the latents it updates.

use candle_core::{Device, Tensor};
use magcache_core::Result;

/// What the transformer is called with (besides the latents it updates).
pub struct Flux2Inputs {
    /// `[B, seq, in_channels]` packed initial latents.
    pub latents: Tensor,
    /// `[B, L, joint_attention_dim]` prompt embeddings.
    pub ctx: Tensor,
    /// The negative prompt's embeddings, with classifier-free guidance.
    pub neg_ctx: Option<Tensor>,
    /// `[seq, 4]` and `[L, 4]` position ids.
    pub img_ids: Tensor,
    pub txt_ids: Tensor,
}

impl Flux2Inputs {
    pub fn to_device(self, dev: &Device) -> Result<Self> {
        Ok(Flux2Inputs {
            latents: self.latents.to_device(dev)?,
            ctx: self.ctx.to_device(dev)?,
            neg_ctx: self.neg_ctx.map(|t| t.to_device(dev)).transpose()?,
            img_ids: self.img_ids.to_device(dev)?,
            txt_ids: self.txt_ids.to_device(dev)?,
        })
    }
}
