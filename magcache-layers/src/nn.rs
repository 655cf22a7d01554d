//! Small building blocks shared by the transformers (f32, CPU-friendly layouts).

use crate::weights::{LinearWeight, WeightStore};
use candle_core::{DType, Device, Module, Tensor};
use magcache_core::{Error, Result};

/// A linear layer: `y = x W^T + b`, with `W^T` kept as a transposed view of the `[out, in]` weight.
///
/// Not `candle_nn::Linear`: that one needs the input, weight and bias in one dtype, while we keep
/// activations and biases in f32 and only the weights (and the product) in the run's dtype (bf16/f16
/// halve the weights' memory without moving norms and modulation out of f32). It also multiplies a
/// `[B, S, in]` input by the weight broadcast over `B` (a batched matmul); we flatten to one
/// `[B*S, in]` product.
#[derive(Clone, Debug)]
pub struct Linear {
    wt: Weight,
    bias: Option<Tensor>,
}

/// A linear layer's weight: dense (the transposed view of `[out, in]`), or a GGUF tensor kept
/// quantized and multiplied by candle's `QMatMul` (which rounds the activations to 8 bits).
#[derive(Clone, Debug)]
enum Weight {
    Dense(Tensor),
    Quantized {
        mm: candle_core::quantized::QMatMul,
        out: usize,
    },
    /// A GGUF tensor multiplied from its own blocks, never repacked (`model.gguf_repack = false`).
    Compact {
        op: CompactQMatMul,
        out: usize,
    },
}

/// The quantized weight of a linear layer as the placement wants it: candle's `QMatMul`, or, with
/// `gguf_repack` off on the CPU, [`CompactQMatMul`].
fn quantized_weight(
    w: &WeightStore,
    q: std::sync::Arc<candle_core::quantized::QTensor>,
    out: usize,
) -> Result<Weight> {
    if !w.placement().gguf_repack && w.placement().device.is_cpu() {
        return Ok(Weight::Compact {
            op: CompactQMatMul(q),
            out,
        });
    }
    Ok(Weight::Quantized {
        mm: candle_core::quantized::QMatMul::from_arc(q)?,
        out,
    })
}

/// `x [m, k] (f32) -> x W^T [m, n]` for a quantized `W [n, k]` on the CPU, computed from the
/// tensor's own blocks by candle's generic quantized product (`k_quants::matmul`: the activations
/// rounded to the weight type's dot-product blocks, as `QMatMul` does). candle's `QMatMul` instead
/// repacks Q4_K / Q6_K (and Q8_0 on AVX-512 VNNI CPUs) into SIMD tiles on the first product and
/// keeps them beside the blocks: faster, but a held Q8_0 checkpoint then takes twice its file
/// (docs/benchmarks.md, "GGUF"). This op holds the file once.
#[derive(Clone, Debug)]
pub struct CompactQMatMul(std::sync::Arc<candle_core::quantized::QTensor>);

impl CompactQMatMul {
    fn product<T: candle_core::quantized::k_quants::GgmlType>(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[f32],
    ) -> candle_core::Result<Vec<f32>> {
        let data = self.0.data()?;
        let size = std::mem::size_of::<T>();
        let (m, k, n) = mkn;
        let blocks = n * k / T::BLCK_SIZE;
        if k % T::BLCK_SIZE != 0
            || data.len() != blocks * size
            || !(data.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        {
            candle_core::bail!(
                "quantized product: a {:?} tensor of {} bytes is not {n}x{k} in whole aligned blocks",
                self.0.dtype(),
                data.len()
            );
        }
        // SAFETY: the bytes are the CPU storage's `Vec<T>` of exactly `blocks` blocks (length and
        // alignment checked above); `T` is a plain-old-data block type.
        let rhs = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<T>(), blocks) };
        let mut dst = vec![0f32; m * n];
        candle_core::quantized::k_quants::matmul(mkn, lhs, rhs, &mut dst)?;
        Ok(dst)
    }
}

