//! A transformer whose blocks form one cache chain, read from a [`WeightStore`]: a family says how
//! to load block `i` and how to assemble the rest around a [`ModelBlocks`]; building it held or
//! streamed, and listing every tensor it reads with its shape (presets, export, estimates), are
//! written here once.

use crate::weights::{TensorShape, WeightStore};
use candle_core::Device;
use magcache_core::{BlockMetadata, ModelBlocks, Offload, Result};
use std::sync::Arc;

/// A family's transformer around one block chain.
pub trait ChainModel: Sized {
    /// Its config (`config.json` as read).
    type Config: Clone + Send + Sync + 'static;
    /// One block of the chain.
    type Block: Send + 'static;
    /// The family, in errors and the streamed reader's name.
    const FAMILY: &'static str;

    /// Each chain block's kind, in chain order (its length is the number of blocks).
    fn chain(cfg: &Self::Config) -> Vec<BlockMetadata>;
    /// Reads chain block `i` from `w`.
    fn load_block(
        w: &WeightStore,
        i: usize,
        cfg: &Self::Config,
        dev: &Device,
    ) -> Result<Self::Block>;
    /// Reads everything outside the chain from `w` and puts the model together.
    fn assemble(
        cfg: Self::Config,
        w: &WeightStore,
        blocks: ModelBlocks<Self::Block>,
    ) -> Result<Self>;

    /// The chain's general per-block hooks ([`ModelBlocks::hooks`]).
    fn hooks(&mut self) -> &mut magcache_core::HookRegistry;

    /// Every block loaded now and held.
    fn from_weights(cfg: Self::Config, w: &WeightStore) -> Result<Self> {
        let dev = w.placement().device.clone();
        let metas = Self::chain(&cfg);
        let blocks = (0..metas.len())
            .map(|i| Self::load_block(w, i, &cfg, &dev))
            .collect::<Result<Vec<_>>>()?;
        Self::assemble(cfg, w, ModelBlocks::held(Self::FAMILY, blocks, metas)?)
    }

    /// The blocks streamed from `w`: each block's tensors checked now (present, right shape) and
    /// read when the block runs; the rest loaded now.
    fn streamed(cfg: Self::Config, w: Arc<WeightStore>) -> Result<Self> {
        w.streamed.store(true, std::sync::atomic::Ordering::Relaxed);
        let metas = Self::chain(&cfg);
        for i in 0..metas.len() {
            for (name, shape) in Self::block_tensors(&cfg, i)? {
                w.expect(&name, &shape)?;
            }
        }
        let (c, dev, store) = (cfg.clone(), w.placement().device.clone(), w.clone());
        let load = move |i| Self::load_block(&w, i, &c, &dev);
        Self::assemble(
            cfg,
            &store,
            ModelBlocks::streamed(Self::FAMILY, metas, load),
        )
    }

    /// Held or streamed, as `model.offload` says.
    fn placed(cfg: Self::Config, w: Arc<WeightStore>, offload: Offload) -> Result<Self> {
        match offload {
            Offload::Stream => Self::streamed(cfg, w),
            Offload::None => Self::from_weights(cfg, &w),
        }
    }

    /// The tensors outside the chain with their shapes, in the order `assemble` reads them
    /// (recorded from it, so every name is written once).
    fn top_tensors(cfg: &Self::Config) -> Result<Vec<TensorShape>> {
        let w = WeightStore::recording();
        Self::assemble(
            cfg.clone(),
            &w,
            ModelBlocks::held(Self::FAMILY, Vec::new(), Vec::new())?,
        )?;
        w.recorded()
    }

    /// The tensors of chain block `i` with their shapes, recorded from its loader.
    fn block_tensors(cfg: &Self::Config, i: usize) -> Result<Vec<TensorShape>> {
        let w = WeightStore::recording();
        Self::load_block(&w, i, cfg, &Device::Cpu)?;
        w.recorded()
    }

    /// Every tensor of a model of `cfg` with its shape: outside the chain, then the blocks.
    fn shapes(cfg: &Self::Config) -> Result<Vec<TensorShape>> {
        let mut all = Self::top_tensors(cfg)?;
        for i in 0..Self::chain(cfg).len() {
            all.extend(Self::block_tensors(cfg, i)?);
        }
        Ok(all)
    }
}
