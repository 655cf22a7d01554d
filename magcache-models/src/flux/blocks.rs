//! The blocks of `FluxTransformer2DModel`: double-stream (joint attention over `[text, image]`)
//! and single-stream, with the projections and modulations they share.

use super::config::FluxConfig;
use crate::nn::{attention, gelu, LayerNorm, Linear, RmsNorm};
use crate::weights::WeightStore;
use candle_core::{Device, Tensor, D};
use magcache_core::Result;

/// The linear layer `name` (`weight` `[out, inp]` and `bias`; see [`crate::nn::linear`]).
pub(crate) fn lin(w: &WeightStore, name: &str, out: usize, inp: usize) -> Result<Linear> {
    crate::nn::linear(w, name, out, inp)
}

/// `[B, S, H*D]` -> `[B, S, H, D]` RMS-normed per head -> `[B, H, S, D]`.
pub(crate) fn heads_normed(x: &Tensor, heads: usize, norm: &RmsNorm) -> Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    let x = norm.forward(&x.reshape((b, s, heads, hd / heads))?)?;
    Ok(x.transpose(1, 2)?.contiguous()?)
}

pub(crate) fn heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    Ok(x.reshape((b, s, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

pub(crate) fn merge(x: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, s, h * d))?)
}

pub(crate) fn rope(q: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::rotary_emb::rope_i(q, cos, sin)?)
}

/// `chunks` equal parts of the modulation linear's output, each `[B, 1, d]`.
pub(crate) fn modulation(lin: &Linear, temb: &Tensor, chunks: usize) -> Result<Vec<Tensor>> {
    let m = lin.forward(&temb.silu()?)?; // [B, chunks*d]
    let d = m.dim(D::Minus1)? / chunks;
    (0..chunks)
        .map(|i| Ok(m.narrow(1, i * d, d)?.unsqueeze(1)?))
        .collect()
}

pub(crate) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)?)
}

pub(crate) struct Ff {
    pub(crate) a: Linear,
    pub(crate) b: Linear,
}

impl Ff {
    pub(crate) fn load(w: &WeightStore, p: &str, d: usize) -> Result<Self> {
        Ok(Ff {
            a: lin(w, &format!("{p}.net.0.proj"), 4 * d, d)?,
            b: lin(w, &format!("{p}.net.2"), d, 4 * d)?,
        })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.b.forward(&gelu(&self.a.forward(x)?)?)
    }
}

/// A double block's `norm1` applied to the image stream: layer norm, then shift and scale from the
/// block's modulation of `temb`.
pub(crate) fn modulated_input(
    norm1: &Linear,
    ln: &LayerNorm,
    h: &Tensor,
    temb: &Tensor,
) -> Result<Tensor> {
    let m = modulation(norm1, temb, 6)?;
    modulate(&ln.forward(h)?, &m[0], &m[1])
}

/// What a FLUX block reads besides its two streams: the same for every block of a call.
pub(crate) struct BlockArgs<'a> {
    /// The timestep (and guidance, pooled text) embedding the modulations are computed from.
    pub(crate) temb: &'a Tensor,
    /// Rotary tables over the text-then-image sequence.
    pub(crate) cos: &'a Tensor,
    pub(crate) sin: &'a Tensor,
}

pub(crate) struct DoubleBlock {
    pub(crate) norm1: Linear,
    pub(crate) norm1_ctx: Linear,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) aq: Linear,
    pub(crate) ak: Linear,
    pub(crate) av: Linear,
    pub(crate) nq: RmsNorm,
    pub(crate) nk: RmsNorm,
    pub(crate) naq: RmsNorm,
    pub(crate) nak: RmsNorm,
    pub(crate) out: Linear,
    pub(crate) add_out: Linear,
    pub(crate) ff: Ff,
    pub(crate) ff_ctx: Ff,
    pub(crate) ln: LayerNorm,
    pub(crate) heads: usize,
}