impl candle_core::CustomOp1 for CompactQMatMul {
    fn name(&self) -> &'static str {
        "compact-qmatmul"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::quantized::{k_quants as kq, GgmlDType as G};
        let candle_core::CpuStorage::F32(x) = s else {
            candle_core::bail!("quantized product: f32 activations only");
        };
        let x = contiguous(x, l, "quantized product")?;
        let (m, k) = l.shape().dims2()?;
        let (n, wk) = self.0.shape().dims2()?;
        if wk != k {
            candle_core::bail!(
                "quantized product: input {:?} against weight {:?}",
                l.shape(),
                self.0.shape()
            );
        }
        let mkn = (m, k, n);
        let y = match self.0.dtype() {
            G::Q4_0 => self.product::<kq::BlockQ4_0>(mkn, x)?,
            G::Q4_1 => self.product::<kq::BlockQ4_1>(mkn, x)?,
            G::Q5_0 => self.product::<kq::BlockQ5_0>(mkn, x)?,
            G::Q5_1 => self.product::<kq::BlockQ5_1>(mkn, x)?,
            G::Q8_0 => self.product::<kq::BlockQ8_0>(mkn, x)?,
            G::Q2K => self.product::<kq::BlockQ2K>(mkn, x)?,
            G::Q3K => self.product::<kq::BlockQ3K>(mkn, x)?,
            G::Q4K => self.product::<kq::BlockQ4K>(mkn, x)?,
            G::Q5K => self.product::<kq::BlockQ5K>(mkn, x)?,
            G::Q6K => self.product::<kq::BlockQ6K>(mkn, x)?,
            other => candle_core::bail!("quantized product: {other:?} weights are not supported"),
        };
        Ok((candle_core::CpuStorage::F32(y), (m, n).into()))
    }
}

/// The linear layer `name` of a checkpoint: `{name}.weight` `[out, inp]` (quantized GGUF weights
/// stay quantized, see [`WeightStore::get_linear`]) and `{name}.bias` `[out]`.
pub fn linear(w: &WeightStore, name: &str, out: usize, inp: usize) -> Result<Linear> {
    let bias = Some(w.get_shape(&format!("{name}.bias"), &[out])?);
    match w.get_linear(&format!("{name}.weight"), &[out, inp])? {
        LinearWeight::Dense(t) => Linear::new(t, bias),
        LinearWeight::Quantized(q) => Ok(Linear {
            wt: quantized_weight(w, q, out)?,
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
        }),
    }
}

/// A linear layer without bias: `{name}.weight` `[out, inp]` (quantized GGUF weights stay
/// quantized, as in [`linear`]).
pub fn linear_no_bias(w: &WeightStore, name: &str, out: usize, inp: usize) -> Result<Linear> {
    match w.get_linear(&format!("{name}.weight"), &[out, inp])? {
        LinearWeight::Dense(t) => Linear::new(t, None),
        LinearWeight::Quantized(q) => Ok(Linear {
            wt: quantized_weight(w, q, out)?,
            bias: None,
        }),
    }
}

impl Linear {
    /// From a PyTorch-layout weight `[out, in]` (in the run's weight dtype) and optional bias
    /// `[out]` (kept in f32).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        // A transposed view, not a copy: candle's gemm reads the transposed layout as fast (measured),
        // and loading then holds each weight once instead of twice.
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        Ok(Linear {
            wt: Weight::Dense(weight.t()?),
            bias,
        })
    }

    /// `x [..., in] -> [..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some((&last, lead)) = x.dims().split_last() else {
            return Err(Error::msg(
                "linear layer: the input is a scalar, expected [..., in]",
            ));
        };
        let rows = x.elem_count() / last.max(1);
        let x2 = x.reshape((rows, last))?;
        let x2 = if x2.is_contiguous() {
            x2
        } else {
            x2.contiguous()?
        };
        // Activations are f32. With bf16/f16 weights on a GPU the product runs in the weights' dtype
        // and comes back to f32. On the CPU, gemm has no native bf16 kernel without AVX512-BF16:
        // its bf16 product was 1.23-1.35x slower than f32 (docs/benchmarks.md), while widening the
        // weight to f32 per call (threaded, exact) and multiplying in f32 cost 1.02-1.27x there
        // and keeps the activations unrounded.
        let (mut y, out) = match &self.wt {
            Weight::Quantized { mm, out } => (mm.forward(&x2.to_dtype(DType::F32)?)?, *out),
            Weight::Compact { op, out } => (
                x2.to_dtype(DType::F32)?
                    .contiguous()?
                    .apply_op1_no_bwd(op)?,
                *out,
            ),
            Weight::Dense(wt) => {
                let y = if x2.dtype() == wt.dtype() {
                    x2.matmul(wt)?
                } else if wt.device().is_cpu() && x2.dtype() == DType::F32 {
                    // `wt` is the transposed view of a contiguous `[out, in]` weight: widen that,
                    // view it transposed again.
                    x2.matmul(&widen_f32(&wt.t()?)?.t()?)?
                } else {
                    x2.to_dtype(wt.dtype())?.matmul(wt)?.to_dtype(DType::F32)?
                };
                (y, wt.dim(1)?)
            }
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(out);
        Ok(y.reshape(out_dims)?)
    }
}

