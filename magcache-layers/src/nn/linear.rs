//! The linear layer: its weight held as the run chose (f32, packed bf16, oneDNN, GGUF) and its
//! products.

use super::{bf16_gemm, contiguous, differentiable, f32_gemm, gelu, onednn, timing, widen_f32};
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
        /// Zero columns the input takes to meet the weight's padding ([`even_blocks`]).
        pad: usize,
    },
    /// A bf16 weight packed for the CPU's bf16 products ([`bf16_gemm`]: AMX or AVX512-BF16).
    Bf16(std::sync::Arc<bf16_gemm::PackedBf16>),
    /// An f32 or f16 weight packed for the layers' AVX-512 f32 kernel ([`f32_gemm::available`]).
    F32(std::sync::Arc<f32_gemm::PackedF32>),
    /// A weight packed once in the layout of oneDNN's products (`MAGCACHE_ONEDNN`: f32, and bf16
    /// where it runs bf16 products: [`onednn::bf16_products`]).
    OneDnn {
        w: std::sync::Arc<onednn::PackedWeight>,
        out: usize,
    },
    /// A GGUF tensor multiplied from its own blocks, never repacked (`model.gguf_repack = false`).
    Compact {
        op: CompactQMatMul,
        out: usize,
        /// As `Quantized`'s.
        pad: usize,
    },
}

/// The quantized weight of a linear layer as the placement wants it: candle's `QMatMul`, or, with
/// `gguf_repack` off on the CPU, [`CompactQMatMul`].
fn quantized_weight(
    w: &WeightStore,
    q: std::sync::Arc<candle_core::quantized::QTensor>,
    out: usize,
) -> Result<Weight> {
    let p = w.placement();
    quantized_weight_on(q, out, p.device.is_cpu(), !p.gguf_repack)
}

/// [`quantized_weight`] for a CPU or not, compact (`gguf_repack` off) or not.
fn quantized_weight_on(
    q: std::sync::Arc<candle_core::quantized::QTensor>,
    out: usize,
    cpu: bool,
    compact: bool,
) -> Result<Weight> {
    let (q, pad) = if cpu { even_blocks(q)? } else { (q, 0) };
    if compact && cpu {
        return Ok(Weight::Compact {
            op: CompactQMatMul(q),
            out,
            pad,
        });
    }
    Ok(Weight::Quantized {
        mm: candle_core::quantized::QMatMul::from_arc(q)?,
        out,
        pad,
    })
}

/// A Q4_1, Q5_0 or Q5_1 weight whose rows hold an odd number of blocks, given one more block of
/// zeros a row; and the zero columns the input then takes (0 where nothing was added). candle's
/// CPU dot products of these types assert an even block count (ggml's SIMD takes two at a time):
/// debug builds panic on such a row, while the generic loop release builds run is right for any
/// count. A zero block (scale and minimum 0) adds exactly 0 against the input's zero columns (an
/// 8-bit block of zeros), so the product is the unpadded one. Released checkpoints' rows (multiples
/// of 64) never take this; tiny models and odd widths do.
fn even_blocks(
    q: std::sync::Arc<candle_core::quantized::QTensor>,
) -> Result<(std::sync::Arc<candle_core::quantized::QTensor>, usize)> {
    use candle_core::quantized::{GgmlDType as G, QStorage, QTensor};
    let bs = q.dtype().block_size();
    let (n, k) = q.shape().dims2()?;
    let nb = k / bs;
    if !matches!(q.dtype(), G::Q4_1 | G::Q5_0 | G::Q5_1) || nb.is_multiple_of(2) || n == 0 {
        return Ok((q, 0));
    }
    let data = q.data()?;
    let row = data.len() / n;
    let block = row / nb.max(1);
    let mut padded = Vec::with_capacity((row + block) * n);
    for r in data.chunks_exact(row) {
        padded.extend_from_slice(r);
        padded.extend(std::iter::repeat_n(0u8, block));
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(padded), &q.device(), q.dtype())?;
    Ok((std::sync::Arc::new(QTensor::new(storage, (n, k + bs))?), bs))
}

