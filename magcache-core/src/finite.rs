//! Finiteness checks: a cheap test run on every transformer output and every step's latents, and a
//! slower description used only once something is found.

use crate::error::Result;
use candle_core::{DType, Tensor};

/// True when every value of `t` is finite. One elementwise product and one reduction: `sum(x * 0)`
/// is 0 when every value is finite and NaN as soon as one is NaN or infinite. (candle's `max`
/// reduction compares with `<`, which skips NaN, so `abs().max()` would miss them.)
pub fn all_finite(t: &Tensor) -> Result<bool> {
    if t.elem_count() == 0 {
        return Ok(true);
    }
    let s = (t * 0.0)?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    Ok(s.is_finite())
}

/// What is not finite in `t`: `"3 NaN and 2 inf of 1152 values (largest finite |x| = 1.2e30)"`.
/// Copies the tensor to the host: call it only after [`all_finite`] said no.
pub fn describe_non_finite(t: &Tensor) -> Result<String> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let nan = v.iter().filter(|x| x.is_nan()).count();
    let inf = v.iter().filter(|x| x.is_infinite()).count();
    let big = v
        .iter()
        .filter(|x| x.is_finite())
        .fold(0f32, |m, x| m.max(x.abs()));
    let what = match (nan, inf) {
        (0, i) => format!("{i} inf"),
        (n, 0) => format!("{n} NaN"),
        (n, i) => format!("{n} NaN and {i} inf"),
    };
    Ok(format!(
        "{what} of {} values (largest finite |x| = {big:.3e})",
        v.len()
    ))
}

/// `Ok(())` when `t` is finite, else an [`crate::Error::NonFinite`] at `at` saying what holds the
/// values (`what`, e.g. "the transformer output") and, after a `;`, `hint`.
pub fn ensure_finite(t: &Tensor, at: &str, what: &str, hint: &str) -> Result<()> {
    if all_finite(t)? {
        return Ok(());
    }
    let desc = describe_non_finite(t)?;
    Err(crate::Error::NonFinite {
        at: at.to_string(),
        what: if hint.is_empty() {
            format!("{what} holds {desc}")
        } else {
            format!("{what} holds {desc}; {hint}")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn finds_nan_anywhere_and_inf() {
        let dev = Device::Cpu;
        let ok = Tensor::new(&[1f32, -3e38, 0.0, 5.0], &dev).unwrap();
        assert!(all_finite(&ok).unwrap());
        for bad in [
            [1f32, f32::NAN, 2.0, 3.0],
            [1f32, 2.0, 3.0, f32::NAN],
            [f32::INFINITY, 2.0, 3.0, 4.0],
            [1f32, f32::NEG_INFINITY, 3.0, 4.0],
        ] {
            let t = Tensor::new(&bad, &dev).unwrap();
            assert!(!all_finite(&t).unwrap(), "{bad:?}");
            assert!(!all_finite(&t.to_dtype(DType::BF16).unwrap()).unwrap());
        }
        let t = Tensor::new(&[1f32, f32::NAN, f32::INFINITY, 4.0], &dev).unwrap();
        let d = describe_non_finite(&t).unwrap();
        assert!(d.starts_with("1 NaN and 1 inf of 4 values"), "{d}");
        let empty = Tensor::zeros((0, 3), DType::F32, &dev).unwrap();
        assert!(all_finite(&empty).unwrap());
    }
}
