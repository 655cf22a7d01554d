//! The joint-attention blocks FLUX.1 and FLUX.2 share (and other MMDiT families can): a
//! double-stream block (image and text streams with their own projections, one attention over
//! `[text, image]`, gated residuals and feed-forwards) and a single-stream block (the streams fused,
//! text first, one attention and MLP, split again at the text length).
//!
//! The blocks here are their maths only. Each family writes its own `load` (its tensor names, bias
//! or not, its norms' epsilon) and computes the modulation chunks (shift, scale, gate) its way:
//! FLUX.1 from each block's own `norm1` linear, FLUX.2 once per call, shared by every block.

use crate::nn::{
    attention_as, gelu, heads_normed, merge_heads, modulate, split_heads, LayerNorm, Linear,
    RmsNorm,
};
use candle_core::{Tensor, D};
use magcache_core::Result;

/// Interleaved rotary embedding (`rope_i`) of `[B, H, S, D]` with tables `[S, D/2]` or `[B, S, D/2]`.
pub fn rope(q: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    crate::nn::rope_i(q, cos, sin)
}

/// `n` equal parts of `lin(silu(temb))`, each `[B, 1, d]`: a modulation's shift, scale and gate
/// chunks.
pub fn chunks(lin: &Linear, temb: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let m = lin.forward(&temb.silu()?)?;
    let width = m.dim(D::Minus1)?;
    if n == 0 || !width.is_multiple_of(n) {
        return Err(magcache_core::Error::msg(format!(
            "modulation: {width} values cannot make {n} equal chunks"
        )));
    }
    let d = width / n;
    (0..n)
        .map(|i| Ok(m.narrow(1, i * d, d)?.unsqueeze(1)?))
        .collect()
}

/// An error unless a block that reads `n` modulation chunks got at least that many.
fn need_chunks(m: &[Tensor], n: usize, what: &str) -> Result<()> {
    if m.len() < n {
        return Err(magcache_core::Error::msg(format!(
            "{what}: {} modulation chunks given, {n} needed (shift, scale and gate of each part)",
            m.len()
        )));
    }
    Ok(())
}

/// `silu(a) * b` with `[a, b]` the two halves of the last dimension.
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    let h = x.dim(D::Minus1)? / 2;
    Ok((x.narrow(D::Minus1, 0, h)?.silu()? * x.narrow(D::Minus1, h, h)?)?)
}

/// The activation between a feed-forward's two projections.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    /// tanh-approximated GELU (FLUX.1).
    Gelu,
    /// SwiGLU: the first projection is twice as wide (FLUX.2).
    SwiGlu,
}

impl Act {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Act::Gelu => gelu(x),
            Act::SwiGlu => swiglu(x),
        }
    }
}

/// A feed-forward: `out(act(inp(x)))`.
pub struct FeedForward {
    pub inp: Linear,
    pub out: Linear,
    pub act: Act,
}

impl FeedForward {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.act {
            Act::Gelu => self.inp.forward_gelu_then(&self.out, x),
            Act::SwiGlu => self.out.forward(&swiglu(&self.inp.forward(x)?)?),
        }
    }
}

/// The projections of joint attention: the image stream's (`q`, `k`, `v`, `out`) and the text
/// stream's (`added_*`), with per-head RMS norms on the queries and keys.
pub struct JointAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub added_q: Linear,
    pub added_k: Linear,
    pub added_v: Linear,
    pub norm_q: RmsNorm,
    pub norm_k: RmsNorm,
    pub norm_added_q: RmsNorm,
    pub norm_added_k: RmsNorm,
    pub out: Linear,
    pub added_out: Linear,
    pub heads: usize,
}

impl JointAttention {
    /// The diffusers names under `{a}` (`to_q`, `add_q_proj`, `norm_added_q`, `to_out.0`,
    /// `to_add_out`, ...), read in that order; `lin(name)` reads a `d x d` projection and
    /// `rms(name)` a per-head RMS norm, the family's way (bias or not, epsilon).
    pub fn load(
        a: &str,
        heads: usize,
        lin: impl Fn(&str) -> Result<Linear>,
        rms: impl Fn(&str) -> Result<RmsNorm>,
    ) -> Result<Self> {
        let l = |n: &str| lin(&format!("{a}.{n}"));
        let n = |n: &str| rms(&format!("{a}.{n}"));
        Ok(JointAttention {
            q: l("to_q")?,
            k: l("to_k")?,
            v: l("to_v")?,
            added_q: l("add_q_proj")?,
            added_k: l("add_k_proj")?,
            added_v: l("add_v_proj")?,
            norm_q: n("norm_q")?,
            norm_k: n("norm_k")?,
            norm_added_q: n("norm_added_q")?,
            norm_added_k: n("norm_added_k")?,
            out: l("to_out.0")?,
            added_out: l("to_add_out")?,
            heads,
        })
    }