/// `x [m, k] (f32) -> x W^T [m, n]` for a quantized `W [n, k]` on the CPU, computed from the
/// tensor's own blocks by candle's generic quantized product (`k_quants::matmul`: the activations
/// rounded to the weight type's dot-product blocks, as `QMatMul` does). candle's `QMatMul` instead
/// repacks Q4_K / Q6_K (and Q8_0 on AVX-512 VNNI CPUs) into SIMD tiles on the first product and
/// keeps them beside the blocks: faster, but a held Q8_0 checkpoint then takes twice its file
/// (docs/benchmarks.md, "GGUF"). This op holds the file once.
#[derive(Clone, Debug)]
pub struct CompactQMatMul(pub(super) std::sync::Arc<candle_core::quantized::QTensor>);

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

/// A product as a CPU op on the f32, contiguous input (the bf16 kernel, the compact GGUF product).
fn f32_op(x: &Tensor, op: &impl candle_core::CustomOp1) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(op)?)
}

/// `x [rows, in]` with `pad` columns of zeros after its last (itself where `pad` is 0).
fn pad_columns(x: &Tensor, pad: usize) -> Result<Tensor> {
    Ok(match pad {
        0 => x.clone(),
        _ => x.pad_with_zeros(1, 0, pad)?,
    })
}

/// `x [..., in]` (rank 1 or more) as rows `[rows, in]`, and the shape `[..., n]` of an output of
/// `n` features for them.
fn as_rows(x: &Tensor, n: usize) -> Result<(Tensor, Vec<usize>)> {
    let last = x.dim(x.rank() - 1)?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().unwrap_or(&mut 0) = n;
    Ok((x.reshape((x.elem_count() / last.max(1), last))?, dims))
}

/// `x wt` on candle's kernels for a dense weight (`wt`: the `[in, out]` transposed view of a
/// `[out, in]` weight in the run's dtype), f32 out.
fn dense_product(x: &Tensor, wt: &Tensor) -> Result<Tensor> {
    Ok(if x.dtype() == wt.dtype() {
        x.matmul(wt)?
    } else if wt.device().is_cpu() && x.dtype() == DType::F32 {
        // `wt` is the transposed view of a contiguous `[out, in]` weight: widen that, view it
        // transposed again.
        x.matmul(&widen_f32(&wt.t()?)?.t()?)?
    } else {
        x.to_dtype(wt.dtype())?.matmul(wt)?.to_dtype(DType::F32)?
    })
}

