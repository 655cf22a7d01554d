//! Quality of a cached result against the dense one.
//!
//! - `max_abs`, `mean_abs`: largest and mean absolute difference of the final latents.
//! - `psnr`: `10 log10(range^2 / MSE)` in dB, `range` the data range (for the digits model the pixel
//!   range, 2; by default the dense result's max - min). Infinite when identical.
//! - `ssim`: mean structural similarity over every 2-D image plane (`[N, H, W]`), with a 7x7 uniform
//!   window (smaller for smaller planes), `C1 = (0.01 range)^2`, `C2 = (0.03 range)^2` and the sample
//!   covariance, as scikit-image's default `structural_similarity`.
//!
//! - `worst_sample`: for a batch of more than one sample (the first dimension), the sample with the
//!   lowest PSNR and that PSNR, measured the same way on its values alone (with the batch's data
//!   range): a batch's PSNR averages
//!   the error, and one sample far below the others (a trajectory near a point where it could turn
//!   into another image) is what a user sees.
//!
//! [`pixel_quality`] measures decoded pixels as the papers' evaluation scripts do (the
//! `common_metrics_on_video_quality` scripts the TeaCache and MagCache evaluations run): pixels in
//! [0, 1], PSNR and SSIM per frame, then the mean over the frames.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Quality {
    pub psnr_db: f64,
    pub ssim: f64,
    pub max_abs: f64,
    pub mean_abs: f64,
    pub data_range: f64,
    /// The lowest-PSNR sample of a batch of more than one (module docs); absent for one sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worst_sample: Option<WorstSample>,
}

/// The sample of a batch with the lowest PSNR against the reference.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct WorstSample {
    /// Its index in the batch (0-based).
    pub index: usize,
    /// Of how many.
    pub of: usize,
    pub psnr_db: f64,
}

