//! Elementwise CPU kernels: the widening of bf16/f16 to f32 and the tanh GELU, over the threads.

use candle_core::{DType, Tensor};
use magcache_core::Result;

/// `e^z` for f32 with ~1e-7 relative error, branch-free so the compiler vectorizes it: range reduction
/// `z = n ln2 + r`, a degree-6 polynomial for `e^r` (|r| <= ln2/2), `2^n` from the exponent bits.
#[inline(always)]
pub(super) fn fast_exp(z: f32) -> f32 {
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
    if x.dtype() != DType::F32
        || x.device().is_cuda()
        || x.device().is_metal()
        || super::differentiable()
    {
        return Ok(x.gelu()?);
    }
    let x = if x.is_contiguous() {
        x.clone()
    } else {
        x.contiguous()?
    };
    Ok(x.apply_op1_no_bwd(&FastGelu)?)
}
