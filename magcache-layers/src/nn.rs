//! Small building blocks shared by the transformers (f32, CPU-friendly layouts).

use candle_core::{DType, Tensor};
use magcache_core::{Error, Result};

/// Interleaved rotary embedding (`rope_i`, Wan's and FLUX's) of `[B, H, S, D]` with tables
/// `[S, D/2]` or per item `[B, S, D/2]` (Z-Image): candle-nn's fused kernel, or in
/// [`differentiable`] mode the same rotation in plain ops ([`rope_i_composite`]).
pub fn rope_i(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if differentiable() {
        return rope_i_composite(x, cos, sin);
    }
    Ok(candle_nn::rotary_emb::rope_i(x, cos, sin)?)
}

/// [`rope_i`] in ops with a backward. candle-nn's `rope_i_slow` takes `[S, D/2]` tables only (it
/// narrows a per-item table's batch axis as if it were the sequence), so the composite is here:
/// each pair `(x0, x1)` becomes `(x0 cos - x1 sin, x0 sin + x1 cos)`.
pub fn rope_i_composite(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    let table = |t: &Tensor| -> Result<Tensor> {
        let t = match t.rank() {
            2 => t.narrow(0, 0, s)?.reshape((1, 1, s, d / 2, 1))?,
            3 => t.narrow(1, 0, s)?.reshape((t.dim(0)?, 1, s, d / 2, 1))?,
            r => return Err(Error::msg(format!("rope: a rank-{r} table"))),
        };
        Ok(t.to_dtype(x.dtype())?)
    };
    let (cos, sin) = (table(cos)?, table(sin)?);
    let x = x.reshape((b, h, s, d / 2, 2))?;
    let (x0, x1) = (x.narrow(4, 0, 1)?, x.narrow(4, 1, 1)?);
    let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let y1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
    Ok(Tensor::cat(&[y0, y1], 4)?.reshape((b, h, s, d))?)
}

/// Softmax over the last axis: candle-nn's fused kernel, or its composite `softmax` in
/// [`differentiable`] mode.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if differentiable() {
        return Ok(candle_nn::ops::softmax(x, candle_core::D::Minus1)?);
    }
    Ok(candle_nn::ops::softmax_last_dim(x)?)
}

thread_local! {
    static DIFFERENTIABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread runs the blocks' ops on paths candle's autograd can differentiate (see
/// [`Differentiable`]).
pub fn differentiable() -> bool {
    // Blocks run during a checkpointed record need no graph (`magcache_core::checkpoint`).
    DIFFERENTIABLE.with(|d| d.get()) && !magcache_core::checkpoint::no_graph_needed()
}

/// While alive, this thread's blocks run on ops with a backward pass: candle-nn's fused softmax,
/// LayerNorm, RMSNorm and `rope_i` kernels, our fused CPU attention and GELU have none (their
/// outputs would silently cut the graph), so their composite forms run instead, and a linear layer
/// whose product has no backward (a packed bf16 or quantized weight) is an error. The same
/// arithmetic in plain ops: slower, and equal to the fused forms within f32 rounding. Used by the
/// fitted estimator's fit (`magcache calibrate --fit`), which backpropagates through whole runs.
pub struct Differentiable {
    was: bool,
}

impl Differentiable {
    pub fn enter() -> Self {
        Differentiable {
            was: DIFFERENTIABLE.with(|d| d.replace(true)),
        }
    }
}

impl Drop for Differentiable {
    fn drop(&mut self) {
        DIFFERENTIABLE.with(|d| d.set(self.was));
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

/// `[B, S, H*D] -> [B, H, S, D]` (contiguous).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    let hd = head_dim(hd, heads)?;
    Ok(x.reshape((b, s, heads, hd))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// `[B, S, H*D]` -> `[B, S, H, D]` RMS-normed per head -> `[B, H, S, D]`.
pub fn heads_normed(x: &Tensor, heads: usize, norm: &RmsNorm) -> Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    let x = norm.forward(&x.reshape((b, s, heads, head_dim(hd, heads)?))?)?;
    Ok(x.transpose(1, 2)?.contiguous()?)
}

/// The size of each of `heads` heads of a `width`: an error unless they divide it.
fn head_dim(width: usize, heads: usize) -> Result<usize> {
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(magcache_core::Error::msg(format!(
            "attention: a width of {width} does not split into {heads} heads"
        )));
    }
    Ok(width / heads)
}

/// `[B, H, S, D] -> [B, S, H*D]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, s, h * d))?)
}

/// The elements of a contiguous custom-op input (`what` names the op in the error).
fn contiguous<'a>(
    x: &'a [f32],
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) if b <= x.len() => Ok(&x[a..b]),
        _ => candle_core::bail!("{what}: contiguous inputs only"),
    }
}

mod attention;
pub mod bf16_gemm;
mod conv;
pub mod f32_gemm;
mod linear;
pub use linear::{linear, linear_no_bias, CompactQMatMul, Linear};
mod norms;
pub use norms::{LayerNorm, RmsNorm};
pub mod onednn;
mod pointwise;
pub mod timing;
pub(crate) use attention::cpu_task_scores;
#[cfg(test)]
pub use attention::max_abs_diff;
pub use attention::{
    attention, attention_as, attention_in_chunks, attention_on_gemm, attention_onednn,
    attention_onednn_blocks, OneDnnBlocks, ATTENTION_SCORE_BUDGET, ONEDNN_KEY_ROWS, QUERY_BLOCK,
};
pub use conv::{conv2d_bounded, IM2COL_BUDGET};
pub use pointwise::{gelu, widen_f32};

#[cfg(test)]
#[path = "nn_tests.rs"]
mod tests;
