//! Finiteness checks: a cheap test run on every transformer output and every step's latents, and a
//! slower description used only once something is found.

use crate::error::Result;
use candle_core::{DType, Tensor};

/// True when every value of `t` is finite. On the CPU, for contiguous float tensors, a scan of the
/// exponent bits (no copy, memory speed: loading a checkpoint checks every tensor). Elsewhere one
/// elementwise product and one reduction: `sum(x * 0)` is 0 when every value is finite and NaN as
/// soon as one is NaN or infinite. (candle's `max` reduction compares with `<`, which skips NaN, so
/// `abs().max()` would miss them.)
pub fn all_finite(t: &Tensor) -> Result<bool> {
    if t.elem_count() == 0 {
        return Ok(true);
    }
    if let Some(ok) = cpu_all_finite(t) {
        return Ok(ok);
    }
    let s = (t * 0.0)?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    Ok(s.is_finite())
}

/// No value of `bits` has its exponent field all ones (`mask`): none is NaN or infinite.
fn exponents_finite<T: Copy + Sync>(v: &[T], bits: impl Fn(T) -> u32 + Sync, mask: u32) -> bool {
    // Branch-free per chunk so that it vectorizes; stops at the first bad chunk.
    v.chunks(4096).all(|c| {
        c.iter()
            .fold(0u32, |bad, &x| bad | u32::from(bits(x) & mask == mask))
            == 0
    })
}

/// The bit scan of [`all_finite`], or `None` where it does not apply (another device, dtype or a
/// non-contiguous layout).
fn cpu_all_finite(t: &Tensor) -> Option<bool> {
    use candle_core::{CpuStorage, Storage};
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            Some(exponents_finite(&v[start..end], f32::to_bits, 0x7f80_0000))
        }
        Storage::Cpu(CpuStorage::BF16(v)) => Some(exponents_finite(
            &v[start..end],
            |x| u32::from(x.to_bits()),
            0x7f80,
        )),
        Storage::Cpu(CpuStorage::F16(v)) => Some(exponents_finite(
            &v[start..end],
            |x| u32::from(x.to_bits()),
            0x7c00,
        )),
        Storage::Cpu(CpuStorage::F64(v)) => Some(v[start..end].iter().all(|x| x.is_finite())),
        _ => None,
    }
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

    #[test]
    fn the_bit_scan_agrees_with_the_reduction_in_every_dtype_and_layout() {
        let dev = Device::Cpu;
        // 3 chunks of the scan; one bad value in the last one.
        let mut v = vec![0.5f32; 3 * 4096 + 7];
        v[2 * 4096 + 3] = f32::NAN;
        let t = Tensor::from_vec(v, (3 * 4096 + 7,), &dev).unwrap();
        for dt in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let t = t.to_dtype(dt).unwrap();
            assert!(!all_finite(&t).unwrap(), "{dt:?}");
            // A view that leaves the bad value out is finite; one that holds it is not.
            assert!(
                all_finite(&t.narrow(0, 0, 2 * 4096).unwrap()).unwrap(),
                "{dt:?}"
            );
            assert!(
                !all_finite(&t.narrow(0, 2 * 4096, 10).unwrap()).unwrap(),
                "{dt:?}"
            );
        }
        // f16 overflows to inf above 65504; bf16 does not.
        let big = Tensor::new(&[1e5f32, 1.0], &dev).unwrap();
        assert!(!all_finite(&big.to_dtype(DType::F16).unwrap()).unwrap());
        assert!(all_finite(&big.to_dtype(DType::BF16).unwrap()).unwrap());
        // A non-contiguous view takes the reduction path.
        let m = Tensor::new(&[[1f32, 2.0], [f32::INFINITY, 4.0]], &dev).unwrap();
        assert!(!all_finite(&m.t().unwrap()).unwrap());
        assert!(all_finite(&m.t().unwrap().narrow(0, 1, 1).unwrap()).unwrap());
    }
}
