//! Decision synchronisation across ranks: [`DecisionSync`].
//!
//! Under sequence parallelism (docs/scaling.md) every rank holds a shard of the tokens, so a strategy
//! that decides from the data (FBCache, TeaCache) computes a different local metric on each rank. If
//! each rank decided alone, one rank could reuse while another computes, and the next all-to-all
//! would pair tensors of different calls (or hang). Strategies therefore hand the partial quantities
//! of their metric to [`DecisionSync::all_reduce_mean`] before deciding: every rank gets the same
//! numbers, so every rank takes the same decision. Strategies whose decisions do not depend on the
//! data (MagCache) need no synchronisation.
//!
//! [`SingleProcess`] (identity) is the default; [`ThreadGroup`] simulates ranks as threads of one
//! process (tests). A multi-GPU implementation would all-reduce over NCCL.

use crate::error::{Error, Result};
use crate::maths::{rel_l1_parts, safe_ratio};
use candle_core::Tensor;
use std::sync::{Arc, Barrier, Mutex};

/// A collective over the ranks that run one generation together.
///
/// Collective: every rank calls [`Self::all_reduce_mean`] the same number of times, in the same
/// order, with slices of the same length. Implementations must return bit-identical results on every
/// rank (reduce in a fixed order), so that threshold comparisons agree.
pub trait DecisionSync: Send + Sync {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize {
        0
    }
    /// Number of ranks.
    fn world_size(&self) -> usize {
        1
    }
    /// Element-wise mean of `values` over all ranks.
    fn all_reduce_mean(&self, values: &[f64]) -> Result<Vec<f64>>;
}

/// One process, one rank: the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl DecisionSync for SingleProcess {
    fn all_reduce_mean(&self, values: &[f64]) -> Result<Vec<f64>> {
        Ok(values.to_vec())
    }
}

/// The relative L1 distance `mean|a - b| / mean|b|` over the whole sequence when each rank holds an
/// equal shard of it: the local numerator and denominator are averaged over the ranks in one
/// collective, then divided (conventions of [`crate::maths::safe_ratio`] for a zero denominator).
/// With [`SingleProcess`] this is exactly [`crate::maths::rel_l1`].
pub fn synced_rel_l1(a: &Tensor, b: &Tensor, sync: &dyn DecisionSync) -> Result<f64> {
    let (num, den) = rel_l1_parts(a, b)?;
    let m = sync.all_reduce_mean(&[num, den])?;
    match m.as_slice() {
        [n, d] => Ok(safe_ratio(*n, *d)),
        _ => Err(Error::msg(format!(
            "decision sync returned {} values for 2",
            m.len()
        ))),
    }
}

struct Shared {
    slots: Mutex<Vec<Option<Vec<f64>>>>,
    barrier: Barrier,
}

/// Ranks simulated by threads of one process, meeting at a shared barrier. Make the group with
/// [`ThreadGroup::new`] (one handle per rank) and move each handle to its thread. As with any
/// collective (NCCL's too), a rank that stops before a call the others make (an error of its own)
/// leaves them waiting at the barrier: end every rank when one fails.
pub struct ThreadGroup {
    rank: usize,
    world_size: usize,
    shared: Arc<Shared>,
}

impl ThreadGroup {
    /// Handles for ranks `0..world_size`.
    pub fn new(world_size: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![None; world_size]),
            barrier: Barrier::new(world_size),
        });
        (0..world_size)
            .map(|rank| ThreadGroup {
                rank,
                world_size,
                shared: shared.clone(),
            })
            .collect()
    }

    fn slots(&self) -> Result<std::sync::MutexGuard<'_, Vec<Option<Vec<f64>>>>> {
        self.shared
            .slots
            .lock()
            .map_err(|_| Error::msg("decision sync: a rank panicked"))
    }
}

impl DecisionSync for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce_mean(&self, values: &[f64]) -> Result<Vec<f64>> {
        self.slots()?[self.rank] = Some(values.to_vec());
        // Everyone has written.
        self.shared.barrier.wait();
        let out = self.reduce(values.len());
        // Everyone has read before anyone writes the next round (also after an error, which every
        // rank sees alike: all read the same slots).
        self.shared.barrier.wait();
        out
    }
}

impl ThreadGroup {
    fn reduce(&self, len: usize) -> Result<Vec<f64>> {
        let slots = self.slots()?;
        let n = slots.len() as f64;
        let mut sum = vec![0.0; len];
        // Fixed order (rank 0, 1, ...): the same bits on every rank.
        for (r, s) in slots.iter().enumerate() {
            let s = s
                .as_ref()
                .ok_or_else(|| Error::msg(format!("decision sync: rank {r} sent nothing")))?;
            if s.len() != len {
                return Err(Error::msg(format!(
                    "decision sync: rank {r} sent {} values, rank {} sent {len}",
                    s.len(),
                    self.rank
                )));
            }
            for (acc, v) in sum.iter_mut().zip(s) {
                *acc += v;
            }
        }
        Ok(sum.into_iter().map(|v| v / n).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maths::rel_l1;
    use candle_core::{DType, Device};

    #[test]
    fn single_process_is_the_identity_and_matches_rel_l1() {
        assert_eq!(
            SingleProcess.all_reduce_mean(&[1.5, -2.0]).unwrap(),
            vec![1.5, -2.0]
        );
        let a = Tensor::new(&[1.0f32, 2.0, 3.5], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1.0f32, 2.5, 3.0], &Device::Cpu).unwrap();
        let s = synced_rel_l1(&a, &b, &SingleProcess).unwrap();
        assert_eq!(s, rel_l1(&a, &b).unwrap());
        let z = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(synced_rel_l1(&z, &z, &SingleProcess).unwrap(), 0.0);
        assert_eq!(
            synced_rel_l1(&a, &z, &SingleProcess).unwrap(),
            f64::INFINITY
        );
    }

    #[test]
    fn thread_group_ranks_get_the_same_mean() {
        let results: Vec<Vec<Vec<f64>>> = std::thread::scope(|s| {
            let handles: Vec<_> = ThreadGroup::new(3)
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        (0..4)
                            .map(|round| {
                                let r = g.rank() as f64;
                                g.all_reduce_mean(&[r + round as f64, 10.0 * r]).unwrap()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (round, want) in results[0].iter().enumerate() {
            assert_eq!(want, &vec![1.0 + round as f64, 10.0]);
        }
        assert_eq!(results[0], results[1]);
        assert_eq!(results[0], results[2]);
    }

    #[test]
    fn thread_group_refuses_mismatched_lengths() {
        let errs: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = ThreadGroup::new(2)
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        let v = vec![1.0; g.rank() + 1];
                        g.all_reduce_mean(&v).is_err()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(errs, vec![true, true]);
    }
}