/// The linear layer `name` of a checkpoint: `{name}.weight` `[out, inp]` (quantized GGUF weights
/// stay quantized, see [`WeightStore::get_linear`]) and `{name}.bias` `[out]`.
pub fn linear(w: &WeightStore, name: &str, out: usize, inp: usize) -> Result<Linear> {
    let bias = Some(w.get_shape(&format!("{name}.bias"), &[out])?);
    match w.get_linear(&format!("{name}.weight"), &[out, inp])? {
        LinearWeight::Dense(t) => Linear::placed(w, t, bias),
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
        LinearWeight::Dense(t) => Linear::placed(w, t, None),
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
        // On a CPU with AVX512-BF16 a bf16 weight is packed once for its dot products (the packed
        // copy replaces the weight: the same bytes, the padding aside).
        // Where oneDNN runs the products (`MAGCACHE_ONEDNN`: f32 weights, and bf16 ones on AMX or
        // with `MAGCACHE_ONEDNN_BF16=on`), the
        // weight is packed once in the layout oneDNN's product reads (the packed copy replaces it,
        // as above; a differentiable run unpacks it per product).
        if let Some(d) = onednn::get() {
            let on_dnnl = match weight.dtype() {
                DType::F32 => true,
                DType::BF16 => d.bf16_products(),
                _ => false,
            };
            if on_dnnl && weight.device().is_cpu() {
                if let Some(w) = d.pack(&weight.t()?)? {
                    let out = w.n();
                    let w = std::sync::Arc::new(w);
                    return Ok(Linear {
                        wt: Weight::OneDnn { w, out },
                        bias,
                    });
                }
            }
        }
        // f32 and f16 weights on the layers' AVX-512 kernel where it runs (packed once in their
        // dtype, replacing them).
        let f32_kernel = matches!(weight.dtype(), DType::F32 | DType::F16);
        if f32_kernel && weight.device().is_cpu() && f32_gemm::available() {
            let w = std::sync::Arc::new(f32_gemm::PackedF32::from_tensor(&weight)?);
            return Ok(Linear {
                wt: Weight::F32(w),
                bias,
            });
        }
        if weight.dtype() == DType::BF16
            && weight.device().is_cpu()
            && bf16_gemm::available()
            && !onednn::bf16_products()
        {
            return Self::packed(&weight, bias);
        }
        Ok(Linear {
            wt: Weight::Dense(weight.t()?),
            bias,
        })
    }

    /// A bf16 or f32 CPU weight packed for the bf16 kernel (read in place), with an f32 bias.
    fn packed(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        let packed = bf16_gemm::PackedBf16::from_tensor(weight)?;
        Ok(Linear {
            wt: Weight::Bf16(std::sync::Arc::new(packed)),
            bias,
        })
    }

    /// [`Linear::new`], with f32 weights rounded to bf16 for the CPU's bf16 products when the
    /// placement says so (`model.matmul_precision = "bf16"`): on oneDNN where it runs bf16 weights
    /// ([`onednn::bf16_products`]), else packed for the layers' bf16 kernel.
    fn placed(w: &WeightStore, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        if w.is_recording() {
            // A recording store's zero-stride zeros: held as they are (packing would write them
            // out at full size, for a model that is only listed).
            let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
            let wt = Weight::Dense(weight.t()?);
            return Ok(Linear { wt, bias });
        }
        let p = w.placement();
        if p.matmul_bf16 && weight.dtype() == DType::F32 && weight.device().is_cpu() {
            if onednn::bf16_products() {
                // oneDNN runs bf16 weights' products (AMX, or `MAGCACHE_ONEDNN_BF16=on`): the
                // weight rounded to bf16 goes there.
                return Linear::new(weight.to_dtype(DType::BF16)?, bias);
            }
            if !bf16_gemm::available() {
                return Err(Error::msg(
                    "model.matmul_precision = \"bf16\": no bf16 products here (MAGCACHE_CPU_BF16=off, no AMX or AVX512-BF16, or a CPU with AMX with MAGCACHE_AMX=off and neither MAGCACHE_ONEDNN nor MAGCACHE_CPU_BF16=on)",
                ));
            }
            let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
            return Self::packed(&weight, bias);
        }
        Linear::new(weight, bias)
    }

    /// Whether the product runs in bf16 on the CPU (a bf16 weight on a CPU with AVX512-BF16, or on
    /// oneDNN's bf16 products: [`onednn::bf16_products`]): the block's attention then runs in bf16 too
    /// ([`super::attention_as`]).
    pub fn runs_bf16(&self) -> bool {
        match &self.wt {
            Weight::Bf16(_) => true,
            Weight::OneDnn { w, .. } => w.is_bf16(),
            // bf16 on oneDNN's bf16 products: the attention runs there as well.
            Weight::Dense(wt) => {
                wt.dtype() == DType::BF16 && wt.device().is_cpu() && onednn::bf16_products()
            }
            _ => false,
        }
    }

    /// `x [..., in] -> [..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _timer = timing::Timer::linear(x.device().is_cpu());
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
        if differentiable() {
            // An f32 weight packed for oneDNN: its plain values for the differentiable product.
            if let Weight::OneDnn { w, .. } = &self.wt {
                if !w.is_bf16() {
                    let wt = Weight::Dense(w.unpack()?);
                    let bias = self.bias.clone();
                    return Linear { wt, bias }.forward(x);
                }
            }
            // An f32 or f16 weight packed for the layers' kernel: its plain values, as above.
            if let Weight::F32(w) = &self.wt {
                let wt = Weight::Dense(w.unpack()?.t()?);
                let bias = self.bias.clone();
                return Linear { wt, bias }.forward(x);
            }
        }
        if differentiable() && !matches!(self.wt, Weight::Dense(_)) {
            return Err(Error::msg(
                "differentiable run (the fitted estimator's fit): a packed bf16 or quantized linear weight has no backward; run the fit with dtype = \"f32\" (or \"bf16\" with MAGCACHE_CPU_BF16=off and MAGCACHE_ONEDNN unset), without GGUF",
            ));
        }
        // `biased`: the bias went into the product.
        let (y, out, biased) = match &self.wt {
            Weight::Quantized { mm, out, pad } => {
                let x = pad_columns(&x2.to_dtype(DType::F32)?, *pad)?;
                (mm.forward(&x)?, *out, false)
            }
            Weight::Bf16(w) => (
                bf16_gemm::linear(w, &x2, self.bias.as_ref(), false)?,
                w.n(),
                true,
            ),
            Weight::F32(w) => (
                f32_gemm::linear(w, &x2, self.bias.as_ref(), false)?,
                w.n(),
                true,
            ),
            Weight::Compact { op, out, pad } => {
                (f32_op(&pad_columns(&x2, *pad)?, op)?, *out, false)
            }
            Weight::OneDnn { w, out } => {
                let y = w.linear(&x2.to_dtype(DType::F32)?, self.bias.as_ref())?;
                (y, *out, true)
            }
            Weight::Dense(wt) => {
                let frozen = differentiable()
                    && wt.device().is_cpu()
                    && wt.dtype() == DType::F32
                    && x2.dtype() == DType::F32;
                let onednn = match onednn::get() {
                    Some(d) if !differentiable() => match d.linear(&x2, wt, self.bias.as_ref())? {
                        // bf16 weights where oneDNN runs no bf16 products: widened to f32 (as
                        // `dense_product` does), the product on it.
                        None if wt.dtype() == DType::BF16 && wt.device().is_cpu() => {
                            d.linear(&x2, &widen_f32(&wt.t()?)?.t()?, self.bias.as_ref())?
                        }
                        y => y,
                    },
                    _ => None,
                };
                let out = wt.dim(1)?;
                match onednn {
                    Some(y) => (y, out, true),
                    None if frozen => (x2.apply_op1(FrozenMatMul { wt: wt.clone() })?, out, false),
                    None => (dense_product(&x2, wt)?, out, false),
                }
            }
        };
        let y = match &self.bias {
            Some(b) if !biased => y.broadcast_add(b)?,
            _ => y,
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(out);
        Ok(y.reshape(out_dims)?)
    }

    /// `next(gelu(self(x)))`: a feed-forward's two layers with the tanh [`gelu`] between. Where
    /// both weights are packed for oneDNN, the GELU runs on the first product's accumulators (a
    /// post-op) and, with bf16 weights, the hidden activations come out as bf16, the second
    /// product's operand as they are: no pass of its own over the `[rows, hidden]` activations
    /// for the GELU, nor for their rounding (the same rounding, to nearest even, at the same
    /// place). On the layers' bf16 kernel the first layer's bias and the GELU run on each output
    /// tile as it leaves the product ([`bf16_gemm::Epilogue`]: the same bits as the passes).
    pub fn forward_gelu_then(&self, next: &Linear, x: &Tensor) -> Result<Tensor> {
        if let (Weight::OneDnn { w: w1, .. }, Weight::OneDnn { w: w2, out }) = (&self.wt, &next.wt)
        {
            let fused = onednn::gelu_in_product() && !differentiable();
            if fused && x.device().is_cpu() && x.rank() >= 1 {
                let _timer = timing::Timer::linear(true);
                let (x2, dims) = as_rows(x, *out)?;
                let epi = onednn::Epilogue {
                    gelu: true,
                    bf16_out: w1.is_bf16() && w2.is_bf16(),
                };
                let hidden = w1.linear_then(&x2.to_dtype(DType::F32)?, self.bias.as_ref(), epi)?;
                if let Some(h) = hidden {
                    return Ok(w2.linear(&h, next.bias.as_ref())?.reshape(dims)?);
                }
            }
        }
        if let (Weight::Bf16(w1), Weight::Bf16(w2)) = (&self.wt, &next.wt) {
            if w1.on_amx() && x.device().is_cpu() && x.rank() >= 1 && !differentiable() {
                // On AMX the hidden activations go from one product to the next as bf16 pairs
                // (`bf16_gemm::feed_forward`: the same bits as the two layers).
                let _timer = timing::Timer::linear(true);
                let (x2, dims) = as_rows(x, w2.n())?;
                let (first, second) = ((&**w1, self.bias.as_ref()), (&**w2, next.bias.as_ref()));
                if let Some(y) = bf16_gemm::feed_forward(first, second, &x2)? {
                    return Ok(y.reshape(dims)?);
                }
            }
        }
        let kernel_n = match &self.wt {
            Weight::F32(w) => Some(w.n()),
            Weight::Bf16(w) => Some(w.n()),
            _ => None,
        };
        let on_kernel = x.device().is_cpu() && x.rank() >= 1 && !differentiable();
        if let Some(n) = kernel_n.filter(|_| on_kernel) {
            // On the layers' kernels (f32 and bf16) the bias and the GELU run on each output tile
            // as the product leaves it (the same bits as the passes they replace).
            let (x2, dims) = as_rows(x, n)?;
            let hidden = {
                let _timer = timing::Timer::linear(true);
                match &self.wt {
                    Weight::F32(w) => f32_gemm::linear(w, &x2, self.bias.as_ref(), true)?,
                    Weight::Bf16(w) => bf16_gemm::linear(w, &x2, self.bias.as_ref(), true)?,
                    _ => gelu(&self.forward(&x2)?)?,
                }
            };
            return next.forward(&hidden.reshape(dims)?);
        }
        next.forward(&gelu(&self.forward(x)?)?)
    }
}

