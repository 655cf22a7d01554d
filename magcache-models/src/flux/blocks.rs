//! The blocks of `FluxTransformer2DModel`: its tensor names and per-block modulations over the
//! shared joint-attention blocks ([`magcache_layers::mmdit`]). Every linear layer has a bias; each block
//! computes its own shift/scale/gate chunks from the call's embedding.

use super::config::FluxConfig;
use candle_core::{Device, Tensor};
use magcache_core::Result;
use magcache_layers::dit::modulated_input;
use magcache_layers::mmdit::{
    chunks, Act, DoubleOrSingle, DoubleStream, FeedForward, JointAttention, SingleProjection,
    SingleStream,
};
use magcache_layers::nn::{LayerNorm, Linear, RmsNorm};
use magcache_layers::weights::WeightStore;

/// The linear layer `name` (`weight` `[out, inp]` and `bias`; see [`magcache_layers::nn::linear`]).
pub(crate) fn lin(w: &WeightStore, name: &str, out: usize, inp: usize) -> Result<Linear> {
    magcache_layers::nn::linear(w, name, out, inp)
}

/// What a FLUX block reads besides its two streams: the same for every block of a call.
pub(crate) struct BlockArgs<'a> {
    /// The timestep (and guidance, pooled text) embedding the modulations are computed from.
    pub(crate) temb: &'a Tensor,
    /// Rotary tables over the text-then-image sequence.
    pub(crate) cos: &'a Tensor,
    pub(crate) sin: &'a Tensor,
}

/// `{p}.net.0.proj` and `{p}.net.2`, GELU between (4 x the inner dimension wide).
fn feed_forward(w: &WeightStore, p: &str, d: usize) -> Result<FeedForward> {
    Ok(FeedForward {
        inp: lin(w, &format!("{p}.net.0.proj"), 4 * d, d)?,
        out: lin(w, &format!("{p}.net.2"), d, 4 * d)?,
        act: Act::Gelu,
    })
}

pub struct DoubleBlock {
    norm1: Linear,
    norm1_ctx: Linear,
    inner: DoubleStream,
}

impl DoubleBlock {
    pub(crate) fn load(w: &WeightStore, i: usize, c: &FluxConfig, dev: &Device) -> Result<Self> {
        let d = c.inner_dim();
        let hd = c.attention_head_dim;
        let p = format!("transformer_blocks.{i}");
        let a = format!("{p}.attn");
        let l = |n: &str| lin(w, n, d, d);
        let rms = |n: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(
                w.get_shape(&format!("{n}.weight"), &[hd])?,
                1e-6,
            ))
        };
        // Read in the checkpoint's order (the recorded names of `block_tensors` follow it).
        Ok(DoubleBlock {
            norm1: lin(w, &format!("{p}.norm1.linear"), 6 * d, d)?,
            norm1_ctx: lin(w, &format!("{p}.norm1_context.linear"), 6 * d, d)?,
            inner: DoubleStream {
                attn: JointAttention::load(&a, c.num_attention_heads, l, rms)?,
                ff: feed_forward(w, &format!("{p}.ff"), d)?,
                ff_context: feed_forward(w, &format!("{p}.ff_context"), d)?,
                ln: LayerNorm::new(d, 1e-6, None, dev)?,
            },
        })
    }

    /// The image stream after `norm1` (the modulated input, [`magcache_core::Indicator::ModulatedInput`]).
    pub(crate) fn norm1_out(&self, h: &Tensor, temb: &Tensor) -> Result<Tensor> {
        modulated_input(&self.norm1, &self.inner.ln, h, temb)
    }
}

pub struct SingleBlock {
    norm: Linear,
    inner: SingleStream,
}

impl SingleBlock {
    pub(crate) fn load(w: &WeightStore, i: usize, c: &FluxConfig, dev: &Device) -> Result<Self> {
        let d = c.inner_dim();
        let hd = c.attention_head_dim;
        let p = format!("single_transformer_blocks.{i}");
        let a = format!("{p}.attn");
        let norm = lin(w, &format!("{p}.norm.linear"), 3 * d, d)?;
        let (q, k, v) = (
            lin(w, &format!("{a}.to_q"), d, d)?,
            lin(w, &format!("{a}.to_k"), d, d)?,
            lin(w, &format!("{a}.to_v"), d, d)?,
        );
        let norm_q = RmsNorm::new(w.get_shape(&format!("{a}.norm_q.weight"), &[hd])?, 1e-6);
        let norm_k = RmsNorm::new(w.get_shape(&format!("{a}.norm_k.weight"), &[hd])?, 1e-6);
        let mlp = lin(w, &format!("{p}.proj_mlp"), 4 * d, d)?;
        Ok(SingleBlock {
            norm,
            inner: SingleStream {
                proj: SingleProjection::Separate { q, k, v, mlp },
                norm_q,
                norm_k,
                act: Act::Gelu,
                out: lin(w, &format!("{p}.proj_out"), d, 5 * d)?,
                ln: LayerNorm::new(d, 1e-6, None, dev)?,
                heads: c.num_attention_heads,
            },
        })
    }
}

/// A block of the FLUX.1 chain.
pub type AnyBlock = DoubleOrSingle<DoubleBlock, SingleBlock>;

impl BlockArgs<'_> {
    /// The (hidden, encoder) streams after block `b`, its modulation computed from `temb`.
    pub(crate) fn run(&self, b: &AnyBlock, h: &Tensor, e: &Tensor) -> Result<(Tensor, Tensor)> {
        let BlockArgs { temb, cos, sin } = self;
        match b {
            DoubleOrSingle::Double(b) => {
                let (m, mc) = (chunks(&b.norm1, temb, 6)?, chunks(&b.norm1_ctx, temb, 6)?);
                b.inner.forward(h, e, &m, &mc, cos, sin)
            }
            DoubleOrSingle::Single(b) => {
                b.inner.forward(h, e, &chunks(&b.norm, temb, 3)?, cos, sin)
            }
        }
    }
}