impl DoubleBlock {
    pub(crate) fn load(w: &WeightStore, i: usize, c: &FluxConfig, dev: &Device) -> Result<Self> {
        let d = c.inner_dim();
        let hd = c.attention_head_dim;
        let p = format!("transformer_blocks.{i}");
        let a = format!("{p}.attn");
        let rms = |n: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(
                w.get_shape(&format!("{a}.{n}.weight"), &[hd])?,
                1e-6,
            ))
        };
        Ok(DoubleBlock {
            norm1: lin(w, &format!("{p}.norm1.linear"), 6 * d, d)?,
            norm1_ctx: lin(w, &format!("{p}.norm1_context.linear"), 6 * d, d)?,
            q: lin(w, &format!("{a}.to_q"), d, d)?,
            k: lin(w, &format!("{a}.to_k"), d, d)?,
            v: lin(w, &format!("{a}.to_v"), d, d)?,
            aq: lin(w, &format!("{a}.add_q_proj"), d, d)?,
            ak: lin(w, &format!("{a}.add_k_proj"), d, d)?,
            av: lin(w, &format!("{a}.add_v_proj"), d, d)?,
            nq: rms("norm_q")?,
            nk: rms("norm_k")?,
            naq: rms("norm_added_q")?,
            nak: rms("norm_added_k")?,
            out: lin(w, &format!("{a}.to_out.0"), d, d)?,
            add_out: lin(w, &format!("{a}.to_add_out"), d, d)?,
            ff: Ff::load(w, &format!("{p}.ff"), d)?,
            ff_ctx: Ff::load(w, &format!("{p}.ff_context"), d)?,
            ln: LayerNorm::new(d, 1e-6, None, dev)?,
            heads: c.num_attention_heads,
        })
    }

    /// The image stream after `norm1` (the modulated input, [`Indicator::ModulatedInput`]).
    pub(crate) fn norm1_out(&self, h: &Tensor, temb: &Tensor) -> Result<Tensor> {
        modulated_input(&self.norm1, &self.ln, h, temb)
    }

    /// The (hidden, encoder) streams after the block.
    pub(crate) fn forward(
        &self,
        h: &Tensor,
        e: &Tensor,
        args: &BlockArgs<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let BlockArgs { temb, cos, sin } = args;
        let m = modulation(&self.norm1, temb, 6)?;
        let mc = modulation(&self.norm1_ctx, temb, 6)?;
        let nh = modulate(&self.ln.forward(h)?, &m[0], &m[1])?;
        let ne = modulate(&self.ln.forward(e)?, &mc[0], &mc[1])?;
        let q = Tensor::cat(
            &[
                heads_normed(&self.aq.forward(&ne)?, self.heads, &self.naq)?,
                heads_normed(&self.q.forward(&nh)?, self.heads, &self.nq)?,
            ],
            2,
        )?;
        let k = Tensor::cat(
            &[
                heads_normed(&self.ak.forward(&ne)?, self.heads, &self.nak)?,
                heads_normed(&self.k.forward(&nh)?, self.heads, &self.nk)?,
            ],
            2,
        )?;
        let v = Tensor::cat(
            &[
                heads(&self.av.forward(&ne)?, self.heads)?,
                heads(&self.v.forward(&nh)?, self.heads)?,
            ],
            2,
        )?;
        let o = merge(&attention(&rope(&q, cos, sin)?, &rope(&k, cos, sin)?, &v)?)?;
        let lt = e.dim(1)?;
        let li = h.dim(1)?;
        let attn_e = self.add_out.forward(&o.narrow(1, 0, lt)?)?;
        let attn_h = self.out.forward(&o.narrow(1, lt, li)?)?;

        let h = (h + attn_h.broadcast_mul(&m[2])?)?;
        let x = modulate(&self.ln.forward(&h)?, &m[3], &m[4])?;
        let h = (&h + self.ff.forward(&x)?.broadcast_mul(&m[5])?)?;

        let e = (e + attn_e.broadcast_mul(&mc[2])?)?;
        let x = modulate(&self.ln.forward(&e)?, &mc[3], &mc[4])?;
        let e = (&e + self.ff_ctx.forward(&x)?.broadcast_mul(&mc[5])?)?;
        Ok((h, e))
    }
}

