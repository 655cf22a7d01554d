//! Maths shared by strategies and calibration.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor, D};

/// Nearest-index resampling of a curve to `target` entries:
/// `out[i] = src[round(i * (len - 1) / (target - 1))]`, rounding half to even (as numpy does).
/// Both ends are kept: `out[0] = src[0]` and `out[target-1] = src[len-1]`. A target of one keeps the
/// last entry.
pub fn nearest_interp(src: &[f64], target: usize) -> Result<Vec<f64>> {
    if src.is_empty() {
        return Err(Error::msg("cannot resample an empty curve"));
    }
    if target == 0 {
        return Ok(Vec::new());
    }
    if target == 1 {
        return Ok(vec![src[src.len() - 1]]);
    }
    let scale = (src.len() - 1) as f64 / (target - 1) as f64;
    Ok((0..target)
        .map(|i| {
            let idx = (i as f64 * scale).round_ties_even() as usize;
            src[idx.min(src.len() - 1)]
        })
        .collect())
}

/// Resamples a curve defined at noise levels `src_sigmas` to the noise levels `dst_sigmas`: each
/// destination step takes the entry of the source step whose sigma is nearest (ties to the earlier
/// step). Used by `resample = "sigma"`.
pub fn sigma_interp(src: &[f64], src_sigmas: &[f64], dst_sigmas: &[f64]) -> Result<Vec<f64>> {
    if src.is_empty() || src.len() != src_sigmas.len() {
        return Err(Error::msg(format!(
            "sigma resampling needs one sigma per curve entry ({} entries, {} sigmas)",
            src.len(),
            src_sigmas.len()
        )));
    }
    Ok(dst_sigmas
        .iter()
        .map(|&s| {
            let mut best = 0;
            for (j, &t) in src_sigmas.iter().enumerate() {
                if (t - s).abs() < (src_sigmas[best] - s).abs() {
                    best = j;
                }
            }
            src[best]
        })
        .collect())
}

/// Mean absolute value of a tensor, as f64.
pub fn mean_abs(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F32)?
        .abs()?
        .mean_all()?
        .to_scalar::<f32>()? as f64)
}

/// Relative L1 distance `mean|a - b| / mean|b|`. A zero `b` gives `0` when `a == b` and
/// `f64::INFINITY` otherwise: never NaN, never a division by zero.
pub fn rel_l1(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (num, den) = rel_l1_parts(a, b)?;
    Ok(safe_ratio(num, den))
}

/// `(mean|a - b|, mean|b|)` in f32: the partial quantities of [`rel_l1`] (what ranks average).
pub fn rel_l1_parts(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    let diff = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
    Ok((mean_abs(&diff)?, mean_abs(b)?))
}

/// `num / den` with the conventions of [`rel_l1`] for a zero denominator.
pub fn safe_ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        num / den
    } else if num == 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

/// Statistics of one residual against the previous step's, the MagCache calibration quantities.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MagStats {
    /// Mean over tokens of `||r_t|| / (||r_{t-1}|| + 1e-8)`, norms over the channel (last) axis.
    pub ratio: f64,
    /// Standard deviation (unbiased) of that per-token ratio.
    pub std: f64,
    /// Mean over tokens of the cosine distance `1 - cos(r_t, r_{t-1})`.
    pub cos_dist: f64,
}

/// Computes [`MagStats`] of `curr` against `prev` (same shape, channels last).
pub fn mag_stats(curr: &Tensor, prev: &Tensor) -> Result<MagStats> {
    if curr.dims() != prev.dims() {
        return Err(Error::msg(format!(
            "calibration: residual shape {:?} differs from the previous step's {:?}",
            curr.dims(),
            prev.dims()
        )));
    }
    let c = curr.to_dtype(DType::F32)?;
    let p = prev.to_dtype(DType::F32)?;
    let cn = c.sqr()?.sum(D::Minus1)?.sqrt()?;
    let pn = p.sqr()?.sum(D::Minus1)?.sqrt()?;
    let ratio_t = (&cn / (&pn + 1e-8)?)?.flatten_all()?;
    let n = ratio_t.elem_count();
    let ratio = ratio_t.mean_all()?.to_scalar::<f32>()? as f64;
    let std = if n > 1 {
        let var = (ratio_t.broadcast_sub(&Tensor::new(ratio as f32, ratio_t.device())?)?)
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64
            / (n - 1) as f64;
        var.sqrt()
    } else {
        0.0
    };
    let dot = (&c * &p)?.sum(D::Minus1)?;
    let denom = (cn.clamp(1e-8, f32::MAX)? * pn.clamp(1e-8, f32::MAX)?)?;
    let cos = (dot / denom)?;
    let cos_dist = 1.0 - cos.mean_all()?.to_scalar::<f32>()? as f64;
    Ok(MagStats {
        ratio,
        std,
        cos_dist,
    })
}

/// Bytes held by a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn interp_matches_numpy_rounding() {
        // numpy: np.round(np.arange(5) * 27/4) = [0, 7, 14, 20, 27] (6.75->7, 13.5->14, 20.25->20)
        let src: Vec<f64> = (0..28).map(|i| i as f64).collect();
        assert_eq!(
            nearest_interp(&src, 5).unwrap(),
            vec![0.0, 7.0, 14.0, 20.0, 27.0]
        );
        // 10 of 28: scale 3; exact
        assert_eq!(nearest_interp(&src, 10).unwrap()[3], 9.0);
        // round half to even: src len 3 -> 5 => idx i*0.5 = [0, .5->0, 1, 1.5->2, 2]
        assert_eq!(
            nearest_interp(&[1.0, 2.0, 3.0], 5).unwrap(),
            vec![1.0, 1.0, 2.0, 3.0, 3.0]
        );
        assert_eq!(nearest_interp(&[1.0, 2.0, 3.0], 1).unwrap(), vec![3.0]);
        assert!(nearest_interp(&[], 3).is_err());
    }

    #[test]
    fn rel_l1_zero_previous_is_finite_or_zero() {
        let d = Device::Cpu;
        let z = Tensor::zeros(4, DType::F32, &d).unwrap();
        let o = Tensor::ones(4, DType::F32, &d).unwrap();
        assert_eq!(rel_l1(&z, &z).unwrap(), 0.0);
        let r = rel_l1(&o, &z).unwrap();
        assert!(r.is_infinite() && !r.is_nan());
        assert!((rel_l1(&(&o * 2.0).unwrap(), &o).unwrap() - 1.0).abs() < 1e-7);
    }

    #[test]
    fn mag_stats_of_scaled_residual() {
        let d = Device::Cpu;
        let p = Tensor::new(&[[[1.0f32, 0.0], [0.0, 2.0]]], &d).unwrap();
        let c = (&p * 1.5).unwrap();
        let s = mag_stats(&c, &p).unwrap();
        assert!((s.ratio - 1.5).abs() < 1e-6);
        assert!(s.std.abs() < 1e-6);
        assert!(s.cos_dist.abs() < 1e-6);
    }
}
