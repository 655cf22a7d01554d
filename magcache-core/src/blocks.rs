//! A model's block chain as the model owns it, written once for every family: the blocks (held,
//! or streamed from the checkpoint as they run), each block's metadata, the general hooks around
//! each block, and the per-call [`BlockChain`] a cache runs ([`ModelBlocks::call`]).
//!
//! A family gives its block type `B`, how to load block `i` (when streamed) and how one block runs
//! on the [`Streams`] entering it; everything else (the range check, the hook call, the streamed
//! reader thread, the trace, the indicators offered to strategies) is here.
//!
//! ```
//! # use magcache_core::{candle_core::{Device, Tensor}, BlockChain, BlockMetadata, Branch, ModelBlocks, ScopeKey, Streams};
//! # fn main() -> magcache_core::Result<()> {
//! const KIND: BlockMetadata = BlockMetadata { kind: "toy.block", joint: false };
//! let blocks = ModelBlocks::held("toy", vec![2.0f64, 3.0], vec![KIND; 2])?;
//! let x = Tensor::ones(4, magcache_core::candle_core::DType::F32, &Device::Cpu)?;
//! let mut seen = Vec::new();
//! let mut trace = |i: usize, s: &Streams| seen.push((i, s.hidden.to_vec1::<f32>().unwrap()[0]));
//! let chain = blocks
//!     .call(ScopeKey::new(0, Branch::Cond), |_, k: &f64, s: Streams| Ok(Streams::hidden((s.hidden * *k)?)))
//!     .traced(&mut trace);
//! assert_eq!(chain.run(0..2, Streams::hidden(x))?.hidden.to_vec1::<f32>()?, [6.0; 4]);
//! drop(chain);
//! assert_eq!(seen, [(0, 2.0), (1, 6.0)]);
//! # Ok(()) }
//! ```

use crate::chain::{BlockChain, Indicator, Indicators, Streams};
use crate::error::{Error, Result};
use crate::hooks::HookRegistry;
use crate::metadata::BlockMetadata;
use crate::scope::ScopeKey;
use candle_core::Tensor;
use std::cell::RefCell;
use std::ops::Range;

/// Reads block `i` from the checkpoint (streamed blocks).
type Loader<B> = Box<dyn Fn(usize) -> Result<B> + Send + Sync>;

/// Where the blocks' weights are.
enum Place<B> {
    /// Built once, held, in chain order.
    Held(Vec<B>),
    /// Read each time a block runs (`model.offload = "stream"`), the next one read ahead.
    Streamed(Loader<B>),
}

/// A model's chain of blocks with their hooks.
pub struct ModelBlocks<B> {
    /// The model, in errors (`wan`, `flux`, ...).
    name: &'static str,
    place: Place<B>,
    /// General per-block hooks (observers, probes); a cache never installs any.
    pub hooks: HookRegistry,
}

impl<B: Send> ModelBlocks<B> {
    /// Held blocks, one metadata entry per block.
    pub fn held(name: &'static str, blocks: Vec<B>, metas: Vec<BlockMetadata>) -> Result<Self> {
        if blocks.len() != metas.len() {
            return Err(Error::msg(format!(
                "{name}: {} blocks given with {} block kinds",
                blocks.len(),
                metas.len()
            )));
        }
        Ok(ModelBlocks {
            name,
            place: Place::Held(blocks),
            hooks: HookRegistry::new(metas),
        })
    }

    /// Blocks read by `load(i)` each time they run, one per metadata entry.
    pub fn streamed(
        name: &'static str,
        metas: Vec<BlockMetadata>,
        load: impl Fn(usize) -> Result<B> + Send + Sync + 'static,
    ) -> Self {
        ModelBlocks {
            name,
            place: Place::Streamed(Box::new(load)),
            hooks: HookRegistry::new(metas),
        }
    }

    pub fn len(&self) -> usize {
        self.hooks.num_blocks()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_streamed(&self) -> bool {
        matches!(self.place, Place::Streamed(_))
    }

    /// The model, as errors name it (`wan`, `flux`, ...).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The held blocks; `None` when streamed.
    pub fn held_blocks(&self) -> Option<&[B]> {
        match &self.place {
            Place::Held(v) => Some(v),
            Place::Streamed(_) => None,
        }
    }

    /// One call's chain: `forward(i, block, streams)` runs block `i` with the call's own arguments
    /// (captured by the closure), inside the block's hooks.
    pub fn call<'a, F>(&'a self, scope: ScopeKey, forward: F) -> CallChain<'a, B, F>
    where
        F: Fn(usize, &B, Streams) -> Result<Streams>,
    {
        CallChain {
            blocks: self,
            scope,
            forward,
            indicators: Indicators::default(),
            trace: None,
        }
    }
}

/// Receives each block's output streams, in chain order (parity traces).
type Trace<'a> = RefCell<&'a mut dyn FnMut(usize, &Streams)>;

