//! Small building blocks shared by the transformers (f32, CPU-friendly layouts).

use candle_core::{DType, Device, Tensor, D};
use magcache_core::Result;

/// A linear layer with its weight stored transposed (`[in, out]`, contiguous) so the hot matmul needs
/// no strided access.
#[derive(Clone, Debug)]
pub struct Linear {
    wt: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// From a PyTorch-layout weight `[out, in]` and optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Linear {
            wt: weight.t()?.contiguous()?,
            bias,
        })
    }

    pub fn out_dim(&self) -> usize {
        self.wt.dim(1).unwrap_or(0)
    }

    /// `x [..., in] -> [..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let last = *dims.last().expect("rank >= 1");
        let rows = x.elem_count() / last.max(1);
        let x2 = x.reshape((rows, last))?;
        let x2 = if x2.is_contiguous() {
            x2
        } else {
            x2.contiguous()?
        };
        let mut y = x2.matmul(&self.wt)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.wt.dim(1)?;
        Ok(y.reshape(out_dims)?)
    }
}

/// LayerNorm over the last axis, optional affine.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn new(
        dim: usize,
        eps: f64,
        affine: Option<(Tensor, Tensor)>,
        dev: &Device,
    ) -> Result<Self> {
        let (weight, bias) = match affine {
            Some((w, b)) => (w, b),
            None => (
                Tensor::ones(dim, DType::F32, dev)?,
                Tensor::zeros(dim, DType::F32, dev)?,
            ),
        };
        Ok(LayerNorm {
            weight,
            bias,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if x.is_contiguous() {
            x.clone()
        } else {
            x.contiguous()?
        };
        Ok(candle_nn::ops::layer_norm(
            &x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// RMSNorm over the last axis with a weight.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm {
            weight,
            eps: eps as f32,
        }
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if x.is_contiguous() {
            x.clone()
        } else {
            x.contiguous()?
        };
        Ok(candle_nn::ops::rms_norm(&x, &self.weight, self.eps)?)
    }
}

/// `x * (1 + scale) + shift` with broadcasting of `scale`/`shift` over the token axis.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)?)
}

/// Sinusoidal timestep embedding (diffusers `get_timestep_embedding` with `flip_sin_to_cos=True`,
/// `downscale_freq_shift=0`): `[cos(t f), sin(t f)]`, `f_j = exp(-ln(10000) j / half)`.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    let freqs: Vec<f32> = (0..half)
        .map(|j| (-(10000f32).ln() * j as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let n = t.elem_count();
    let args = t
        .to_dtype(DType::F32)?
        .reshape((n, 1))?
        .broadcast_mul(&freqs)?;
    let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?;
    if dim % 2 == 1 {
        return Ok(emb.pad_with_zeros(1, 0, 1)?);
    }
    Ok(emb)
}

/// Scaled dot-product attention, no mask. `q [B, Hq, S, D]`, `k`/`v` `[B, H, L, D]` -> `[B, H, S, D]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let p = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(p.matmul(&v.contiguous()?)?)
}

/// `[B, S, H*D] -> [B, H, S, D]` (contiguous).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    Ok(x.reshape((b, s, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// `[B, H, S, D] -> [B, S, H*D]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, s, h * d))?)
}
