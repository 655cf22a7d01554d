//! # magcache-core
//!
//! Two floors.
//!
//! **The cache framework** (the crate root), what strategies and models meet in:
//! - [`TimestepCache`]: the strategy trait: one call of a [`BlockChain`], decided and run as a whole;
//! - [`Denoiser`], [`CallCx`], [`GenerationPlan::from_steps`]: the denoising kit a model's loop uses
//!   ([`denoise`], [`cache`], [`scope`]);
//! - [`Indicator`]: the tensors a model can compute for strategies, named by what they are; [`model`]:
//!   what a strategy may know of the model ([`ModelInfo`]);
//! - [`DecisionSync`]: the collective data-dependent strategies average their metric through, so
//!   that every rank of a sequence-parallel run decides alike ([`SingleProcess`] by default);
//! - [`ModelBlocks`]: a model's chain of blocks (held or streamed) with its hooks, and each call's
//!   [`BlockChain`] over it ([`CallChain`]): a family gives its blocks and how one runs;
//! - [`HookRegistry`]: general hooks composed around each block (observers, probes);
//!   [`BlockMetadata`]: a block's kind and whether it updates an encoder stream;
//! - [`ScopeKey`] / [`ScopeStates`]: per (expert, branch) state and step accounting;
//! - [`maths`]: curve resampling and calibration statistics (profiles live in `magcache-strategies`);
//!   [`finite`]: the non-finite checks on every call and step; [`error`].
//!
//! **The runtime contract** ([`runtime`]), what a model family implements to get the whole runner:
//! the run file ([`RunConfig`], [`StrategyConfig`]), the registries ([`ModelFamily`]), the
//! [`Pipeline`] the runner drives, the size guard, placement, metrics and progress (its main types
//! are re-exported here for convenience). The framework never imports it.
//!
//! See `docs/architecture.md` for how a call flows: loop -> denoiser -> model -> cache -> chain.

pub mod blocks;
pub mod cache;
pub mod cancel;
pub mod chain;
pub mod checkpoint;
pub mod denoise;
pub mod error;
pub mod files;
pub mod finite;
pub mod hooks;
pub mod maths;
pub mod metadata;
pub mod model;
pub mod runtime;
pub mod scope;
pub mod states;
pub mod sync;

pub use blocks::{CallChain, ModelBlocks};
pub use cache::{CacheHandle, CallCx, CallDecision, TimestepCache};
pub use chain::{BlockChain, Indicator, Indicators, PerBlock, Streams};
pub use denoise::{CallEvent, Denoiser, Observer, Silent};
pub use error::{Error, Result};
pub use hooks::{BlockHook, HookCx, HookOrder, HookRegistry};
pub use metadata::BlockMetadata;
pub use model::{ModelInfo, ScheduleMeta};
pub use runtime::config::{BuildEnv, PromptSection, RunConfig, StrategyConfig};
pub use runtime::pipeline::{Decoded, Pipeline, PipelineCommon};
pub use runtime::placement::{Offload, Placement};
pub use runtime::registry::{
    ExportWeights, GeneratedWeights, ModelFamily, PresetExport, RunPlan, StrategyRegistration,
};
pub use scope::{Branch, GenerationPlan, ScopeKey, ScopePlan, StepsSpec};
pub use states::{ScopeSlot, ScopeStates};
pub use sync::{DecisionSync, SingleProcess};

pub use candle_core;
pub use inventory;
pub use typetag;
