//! A change to a checkpoint's tensor (a LoRA adapter's low-rank or full delta), kept beside the
//! store and added each time the tensor is handed out.

use candle_core::{DType, Tensor};
use magcache_core::{Error, Result};

/// A change to one tensor of the store, added (in f32) each time the tensor is handed out: at load
/// for a held model, per block as it is read for a streamed one.
#[derive(Clone, Debug)]
pub enum Delta {
    /// `factor * up @ down`: a low-rank update, `up` `[out, r]`, `down` `[r, in]` (f32, CPU).
    LowRank {
        up: Tensor,
        down: Tensor,
        factor: f64,
    },
    /// `factor * t`: a full delta of the tensor's shape (f32, CPU).
    Full { t: Tensor, factor: f64 },
}

impl Delta {
    pub(super) fn shape(&self) -> Result<Vec<usize>> {
        Ok(match self {
            Delta::LowRank { up, down, .. } => vec![up.dim(0)?, down.dim(1)?],
            Delta::Full { t, .. } => t.dims().to_vec(),
        })
    }

    pub(super) fn value(&self) -> Result<Tensor> {
        Ok(match self {
            Delta::LowRank { up, down, factor } => (up.matmul(down)? * *factor)?,
            Delta::Full { t, factor } => (t * *factor)?,
        })
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        let n = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Delta::LowRank { up, down, .. } => n(up) + n(down),
            Delta::Full { t, .. } => n(t),
        }
    }
}

/// `base` with the deltas `ds` added (in f32); with `check`, a sum that is not finite where `base`
/// is, is an error naming the tensor (`at`: its file and name) and the adapters (each delta's
/// origin) rather than the checkpoint.
pub(super) fn merged(
    base: &Tensor,
    ds: &[(Delta, String)],
    check: bool,
    at: (&str, &str),
) -> Result<Tensor> {
    let base = base.to_dtype(DType::F32)?;
    let mut t = base.clone();
    for (d, _) in ds {
        t = (t + d.value()?)?;
    }
    let all_finite = magcache_core::finite::all_finite;
    if check && !all_finite(&t)? && all_finite(&base)? {
        let what = magcache_core::finite::describe_non_finite(&t)?;
        let from: Vec<&str> = ds.iter().map(|(_, o)| o.as_str()).collect();
        return Err(Error::weights(
            at.0,
            at.1,
            format!(
                "is finite in the checkpoint but not with the LoRA adapters merged ({what}), from {}: check their scale and alpha",
                from.join(", ")
            ),
        ));
    }
    Ok(t)
}
