//! The blocks of `Flux2Transformer2DModel`: double-stream (joint attention over `[text, image]`,
//! SwiGLU feed-forwards) and single-stream (one fused projection to q, k, v and the MLP input). No
//! linear layer has a bias and no block has modulation weights of its own: every block of a kind
//! reads the same shift/scale/gate chunks (`Modulations`), computed once per call.

use super::config::Flux2Config;
use crate::flux::blocks::{heads, heads_normed, merge, rope};
use crate::nn::{attention, linear_no_bias, modulate, LayerNorm, Linear, RmsNorm};
use crate::weights::WeightStore;
use candle_core::{Device, Tensor, D};
use magcache_core::Result;

/// `chunks` equal parts of `lin(silu(temb))`, each `[B, 1, d]`.
pub(crate) fn chunks(lin: &Linear, temb: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let m = lin.forward(&temb.silu()?)?;
    let d = m.dim(D::Minus1)? / n;
    (0..n)
        .map(|i| Ok(m.narrow(1, i * d, d)?.unsqueeze(1)?))
        .collect()
}

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

/// `linear_out(silu(a) * b)` with `[a, b] = linear_in(x)`.
pub(crate) struct SwiGlu {
    lin_in: Linear,
    lin_out: Linear,
}

pub(crate) fn swiglu(x: &Tensor) -> Result<Tensor> {
    let h = x.dim(D::Minus1)? / 2;
    Ok((x.narrow(D::Minus1, 0, h)?.silu()? * x.narrow(D::Minus1, h, h)?)?)
}