    /// Attention over `[text, image]` of the normed streams `nh` (image) and `ne` (text); returns
    /// the (image, text) outputs after their output projections.
    pub fn forward(
        &self,
        nh: &Tensor,
        ne: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let hs = self.heads;
        let normed = |p: &Linear, x: &Tensor, n: &RmsNorm| heads_normed(&p.forward(x)?, hs, n);
        let q = Tensor::cat(
            &[
                normed(&self.added_q, ne, &self.norm_added_q)?,
                normed(&self.q, nh, &self.norm_q)?,
            ],
            2,
        )?;
        let k = Tensor::cat(
            &[
                normed(&self.added_k, ne, &self.norm_added_k)?,
                normed(&self.k, nh, &self.norm_k)?,
            ],
            2,
        )?;
        let v = Tensor::cat(
            &[
                split_heads(&self.added_v.forward(ne)?, hs)?,
                split_heads(&self.v.forward(nh)?, hs)?,
            ],
            2,
        )?;
        let (q, k) = (rope(&q, cos, sin)?, rope(&k, cos, sin)?);
        let o = merge_heads(&attention_as(&q, &k, &v, self.q.runs_bf16())?)?;
        let (lt, li) = (ne.dim(1)?, nh.dim(1)?);
        let e = self.added_out.forward(&o.narrow(1, 0, lt)?)?;
        let h = self.out.forward(&o.narrow(1, lt, li)?)?;
        Ok((h, e))
    }
}

/// A double-stream block's weights besides its modulation.
pub struct DoubleStream {
    pub attn: JointAttention,
    pub ff: FeedForward,
    pub ff_context: FeedForward,
    /// The affine-free layer norm of both streams.
    pub ln: LayerNorm,
}

impl DoubleStream {
    /// The (image, text) streams after the block, with the image stream's six modulation chunks
    /// `m` (shift, scale, gate of the attention, then of the feed-forward) and the text stream's
    /// `mc`.
    pub fn forward(
        &self,
        h: &Tensor,
        e: &Tensor,
        m: &[Tensor],
        mc: &[Tensor],
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        need_chunks(m, 6, "double-stream block, image stream")?;
        need_chunks(mc, 6, "double-stream block, text stream")?;
        let nh = modulate(&self.ln.forward(h)?, &m[0], &m[1])?;
        let ne = modulate(&self.ln.forward(e)?, &mc[0], &mc[1])?;
        let (attn_h, attn_e) = self.attn.forward(&nh, &ne, cos, sin)?;
        let h = self.residuals(h, &attn_h, m, &self.ff)?;
        let e = self.residuals(e, &attn_e, mc, &self.ff_context)?;
        Ok((h, e))
    }

    /// One stream's gated attention residual, then its gated feed-forward residual.
    fn residuals(
        &self,
        x: &Tensor,
        attn: &Tensor,
        m: &[Tensor],
        ff: &FeedForward,
    ) -> Result<Tensor> {
        let x = (x + attn.broadcast_mul(&m[2])?)?;
        let y = modulate(&self.ln.forward(&x)?, &m[3], &m[4])?;
        Ok((&x + ff.forward(&y)?.broadcast_mul(&m[5])?)?)
    }
}

/// How a single-stream block projects its normed input to the queries, keys, values and the MLP's
/// input.
pub enum SingleProjection {
    /// Separate `to_q`, `to_k`, `to_v` and `proj_mlp` (FLUX.1).
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
        mlp: Linear,
    },
    /// One fused projection to `[q, k, v, mlp input]` of widths `d, d, d, mlp_width` (FLUX.2).
    Fused { qkv_mlp: Linear, mlp_width: usize },
}

/// A single-stream block's weights besides its modulation.
pub struct SingleStream {
    pub proj: SingleProjection,
    pub norm_q: RmsNorm,
    pub norm_k: RmsNorm,
    /// The MLP's activation (its output is concatenated with the attention's before `out`).
    pub act: Act,
    pub out: Linear,
    pub ln: LayerNorm,
    pub heads: usize,
}