/// LayerNorm over the last axis, optional affine: candle-nn's, fed a contiguous input (its fused
/// kernel only runs on contiguous tensors; on others it falls back to a slower composite path).
#[derive(Clone, Debug)]
pub struct LayerNorm(candle_nn::LayerNorm);

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
        Ok(LayerNorm(candle_nn::LayerNorm::new(weight, bias, eps)))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward(&x.contiguous()?)?)
    }
}

/// RMSNorm over the last axis with a weight: candle-nn's, fed a contiguous input (see [`LayerNorm`]).
#[derive(Clone, Debug)]
pub struct RmsNorm(candle_nn::RmsNorm);

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm(candle_nn::RmsNorm::new(weight, eps))
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward(&x.contiguous()?)?)
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

/// Largest score matrix (bytes) one attention matmul may materialise; longer sequences are processed
/// in query chunks, so a 32k-token video needs ~256 MB for scores, not `H * S * S * 4` bytes.
pub const ATTENTION_SCORE_BUDGET: usize = 256 << 20;

/// Scaled dot-product attention, no mask. `q [B, H, S, D]`, `k`/`v` `[B, H, L, D]` -> `[B, H, S, D]`.
/// On the CPU in f32: `cpu_attention`, fused. Elsewhere queries are processed in chunks whose
/// `[B, H, chunk, L]` scores fit [`ATTENTION_SCORE_BUDGET`] (candle's CPU flash attention avoids the
/// scores too but measured 2.6-3.5x slower here).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32) {
        return cpu_attention(q, k, v);
    }
    let (b, h, s, _) = q.dims4()?;
    let per_query = b * h * k.dim(2)? * 4;
    attention_in_chunks(
        q,
        k,
        v,
        (ATTENTION_SCORE_BUDGET / per_query.max(1)).clamp(1, s.max(1)),
    )
}

/// Queries per task of `cpu_attention`: its scores are `QUERY_BLOCK x L` floats per thread.
pub const QUERY_BLOCK: usize = 128;

/// [`attention`] on the CPU in f32, fused: one task per (batch, head, block of [`QUERY_BLOCK`]
/// queries), spread over the threads, each running its two products single-threaded through `gemm`
/// with the softmax in between on its own score rows. candle's batched matmul instead threads each
/// head's small product in turn (measured 25-45% below the linear layers' throughput), materialises
/// `[B, H, S, L]` scores and passes over them three times; candle's CPU flash attention was slower
/// still (see [`attention`]).
fn cpu_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let d = q.dim(3)?;
    let q = (q * (1.0 / (d as f64).sqrt()))?;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    Ok(q.apply_op3_no_bwd(&k, &v, &CpuAttention)?)
}

struct CpuAttention;

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

