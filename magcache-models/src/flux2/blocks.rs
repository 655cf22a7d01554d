//! The blocks of `Flux2Transformer2DModel`: its tensor names over the shared joint-attention
//! blocks ([`magcache_layers::mmdit`]), with SwiGLU feed-forwards and, in the single blocks, one fused
//! projection to q, k, v and the MLP input. No linear layer has a bias and no block has modulation
//! weights of its own: every block of a kind reads the same shift/scale/gate chunks
//! (`Modulations`), computed once per call.

use super::config::Flux2Config;
use candle_core::{Device, Tensor};
use magcache_core::Result;
use magcache_layers::mmdit::{
    Act, DoubleOrSingle, DoubleStream, FeedForward, JointAttention, SingleProjection, SingleStream,
};
use magcache_layers::nn::{linear_no_bias, LayerNorm, RmsNorm};
use magcache_layers::weights::WeightStore;

/// The shared modulations of one call: image and text streams of the double blocks (shift, scale,
/// gate of attention, then of the MLP) and the single blocks (shift, scale, gate).
pub(crate) struct Modulations {
    pub(crate) img: Vec<Tensor>,
    pub(crate) txt: Vec<Tensor>,
    pub(crate) single: Vec<Tensor>,
}

/// What a block reads besides its two streams: the same for every block of a call.
pub(crate) struct BlockArgs<'a> {
    pub(crate) mods: &'a Modulations,
    /// Rotary tables `[S, head_dim/2]` over the text-then-image sequence.
    pub(crate) cos: &'a Tensor,
    pub(crate) sin: &'a Tensor,
}

/// `{p}.linear_in` (twice `hidden` wide) and `{p}.linear_out`, SwiGLU between.
fn swiglu_ff(w: &WeightStore, p: &str, d: usize, hidden: usize) -> Result<FeedForward> {
    Ok(FeedForward {
        inp: linear_no_bias(w, &format!("{p}.linear_in"), 2 * hidden, d)?,
        out: linear_no_bias(w, &format!("{p}.linear_out"), d, hidden)?,
        act: Act::SwiGlu,
    })
}

fn rms(w: &WeightStore, name: &str, hd: usize, eps: f64) -> Result<RmsNorm> {
    Ok(RmsNorm::new(
        w.get_shape(&format!("{name}.weight"), &[hd])?,
        eps,
    ))
}

pub(crate) fn double(
    w: &WeightStore,
    i: usize,
    c: &Flux2Config,
    dev: &Device,
) -> Result<DoubleStream> {
    let d = c.inner_dim();
    let hd = c.attention_head_dim;
    let p = format!("transformer_blocks.{i}");
    let a = format!("{p}.attn");
    let l = |n: &str| linear_no_bias(w, n, d, d);
    let n = |n: &str| rms(w, n, hd, c.eps);
    Ok(DoubleStream {
        attn: JointAttention::load(&a, c.num_attention_heads, l, n)?,
        ff: swiglu_ff(w, &format!("{p}.ff"), d, c.mlp_hidden())?,
        ff_context: swiglu_ff(w, &format!("{p}.ff_context"), d, c.mlp_hidden())?,
        ln: LayerNorm::new(d, c.eps, None, dev)?,
    })
}

pub(crate) fn single(
    w: &WeightStore,
    i: usize,
    c: &Flux2Config,
    dev: &Device,
) -> Result<SingleStream> {
    let d = c.inner_dim();
    let mlp = c.mlp_hidden();
    let a = format!("single_transformer_blocks.{i}.attn");
    let qkv_mlp = linear_no_bias(w, &format!("{a}.to_qkv_mlp_proj"), 3 * d + 2 * mlp, d)?;
    Ok(SingleStream {
        proj: SingleProjection::Fused {
            qkv_mlp,
            mlp_width: 2 * mlp,
        },
        norm_q: rms(w, &format!("{a}.norm_q"), c.attention_head_dim, c.eps)?,
        norm_k: rms(w, &format!("{a}.norm_k"), c.attention_head_dim, c.eps)?,
        act: Act::SwiGlu,
        out: linear_no_bias(w, &format!("{a}.to_out"), d, d + mlp)?,
        ln: LayerNorm::new(d, c.eps, None, dev)?,
        heads: c.num_attention_heads,
    })
}

/// One block of the chain.
pub type AnyBlock = DoubleOrSingle<DoubleStream, SingleStream>;

impl BlockArgs<'_> {
    /// The (hidden, encoder) streams after block `b`, with the call's shared modulations.
    pub(crate) fn run(&self, b: &AnyBlock, h: &Tensor, e: &Tensor) -> Result<(Tensor, Tensor)> {
        let (m, cos, sin) = (self.mods, self.cos, self.sin);
        match b {
            DoubleOrSingle::Double(b) => b.forward(h, e, &m.img, &m.txt, cos, sin),
            DoubleOrSingle::Single(b) => b.forward(h, e, &m.single, cos, sin),
        }
    }
}