impl SingleStream {
    /// The (image, text) streams after the block: concatenated (text first), updated with the
    /// modulation chunks `m` (shift, scale, gate), split again at the text length.
    pub fn forward(
        &self,
        h: &Tensor,
        e: &Tensor,
        m: &[Tensor],
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        need_chunks(m, 3, "single-stream block")?;
        let (lt, li) = (e.dim(1)?, h.dim(1)?);
        let x = Tensor::cat(&[e, h], 1)?;
        let nx = modulate(&self.ln.forward(&x)?, &m[0], &m[1])?;
        let (q, k, v, mlp) = match &self.proj {
            SingleProjection::Separate { q, k, v, mlp } => (
                q.forward(&nx)?,
                k.forward(&nx)?,
                v.forward(&nx)?,
                mlp.forward(&nx)?,
            ),
            SingleProjection::Fused { qkv_mlp, mlp_width } => {
                let p = qkv_mlp.forward(&nx)?;
                let d = p.dim(D::Minus1)?.saturating_sub(*mlp_width) / 3;
                let part = |i: usize, w: usize| p.narrow(D::Minus1, i * d, w);
                (part(0, d)?, part(1, d)?, part(2, d)?, part(3, *mlp_width)?)
            }
        };
        let q = rope(&heads_normed(&q, self.heads, &self.norm_q)?, cos, sin)?;
        let k = rope(&heads_normed(&k, self.heads, &self.norm_k)?, cos, sin)?;
        let bf16 = self.out.runs_bf16();
        let a = merge_heads(&attention_as(&q, &k, &split_heads(&v, self.heads)?, bf16)?)?;
        let mlp = self.act.apply(&mlp)?;
        let y = self
            .out
            .forward(&Tensor::cat(&[a, mlp], 2)?)?
            .broadcast_mul(&m[2])?;
        let x = (x + y)?;
        Ok((x.narrow(1, lt, li)?, x.narrow(1, 0, lt)?))
    }
}

/// A block of an MMDiT chain: the first blocks double-stream, the rest single-stream.
// One value per block of the chain, built once and never moved in a loop: the variants' sizes do
// not matter.
#[allow(clippy::large_enum_variant)]
pub enum DoubleOrSingle<D, S> {
    Double(D),
    Single(S),
}

impl<D, S> DoubleOrSingle<D, S> {
    /// Chain block `i` of a chain of `doubles` double blocks then single ones: `double(i)`, or
    /// `single(i - doubles)`.
    pub fn load(
        i: usize,
        doubles: usize,
        double: impl FnOnce(usize) -> Result<D>,
        single: impl FnOnce(usize) -> Result<S>,
    ) -> Result<Self> {
        Ok(match i.checked_sub(doubles) {
            None => DoubleOrSingle::Double(double(i)?),
            Some(j) => DoubleOrSingle::Single(single(j)?),
        })
    }
}

/// The chain of an MMDiT of `n.0` double-stream then `n.1` single-stream blocks, of `kinds`.
pub fn double_then_single(
    kinds: (magcache_core::BlockMetadata, magcache_core::BlockMetadata),
    n: (usize, usize),
) -> Vec<magcache_core::BlockMetadata> {
    magcache_core::BlockMetadata::chain(&[(kinds.0, n.0), (kinds.1, n.1)])
}

/// A FLUX-style transformer's `config.json` struct: the fields FLUX.1's and FLUX.2's released
/// configs share (`patch_size` through `joint_attention_dim` in diffusers' order, and
/// `axes_dims_rope`), then the family's own; with `inner_dim()`, `out_channels()` and the packing
/// check. The family derives what it needs.
#[macro_export]
macro_rules! packed_dit_config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)* }
    ) => {
        $(#[$meta])*
        pub struct $name {
            pub patch_size: usize,
            pub in_channels: usize,
            pub out_channels: Option<usize>,
            pub num_layers: usize,
            pub num_single_layers: usize,
            pub attention_head_dim: usize,
            pub num_attention_heads: usize,
            pub joint_attention_dim: usize,
            /// Rotary dimensions per position axis.
            pub axes_dims_rope: Vec<usize>,
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $name {
            /// Heads times head width.
            pub fn inner_dim(&self) -> usize {
                self.num_attention_heads.saturating_mul(self.attention_head_dim)
            }
            /// The packed output channels (`out_channels`, else `in_channels`).
            pub fn out_channels(&self) -> usize {
                self.out_channels.unwrap_or(self.in_channels)
            }
            /// `(double, single)` blocks of the chain.
            pub fn depths(&self) -> (usize, usize) {
                (self.num_layers, self.num_single_layers)
            }
            /// `N+M blocks, dim D, H heads`, for a run's description.
            pub fn sizes(&self) -> String {
                format!(
                    "{}+{} blocks, dim {}, {} heads",
                    self.num_layers,
                    self.num_single_layers,
                    self.inner_dim(),
                    self.num_attention_heads
                )
            }
            /// Patch 1 over 2x2-packed latents, and rotary axes that fill a head
            /// (`magcache_layers::config_util::check_packed_rope`).
            pub fn check_packing(&self, file: &str) -> magcache_core::Result<()> {
                $crate::config_util::check_packed_rope(
                    file,
                    self.patch_size,
                    &self.axes_dims_rope,
                    self.attention_head_dim,
                )
            }
        }
    };
}