impl candle_core::CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "cpu-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage::F32;
        let (F32(q), F32(k), F32(v)) = (s1, s2, s3) else {
            candle_core::bail!("cpu attention: f32 only");
        };
        let what = "cpu attention";
        let (q, k, v) = (
            contiguous(q, l1, what)?,
            contiguous(k, l2, what)?,
            contiguous(v, l3, what)?,
        );
        let (b, h, s, d) = l1.shape().dims4()?;
        let (kb, kh, l, kd) = l2.shape().dims4()?;
        if (kb, kh, kd) != (b, h, d) || l3.shape() != l2.shape() {
            candle_core::bail!(
                "cpu attention: q {:?}, k {:?}, v {:?} do not match",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let mut out = vec![0f32; b * h * s * d];
        if out.is_empty() || l == 0 {
            return Ok((F32(out), l1.shape().clone()));
        }
        let qb = QUERY_BLOCK.min(s);
        // (batch x head, first query, its output rows): disjoint, in any order.
        let mut tasks = Vec::new();
        for (bh, head_out) in out.chunks_mut(s * d).enumerate() {
            for (i, rows) in head_out.chunks_mut(qb * d).enumerate() {
                tasks.push((bh, i * qb, rows));
            }
        }
        let threads = candle_core::utils::get_num_threads().clamp(1, tasks.len());
        let tasks = std::sync::Mutex::new(tasks.into_iter());
        let run = || {
            let mut scores = vec![0f32; qb * l];
            loop {
                let next = match tasks.lock() {
                    Ok(mut t) => t.next(),
                    Err(_) => None,
                };
                let Some((bh, q0, o)) = next else { break };
                let rows = o.len() / d;
                let qs = &q[(bh * s + q0) * d..(bh * s + q0 + rows) * d];
                let (ks, vs) = (
                    &k[bh * l * d..(bh + 1) * l * d],
                    &v[bh * l * d..(bh + 1) * l * d],
                );
                let sc = &mut scores[..rows * l];
                // SAFETY: every pointer and stride below stays inside its slice: `qs` is
                // rows x d, `ks` and `vs` are l x d, `sc` rows x l and `o` rows x d, all row-major.
                unsafe {
                    // sc = qs . ks^T
                    gemm::gemm(
                        rows,
                        l,
                        d,
                        sc.as_mut_ptr(),
                        1,
                        l as isize,
                        false,
                        qs.as_ptr(),
                        1,
                        d as isize,
                        ks.as_ptr(),
                        d as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for row in sc.chunks_mut(l) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for x in row.iter_mut() {
                        *x = fast_exp(*x - max);
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|x| *x *= inv);
                }
                // SAFETY: as above.
                unsafe {
                    // o = softmax(sc) . vs
                    gemm::gemm(
                        rows,
                        d,
                        l,
                        o.as_mut_ptr(),
                        1,
                        d as isize,
                        false,
                        sc.as_ptr(),
                        1,
                        l as isize,
                        vs.as_ptr(),
                        1,
                        d as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        };
        std::thread::scope(|sc| {
            for _ in 1..threads {
                sc.spawn(run);
            }
            run();
        });
        Ok((F32(out), l1.shape().clone()))
    }
}

/// [`attention`] over chunks of `chunk` queries (the path off the CPU, and the CPU path's reference).
pub fn attention_in_chunks(q: &Tensor, k: &Tensor, v: &Tensor, chunk: usize) -> Result<Tensor> {
    let (_, _, s, d) = q.dims4()?;
    // The 1/sqrt(d) scale goes on `q` (S x D values), not on the S x L scores: candle's CPU affine
    // is a single-threaded pass, which over the scores of a 32k-token video would read and write
    // tens of GB per block while one core idles.
    let q = (q * (1.0 / (d as f64).sqrt()))?;
    let kt = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    let one = |q: &Tensor| -> Result<Tensor> {
        let scores = q.matmul(&kt)?;
        Ok(candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?)
    };
    if chunk >= s {
        return one(&q);
    }
    let parts = (0..s)
        .step_by(chunk.max(1))
        .map(|start| one(&q.narrow(2, start, chunk.min(s - start))?.contiguous()?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 2)?)
}

/// Largest absolute difference of two tensors (unit tests of this crate).
#[cfg(test)]
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[cfg(test)]
#[test]
fn fused_cpu_attention_equals_the_matmul_path() {
    let dev = Device::Cpu;
    // Query counts across and off the task block, keys fewer and more than the queries.
    for (b, h, s, l, d) in [(2, 3, 300, 200, 16), (1, 2, 128, 129, 8), (1, 1, 1, 3, 4)] {
        let q = Tensor::randn(0f32, 2.0, (b, h, s, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 2.0, (b, h, l, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap();
        let fused = cpu_attention(&q, &k, &v).unwrap();
        let reference = attention_in_chunks(&q, &k, &v, s).unwrap();
        let diff = max_abs_diff(&fused, &reference);
        assert!(diff < 1e-5, "{b}x{h}x{s}x{l}x{d}: {diff}");
    }
    // A non-contiguous q (heads transposed in, as the models pass them) is accepted.
    let q = Tensor::randn(0f32, 1.0, (1, 5, 2, 8), &dev)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, 2, 7, 8), &dev).unwrap();
    let a = cpu_attention(&q, &k, &k).unwrap();
    let r = attention_in_chunks(&q, &k, &k, 5).unwrap();
    let diff = max_abs_diff(&a, &r);
    assert!(diff < 1e-5, "{diff}");
}

#[cfg(test)]
#[test]
fn chunked_attention_equals_one_shot() {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (1, 2, 37, 8), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, 2, 29, 8), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (1, 2, 29, 8), &dev).unwrap();
    let full = attention(&q, &k, &v).unwrap();
    let chunked = attention_in_chunks(&q, &k, &v, 5).unwrap();
    let d = max_abs_diff(&full, &chunked);
    assert!(d < 1e-6, "{d}");
}

/// Largest im2col matrix (bytes) one conv2d call may build. candle lowers conv2d to im2col + matmul
/// on CPU and CUDA: at 480x832 a Wan VAE 96-channel 3-tap layer over 4 frames, or a FLUX VAE
/// 128-channel 3x3 layer at 1024x1024, would need 5-16 GB in one call, so larger convolutions run
/// over slices of the batch, then of output rows ([`conv2d_bounded`]).
pub const IM2COL_BUDGET: usize = 256 << 20;

/// `x.conv2d(w, pad, stride)` computed in pieces whose im2col matrix stays under `budget` bytes:
/// whole images in groups, or, when one image is over budget, bands of output rows (each reading
/// its rows of the explicitly zero-padded input plus the kernel's halo).
pub fn conv2d_bounded(
    x: &Tensor,
    w: &Tensor,
    pad: usize,
    stride: usize,
    budget: usize,
) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    if h + 2 * pad < kh || wd + 2 * pad < kw || stride == 0 {
        return Err(Error::msg(format!(
            "a {kh}x{kw} convolution (padding {pad}, stride {stride}) got a {h}x{wd} input: too small"
        )));
    }
    let h_out = (h + 2 * pad - kh) / stride + 1;
    let w_out = (wd + 2 * pad - kw) / stride + 1;
    if stride == 1
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.dim(1)? == c
    {
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        return Ok(x.apply_op2_no_bwd(&w, &RowConv { pad, budget })?);
    }
    let row_bytes = w_out * c * kh * kw * x.dtype().size_in_bytes();
    let image_bytes = h_out * row_bytes;
    if n * image_bytes <= budget {
        return Ok(x.conv2d(w, pad, stride, 1, 1)?);
    }
    if image_bytes <= budget {
        let per = (budget / image_bytes.max(1)).max(1);
        let parts = (0..n)
            .step_by(per)
            .map(|i| {
                Ok(x.narrow(0, i, per.min(n - i))?
                    .conv2d(w, pad, stride, 1, 1)?)
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(Tensor::cat(&parts, 0)?);
    }
    let rows = (budget / row_bytes.max(1)).max(1);
    let padded = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
    let mut images = Vec::with_capacity(n);
    for i in 0..n {
        let img = padded.narrow(0, i, 1)?;
        let bands = (0..h_out)
            .step_by(rows)
            .map(|r0| {
                let r = rows.min(h_out - r0);
                let band = img.narrow(2, r0 * stride, (r - 1) * stride + kh)?;
                Ok(band.conv2d(w, 0, stride, 1, 1)?)
            })
            .collect::<Result<Vec<_>>>()?;
        images.push(Tensor::cat(&bands, 2)?);
    }
    Ok(Tensor::cat(&images, 0)?)
}

/// [`conv2d_bounded`] at stride 1 on the CPU in f32: per band of output rows (its im2col matrix under
/// `budget` bytes and under the output image's size), the matrix is filled by copying whole input rows (each kernel tap of each input
/// channel is a shifted copy of the band's rows, zeros where the padding is), split over the
/// threads, and multiplied by the `[O, C*KH*KW]` weights in one threaded `gemm` straight into the
/// output. candle 0.11's CPU conv2d (a tiled im2col) gathers the matrix one element at a time
/// with bounds checks: in `perf` of a tiled Wan VAE decode that gather took 63% of the time and the
/// product 14%.
struct RowConv {
    pad: usize,
    budget: usize,
}

impl candle_core::CustomOp2 for RowConv {
    fn name(&self) -> &'static str {
        "row-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage::F32;
        let (F32(x), F32(wt)) = (s1, s2) else {
            candle_core::bail!("row conv2d: f32 only");
        };
        let (x, wt) = (
            contiguous(x, l1, "row conv2d")?,
            contiguous(wt, l2, "row conv2d")?,
        );
        let (n, c, h, w) = l1.shape().dims4()?;
        let (o, wc, kh, kw) = l2.shape().dims4()?;
        let pad = self.pad;
        if wc != c || h + 2 * pad < kh || w + 2 * pad < kw {
            candle_core::bail!(
                "row conv2d: input {:?} and weight {:?} do not fit",
                l1.shape(),
                l2.shape()
            );
        }
        let (h_out, w_out) = (h + 2 * pad - kh + 1, w + 2 * pad - kw + 1);
        let k = c * kh * kw;
        let mut out = vec![0f32; n * o * h_out * w_out];
        if k == 0 || out.is_empty() {
            // No input channel (or no output): the convolution is all zeros.
            return Ok((F32(out), candle_core::Shape::from((n, o, h_out, w_out))));
        }
        // A band's matrix stays under the budget and under one output image (at least 1 MB, for
        // products large enough to run at speed), so it adds at most an output's worth of memory.
        let band = self.budget.min((o * h_out * w_out * 4).max(1 << 20));
        let rows = (band / (k * w_out * 4).max(1)).clamp(1, h_out.max(1));
        let mut col = vec![0f32; k * rows * w_out];
        let threads = candle_core::utils::get_num_threads().max(1);
        for img in 0..n {
            let xi = &x[img * c * h * w..(img + 1) * c * h * w];
            for r0 in (0..h_out).step_by(rows) {
                let r = rows.min(h_out - r0);
                let p = r * w_out;
                let col = &mut col[..k * p];
                // Row `kk = (ci * kh + a) * kw + b` of the matrix: input channel `ci` shifted by
                // tap (a, b): output (y, x) reads input (r0 + y + a - pad, x + b - pad).
                let fill = |kk0: usize, part: &mut [f32]| {
                    for (i, dst) in part.chunks_mut(p).enumerate() {
                        let kk = kk0 + i;
                        let (ci, a, b) = (kk / (kh * kw), (kk / kw) % kh, kk % kw);
                        // The columns whose input x + b - pad lies inside the row.
                        let x0 = pad.saturating_sub(b).min(w_out);
                        let x1 = (w + pad).saturating_sub(b).min(w_out).max(x0);
                        for (y, d) in dst.chunks_mut(w_out).enumerate() {
                            let iy = (r0 + y + a) as isize - pad as isize;
                            if iy < 0 || iy >= h as isize {
                                d.fill(0.0);
                                continue;
                            }
                            d[..x0].fill(0.0);
                            d[x1..].fill(0.0);
                            let src = ci * h * w + iy as usize * w + x0 + b - pad;
                            d[x0..x1].copy_from_slice(&xi[src..src + (x1 - x0)]);
                        }
                    }
                };
                let per = k.div_ceil(threads);
                std::thread::scope(|sc| {
                    for (t, part) in col.chunks_mut(per * p).enumerate() {
                        let fill = &fill;
                        sc.spawn(move || fill(t * per, part));
                    }
                });
                let dst = &mut out[img * o * h_out * w_out + r0 * w_out..];
                // SAFETY: dst rows `0..o` at stride `h_out * w_out`, `p` columns each, lie inside
                // `out` (the band's rows of each output channel of image `img`); the weights are
                // `[o, k]` and the matrix `[k, p]`, both contiguous and of those lengths.
                unsafe {
                    gemm::gemm(
                        o,
                        p,
                        k,
                        dst.as_mut_ptr(),
                        1,
                        (h_out * w_out) as isize,
                        false,
                        wt.as_ptr(),
                        1,
                        k as isize,
                        col.as_ptr(),
                        1,
                        p as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    );
                }
            }
        }
        Ok((F32(out), candle_core::Shape::from((n, o, h_out, w_out))))
    }
}

/// `[B, S, H*D] -> [B, H, S, D]` (contiguous).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    Ok(x.reshape((b, s, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// `[B, S, H*D]` -> `[B, S, H, D]` RMS-normed per head -> `[B, H, S, D]`.
pub fn heads_normed(x: &Tensor, heads: usize, norm: &RmsNorm) -> Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    let x = norm.forward(&x.reshape((b, s, heads, hd / heads))?)?;
    Ok(x.transpose(1, 2)?.contiguous()?)
}

/// `[B, H, S, D] -> [B, S, H*D]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, s, h * d))?)
}

/// `e^z` for f32 with ~1e-7 relative error, branch-free so the compiler vectorizes it: range reduction
/// `z = n ln2 + r`, a degree-6 polynomial for `e^r` (|r| <= ln2/2), `2^n` from the exponent bits.
#[inline(always)]
fn fast_exp(z: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to nearest
    let z = z.clamp(-87.0, 88.0);
    let n = (z * LOG2E + ROUND) - ROUND;
    let r = z - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    f32::from_bits(((n as i32 + 127) << 23) as u32) * p
}

/// GELU with the tanh approximation (`0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, as
/// `gelu-approximate` in diffusers), written as `x / (1 + e^(-2u))`.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let u = C * (x + 0.044_715 * x * x * x);
    x / (1.0 + fast_exp(-2.0 * u))
}

