//! Per-block probes (`magcache calibrate --blocks`): two hooks on every block of a model's chain,
//! through the model's [`HookRegistry`].
//!
//! - [`BlockChangeProbe`] (`HookOrder::Middle`): the block's hidden residual `r_k = out - in` on a
//!   strided subset of at most [`PROBE_TOKENS`] tokens, and its relative L1 change
//!   `mean|r_k - r_(k-1)| / mean|r_(k-1)|` from the previous call of the same scope. Blocks whose
//!   residual changes least between calls are the ones a block-level cache (DBCache's middle) can
//!   stand in for; the front blocks DBCache measures should change like the chain does.
//! - [`BlockTimeProbe`] (`HookOrder::Outer`, so it times the block and the change probe inside it):
//!   the wall time of each block.
//!
//! Both write into one [`BlockProbes`] store; [`BlockProbes::summary`] averages over the calls.

use magcache_core::candle_core::{DType, Tensor};
use magcache_core::hooks::Next;
use magcache_core::maths::rel_l1;
use magcache_core::{BlockHook, Error, HookCx, HookOrder, HookRegistry, Result, ScopeKey, Streams};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Most tokens of a block's residual a change probe keeps between calls (a strided subset), so
/// that probing a 30-block model at 32k tokens holds megabytes, not gigabytes.
pub const PROBE_TOKENS: usize = 256;

/// What the probes measured on one block of one scope.
#[derive(Debug, Default)]
struct BlockRecord {
    prev: Option<Tensor>,
    changes: Vec<f64>,
    seconds: f64,
    calls: usize,
}

/// One block of one scope, averaged over its calls.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockStat {
    pub expert: usize,
    pub scope: ScopeKey,
    pub block: usize,
    /// Mean relative change of the block's residual between consecutive calls (`None`: one call).
    pub mean_change: Option<f64>,
    /// Mean wall time of one call of the block.
    pub mean_seconds: f64,
}

/// (expert, scope, block).
type BlockKey = (usize, ScopeKey, usize);

/// The store both probes write into.
#[derive(Clone, Default)]
pub struct BlockProbes {
    records: Arc<Mutex<BTreeMap<BlockKey, BlockRecord>>>,
}

impl BlockProbes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a time probe and a change probe on every block of `registry`, the chain of expert
    /// `expert`.
    pub fn attach(&self, expert: usize, registry: &mut HookRegistry) -> Result<()> {
        for block in 0..registry.num_blocks() {
            registry.register(
                block,
                Arc::new(BlockTimeProbe {
                    expert,
                    probes: self.clone(),
                }),
            )?;
            registry.register(
                block,
                Arc::new(BlockChangeProbe {
                    expert,
                    probes: self.clone(),
                }),
            )?;
        }
        Ok(())
    }

    fn with<T>(&self, key: BlockKey, f: impl FnOnce(&mut BlockRecord) -> Result<T>) -> Result<T> {
        let mut map = self
            .records
            .lock()
            .map_err(|_| Error::msg("block probes poisoned by an earlier panic"))?;
        f(map.entry(key).or_default())
    }

    /// Every probed block of every scope, in (expert, scope, block) order.
    pub fn summary(&self) -> Result<Vec<BlockStat>> {
        let map = self
            .records
            .lock()
            .map_err(|_| Error::msg("block probes poisoned by an earlier panic"))?;
        Ok(map
            .iter()
            .map(|(&(expert, scope, block), r)| BlockStat {
                expert,
                scope,
                block,
                mean_change: (!r.changes.is_empty())
                    .then(|| r.changes.iter().sum::<f64>() / r.changes.len() as f64),
                mean_seconds: r.seconds / r.calls.max(1) as f64,
            })
            .collect())
    }
}

/// Every `ceil(L / PROBE_TOKENS)`-th token of a `[B, L, D]` tensor, in f32.
fn strided_tokens(t: &Tensor) -> Result<Tensor> {
    let t = t.to_dtype(DType::F32)?;
    if t.rank() < 2 {
        return Ok(t);
    }
    let n = t.dim(1)?;
    let stride = n.div_ceil(PROBE_TOKENS).max(1);
    if stride == 1 {
        return Ok(t);
    }
    let idx: Vec<u32> = (0..n).step_by(stride).map(|i| i as u32).collect();
    Ok(t.index_select(&Tensor::new(idx.as_slice(), t.device())?, 1)?)
}

/// Measures how much a block's hidden residual changes between consecutive calls of a scope.
pub struct BlockChangeProbe {
    expert: usize,
    probes: BlockProbes,
}

impl BlockHook for BlockChangeProbe {
    fn name(&self) -> &str {
        "probe.change"
    }

    fn order(&self) -> HookOrder {
        HookOrder::Middle
    }

    fn forward(&self, cx: &HookCx<'_>, streams: Streams, next: Next<'_>) -> Result<Streams> {
        let hin = streams.hidden.clone();
        let out = next(streams)?;
        let residual = strided_tokens(&(&out.hidden - &hin)?)?;
        self.probes.with((self.expert, cx.scope, cx.block), |r| {
            if let Some(prev) = &r.prev {
                r.changes.push(rel_l1(&residual, prev)?);
            }
            r.prev = Some(residual);
            Ok(())
        })?;
        Ok(out)
    }
}

/// Measures the wall time of each block (and of the hooks inside it).
pub struct BlockTimeProbe {
    expert: usize,
    probes: BlockProbes,
}

impl BlockHook for BlockTimeProbe {
    fn name(&self) -> &str {
        "probe.time"
    }

    fn order(&self) -> HookOrder {
        HookOrder::Outer
    }

    fn forward(&self, cx: &HookCx<'_>, streams: Streams, next: Next<'_>) -> Result<Streams> {
        let t0 = Instant::now();
        let out = next(streams)?;
        let dt = t0.elapsed().as_secs_f64();
        self.probes.with((self.expert, cx.scope, cx.block), |r| {
            r.seconds += dt;
            r.calls += 1;
            Ok(())
        })?;
        Ok(out)
    }
}
