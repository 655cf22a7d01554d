//! `ZImageTransformerBlock`: RMS-normed single-stream attention and SwiGLU feed-forward, modulated
//! by the timestep (`noise_refiner`, `layers`) or not (`context_refiner`), and the rotary tables
//! and padding masks of its sequences.

use super::config::ZImageConfig;
use candle_core::{DType, Device, Tensor, D};
use magcache_core::{Error, Result};
use magcache_layers::mmdit::rope;
use magcache_layers::nn::{
    attention_as, heads_normed, linear, linear_no_bias, merge_heads, split_heads, Linear, RmsNorm,
};
use magcache_layers::weights::WeightStore;

/// One block: `adaLN_modulation.0` (modulated blocks only), `attention.{to_q,to_k,to_v,to_out.0,
/// norm_q,norm_k}`, `attention_norm{1,2}`, `ffn_norm{1,2}`, `feed_forward.{w1,w2,w3}`.
pub struct ZBlock {
    modulation: Option<Linear>,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    attn_norm1: RmsNorm,
    attn_norm2: RmsNorm,
    ffn_norm1: RmsNorm,
    ffn_norm2: RmsNorm,
    w1: Linear,
    w2: Linear,
    w3: Linear,
    heads: usize,
}

/// A sequence's rotary tables `[B, L, head_dim/2]` and, when its items have different lengths, the
/// additive key mask `[B, 1, 1, L]` (0 for real rows, -inf for the batch padding).
pub struct SeqRope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Option<Tensor>,
}

impl ZBlock {
    /// Loads block `prefix` (`layers.3`, `noise_refiner.0`, ...).
    pub fn load(w: &WeightStore, prefix: &str, c: &ZImageConfig, modulated: bool) -> Result<Self> {
        let (d, hd, f) = (c.dim, c.head_dim(), c.ffn_hidden());
        let norm = |name: &str, n: usize, eps: f64| -> Result<RmsNorm> {
            Ok(RmsNorm::new(
                w.get_shape(&format!("{prefix}.{name}.weight"), &[n])?,
                eps,
            ))
        };
        let lin =
            |name: &str, o: usize, i: usize| linear_no_bias(w, &format!("{prefix}.{name}"), o, i);
        let a = "attention";
        Ok(ZBlock {
            modulation: if modulated {
                Some(linear(
                    w,
                    &format!("{prefix}.adaLN_modulation.0"),
                    4 * d,
                    c.adaln_dim(),
                )?)
            } else {
                None
            },
            q: lin(&format!("{a}.to_q"), d, d)?,
            k: lin(&format!("{a}.to_k"), d, d)?,
            v: lin(&format!("{a}.to_v"), d, d)?,
            out: lin(&format!("{a}.to_out.0"), d, d)?,
            // diffusers' Attention builds its q/k norms with eps 1e-5 whatever `norm_eps` is.
            norm_q: norm(&format!("{a}.norm_q"), hd, 1e-5)?,
            norm_k: norm(&format!("{a}.norm_k"), hd, 1e-5)?,
            attn_norm1: norm("attention_norm1", d, c.norm_eps)?,
            attn_norm2: norm("attention_norm2", d, c.norm_eps)?,
            ffn_norm1: norm("ffn_norm1", d, c.norm_eps)?,
            ffn_norm2: norm("ffn_norm2", d, c.norm_eps)?,
            w1: lin("feed_forward.w1", f, d)?,
            w2: lin("feed_forward.w2", d, f)?,
            w3: lin("feed_forward.w3", f, d)?,
            heads: c.n_heads,
        })
    }

    fn attend(&self, x: &Tensor, r: &SeqRope) -> Result<Tensor> {
        let q = rope(
            &heads_normed(&self.q.forward(x)?, self.heads, &self.norm_q)?,
            &r.cos,
            &r.sin,
        )?;
        let k = rope(
            &heads_normed(&self.k.forward(x)?, self.heads, &self.norm_k)?,
            &r.cos,
            &r.sin,
        )?;
        let v = split_heads(&self.v.forward(x)?, self.heads)?;
        let o = match &r.mask {
            None => attention_as(&q, &k, &v, self.q.runs_bf16())?,
            Some(bias) => {
                let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
                let s = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(bias)?;
                magcache_layers::nn::softmax_last_dim(&s)?.matmul(&v)?
            }
        };
        self.out.forward(&merge_heads(&o)?)
    }

    fn ffn(&self, x: &Tensor) -> Result<Tensor> {
        let g = (self.w1.forward(x)?.silu()? * self.w3.forward(x)?)?;
        self.w2.forward(&g)
    }

