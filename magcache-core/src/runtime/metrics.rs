//! Quality of a cached result against the dense one.
//!
//! - `max_abs`, `mean_abs`: largest and mean absolute difference of the final latents.
//! - `psnr`: `10 log10(range^2 / MSE)` in dB, `range` the data range (for the digits model the pixel
//!   range, 2; by default the dense result's max - min). Infinite when identical.
//! - `ssim`: mean structural similarity over every 2-D image plane (`[N, H, W]`), with a 7x7 uniform
//!   window (smaller for smaller planes), `C1 = (0.01 range)^2`, `C2 = (0.03 range)^2` and the sample
//!   covariance, as scikit-image's default `structural_similarity`.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Quality {
    pub psnr_db: f64,
    pub ssim: f64,
    pub max_abs: f64,
    pub mean_abs: f64,
    pub data_range: f64,
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Compares `test` with `reference` (same shape); `planes` are both as `[N, H, W]` image planes.
pub fn quality(
    reference: &Tensor,
    test: &Tensor,
    ref_planes: &Tensor,
    test_planes: &Tensor,
    data_range: Option<f64>,
) -> Result<Quality> {
    if reference.dims() != test.dims() {
        return Err(Error::msg(format!(
            "cannot compare shapes {:?} and {:?}",
            reference.dims(),
            test.dims()
        )));
    }
    let a = flat(reference)?;
    let b = flat(test)?;
    let n = a.len().max(1) as f64;
    let (mut max_abs, mut sum_abs, mut sse) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        let d = (*x as f64 - *y as f64).abs();
        max_abs = max_abs.max(d);
        sum_abs += d;
        sse += d * d;
    }
    let range = data_range.unwrap_or_else(|| {
        let (lo, hi) = a
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        (hi - lo).max(f32::MIN_POSITIVE) as f64
    });
    let mse = sse / n;
    let psnr_db = if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (range * range / mse).log10()
    };
    Ok(Quality {
        psnr_db,
        ssim: ssim(ref_planes, test_planes, range)?,
        max_abs,
        mean_abs: sum_abs / n,
        data_range: range,
    })
}

/// Mean SSIM over `[N, H, W]` planes.
pub fn ssim(a: &Tensor, b: &Tensor, range: f64) -> Result<f64> {
    let (n, h, w) = a.dims3()?;
    if b.dims() != [n, h, w] {
        return Err(Error::msg(format!(
            "SSIM planes differ: {:?} vs {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let a = flat(a)?;
    let b = flat(b)?;
    let win = 7.min(h).min(w);
    let win = if win % 2 == 0 {
        win.saturating_sub(1).max(1)
    } else {
        win
    };
    let np = (win * win) as f64;
    let cov_norm = if np > 1.0 { np / (np - 1.0) } else { 1.0 };
    let c1 = (0.01 * range).powi(2);
    let c2 = (0.03 * range).powi(2);
    let (mut total, mut count) = (0.0, 0usize);
    for p in 0..n {
        let x = &a[p * h * w..(p + 1) * h * w];
        let y = &b[p * h * w..(p + 1) * h * w];
        // Windows fully inside the plane (scikit-image crops the borders the same way).
        // (None for planes smaller than the window, i.e. empty ones.)
        for i in 0..(h + 1).saturating_sub(win) {
            for j in 0..(w + 1).saturating_sub(win) {
                let (mut sx, mut sy, mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
                for di in 0..win {
                    for dj in 0..win {
                        let k = (i + di) * w + j + dj;
                        let (u, v) = (x[k] as f64, y[k] as f64);
                        sx += u;
                        sy += v;
                        sxx += u * u;
                        syy += v * v;
                        sxy += u * v;
                    }
                }
                let (mx, my) = (sx / np, sy / np);
                let vx = cov_norm * (sxx / np - mx * mx);
                let vy = cov_norm * (syy / np - my * my);
                let vxy = cov_norm * (sxy / np - mx * my);
                total += ((2.0 * mx * my + c1) * (2.0 * vxy + c2))
                    / ((mx * mx + my * my + c1) * (vx + vy + c2));
                count += 1;
            }
        }
    }
    Ok(if count == 0 {
        1.0
    } else {
        total / count as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn identical_is_perfect_and_noise_is_not() {
        let d = Device::Cpu;
        let a = Tensor::arange(0f32, 64.0, &d)
            .unwrap()
            .reshape((1, 8, 8))
            .unwrap();
        let q = quality(&a, &a, &a, &a, None).unwrap();
        assert!(q.psnr_db.is_infinite() && (q.ssim - 1.0).abs() < 1e-12 && q.max_abs == 0.0);
        let b = (&a + 1.0).unwrap();
        let q = quality(&a, &b, &a, &b, Some(63.0)).unwrap();
        assert!((q.psnr_db - 10.0 * (63.0f64 * 63.0).log10()).abs() < 1e-9);
        assert!(q.ssim < 1.0 && q.ssim > 0.9);
        assert_eq!(q.mean_abs, 1.0);
    }
}