/// `out[i] = f(src[i])` over candle's CPU threads (`RAYON_NUM_THREADS`, like its own ops and
/// [`cpu_attention`]) for large slices.
fn par_map<A: Copy + Sync, B: Send>(src: &[A], out: &mut [B], f: impl Fn(A) -> B + Sync) {
    let threads = candle_core::utils::get_num_threads();
    let apply = |o: &mut [B], i: &[A]| {
        for (o, &x) in o.iter_mut().zip(i) {
            *o = f(x);
        }
    };
    if threads > 1 && src.len() >= 1 << 18 {
        let chunk = src.len().div_ceil(threads);
        std::thread::scope(|sc| {
            for (o, i) in out.chunks_mut(chunk).zip(src.chunks(chunk)) {
                sc.spawn(|| apply(o, i));
            }
        });
    } else {
        apply(out, src);
    }
}

/// bf16/f16 -> f32 on the CPU, threaded (candle's `to_dtype` converts on one thread).
struct WidenF32;

impl candle_core::CustomOp1 for WidenF32 {
    fn name(&self) -> &'static str {
        "widen-f32"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("widen to f32: contiguous input only");
        };
        let mut out = vec![0f32; b - a];
        match s {
            candle_core::CpuStorage::BF16(v) => par_map(&v[a..b], &mut out, |x| x.to_f32()),
            candle_core::CpuStorage::F16(v) => par_map(&v[a..b], &mut out, |x| x.to_f32()),
            _ => candle_core::bail!("widen to f32: bf16 or f16 input only"),
        }
        Ok((candle_core::CpuStorage::F32(out), l.shape().clone()))
    }
}

