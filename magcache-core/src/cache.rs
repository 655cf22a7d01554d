//! The strategy trait [`TimestepCache`] and the hooks that attach a strategy to a block chain.
//!
//! A cache attaches three kinds of hooks (see [`CacheHandle::install`]):
//! - `cache.head` (order `Outer`) on the first block of the chain: asks [`TimestepCache::head`] whether
//!   to compute or reuse. On reuse the strategy returns the first block's output tuple (first-block
//!   input plus the cached residual) and no block runs; the residual is added exactly once, here.
//! - `cache.pass` (order `Middle`) on every block after the first: while the scope reuses, the block
//!   is passed through unchanged.
//! - `cache.tail` (order `Inner`) on the last block: after a computed call it hands the last block's
//!   output to [`TimestepCache::tail`], which records what the strategy keeps.
//!
//! On a one-block chain the head and the tail hook sit on the same block; the order makes the head
//! decide first and the tail see the block's output.

use crate::error::{Error, Result};
use crate::hooks::{BlockHook, HookCx, HookOrder, HookRegistry, Next};
use crate::scope::{GenerationPlan, ScopeKey};
use candle_core::Tensor;
use std::sync::{Arc, Mutex, MutexGuard};

/// What the head hook does with the current call.
#[derive(Debug)]
pub enum HeadAction {
    /// Run every block; the tail hook records.
    Compute,
    /// Skip every block: this is the first block's output tuple.
    Reuse(Vec<Tensor>),
    /// Run the first block, then decide in [`TimestepCache::after_first_block`] (FBCache).
    RunFirstBlock,
}

/// The decision a cache took for one transformer call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CallDecision {
    pub computed: bool,
    /// The strategy's decision quantity, if it computed one for this call.
    pub metric: Option<f64>,
}

/// A timestep-caching strategy. Implementations keep per-scope state (see [`crate::ScopeStates`]),
/// read and write block tuples only through [`crate::BlockMetadata`], and know nothing of a model's
/// internals.
pub trait TimestepCache: Send {
    /// Strategy name (`magcache`, ...).
    fn name(&self) -> &str;

    /// Resets all state and announces the scopes of the next generation with their step counts.
    /// Returns warnings for the user (for example a ratio curve calibrated on another schedule).
    fn begin_generation(&mut self, plan: &GenerationPlan) -> Result<Vec<String>>;

    /// Called at the first block of a call, before it runs. Counts the call in its scope.
    fn head(&mut self, cx: &HookCx<'_>, inputs: &[Tensor]) -> Result<HeadAction>;

    /// After [`HeadAction::RunFirstBlock`]: the first block ran and produced `outputs`. Returns the
    /// tuple to continue with: `outputs` to compute the remaining blocks, or the reused result.
    fn after_first_block(
        &mut self,
        cx: &HookCx<'_>,
        inputs: &[Tensor],
        outputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>> {
        let _ = (cx, inputs);
        Ok(outputs)
    }

    /// True while the current call of `scope` reuses (blocks after the head are passed through).
    fn is_reusing(&self, scope: ScopeKey) -> bool;

    /// Called at the last block of a computed call with that block's outputs.
    fn tail(&mut self, cx: &HookCx<'_>, outputs: &[Tensor]) -> Result<()>;

    /// The decision of the last call of `scope`, if it has had one.
    fn last_decision(&self, scope: ScopeKey) -> Option<CallDecision>;

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

    /// Names of the model indicators the strategy decides from (see
    /// [`crate::HookRegistry::set_indicator`]); models compute costly ones only when asked.
    fn indicators(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A shared handle on one strategy instance; hooks and the denoising loop hold clones of it.
#[derive(Clone)]
pub struct CacheHandle {
    inner: Arc<Mutex<Box<dyn TimestepCache>>>,
}

/// Hook names the cache uses on a registry.
pub const HEAD_HOOK: &str = "cache.head";
pub const PASS_HOOK: &str = "cache.pass";
pub const TAIL_HOOK: &str = "cache.tail";

impl CacheHandle {
    pub fn new(cache: Box<dyn TimestepCache>) -> Self {
        CacheHandle {
            inner: Arc::new(Mutex::new(cache)),
        }
    }

    /// Locks the strategy. Fails only if a previous holder panicked.
    pub fn lock(&self) -> Result<MutexGuard<'_, Box<dyn TimestepCache>>> {
        self.inner
            .lock()
            .map_err(|_| Error::msg("cache state is poisoned by an earlier panic"))
    }

    /// Attaches the cache to a chain: head on the first block, pass-through on the others, tail on
    /// the last (on a one-block chain the head and the tail share block 0).
    pub fn install(&self, reg: &mut HookRegistry) -> Result<()> {
        let n = reg.num_blocks();
        if n == 0 {
            return Err(Error::Hooks(
                "cannot install a cache on a chain without blocks".into(),
            ));
        }
        reg.register(
            0,
            Arc::new(CacheHook {
                cache: self.clone(),
                role: Role::Head,
            }),
        )?;
        for b in 1..n {
            reg.register(
                b,
                Arc::new(CacheHook {
                    cache: self.clone(),
                    role: Role::Pass,
                }),
            )?;
        }
        reg.register(
            n - 1,
            Arc::new(CacheHook {
                cache: self.clone(),
                role: Role::Tail,
            }),
        )?;
        Ok(())
    }

    /// Removes the cache's hooks from a chain.
    pub fn uninstall(reg: &mut HookRegistry) -> usize {
        reg.remove_prefixed("cache.")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Head,
    Pass,
    Tail,
}

struct CacheHook {
    cache: CacheHandle,
    role: Role,
}

impl BlockHook for CacheHook {
    fn name(&self) -> &str {
        match self.role {
            Role::Head => HEAD_HOOK,
            Role::Pass => PASS_HOOK,
            Role::Tail => TAIL_HOOK,
        }
    }

    fn order(&self) -> HookOrder {
        match self.role {
            Role::Head => HookOrder::Outer,
            Role::Pass => HookOrder::Middle,
            Role::Tail => HookOrder::Inner,
        }
    }

    fn wants_indicator(&self, name: &str) -> bool {
        self.role == Role::Head
            && self
                .cache
                .lock()
                .map(|c| c.indicators().iter().any(|n| n == name))
                .unwrap_or(false)
    }

    fn forward(&self, cx: &HookCx<'_>, inputs: &[Tensor], next: Next<'_>) -> Result<Vec<Tensor>> {
        match self.role {
            Role::Head => {
                // The lock is never held while blocks run: the tail hook of a one-block chain runs
                // inside `next`.
                let action = self.cache.lock()?.head(cx, inputs)?;
                match action {
                    HeadAction::Compute => next(inputs),
                    HeadAction::Reuse(out) => Ok(out),
                    HeadAction::RunFirstBlock => {
                        let out = next(inputs)?;
                        self.cache.lock()?.after_first_block(cx, inputs, out)
                    }
                }
            }
            Role::Pass => {
                if self.cache.lock()?.is_reusing(cx.scope) {
                    cx.meta.pass_through(inputs)
                } else {
                    next(inputs)
                }
            }
            Role::Tail => {
                if self.cache.lock()?.is_reusing(cx.scope) {
                    // A reused call has already been answered at the head (or passed through by the
                    // pass hook of this block); never add anything here.
                    return cx.meta.pass_through(inputs);
                }
                let out = next(inputs)?;
                self.cache.lock()?.tail(cx, &out)?;
                Ok(out)
            }
        }
    }
}
