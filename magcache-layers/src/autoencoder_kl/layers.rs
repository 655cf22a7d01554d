//! The FLUX VAE's layers: convolution, GroupNorm, the ResNet and attention blocks, the mid block
//! and a resolution stage. Activations are f32 `[B, C, H, W]`.

use crate::nn::{attention, Linear};
use crate::vae_common::conv2d_f32;
use candle_core::{Module, Tensor};
use magcache_core::Result;

pub(super) struct Conv {
    /// `[O, C, k, k]` in the run's dtype (f32 for bf16 on the CPU).
    pub(super) w: Tensor,
    /// `[1, O, 1, 1]`, f32.
    pub(super) b: Tensor,
    pub(super) pad: usize,
    pub(super) stride: usize,
}

impl Conv {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d_f32(x, &self.w, &self.b, self.pad, self.stride)
    }
}

pub(super) struct Norm(pub(super) candle_nn::GroupNorm);

impl Norm {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward(x)?)
    }
}

/// `ResnetBlock2D` without time embedding: group norms and 2-D convolutions.
pub(super) type ResBlock = crate::vae_common::ResBlock<Norm, Conv>;

impl ResBlock {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, Norm::forward, Conv::forward)
    }
}

/// Single-head self-attention over the `H*W` positions (diffusers `Attention` with `group_norm`,
/// residual connection, rescale 1).
pub(super) struct AttnBlock {
    pub(super) norm: Norm,
    pub(super) q: Linear,
    pub(super) k: Linear,
    pub(super) v: Linear,
    pub(super) out: Linear,
}

impl AttnBlock {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let xn = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let head = |l: &Linear| -> Result<Tensor> { Ok(l.forward(&xn)?.unsqueeze(1)?) };
        let o = attention(&head(&self.q)?, &head(&self.k)?, &head(&self.v)?)?.squeeze(1)?;
        let o = self
            .out
            .forward(&o)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        Ok((o + x)?)
    }
}

pub(super) struct MidBlock {
    pub(super) res0: ResBlock,
    pub(super) attn: Option<AttnBlock>,
    pub(super) res1: ResBlock,
}

impl MidBlock {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.res0.forward(x)?;
        if let Some(a) = &self.attn {
            x = a.forward(&x)?;
        }
        self.res1.forward(&x)
    }
}

pub(super) struct Stage {
    pub(super) resnets: Vec<ResBlock>,
    /// Encoder: stride-2 conv after zero-padding (0, 1, 0, 1); decoder: nearest 2x then conv.
    pub(super) resample: Option<Conv>,
}
