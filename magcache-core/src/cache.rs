//! The strategy trait [`TimestepCache`], the shared [`CacheHandle`] and the per-call [`CallCx`].
//!
//! A cache wraps a model's block chain as a whole: for every transformer call the model hands the
//! chain ([`BlockChain`]) and the streams entering its first block to [`CallCx::run_chain`]; the
//! strategy decides and runs none, the first, or all of the blocks (FBCache: the first, decide, the
//! rest). A reused call's residual is added exactly once, by the strategy, to the chain's input.
//! No per-block hook takes part and the strategy is locked once per call.

use crate::chain::{BlockChain, Streams};
use crate::error::{Error, Result};
use crate::scope::{GenerationPlan, ScopeKey};
use crate::sync::{DecisionSync, SingleProcess};
use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard};

/// The decision a cache took for one transformer call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CallDecision {
    pub computed: bool,
    /// The strategy's decision quantity, if it computed one for this call.
    pub metric: Option<f64>,
    /// The value the strategy compared with its threshold on a call it was free to decide (no
    /// guard, no forced compute, a residual to reuse); `None` otherwise. Equal to `metric` for
    /// most strategies; a strategy that reports its state after the decision (MagCache resets its
    /// accumulators on a computed call) gives here what it decided from. Runs that compute nearly
    /// every call report its spread against the threshold.
    pub compared: Option<f64>,
}

impl CallDecision {
    /// A computed call.
    pub fn computed(metric: Option<f64>) -> Self {
        CallDecision {
            computed: true,
            metric,
            compared: None,
        }
    }
    /// A reused call.
    pub fn reused(metric: Option<f64>) -> Self {
        CallDecision {
            computed: false,
            metric,
            compared: None,
        }
    }
}

/// A timestep-caching strategy. Implementations keep per-scope state (see [`crate::ScopeStates`]),
/// see a model only through [`BlockChain`] and [`Streams`], and know nothing of its internals.
pub trait TimestepCache: Send {
    /// Strategy name (`magcache`, ...).
    fn name(&self) -> &str;

    /// Resets all state and announces the scopes of the next generation with their step counts.
    /// Returns warnings for the user (for example a ratio curve calibrated on another schedule).
    fn begin_generation(&mut self, plan: &GenerationPlan) -> Result<Vec<String>>;

    /// Notes for the user on where the strategy's settings come from (a fitted profile's
    /// provenance): information shown with a run, not warnings (default none).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// One transformer call of `scope`: decide, run what must run of `chain` on `x` (the streams
    /// entering block 0), and return the streams leaving the last block with the decision.
    ///
    /// A strategy that decides from the data passes its metric's partial quantities through `sync`
    /// ([`DecisionSync::all_reduce_mean`], for example [`crate::sync::synced_rel_l1`]) before
    /// comparing it with a threshold, once per call on every rank, so that all ranks of a
    /// sequence-parallel run take the same decision. [`SingleProcess`] (one rank) is the identity.
    fn run(
        &mut self,
        scope: ScopeKey,
        chain: &dyn BlockChain,
        x: Streams,
        sync: &dyn DecisionSync,
    ) -> Result<(Streams, CallDecision)>;

    /// Bytes of tensors each scope holds now (residuals, indicators).
    fn cached_bytes_by_scope(&self) -> Vec<(ScopeKey, usize)>;

    /// Bytes of tensors the cache holds now, all scopes together.
    fn cached_bytes(&self) -> usize {
        self.cached_bytes_by_scope().iter().map(|(_, b)| b).sum()
    }

    /// The decisions the scope's calls will get in the current generation, when they do not depend on
    /// the data (MagCache); `None` for strategies that decide from the data. Valid after
    /// `begin_generation`.
    fn predict(&self, scope: ScopeKey) -> Option<Vec<CallDecision>> {
        let _ = scope;
        None
    }
}

/// A shared handle on one strategy instance: the pipeline runs calls through it, the runner reads
/// the cache's size and results after a generation. It also carries the [`DecisionSync`] of the
/// process group the run belongs to ([`SingleProcess`] unless [`CacheHandle::with_sync`]).
#[derive(Clone)]
pub struct CacheHandle {
    inner: Arc<Mutex<Box<dyn TimestepCache>>>,
    sync: Arc<dyn DecisionSync>,
}

impl std::fmt::Debug for CacheHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheHandle")
    }
}

impl CacheHandle {
    /// A handle for a single-process run.
    pub fn new(cache: Box<dyn TimestepCache>) -> Self {
        Self::with_sync(cache, Arc::new(SingleProcess))
    }

    /// A handle whose calls synchronise their decisions through `sync` (one rank of a group).
    pub fn with_sync(cache: Box<dyn TimestepCache>, sync: Arc<dyn DecisionSync>) -> Self {
        CacheHandle {
            inner: Arc::new(Mutex::new(cache)),
            sync,
        }
    }

    /// The decision synchronisation this handle's calls use.
    pub fn sync(&self) -> &dyn DecisionSync {
        &*self.sync
    }

    /// Locks the strategy. Fails only if a previous holder panicked.
    pub fn lock(&self) -> Result<MutexGuard<'_, Box<dyn TimestepCache>>> {
        self.inner
            .lock()
            .map_err(|_| Error::msg("cache state is poisoned by an earlier panic"))
    }
}

/// What one transformer call carries into the model's forward: its cache scope and the cache (if
/// any). Built by [`crate::Denoiser::call`]; the model passes it to [`CallCx::run_chain`] and, for
/// general per-block hooks, [`crate::HookRegistry::run_block`].
pub struct CallCx<'a> {
    pub scope: ScopeKey,
    cache: Option<&'a CacheHandle>,
    decision: Cell<Option<CallDecision>>,
}

impl<'a> CallCx<'a> {
    /// A call of `scope` through `cache` (dense when `None`).
    pub fn new(scope: ScopeKey, cache: Option<&'a CacheHandle>) -> Self {
        CallCx {
            scope,
            cache,
            decision: Cell::new(None),
        }
    }

    /// A call without a cache (forward tests, calibration-free tools).
    pub fn dense(scope: ScopeKey) -> CallCx<'static> {
        CallCx::new(scope, None)
    }

    /// Runs the model's block chain for this call: through the cache when there is one (which may
    /// skip blocks), else every block. Call it once per call.
    pub fn run_chain(&self, chain: &dyn BlockChain, x: Streams) -> Result<Streams> {
        let taped;
        let chain = if crate::checkpoint::active() {
            taped = crate::checkpoint::Taped(chain);
            &taped as &dyn BlockChain
        } else {
            chain
        };
        match self.cache {
            None => chain.run(0..chain.num_blocks(), x),
            Some(c) => {
                if chain.num_blocks() == 0 {
                    return Err(Error::Hooks("cannot cache a chain without blocks".into()));
                }
                let (out, d) = c.lock()?.run(self.scope, chain, x, c.sync())?;
                self.decision.set(Some(d));
                Ok(out)
            }
        }
    }

    /// The cache's decision for this call, once the chain ran (`None` without a cache).
    pub fn decision(&self) -> Option<CallDecision> {
        self.decision.get()
    }
}
