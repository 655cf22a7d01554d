//! The hook registry: any number of hooks around each block's forward, composed in a fixed order.
//!
//! # Order
//! Hooks on one block are sorted by [`HookOrder`] (`Outer` first, then `Middle`, then `Inner`); hooks of
//! the same order keep their registration order. The first hook in that order is the outermost wrapper:
//! it receives the block's input [`Streams`] and a `next` that runs the remaining hooks and finally the block.
//! Caches do not use hooks (they wrap the whole chain, see [`crate::CallCx::run_chain`]); hooks are
//! for anything else a user attaches to a block: observers, probes, modifications. Head and tail hooks
//! on the same block chain: the outer one sees the inner one's result.
//!
//! Removing a hook keeps the others (and their order) intact.

use crate::chain::Streams;
use crate::error::{Error, Result};
use crate::metadata::BlockMetadata;
use crate::scope::ScopeKey;
use std::sync::Arc;

/// Where a hook sits in the composition around a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookOrder {
    /// Outermost: sees the block inputs first.
    Outer,
    /// Between outer and inner (observers).
    Middle,
    /// Innermost: sees the block output first.
    Inner,
}

/// What a hook knows about the call it wraps.
#[derive(Clone, Debug)]
pub struct HookCx<'a> {
    /// The cache scope of the current transformer call.
    pub scope: ScopeKey,
    /// Index of the block in the model's cache chain.
    pub block: usize,
    /// Number of blocks in the chain.
    pub num_blocks: usize,
    /// Metadata of this block's kind.
    pub meta: &'a BlockMetadata,
}

/// The rest of the chain: the remaining hooks and the block itself.
pub type Next<'a> = &'a dyn Fn(Streams) -> Result<Streams>;

/// A wrapper around a block's forward.
pub trait BlockHook: Send + Sync {
    /// Unique name of the hook on its block.
    fn name(&self) -> &str;
    fn order(&self) -> HookOrder;
    /// Runs around the block: call `next(inputs)` to run the rest of the chain, or return without it.
    fn forward(&self, cx: &HookCx<'_>, streams: Streams, next: Next<'_>) -> Result<Streams>;
}

/// The hooks of one model's block chain (for FLUX: the double blocks, then the single blocks).
pub struct HookRegistry {
    metas: Vec<BlockMetadata>,
    hooks: Vec<Vec<Arc<dyn BlockHook>>>,
}

impl std::fmt::Debug for HookRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<Vec<&str>> = self
            .hooks
            .iter()
            .map(|h| h.iter().map(|x| x.name()).collect())
            .collect();
        f.debug_struct("HookRegistry")
            .field("hooks", &names)
            .finish()
    }
}

impl HookRegistry {
    /// A registry for a chain of blocks, each with its kind's metadata.
    pub fn new(metas: Vec<BlockMetadata>) -> Self {
        let n = metas.len();
        HookRegistry {
            metas,
            hooks: (0..n).map(|_| Vec::new()).collect(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.metas.len()
    }

    pub fn metadata(&self) -> &[BlockMetadata] {
        &self.metas
    }

    /// True when no block carries a hook.
    pub fn is_empty(&self) -> bool {
        self.hooks.iter().all(|h| h.is_empty())
    }

    /// Adds a hook to a block. Names are unique per block.
    pub fn register(&mut self, block: usize, hook: Arc<dyn BlockHook>) -> Result<()> {
        let n = self.metas.len();
        let list = self.hooks.get_mut(block).ok_or_else(|| {
            Error::Hooks(format!(
                "block {block} does not exist (chain of {n} blocks)"
            ))
        })?;
        if list.iter().any(|h| h.name() == hook.name()) {
            return Err(Error::Hooks(format!(
                "block {block} already has a hook named `{}`",
                hook.name()
            )));
        }
        // Stable insert: after every hook of the same or an outer order.
        let pos = list
            .iter()
            .position(|h| h.order() > hook.order())
            .unwrap_or(list.len());
        list.insert(pos, hook);
        Ok(())
    }

    /// Removes the hook `name` from `block`; returns whether one was removed.
    pub fn remove(&mut self, block: usize, name: &str) -> bool {
        match self.hooks.get_mut(block) {
            Some(list) => {
                let before = list.len();
                list.retain(|h| h.name() != name);
                list.len() != before
            }
            None => false,
        }
    }

    /// Removes every hook whose name starts with `prefix`, on every block; returns how many.
    pub fn remove_prefixed(&mut self, prefix: &str) -> usize {
        let mut n = 0;
        for list in &mut self.hooks {
            let before = list.len();
            list.retain(|h| !h.name().starts_with(prefix));
            n += before - list.len();
        }
        n
    }

    /// Names of the hooks on a block, outermost first.
    pub fn hook_names(&self, block: usize) -> Vec<String> {
        self.hooks
            .get(block)
            .map(|l| l.iter().map(|h| h.name().to_string()).collect())
            .unwrap_or_default()
    }

    /// Runs block `block` of a call of `scope` through its hooks. `forward` is the block itself.
    pub fn run_block(
        &self,
        scope: ScopeKey,
        block: usize,
        streams: Streams,
        forward: &dyn Fn(Streams) -> Result<Streams>,
    ) -> Result<Streams> {
        let list = self.hooks.get(block).ok_or_else(|| {
            Error::Hooks(format!(
                "block {block} does not exist (chain of {} blocks)",
                self.metas.len()
            ))
        })?;
        if list.is_empty() {
            return forward(streams);
        }
        let meta = self
            .metas
            .get(block)
            .ok_or_else(|| Error::Hooks(format!("block {block} has no metadata")))?;
        let cx = HookCx {
            scope,
            block,
            num_blocks: self.metas.len(),
            meta,
        };
        chain(list, &cx, streams, forward)
    }
}

fn chain(
    hooks: &[Arc<dyn BlockHook>],
    cx: &HookCx<'_>,
    streams: Streams,
    forward: &dyn Fn(Streams) -> Result<Streams>,
) -> Result<Streams> {
    match hooks.split_first() {
        None => forward(streams),
        Some((h, rest)) => h.forward(cx, streams, &|s: Streams| chain(rest, cx, s, forward)),
    }
}
