//! What a FLUX.2 transformer call is given besides the latents it updates.

use candle_core::{Device, Tensor};
use magcache_core::Result;
use magcache_layers::dit::PackedInputs;

/// What the transformer is called with (besides the latents it updates).
pub struct Flux2Inputs {
    /// Packed latents, the prompt's embeddings and position ids (`[seq, 4]` and `[L, 4]`).
    pub packed: PackedInputs,
    /// The negative prompt's embeddings, with classifier-free guidance.
    pub neg_ctx: Option<Tensor>,
}

impl Flux2Inputs {
    pub fn to_device(self, dev: &Device) -> Result<Self> {
        Ok(Flux2Inputs {
            packed: self.packed.to_device(dev)?,
            neg_ctx: self.neg_ctx.map(|t| t.to_device(dev)).transpose()?,
        })
    }
}
