//! LayerNorm and RMSNorm over the last axis on the CPU in f32: rows spread over candle's threads,
//! each row's sums over vector lanes ([`lanes_sum`]) on the widest vectors, the variance from the
//! centred values (two passes over the row, in cache). candle-nn's CPU kernel sums each row
//! serially (one scalar chain, `sum` and `sum of squares` in one pass) into a zeroed output: 3.4 ms
//! per LayerNorm of `[720, 1536]` on a Zen 4 core (issue 45's "rest" of a call).

use super::differentiable;
use super::pointwise::{fill_over_threads, lanes_sum, lanes_sum_of, widest};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor};
use magcache_core::Result;
use std::mem::MaybeUninit;

/// LayerNorm over the last axis, optional affine. On the CPU in f32 this module's kernel (rows over
/// the threads, vectorized sums); elsewhere candle-nn's, fed a contiguous input (its fused kernel
/// only runs on contiguous tensors; on others it falls back to a slower composite path). In
/// [`differentiable`] mode candle-nn's composite `layer_norm_slow` (the fused kernels have no
/// backward).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
    eps: f64,
    /// The CPU kernel's constants, when the weights are f32 on the CPU.
    cpu: Option<std::sync::Arc<RowNorm>>,
}

/// An f32 CPU tensor's values (a norm's constants for the CPU kernel); `None` elsewhere.
fn cpu_values(t: &Tensor) -> Result<Option<Vec<f32>>> {
    Ok(
        (t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 1)
            .then(|| t.to_vec1::<f32>())
            .transpose()?,
    )
}

/// `x` through the CPU norm kernel when it applies (f32 on the CPU, not differentiable).
fn cpu_norm(norm: &Option<std::sync::Arc<RowNorm>>, x: &Tensor) -> Result<Option<Tensor>> {
    match norm {
        Some(n) if x.device().is_cpu() && x.dtype() == DType::F32 && !differentiable() => {
            let x = if x.is_contiguous() {
                x.clone()
            } else {
                x.contiguous()?
            };
            Ok(Some(x.apply_op1_no_bwd(n.as_ref())?))
        }
        _ => Ok(None),
    }
}

impl LayerNorm {
    pub fn new(
        dim: usize,
        eps: f64,
        affine: Option<(Tensor, Tensor)>,
        dev: &Device,
    ) -> Result<Self> {
        let (weight, bias, cpu) = match affine {
            Some((w, b)) => {
                let cpu = match (cpu_values(&w)?, cpu_values(&b)?) {
                    (Some(wv), Some(bv)) => Some((Some(wv), Some(bv))),
                    _ => None,
                };
                (w, b, cpu)
            }
            None => (
                Tensor::ones(dim, DType::F32, dev)?,
                Tensor::zeros(dim, DType::F32, dev)?,
                dev.is_cpu().then_some((None, None)),
            ),
        };
        let cpu = cpu.map(|(weight, bias)| {
            std::sync::Arc::new(RowNorm {
                eps: eps as f32,
                center: true,
                weight,
                bias,
            })
        });
        Ok(LayerNorm {
            inner: candle_nn::LayerNorm::new(weight, bias, eps),
            eps,
            cpu,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let (true, Some(b)) = (differentiable(), self.inner.bias()) {
            let w = self.inner.weight();
            return Ok(candle_nn::ops::layer_norm_slow(x, w, b, self.eps as f32)?);
        }
        if let Some(y) = cpu_norm(&self.cpu, x)? {
            return Ok(y);
        }
        Ok(self.inner.forward(&x.contiguous()?)?)
    }
}

/// RMSNorm over the last axis with a weight: on the CPU in f32 this module's kernel, elsewhere
/// candle-nn's, fed a contiguous input (see [`LayerNorm`]; `rms_norm_slow` in [`differentiable`]
/// mode).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    inner: candle_nn::RmsNorm,
    eps: f64,
    cpu: Option<std::sync::Arc<RowNorm>>,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        // A weight that cannot be read (not f32 on the CPU) leaves the norm on candle-nn's kernel.
        let cpu = cpu_values(&weight).ok().flatten().map(|w| {
            std::sync::Arc::new(RowNorm {
                eps: eps as f32,
                center: false,
                weight: Some(w),
                bias: None,
            })
        });
        RmsNorm {
            inner: candle_nn::RmsNorm::new(weight, eps),
            eps,
            cpu,
        }
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if differentiable() {
            let w = self.inner.weight();
            return Ok(candle_nn::ops::rms_norm_slow(x, w, self.eps as f32)?);
        }
        if let Some(y) = cpu_norm(&self.cpu, x)? {
            return Ok(y);
        }
        Ok(self.inner.forward(&x.contiguous()?)?)
    }
}

/// One norm's constants: `y = (x - mean) / sqrt(var + eps) * weight + bias` per row (LayerNorm,
/// `center`), or `y = x / sqrt(mean(x^2) + eps) * weight` (RMSNorm).
#[derive(Clone, Debug)]
pub(crate) struct RowNorm {
    pub eps: f32,
    pub center: bool,
    pub weight: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
}