impl SwiGlu {
    fn load(w: &WeightStore, p: &str, d: usize, hidden: usize) -> Result<Self> {
        Ok(SwiGlu {
            lin_in: linear_no_bias(w, &format!("{p}.linear_in"), 2 * hidden, d)?,
            lin_out: linear_no_bias(w, &format!("{p}.linear_out"), d, hidden)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.lin_out.forward(&swiglu(&self.lin_in.forward(x)?)?)
    }
}

fn rms(w: &WeightStore, name: &str, hd: usize, eps: f64) -> Result<RmsNorm> {
    Ok(RmsNorm::new(
        w.get_shape(&format!("{name}.weight"), &[hd])?,
        eps,
    ))
}

pub(crate) struct DoubleBlock {
    q: Linear,
    k: Linear,
    v: Linear,
    aq: Linear,
    ak: Linear,
    av: Linear,
    nq: RmsNorm,
    nk: RmsNorm,
    naq: RmsNorm,
    nak: RmsNorm,
    out: Linear,
    add_out: Linear,
    ff: SwiGlu,
    ff_ctx: SwiGlu,
    ln: LayerNorm,
    heads: usize,
}

impl DoubleBlock {
    pub(crate) fn load(w: &WeightStore, i: usize, c: &Flux2Config, dev: &Device) -> Result<Self> {
        let d = c.inner_dim();
        let hd = c.attention_head_dim;
        let p = format!("transformer_blocks.{i}");
        let a = format!("{p}.attn");
        let l = |n: &str| linear_no_bias(w, &format!("{a}.{n}"), d, d);
        let n = |n: &str| rms(w, &format!("{a}.{n}"), hd, c.eps);
        Ok(DoubleBlock {
            q: l("to_q")?,
            k: l("to_k")?,
            v: l("to_v")?,
            aq: l("add_q_proj")?,
            ak: l("add_k_proj")?,
            av: l("add_v_proj")?,
            nq: n("norm_q")?,
            nk: n("norm_k")?,
            naq: n("norm_added_q")?,
            nak: n("norm_added_k")?,
            out: l("to_out.0")?,
            add_out: l("to_add_out")?,
            ff: SwiGlu::load(w, &format!("{p}.ff"), d, c.mlp_hidden())?,
            ff_ctx: SwiGlu::load(w, &format!("{p}.ff_context"), d, c.mlp_hidden())?,
            ln: LayerNorm::new(d, c.eps, None, dev)?,
            heads: c.num_attention_heads,
        })
    }

    /// The (hidden, encoder) streams after the block.
    pub(crate) fn forward(
        &self,
        h: &Tensor,
        e: &Tensor,
        args: &BlockArgs<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let (m, mc) = (&args.mods.img, &args.mods.txt);
        let nh = modulate(&self.ln.forward(h)?, &m[0], &m[1])?;
        let ne = modulate(&self.ln.forward(e)?, &mc[0], &mc[1])?;
        let hs = self.heads;
        let q = Tensor::cat(
            &[
                heads_normed(&self.aq.forward(&ne)?, hs, &self.naq)?,
                heads_normed(&self.q.forward(&nh)?, hs, &self.nq)?,
            ],
            2,
        )?;
        let k = Tensor::cat(
            &[
                heads_normed(&self.ak.forward(&ne)?, hs, &self.nak)?,
                heads_normed(&self.k.forward(&nh)?, hs, &self.nk)?,
            ],
            2,
        )?;
        let v = Tensor::cat(
            &[
                heads(&self.av.forward(&ne)?, hs)?,
                heads(&self.v.forward(&nh)?, hs)?,
            ],
            2,
        )?;
        let (cos, sin) = (args.cos, args.sin);
        let o = merge(&attention(&rope(&q, cos, sin)?, &rope(&k, cos, sin)?, &v)?)?;
        let (lt, li) = (e.dim(1)?, h.dim(1)?);
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
    qkv_mlp: Linear,
    nq: RmsNorm,
    nk: RmsNorm,
    out: Linear,
    ln: LayerNorm,
    heads: usize,
    inner: usize,
    mlp: usize,
}

impl SingleBlock {
    pub(crate) fn load(w: &WeightStore, i: usize, c: &Flux2Config, dev: &Device) -> Result<Self> {
        let d = c.inner_dim();
        let mlp = c.mlp_hidden();
        let a = format!("single_transformer_blocks.{i}.attn");
        Ok(SingleBlock {
            qkv_mlp: linear_no_bias(w, &format!("{a}.to_qkv_mlp_proj"), 3 * d + 2 * mlp, d)?,
            nq: rms(w, &format!("{a}.norm_q"), c.attention_head_dim, c.eps)?,
            nk: rms(w, &format!("{a}.norm_k"), c.attention_head_dim, c.eps)?,
            out: linear_no_bias(w, &format!("{a}.to_out"), d, d + mlp)?,
            ln: LayerNorm::new(d, c.eps, None, dev)?,
            heads: c.num_attention_heads,
            inner: d,
            mlp,
        })
    }

    /// The (hidden, encoder) streams after the block: the fused `[text; image]` sequence updated
    /// and split again at the text length.
    pub(crate) fn forward(
        &self,
        h: &Tensor,
        e: &Tensor,
        args: &BlockArgs<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let (lt, li) = (e.dim(1)?, h.dim(1)?);
        let x = Tensor::cat(&[e, h], 1)?;
        let m = &args.mods.single;
        let nx = modulate(&self.ln.forward(&x)?, &m[0], &m[1])?;
        let p = self.qkv_mlp.forward(&nx)?;
        let d = self.inner;
        let q = heads_normed(&p.narrow(D::Minus1, 0, d)?, self.heads, &self.nq)?;
        let k = heads_normed(&p.narrow(D::Minus1, d, d)?, self.heads, &self.nk)?;
        let v = heads(&p.narrow(D::Minus1, 2 * d, d)?, self.heads)?;
        let (cos, sin) = (args.cos, args.sin);
        let a = merge(&attention(&rope(&q, cos, sin)?, &rope(&k, cos, sin)?, &v)?)?;
        let mlp = swiglu(&p.narrow(D::Minus1, 3 * d, 2 * self.mlp)?)?;
        let y = self
            .out
            .forward(&Tensor::cat(&[a, mlp], 2)?)?
            .broadcast_mul(&m[2])?;
        let x = (x + y)?;
        Ok((x.narrow(1, lt, li)?, x.narrow(1, 0, lt)?))
    }
}

/// One block of the chain.
// One value per block, built once and never moved in a loop: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum AnyBlock {
    Double(DoubleBlock),
    Single(SingleBlock),
}

impl AnyBlock {
    /// Chain block `i`: double block `i`, or single block `i - num_layers`.
    pub(crate) fn load(w: &WeightStore, i: usize, c: &Flux2Config, dev: &Device) -> Result<Self> {
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