/// `t` in f32: threaded for contiguous bf16/f16 tensors on the CPU, candle's conversion otherwise.
pub fn widen_f32(t: &Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::F32 => Ok(t.clone()),
        DType::BF16 | DType::F16 if t.device().is_cpu() && t.is_contiguous() => {
            Ok(t.apply_op1_no_bwd(&WidenF32)?)
        }
        _ => Ok(t.to_dtype(DType::F32)?),
    }
}

struct FastGelu;

impl candle_core::CustomOp1 for FastGelu {
    fn name(&self) -> &'static str {
        "fast-gelu-tanh"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(v) = s else {
            candle_core::bail!("fast gelu: f32 only");
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("fast gelu: contiguous input only");
        };
        let src = &v[a..b];
        let mut out = vec![0f32; src.len()];
        par_map(src, &mut out, gelu_tanh);
        Ok((candle_core::CpuStorage::F32(out), l.shape().clone()))
    }
}

/// GELU (tanh approximation) of an f32 tensor; other dtypes use candle's.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || x.device().is_cuda() || x.device().is_metal() {
        return Ok(x.gelu()?);
    }
    let x = if x.is_contiguous() {
        x.clone()
    } else {
        x.contiguous()?
    };
    Ok(x.apply_op1_no_bwd(&FastGelu)?)
}

#[cfg(test)]
#[path = "nn_tests.rs"]
mod tests;
