//! Elementwise CPU kernels: the widening of bf16/f16 to f32 and the tanh GELU, over the threads.

use candle_core::{DType, Tensor};
use magcache_core::Result;
use std::mem::MaybeUninit;

/// `e^z` for f32 with ~1e-7 relative error, branch-free so the compiler vectorizes it: range reduction
/// `z = n ln2 + r`, a degree-6 polynomial for `e^r` (|r| <= ln2/2), `2^n` from the exponent bits.
#[inline(always)]
pub(super) fn fast_exp(z: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to nearest
    let z = z.clamp(-87.0, 88.0);
    let k = z * LOG2E + ROUND;
    let n = k - ROUND;
    let r = z - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `n` as an integer from `k`'s bits (`k = 1.5 * 2^23 + n`, so its mantissa holds `n`): an
    // integer subtraction, where `n as i32` (Rust's saturating conversion) kept the loops scalar
    // lane by lane (measured: the GELU of the Wan2.1-1.3B FFN 2.4 ns per value on a Zen 4).
    let n_int = k.to_bits().wrapping_sub(ROUND.to_bits());
    f32::from_bits(n_int.wrapping_add(127) << 23) * p
}

/// Runs `body` compiled for the widest vectors this CPU has: AVX-512F, else AVX2 with FMA, else
/// the build's baseline (SSE2 on x86-64; the default build targets no particular CPU). The loops
/// in `body` (inlined into the wrapper whose features are enabled) are vectorized that wide; the
/// results are the same bits at every width where `body` does no horizontal reduction of its own
/// (a reduction written over [`LANES`] partial results, as [`lanes_sum`], is the same at every
/// width).
#[inline(always)]
pub(super) fn widest<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the wrapper is compiled for.
            return unsafe { avx512(body) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { avx2(body) };
        }
    }
    body()
}

/// Partial results a reduction keeps ([`lanes_sum`], [`lanes_max`]): one AVX-512 register's f32
/// lanes, so the loop vectorizes (a plain running sum is a serial chain the compiler may not
/// reorder) and the result does not depend on the vector width.
pub(super) const LANES: usize = 16;

/// The sum of `v`, over [`LANES`] partial sums.
#[inline(always)]
pub(super) fn lanes_sum(v: &[f32]) -> f32 {
    lanes_sum_of(v, |x| x)
}

/// The sum of `f(x)` over `v`, over [`LANES`] partial sums (`f` inlined into the loop).
#[inline(always)]
pub(super) fn lanes_sum_of(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|&x| f(x)).sum::<f32>()
}

/// The largest value of `v` (`f32::max`'s: a NaN is passed over), over [`LANES`] partial maxima;
/// `-inf` when empty.
#[inline(always)]
pub(super) fn lanes_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    acc.iter()
        .chain(tail)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// GELU with the tanh approximation (`0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, as
/// `gelu-approximate` in diffusers), written as `x / (1 + e^(-2u))`.
#[inline(always)]
pub(super) fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let u = C * (x + 0.044_715 * x * x * x);
    x / (1.0 + fast_exp(-2.0 * u))
}

/// A new vector of `src.len()` values written once by `apply(out, src)` on matching chunks, never
/// zeroed first (a zeroed `vec!` of a large output cost a memset as long as a cheap map): over
/// candle's CPU threads (`RAYON_NUM_THREADS`, like its own ops and `nn::attention::cpu_attention`) when `src`
/// holds at least `min_len` values, in chunks of whole `unit`s (a norm's rows), else on this
/// thread.
///
/// # Safety
/// `apply` writes every element of the output chunk it is given (as long as its input chunk).
pub(super) unsafe fn fill_over_threads<A: Sync, B: Send>(
    src: &[A],
    unit: usize,
    min_len: usize,
    apply: impl Fn(&mut [MaybeUninit<B>], &[A]) + Sync,
) -> Vec<B> {
    let mut out: Vec<B> = Vec::with_capacity(src.len());
    let spare = &mut out.spare_capacity_mut()[..src.len()];
    let units = src.len() / unit.max(1);
    let threads = candle_core::utils::get_num_threads().min(units);
    if threads > 1 && src.len() >= min_len {
        let chunk = units.div_ceil(threads) * unit;
        rayon::scope(|sc| {
            for (o, i) in spare.chunks_mut(chunk).zip(src.chunks(chunk)) {
                let apply = &apply;
                sc.spawn(move |_| apply(o, i));
            }
        });
    } else {
        apply(spare, src);
    }
    // SAFETY: the chunks of `spare` and of `src` pair up one to one and cover both, and the
    // caller's `apply` wrote every element of each.
    unsafe { out.set_len(src.len()) };
    out
}