    /// `x` `[B, L, dim]` (f32); `adaln` `[B, min(dim, 256)]` for modulated blocks.
    pub fn forward(&self, x: &Tensor, adaln: Option<&Tensor>, r: &SeqRope) -> Result<Tensor> {
        match (&self.modulation, adaln) {
            (Some(m), Some(c)) => {
                let d = x.dim(D::Minus1)?;
                let m = m.forward(c)?.unsqueeze(1)?;
                let part = |i: usize| m.narrow(2, i * d, d);
                let (scale_msa, gate_msa) = ((part(0)? + 1.0)?, part(1)?.tanh()?);
                let (scale_mlp, gate_mlp) = ((part(2)? + 1.0)?, part(3)?.tanh()?);
                let a = self.attend(&self.attn_norm1.forward(x)?.broadcast_mul(&scale_msa)?, r)?;
                let x = (x + self.attn_norm2.forward(&a)?.broadcast_mul(&gate_msa)?)?;
                let f = self.ffn(&self.ffn_norm1.forward(&x)?.broadcast_mul(&scale_mlp)?)?;
                Ok((&x + self.ffn_norm2.forward(&f)?.broadcast_mul(&gate_mlp)?)?)
            }
            (None, _) => {
                let a = self.attend(&self.attn_norm1.forward(x)?, r)?;
                let x = (x + self.attn_norm2.forward(&a)?)?;
                let f = self.ffn(&self.ffn_norm1.forward(&x)?)?;
                Ok((&x + self.ffn_norm2.forward(&f)?)?)
            }
            (Some(_), None) => Err(Error::msg(
                "internal: a modulated Z-Image block called without the timestep conditioning",
            )),
        }
    }
}

/// Each axis's RoPE frequencies: `freq_j = 1 / theta^(2j / d_a)` (f64), computed once per table.
fn rope_freqs(c: &ZImageConfig) -> Vec<Vec<f64>> {
    c.axes_dims
        .iter()
        .map(|&d| {
            (0..d / 2)
                .map(|j| 1.0 / c.rope_theta.powf((2 * j) as f64 / d as f64))
                .collect()
        })
        .collect()
}

/// Rotary factors of one position `(p0, p1, p2)`: per axis, the angle `p * freq_j` cast to f32, its
/// cosine and sine (f32).
fn rope_row(freqs: &[Vec<f64>], pos: [usize; 3], cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
    for (&p, fs) in pos.iter().zip(freqs) {
        for f in fs {
            let a = (p as f64 * f) as f32;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
}

/// Position ids outside the model's RoPE tables (`axes_lens`) are an error, as in the reference
/// (which indexes the tables), naming what is too long.
pub fn check_positions(c: &ZImageConfig, pos: &[[usize; 3]], what: &str) -> Result<()> {
    for p in pos {
        for (a, (&v, &len)) in p.iter().zip(&c.axes_lens).enumerate() {
            if v >= len {
                return Err(Error::msg(format!(
                    "Z-Image: {what} needs RoPE position {v} on axis {a}, but the transformer's axes_lens[{a}] is {len} (a shorter prompt, max_sequence_length or a smaller picture fits)"
                )));
            }
        }
    }
    Ok(())
}

/// The rotary tables and key mask of a batch of sequences given by their position ids (each item's
/// own length); items shorter than the longest are padded with zero factors (zeroing their queries
/// and keys, as the reference's zero-padded complex factors do) and masked as keys.
pub fn seq_rope(c: &ZImageConfig, items: &[Vec<[usize; 3]>], dev: &Device) -> Result<SeqRope> {
    let l = items.iter().map(Vec::len).max().unwrap_or(0);
    let half = c.head_dim() / 2;
    let freqs = rope_freqs(c);
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    let mut bias = Vec::with_capacity(items.len() * l);
    for it in items {
        for p in it {
            rope_row(&freqs, *p, &mut cos, &mut sin);
        }
        let pad = (l - it.len()) * half;
        cos.extend(std::iter::repeat_n(0f32, pad));
        sin.extend(std::iter::repeat_n(0f32, pad));
        bias.extend((0..l).map(|i| {
            if i < it.len() {
                0f32
            } else {
                f32::NEG_INFINITY
            }
        }));
    }
    let b = items.len();
    let mask = if items.iter().all(|it| it.len() == l) {
        None
    } else {
        Some(Tensor::from_vec(bias, (b, 1, 1, l), dev)?)
    };
    Ok(SeqRope {
        cos: Tensor::from_vec(cos, (b, l, half), dev)?,
        sin: Tensor::from_vec(sin, (b, l, half), dev)?,
        mask,
    })
}

/// Rows `[B, L_b, dim]` of different lengths -> `[B, max L, dim]`, zero-padded at the end.
pub fn pad_rows(items: &[Tensor]) -> Result<Tensor> {
    let l = items
        .iter()
        .map(|t| t.dim(0))
        .collect::<candle_core::Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    let rows = items
        .iter()
        .map(|t| {
            let n = t.dim(0)?;
            let t = if n < l {
                let z = Tensor::zeros((l - n, t.dim(1)?), DType::F32, t.device())?;
                Tensor::cat(&[t, &z], 0)?
            } else {
                t.clone()
            };
            Ok(t.unsqueeze(0)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}