impl RowNorm {
    #[inline(always)]
    fn row(&self, x: &[f32], y: &mut [MaybeUninit<f32>]) {
        let d = x.len() as f32;
        let mean = if self.center { lanes_sum(x) / d } else { 0.0 };
        let var = lanes_sum_of(x, |v| (v - mean) * (v - mean)) / d;
        // A variance past f32's range (values near 1e19 and up) would scale the row to zeros: NaN
        // instead, so that the run stops with its non-finite error rather than go on with garbage.
        let inv = if var.is_finite() {
            1.0 / (var + self.eps).sqrt()
        } else {
            f32::NAN
        };
        match (&self.weight, &self.bias) {
            (Some(w), Some(b)) => {
                for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                    y.write((x - mean) * inv * w + b);
                }
            }
            (Some(w), None) => {
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    y.write((x - mean) * inv * w);
                }
            }
            (None, Some(b)) => {
                for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                    y.write((x - mean) * inv + b);
                }
            }
            (None, None) => {
                for (y, &x) in y.iter_mut().zip(x) {
                    y.write((x - mean) * inv);
                }
            }
        }
    }

    fn rows(&self, x: &[f32], y: &mut [MaybeUninit<f32>], d: usize) {
        widest(
            #[inline(always)]
            || {
                for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
                    self.row(x, y);
                }
            },
        )
    }
}

impl CustomOp1 for RowNorm {
    fn name(&self) -> &'static str {
        if self.center {
            "layer-norm-rows"
        } else {
            "rms-norm-rows"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("{}: f32 only", self.name());
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("{}: contiguous input only", self.name());
        };
        let x = &v[a..b];
        let d = l.dims().last().copied().unwrap_or(0);
        for (what, p) in [("weight", &self.weight), ("bias", &self.bias)] {
            if let Some(p) = p {
                if p.len() != d {
                    candle_core::bail!(
                        "{}: {what} of {} values for rows of {d}",
                        self.name(),
                        p.len()
                    );
                }
            }
        }
        if d == 0 {
            return Ok((CpuStorage::F32(Vec::new()), l.shape().clone()));
        }
        // SAFETY: the chunks hold whole rows (`x.len()` is a whole number of rows of `d`) and
        // `rows` writes every row of its output chunk.
        let out = unsafe { fill_over_threads(x, d, 1 << 16, |y, x| self.rows(x, y, d)) };
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(x - mean) / sqrt(var + eps) * w + b` per row in f64 (`center` off: no mean, no bias).
    fn reference(x: &[f32], d: usize, eps: f64, center: bool, w: &[f32], b: &[f32]) -> Vec<f64> {
        x.chunks(d)
            .flat_map(|r| {
                let n = d as f64;
                let mean = if center {
                    r.iter().map(|&v| v as f64).sum::<f64>() / n
                } else {
                    0.0
                };
                let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                let inv = 1.0 / (var + eps).sqrt();
                r.iter()
                    .enumerate()
                    .map(move |(i, &v)| (v as f64 - mean) * inv * w[i] as f64 + b[i] as f64)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn row_norms_match_f64_on_odd_rows_and_threads() {
        let dev = Device::Cpu;
        // Row lengths with and without a lane tail; row counts below and above the threaded size.
        for (rows, d) in [(3, 7), (5, 16), (2, 33), (300, 250), (64, 1536)] {
            let x = (Tensor::randn(0f32, 2.0, (1, rows, d), &dev).unwrap() + 3.0).unwrap();
            let w = Tensor::randn(0f32, 1.0, d, &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, d, &dev).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (wv, bv) = (w.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            let (ones, zeros) = (vec![1f32; d], vec![0f32; d]);
            let cases = [
                (
                    LayerNorm::new(d, 1e-6, Some((w.clone(), b.clone())), &dev)
                        .unwrap()
                        .forward(&x)
                        .unwrap(),
                    reference(&xs, d, 1e-6, true, &wv, &bv),
                ),
                (
                    LayerNorm::new(d, 1e-5, None, &dev)
                        .unwrap()
                        .forward(&x)
                        .unwrap(),
                    reference(&xs, d, 1e-5, true, &ones, &zeros),
                ),
                (
                    RmsNorm::new(w.clone(), 1e-6).forward(&x).unwrap(),
                    reference(&xs, d, 1e-6, false, &wv, &zeros),
                ),
            ];
            for (i, (y, want)) in cases.iter().enumerate() {
                assert_eq!(y.dims(), x.dims());
                let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "case {i}, {rows} x {d}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn row_norms_take_strided_inputs_and_refuse_a_wrong_weight() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 6, 10), &dev).unwrap();
        let t = x.transpose(0, 1).unwrap();
        let n = LayerNorm::new(10, 1e-6, None, &dev).unwrap();
        let a = n.forward(&t).unwrap();
        let b = n.forward(&t.contiguous().unwrap()).unwrap();
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // Values whose squares overflow f32: NaN out (a non-finite error downstream), not zeros.
        let huge = (Tensor::randn(0f32, 1.0, (2, 10), &dev).unwrap() * 1e30).unwrap();
        let y = n.forward(&huge).unwrap().flatten_all().unwrap();
        assert!(y.to_vec1::<f32>().unwrap().iter().all(|v| v.is_nan()));
        let wrong = RmsNorm::new(Tensor::ones(7, DType::F32, &dev).unwrap(), 1e-6);
        let e = wrong.forward(&x).unwrap_err().to_string();
        assert!(e.contains("weight of 7 values for rows of 10"), "{e}");
    }
}
