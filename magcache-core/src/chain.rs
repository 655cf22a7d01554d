//! The block chain as a cache sees it: two streams, any range of blocks, and the indicators a model
//! can compute for the current call.
//!
//! A model hands its cache chain (for FLUX: the double blocks, then the single blocks) to the cache
//! as a [`BlockChain`]. The cache decides and runs none of the blocks, the first, or all of them; it
//! never sees a block's arguments, weights or conditioning, only the [`Streams`] between blocks.

use crate::error::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// The states that flow from block to block: the hidden (image/video) tokens and, for joint-attention
/// models whose blocks update the text tokens too (FLUX), the encoder tokens. A model whose encoder
/// states are constant conditioning (Wan's cross-attention text) leaves `encoder` empty.
#[derive(Clone, Debug)]
pub struct Streams {
    pub hidden: Tensor,
    pub encoder: Option<Tensor>,
}

impl Streams {
    /// Hidden states only.
    pub fn hidden(hidden: Tensor) -> Self {
        Streams {
            hidden,
            encoder: None,
        }
    }

    /// Hidden and encoder states.
    pub fn joint(hidden: Tensor, encoder: Tensor) -> Self {
        Streams {
            hidden,
            encoder: Some(encoder),
        }
    }

    /// The encoder stream a joint block of `model` (chain block `block`) needs: an error naming
    /// both when it is missing.
    pub fn joint_encoder(&self, model: &str, block: usize) -> Result<&Tensor> {
        self.encoder.as_ref().ok_or_else(|| {
            crate::error::Error::msg(format!("{model} block {block}: no encoder stream"))
        })
    }

    /// `self - base`, stream by stream (a residual). An encoder stream missing on either side is
    /// missing in the result.
    pub fn sub(&self, base: &Streams) -> Result<Streams> {
        Ok(Streams {
            hidden: (&self.hidden - &base.hidden)?,
            encoder: match (&self.encoder, &base.encoder) {
                (Some(a), Some(b)) => Some((a - b)?),
                _ => None,
            },
        })
    }

    /// `self + residual`, stream by stream; an encoder stream without a residual passes unchanged.
    pub fn add(&self, residual: &Streams) -> Result<Streams> {
        Ok(Streams {
            hidden: (&self.hidden + &residual.hidden)?,
            encoder: match (&self.encoder, &residual.encoder) {
                (Some(a), Some(r)) => Some((a + r)?),
                (e, _) => e.clone(),
            },
        })
    }

    /// Bytes the tensors hold.
    pub fn bytes(&self) -> usize {
        crate::maths::tensor_bytes(&self.hidden)
            + self
                .encoder
                .as_ref()
                .map(crate::maths::tensor_bytes)
                .unwrap_or(0)
    }
}

/// A model tensor a strategy may decide from before any block runs, named by what it is (never by
/// the strategy that reads it). A model computes the ones it has when asked
/// ([`BlockChain::indicator`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Indicator {
    /// The timestep embedding (Wan's `temb`, FLUX's time + guidance + pooled-text embedding).
    TimestepEmbedding,
    /// The projection of the timestep embedding into the blocks' modulation parameters (Wan's
    /// `6 * dim` `timestep_proj`).
    TimestepModulation,
    /// The first block's hidden input after its adaptive norm and modulation (FLUX's first double
    /// block's `norm1` output).
    ModulatedInput,
    /// The transformer's input latents before patch embedding (the current sample `x_k`), per batch
    /// element as frames x height x width x channels: `[B, F, h, w, C]` (an image model: `F = 1`).
    InputLatents,
}

impl Indicator {
    pub const ALL: [Indicator; 4] = [
        Indicator::TimestepEmbedding,
        Indicator::TimestepModulation,
        Indicator::ModulatedInput,
        Indicator::InputLatents,
    ];

    /// The config name (`timestep_embedding`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Indicator::TimestepEmbedding => "timestep_embedding",
            Indicator::TimestepModulation => "timestep_modulation",
            Indicator::ModulatedInput => "modulated_input",
            Indicator::InputLatents => "input_latents",
        }
    }
}