pub(crate) struct SingleBlock {
    pub(crate) norm: Linear,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) nq: RmsNorm,
    pub(crate) nk: RmsNorm,
    pub(crate) mlp: Linear,
    pub(crate) out: Linear,
    pub(crate) ln: LayerNorm,
    pub(crate) heads: usize,
}

impl SingleBlock {
    pub(crate) fn load(w: &WeightStore, i: usize, c: &FluxConfig, dev: &Device) -> Result<Self> {
        let d = c.inner_dim();
        let hd = c.attention_head_dim;
        let p = format!("single_transformer_blocks.{i}");
        let a = format!("{p}.attn");
        Ok(SingleBlock {
            norm: lin(w, &format!("{p}.norm.linear"), 3 * d, d)?,
            q: lin(w, &format!("{a}.to_q"), d, d)?,
            k: lin(w, &format!("{a}.to_k"), d, d)?,
            v: lin(w, &format!("{a}.to_v"), d, d)?,
            nq: RmsNorm::new(w.get_shape(&format!("{a}.norm_q.weight"), &[hd])?, 1e-6),
            nk: RmsNorm::new(w.get_shape(&format!("{a}.norm_k.weight"), &[hd])?, 1e-6),
            mlp: lin(w, &format!("{p}.proj_mlp"), 4 * d, d)?,
            out: lin(w, &format!("{p}.proj_out"), d, 5 * d)?,
            ln: LayerNorm::new(d, 1e-6, None, dev)?,
            heads: c.num_attention_heads,
        })
    }

    /// The (hidden, encoder) streams after the block: concatenated (text first), updated, split.
    pub(crate) fn forward(
        &self,
        h: &Tensor,
        e: &Tensor,
        args: &BlockArgs<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let BlockArgs { temb, cos, sin } = args;
        let lt = e.dim(1)?;
        let li = h.dim(1)?;
        let x = Tensor::cat(&[e, h], 1)?;
        let m = modulation(&self.norm, temb, 3)?;
        let nx = modulate(&self.ln.forward(&x)?, &m[0], &m[1])?;
        let mlp = gelu(&self.mlp.forward(&nx)?)?;
        let q = rope(
            &heads_normed(&self.q.forward(&nx)?, self.heads, &self.nq)?,
            cos,
            sin,
        )?;
        let k = rope(
            &heads_normed(&self.k.forward(&nx)?, self.heads, &self.nk)?,
            cos,
            sin,
        )?;
        let v = heads(&self.v.forward(&nx)?, self.heads)?;
        let a = merge(&attention(&q, &k, &v)?)?;
        let y = self
            .out
            .forward(&Tensor::cat(&[a, mlp], 2)?)?
            .broadcast_mul(&m[2])?;
        let x = (x + y)?;
        Ok((x.narrow(1, lt, li)?, x.narrow(1, 0, lt)?))
    }
}

/// One block of the chain.
// One value per block of the chain, built once and never moved in a loop: the variants' sizes do
// not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum AnyBlock {
    Double(DoubleBlock),
    Single(SingleBlock),
}

impl AnyBlock {
    /// Chain block `i`: double block `i`, or single block `i - num_layers`.
    pub(crate) fn load(w: &WeightStore, i: usize, c: &FluxConfig, dev: &Device) -> Result<Self> {
        if i < c.num_layers {
            Ok(AnyBlock::Double(DoubleBlock::load(w, i, c, dev)?))
        } else {
            Ok(AnyBlock::Single(SingleBlock::load(
                w,
                i - c.num_layers,
                c,
                dev,
            )?))
        }
    }

    pub(crate) fn forward(
        &self,
        h: &Tensor,
        e: &Tensor,
        args: &BlockArgs<'_>,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            AnyBlock::Double(b) => b.forward(h, e, args),
            AnyBlock::Single(b) => b.forward(h, e, args),
        }
    }
}