/// `f(src[i])` for every `i` on the CPU's widest vectors ([`widest`]: `f` inlined into the loop),
/// over the threads for large slices ([`fill_over_threads`]).
fn par_map<A: Copy + Sync, B: Send>(src: &[A], f: impl Fn(A) -> B + Sync) -> Vec<B> {
    let apply = |o: &mut [MaybeUninit<B>], i: &[A]| {
        widest(
            #[inline(always)]
            || {
                for (o, &x) in o.iter_mut().zip(i) {
                    o.write(f(x));
                }
            },
        )
    };
    // SAFETY: `apply` writes every element of its output chunk (as long as its input chunk).
    unsafe { fill_over_threads(src, 1, 1 << 18, apply) }
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
        let out = match s {
            candle_core::CpuStorage::BF16(v) => par_map(&v[a..b], |x| x.to_f32()),
            candle_core::CpuStorage::F16(v) => par_map(&v[a..b], |x| x.to_f32()),
            _ => candle_core::bail!("widen to f32: bf16 or f16 input only"),
        };
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
        let out = par_map(src, gelu_tanh);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.013 - 6.0)
            .collect()
    }

    #[test]
    fn lane_reductions_match_f64_on_every_tail() {
        for n in (0..70).chain([1000, 4801]) {
            let v = values(n);
            let exact: f64 = v.iter().map(|&x| x as f64).sum();
            let sum = lanes_sum(&v) as f64;
            assert!(
                (sum - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                "n {n}: {sum} vs {exact}"
            );
            let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(lanes_max(&v), max, "n {n}");
        }
        assert_eq!(lanes_max(&[]), f32::NEG_INFINITY);
        // A NaN is passed over as `f32::max` does, in a lane and in the tail.
        let mut v = values(40);
        v[3] = f32::NAN;
        v[37] = f32::NAN;
        assert_eq!(
            lanes_max(&v),
            values(40).iter().copied().fold(f32::NEG_INFINITY, f32::max)
        );
    }

    /// The widest vectors give the baseline's bits: the exponential, and a reduction over lanes.
    #[test]
    fn widest_vectors_give_the_baseline_bits() {
        let v: Vec<f32> = values(1037).iter().map(|x| x * 15.0).collect();
        // Plain loops inlined into the wrapper, so the wide build really vectorizes them.
        #[inline(always)]
        fn body(v: &[f32]) -> (f32, f32, Vec<f32>, Vec<f32>) {
            let (mut e, mut g) = (vec![0f32; v.len()], vec![0f32; v.len()]);
            for ((e, g), &x) in e.iter_mut().zip(g.iter_mut()).zip(v) {
                *e = fast_exp(x);
                *g = gelu_tanh(x);
            }
            (lanes_sum(&e), lanes_max(&g), e, g)
        }
        let wide = widest(
            #[inline(always)]
            || body(&v),
        );
        let base = body(&v);
        assert_eq!(wide.0.to_bits(), base.0.to_bits());
        assert_eq!(wide.1.to_bits(), base.1.to_bits());
        for (a, b) in wide.2.iter().zip(&base.2).chain(wide.3.iter().zip(&base.3)) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }
}