/// The lowest of per-sample PSNRs (`None` for fewer than two; the first of equals; a NaN, from
/// non-finite values, counts as the lowest).
fn worst_of(psnrs: &[f64]) -> Option<WorstSample> {
    if psnrs.len() < 2 {
        return None;
    }
    let key = |p: f64| if p.is_nan() { f64::NEG_INFINITY } else { p };
    let mut index = 0;
    for (i, &p) in psnrs.iter().enumerate() {
        if key(p) < key(psnrs[index]) {
            index = i;
        }
    }
    Some(WorstSample {
        index,
        of: psnrs.len(),
        psnr_db: psnrs[index],
    })
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
    // One pass: the batch's sums and each sample's squared error (a batch of more than one sample
    // along the first dimension; otherwise one chunk, no per-sample figure).
    let batch = reference.dims().first().copied().unwrap_or(1);
    let split = batch > 1 && !a.is_empty() && a.len() % batch == 0;
    let per = if split {
        a.len() / batch
    } else {
        a.len().max(1)
    };
    let (mut max_abs, mut sum_abs, mut sse) = (0f64, 0f64, 0f64);
    let mut sample_sse = Vec::with_capacity(batch);
    for (x, y) in a.chunks(per).zip(b.chunks(per)) {
        let mut own = 0f64;
        for (x, y) in x.iter().zip(y) {
            let d = (*x as f64 - *y as f64).abs();
            max_abs = max_abs.max(d);
            sum_abs += d;
            sse += d * d;
            own += d * d;
        }
        sample_sse.push(own);
    }
    let range = data_range.unwrap_or_else(|| {
        let (lo, hi) = a
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        (hi - lo).max(f32::MIN_POSITIVE) as f64
    });
    let psnr = |sse: f64, n: f64| {
        let mse = sse / n;
        if mse == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (range * range / mse).log10()
        }
    };
    let per_sample: Vec<f64> = if split {
        sample_sse.iter().map(|&e| psnr(e, per as f64)).collect()
    } else {
        Vec::new()
    };
    Ok(Quality {
        psnr_db: psnr(sse, n),
        ssim: ssim(ref_planes, test_planes, range)?,
        max_abs,
        mean_abs: sum_abs / n,
        data_range: range,
        worst_sample: worst_of(&per_sample),
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

/// Frames of decoded pixels: `(frames, height, width, channels, values)` of `[B, F, H, W, C]` (a
/// video; `B * F` frames) or `[B, H, W, C]` (images; `B` frames), values as f64.
fn frames_of(t: &Tensor) -> Result<(usize, usize, usize, usize, Vec<f64>)> {
    let d = t.dims();
    let (n, h, w, c) = match *d {
        [b, f, h, w, c] => (b * f, h, w, c),
        [b, h, w, c] => (b, h, w, c),
        _ => {
            return Err(Error::msg(format!(
                "decoded pixels of shape {d:?}: expected [B, F, H, W, C] or [B, H, W, C]"
            )))
        }
    };
    let v = flat(t)?.into_iter().map(f64::from).collect();
    Ok((n, h, w, c, v))
}

/// The per-frame PSNR a frame gets when it equals the reference (MSE below 1e-10), as the papers'
/// scripts give it.
pub const PSNR_IDENTICAL_DB: f64 = 100.0;

/// The normalised 1-D Gaussian of `size` taps, sigma 1.5 (OpenCV's `getGaussianKernel(size, 1.5)`).
fn gaussian_taps(size: usize) -> Vec<f64> {
    let mid = (size / 2) as f64;
    let g: Vec<f64> = (0..size)
        .map(|i| (-((i as f64 - mid).powi(2)) / (2.0 * 1.5 * 1.5)).exp())
        .collect();
    let s: f64 = g.iter().sum();
    g.into_iter().map(|v| v / s).collect()
}

/// Quality of decoded pixels `test` against `reference` (same shape, `[B, F, H, W, C]` or
/// `[B, H, W, C]`, values in [0, 1]; values outside are clamped to it first):
///
/// - `psnr_db`: per frame `10 log10(1 / MSE)` with the MSE over the frame's `H * W * C` values
///   ([`PSNR_IDENTICAL_DB`] where the MSE is below 1e-10), then the mean over the frames.
/// - `ssim`: per frame and channel, SSIM with an 11x11 Gaussian window of sigma 1.5 (smaller frames:
///   the largest odd size that fits, same sigma, renormalised) over the windows wholly inside the
///   frame, `C1 = 0.01^2`, `C2 = 0.03^2`, weighted (biased) variances; the mean of the map, then
///   the mean over channels, then over frames (Wang et al. 2004 as the scripts compute it).
/// - `max_abs`, `mean_abs` over every value; `data_range` 1.
pub fn pixel_quality(reference: &Tensor, test: &Tensor) -> Result<Quality> {
    if reference.dims() != test.dims() {
        return Err(Error::msg(format!(
            "cannot compare decoded pixels of shapes {:?} and {:?}",
            reference.dims(),
            test.dims()
        )));
    }
    let (n, h, w, c, a) = frames_of(reference)?;
    let (_, _, _, _, b) = frames_of(test)?;
    if n * h * w * c == 0 {
        return Err(Error::msg(format!(
            "cannot compare decoded pixels of shape {:?}: no pixels",
            reference.dims()
        )));
    }
    let a: Vec<f64> = a.into_iter().map(|v| v.clamp(0.0, 1.0)).collect();
    let b: Vec<f64> = b.into_iter().map(|v| v.clamp(0.0, 1.0)).collect();
    let per = h * w * c;
    let (mut max_abs, mut sum_abs) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        max_abs = max_abs.max(d);
        sum_abs += d;
    }
    let win = 11.min(h).min(w);
    let win = if win % 2 == 0 { win - 1 } else { win };
    let taps = gaussian_taps(win.max(1));
    let (mut psnr_sum, mut ssim_sum) = (0.0, 0.0);
    let mut frame_psnr = Vec::with_capacity(n);
    for f in 0..n {
        let x = &a[f * per..(f + 1) * per];
        let y = &b[f * per..(f + 1) * per];
        let mse = x.iter().zip(y).map(|(u, v)| (u - v) * (u - v)).sum::<f64>() / per.max(1) as f64;
        let p = if mse < 1e-10 {
            PSNR_IDENTICAL_DB
        } else {
            10.0 * (1.0 / mse).log10()
        };
        psnr_sum += p;
        frame_psnr.push(p);
        let mut frame_ssim = 0.0;
        for ch in 0..c {
            let plane = |v: &[f64]| -> Vec<f64> { (0..h * w).map(|k| v[k * c + ch]).collect() };
            frame_ssim += gaussian_ssim(&plane(x), &plane(y), h, w, &taps);
        }
        ssim_sum += frame_ssim / c.max(1) as f64;
    }
    let frames = n.max(1) as f64;
    // A sample's PSNR: the mean over its own frames, as the batch's over all.
    let batch = reference.dims().first().copied().unwrap_or(1);
    let per_sample: Vec<f64> = if batch > 1 && n > 0 && n % batch == 0 {
        frame_psnr
            .chunks(n / batch)
            .map(|f| f.iter().sum::<f64>() / f.len() as f64)
            .collect()
    } else {
        Vec::new()
    };
    Ok(Quality {
        psnr_db: psnr_sum / frames,
        ssim: ssim_sum / frames,
        max_abs,
        mean_abs: sum_abs / a.len().max(1) as f64,
        data_range: 1.0,
        worst_sample: worst_of(&per_sample),
    })
}

/// Mean SSIM of one `h x w` plane pair over the windows wholly inside it, the window the outer
/// product of `taps` (separable: rows, then columns); 1 when no window fits.
fn gaussian_ssim(x: &[f64], y: &[f64], h: usize, w: usize, taps: &[f64]) -> f64 {
    let k = taps.len();
    if k == 0 || h < k || w < k {
        return 1.0;
    }
    let (oh, ow) = (h - k + 1, w - k + 1);
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    // Five maps filtered: x, y, x^2, y^2, xy.
    let mut rows = vec![0.0; h * ow];
    let mut filter = |v: &[f64]| -> Vec<f64> {
        for i in 0..h {
            let src = &v[i * w..(i + 1) * w];
            let dst = &mut rows[i * ow..(i + 1) * ow];
            for (j, d) in dst.iter_mut().enumerate() {
                *d = taps.iter().zip(&src[j..j + k]).map(|(t, s)| t * s).sum();
            }
        }
        let mut out = vec![0.0; oh * ow];
        for i in 0..oh {
            let dst = &mut out[i * ow..(i + 1) * ow];
            for (t, &g) in taps.iter().enumerate() {
                let src = &rows[(i + t) * ow..(i + t + 1) * ow];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += g * s;
                }
            }
        }
        out
    };
    let product =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(u, v)| u * v).collect() };
    let mx = filter(x);
    let my = filter(y);
    let mxx = filter(&product(x, x));
    let myy = filter(&product(y, y));
    let mxy = filter(&product(x, y));
    let mut total = 0.0;
    for p in 0..oh * ow {
        let (u, v) = (mx[p], my[p]);
        let (vx, vy, cxy) = (mxx[p] - u * u, myy[p] - v * v, mxy[p] - u * v);
        total += ((2.0 * u * v + c1) * (2.0 * cxy + c2)) / ((u * u + v * v + c1) * (vx + vy + c2));
    }
    total / (oh * ow) as f64
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

    #[test]
    fn pixels_of_no_size_are_an_error() {
        for shape in [(1, 0, 5, 3), (1, 5, 0, 3), (0, 5, 5, 3)] {
            let t = Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
            let e = pixel_quality(&t, &t).unwrap_err().to_string();
            assert!(e.contains("no pixels"), "{shape:?}: {e}");
        }
    }

    #[test]
    fn pixel_quality_is_per_frame_in_unit_range() {
        let d = Device::Cpu;
        let a = (Tensor::arange(0f32, 2.0 * 16.0 * 12.0 * 3.0, &d)
            .unwrap()
            .reshape((1, 2, 16, 12, 3))
            .unwrap()
            / 1500.0)
            .unwrap();
        let q = pixel_quality(&a, &a).unwrap();
        assert_eq!(q.psnr_db, PSNR_IDENTICAL_DB);
        assert!((q.ssim - 1.0).abs() < 1e-12);
        // Frame 0 off by 0.1 everywhere, frame 1 equal: (20 + 100) / 2 dB.
        let off = Tensor::cat(
            &[
                (a.narrow(1, 0, 1).unwrap() + 0.1).unwrap(),
                a.narrow(1, 1, 1).unwrap(),
            ],
            1,
        )
        .unwrap();
        let q = pixel_quality(&a, &off).unwrap();
        assert!((q.psnr_db - 60.0).abs() < 1e-4, "{}", q.psnr_db);
        assert!(q.ssim < 1.0 && q.ssim > 0.5 && q.data_range == 1.0);
        assert!(pixel_quality(&a, &a.narrow(1, 0, 1).unwrap()).is_err());
        assert_eq!(q.worst_sample, None, "one sample");
        // Two samples of two frames: sample 1 is `off` (frame 0 at 20 dB), the rest equal.
        let two = Tensor::cat(&[&a, &a], 0).unwrap();
        let one_off = Tensor::cat(&[&a, &off], 0).unwrap();
        let q = pixel_quality(&two, &one_off).unwrap();
        let w = q.worst_sample.unwrap();
        assert_eq!((w.index, w.of), (1, 2));
        assert!((w.psnr_db - 60.0).abs() < 1e-4 && (q.psnr_db - 80.0).abs() < 1e-4);
    }

    #[test]
    fn a_nan_sample_is_the_worst() {
        let w = worst_of(&[10.0, f64::NAN, 50.0]).unwrap();
        assert!(w.index == 1 && w.psnr_db.is_nan());
        let w = worst_of(&[30.0, 10.0, 10.0, f64::INFINITY]).unwrap();
        assert_eq!((w.index, w.of, w.psnr_db), (1, 4, 10.0));
        assert_eq!(worst_of(&[5.0]), None);
    }

    /// A batch's worst sample is the one with the largest error, measured on its values alone.
    #[test]
    fn worst_sample_names_the_sample_far_below_the_batch() {
        let d = Device::Cpu;
        let a = Tensor::zeros((4, 2, 8, 8), DType::F32, &d).unwrap();
        let planes = |t: &Tensor| t.reshape((8, 8, 8)).unwrap();
        // Samples off by 0.01, 0.01, 0.1 and 0.001 everywhere: sample 2, at 20 log10(2 / 0.1).
        let off = Tensor::new(&[0.01f32, 0.01, 0.1, 0.001], &d)
            .unwrap()
            .reshape((4, 1, 1, 1))
            .unwrap()
            .broadcast_as((4, 2, 8, 8))
            .unwrap()
            .contiguous()
            .unwrap();
        let q = quality(&a, &off, &planes(&a), &planes(&off), Some(2.0)).unwrap();
        let w = q.worst_sample.unwrap();
        assert_eq!((w.index, w.of), (2, 4));
        assert!((w.psnr_db - 20.0 * 20f64.log10()).abs() < 1e-4, "{w:?}");
        assert!(q.psnr_db > w.psnr_db + 5.0);
        let json = serde_json::to_string(&q).unwrap();
        assert!(
            json.contains("\"worst_sample\":{\"index\":2,\"of\":4"),
            "{json}"
        );
        // One sample: none, and the JSON leaves it out.
        let one = a.narrow(0, 0, 1).unwrap();
        let q = quality(
            &one,
            &one,
            &planes(&a).narrow(0, 0, 2).unwrap(),
            &planes(&a).narrow(0, 0, 2).unwrap(),
            None,
        )
        .unwrap();
        assert_eq!(q.worst_sample, None);
        assert!(!serde_json::to_string(&q).unwrap().contains("worst_sample"));
    }
}
