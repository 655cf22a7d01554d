//! 2-D convolution within a memory budget (the VAEs' large frames).

use super::contiguous;
use candle_core::{DType, Tensor};
use magcache_core::{Error, Result};

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

/// `(N, C, H, W)` of the input and `(O, KH, KW)` of the weight, checked to fit at padding `pad`.
type ConvDims = ((usize, usize, usize, usize), (usize, usize, usize));

fn conv_dims(
    l1: &candle_core::Layout,
    l2: &candle_core::Layout,
    pad: usize,
) -> candle_core::Result<ConvDims> {
    let (n, c, h, w) = l1.shape().dims4()?;
    let (o, wc, kh, kw) = l2.shape().dims4()?;
    if wc != c || h + 2 * pad < kh || w + 2 * pad < kw {
        candle_core::bail!(
            "row conv2d: input {:?} and weight {:?} do not fit",
            l1.shape(),
            l2.shape()
        );
    }
    Ok(((n, c, h, w), (o, kh, kw)))
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
        let pad = self.pad;
        let ((n, c, h, w), (o, kh, kw)) = conv_dims(l1, l2, pad)?;
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
                rayon::scope(|sc| {
                    for (t, part) in col.chunks_mut(per * p).enumerate() {
                        let fill = &fill;
                        sc.spawn(move |_| fill(t * per, part));
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