impl std::fmt::Display for Indicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One transformer call's block chain, as a model hands it to a cache.
pub trait BlockChain {
    /// Number of blocks in the chain.
    fn num_blocks(&self) -> usize;

    /// Runs blocks `blocks` (a sub-range of `0..num_blocks()`) on `x`, the streams entering
    /// `blocks.start`, and returns the streams leaving the last block of the range. An empty range
    /// returns `x` unchanged.
    fn run(&self, blocks: Range<usize>, x: Streams) -> Result<Streams>;

    /// The indicator `kind` of this call, computed on demand; `None` when the model has no such
    /// tensor.
    fn indicator(&self, kind: Indicator) -> Result<Option<Tensor>> {
        let _ = kind;
        Ok(None)
    }
}

/// A lazily computed indicator.
type LazyIndicator<'a> = Box<dyn Fn() -> Result<Tensor> + 'a>;

/// The indicators a call's chain offers, each computed only when a strategy asks
/// ([`BlockChain::indicator`]); shared by [`PerBlock`] and [`crate::CallChain`].
#[derive(Default)]
pub struct Indicators<'a> {
    offered: Vec<(Indicator, LazyIndicator<'a>)>,
}

impl<'a> Indicators<'a> {
    /// Offers `f()` as the indicator `kind`.
    pub fn offer(&mut self, kind: Indicator, f: impl Fn() -> Result<Tensor> + 'a) {
        self.offered.push((kind, Box::new(f)));
    }

    /// The indicator `kind`, computed now; `None` when not offered.
    pub fn get(&self, kind: Indicator) -> Result<Option<Tensor>> {
        self.offered
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, f)| f())
            .transpose()
    }
}

/// A [`BlockChain`] from a closure that runs one block: the shortest way for a model to hand its
/// blocks to a cache.
///
/// ```
/// # use magcache_core::{candle_core::{self, Device, Tensor}, BlockChain, Indicator, PerBlock, Streams};
/// # fn main() -> magcache_core::Result<()> {
/// let scales = [2.0, 3.0];
/// let temb = Tensor::ones(4, candle_core::DType::F32, &Device::Cpu)?;
/// let chain = PerBlock::new(scales.len(), |i, x: Streams| {
///     Ok(Streams::hidden((x.hidden * scales[i])?))
/// })
/// .with_indicator(Indicator::TimestepEmbedding, &temb);
/// let out = chain.run(0..2, Streams::hidden(temb.clone()))?;
/// assert_eq!(out.hidden.to_vec1::<f32>()?, [6.0; 4]);
/// assert!(chain.indicator(Indicator::ModulatedInput)?.is_none());
/// # Ok(()) }
/// ```
pub struct PerBlock<'a, F> {
    n: usize,
    block: F,
    indicators: Indicators<'a>,
}

impl<'a, F: Fn(usize, Streams) -> Result<Streams>> PerBlock<'a, F> {
    /// `n` blocks; `block(i, x)` runs block `i` on the streams entering it.
    pub fn new(n: usize, block: F) -> Self {
        PerBlock {
            n,
            block,
            indicators: Indicators::default(),
        }
    }

    /// Offers `t` as the indicator `kind`.
    pub fn with_indicator(mut self, kind: Indicator, t: &Tensor) -> Self {
        let t = t.clone();
        self.indicators.offer(kind, move || Ok(t.clone()));
        self
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
}

impl<F: Fn(usize, Streams) -> Result<Streams>> BlockChain for PerBlock<'_, F> {
    fn num_blocks(&self) -> usize {
        self.n
    }

    fn run(&self, blocks: Range<usize>, x: Streams) -> Result<Streams> {
        if blocks.end > self.n {
            return Err(crate::error::Error::Hooks(format!(
                "blocks {blocks:?} of a chain of {}",
                self.n
            )));
        }
        blocks.into_iter().try_fold(x, |x, i| (self.block)(i, x))
    }

    fn indicator(&self, kind: Indicator) -> Result<Option<Tensor>> {
        self.indicators.get(kind)
    }
}