/// One transformer call's [`BlockChain`] over a [`ModelBlocks`].
pub struct CallChain<'a, B, F> {
    blocks: &'a ModelBlocks<B>,
    scope: ScopeKey,
    forward: F,
    indicators: Indicators<'a>,
    trace: Option<Trace<'a>>,
}

impl<'a, B: Send, F: Fn(usize, &B, Streams) -> Result<Streams>> CallChain<'a, B, F> {
    /// Offers `t` as the indicator `kind`.
    pub fn with_indicator(self, kind: Indicator, t: &Tensor) -> Self {
        let t = t.clone();
        self.with_indicator_fn(kind, move || Ok(t.clone()))
    }

    /// Offers the indicator `kind`, computed by `f` only when a strategy asks for it.
    pub fn with_indicator_fn(
        mut self,
        kind: Indicator,
        f: impl Fn() -> Result<Tensor> + 'a,
    ) -> Self {
        self.indicators.offer(kind, f);
        self
    }

    /// Hands every computed block's output to `trace` (after its hooks).
    pub fn traced(mut self, trace: &'a mut dyn FnMut(usize, &Streams)) -> Self {
        self.trace = Some(RefCell::new(trace));
        self
    }

    /// Block `i` through its hooks, then traced.
    fn run_one(&self, i: usize, blk: &B, x: Streams) -> Result<Streams> {
        let out = self
            .blocks
            .hooks
            .run_block(self.scope, i, x, &|s| (self.forward)(i, blk, s))?;
        if let Some(t) = &self.trace {
            (t.borrow_mut())(i, &out);
        }
        Ok(out)
    }
}

impl<B: Send, F: Fn(usize, &B, Streams) -> Result<Streams>> BlockChain for CallChain<'_, B, F> {
    fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    fn run(&self, blocks: Range<usize>, x: Streams) -> Result<Streams> {
        let (name, n) = (self.blocks.name, self.blocks.len());
        if blocks.end > n || blocks.start > blocks.end {
            return Err(Error::msg(format!(
                "{name}: blocks {blocks:?} asked of a model with {n}"
            )));
        }
        match &self.blocks.place {
            Place::Held(v) => blocks.into_iter().try_fold(x, |x, i| match v.get(i) {
                Some(b) => self.run_one(i, b, x),
                None => Err(Error::msg(format!("{name}: no block {i}"))),
            }),
            Place::Streamed(load) => {
                let mut x = Some(x);
                run_streamed(name, blocks, load, |i, blk| {
                    let s = x.take().ok_or_else(|| Error::msg("streams taken"))?;
                    x = Some(self.run_one(i, blk, s)?);
                    Ok(())
                })?;
                x.ok_or_else(|| Error::msg(format!("{name}: a streamed block failed")))
            }
        }
    }

    fn indicator(&self, kind: Indicator) -> Result<Option<Tensor>> {
        self.indicators.get(kind)
    }
}

/// Runs the streamed blocks `blocks` in order (`model.offload = "stream"`): `load(i)` reads block
/// `i` from the checkpoint, `run(i, block)` computes it. One reader thread reads the blocks in
/// order, each handed over only when the previous one has run, so block `i + 1` is read while block
/// `i` runs and two blocks are resident. One thread for the whole pass, not one per block: glibc
/// gives each new thread's allocations an arena of its own and keeps what is freed there, so a
/// thread per block left up to one freed block in each of several arenas (a streamed FLUX.1-dev
/// call peaked at 2.50 GB instead of 1.87 GB). On a failure the reader is stopped and joined before
/// returning, so a panic in it is an error, never an abort. `family` names the model in errors.
pub fn run_streamed<B: Send>(
    family: &str,
    blocks: Range<usize>,
    load: impl Fn(usize) -> Result<B> + Sync,
    mut run: impl FnMut(usize, &B) -> Result<()>,
) -> Result<()> {
    let panicked = || {
        Error::msg(format!(
            "{family}: the thread reading a streamed block panicked"
        ))
    };
    std::thread::scope(|s| {
        let load = &load;
        // A rendezvous channel: the reader holds at most the one block it has read ahead.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<B>>(0);
        let range = blocks.clone();
        let reader = s.spawn(move || {
            for i in range {
                let b = load(i);
                let failed = b.is_err();
                if tx.send(b).is_err() || failed {
                    break;
                }
            }
        });
        let r = (|| -> Result<()> {
            for i in blocks {
                let blk = rx.recv().map_err(|_| panicked())??;
                run(i, &blk)?;
            }
            Ok(())
        })();
        // Unblocks a reader waiting to hand over a block, then waits for it.
        drop(rx);
        let joined = reader.join();
        match (r, joined) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(_)) => Err(panicked()),
            (Ok(()), Ok(())) => Ok(()),
        }
    })
}

#[cfg(test)]
#[path = "blocks_tests.rs"]
mod tests;