/// `x [m, k] -> x W^T [m, n]` for a weight that takes no gradient (`wt`: the `[k, n]` transposed
/// view), in [`differentiable`] mode: candle's matmul backward computes the weight's gradient too,
/// which for a whole model is as large as its weights and as costly as the activations' gradient;
/// this op's backward returns the input's alone (`grad W`).
struct FrozenMatMul {
    wt: Tensor,
}

impl candle_core::CustomOp1 for FrozenMatMul {
    fn name(&self) -> &'static str {
        "frozen-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(v) = s else {
            candle_core::bail!("frozen-weight matmul: f32 only");
        };
        let (m, k) = l.shape().dims2()?;
        let x = Tensor::from_slice(
            contiguous(v, l, "frozen-weight matmul")?,
            (m, k),
            &Device::Cpu,
        )?;
        let y = x.matmul(&self.wt)?;
        let n = y.dim(1)?;
        let out = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((m, n)),
        ))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.wt.t()?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    /// Q4_1, Q5_0 and Q5_1 weights of an odd number of blocks a row (one, three): the product runs
    /// (candle asserts an even count in debug builds) and equals the same weight's product with a
    /// second block that is zero in every row, on both quantized paths.
    #[test]
    fn odd_block_counts_multiply_as_the_padded_weight() {
        let dev = Device::Cpu;
        for k in [32, 96] {
            let (m, n) = (5, 7);
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            for ty in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1] {
                let q = std::sync::Arc::new(QTensor::quantize(&w, ty).unwrap());
                // The same rows followed by 32 zero weights, quantized by candle (zero blocks).
                let wide = w.pad_with_zeros(1, 0, 32).unwrap();
                let qw = QTensor::quantize(&wide, ty).unwrap();
                let xw = x.pad_with_zeros(1, 0, 32).unwrap();
                let want = candle_core::quantized::QMatMul::from_qtensor(qw)
                    .unwrap()
                    .forward(&xw)
                    .unwrap();
                for compact in [false, true] {
                    let wt = quantized_weight_on(q.clone(), n, true, compact).unwrap();
                    let y = Linear { wt, bias: None }.forward(&x).unwrap();
                    assert_eq!(y.dims(), &[m, n]);
                    let d = super::super::attention::max_abs_diff(&y, &want);
                    assert!(d < 1e-5, "{ty:?} k {k} compact {compact}: {d}");
                }
            }
        }
    }
}
