//! # magcache-core
//!
//! The framework the strategies and the models meet in:
//! - [`TimestepCache`]: the strategy trait: one call of a [`BlockChain`], decided and run as a whole;
//! - [`Denoiser`], [`CallCx`], [`GenerationPlan::from_steps`]: the denoising kit a model's loop uses;
//! - [`Indicator`]: the tensors a model can compute for strategies, named by what they are;
//! - [`DecisionSync`]: the collective data-dependent strategies average their metric through, so
//!   that every rank of a sequence-parallel run decides alike ([`SingleProcess`] by default);
//! - [`HookRegistry`]: general hooks composed around each block (observers, probes);
//! - [`BlockMetadata`]: where hidden and encoder states sit in a block's tuples (for hooks);
//! - [`ScopeKey`] / [`ScopeStates`]: per (expert, branch) state and step accounting;
//! - [`maths`]: curve resampling and calibration statistics (profiles live in `magcache-strategies`);
//! - [`config`]: the TOML run file and the typetag strategy table;
//! - [`registry`]: model families and strategies registered through `inventory`; [`model`]: what a
//!   strategy may know of the model ([`ModelInfo`]);
//! - [`Pipeline`]: the denoising loop interface the runner drives;
//! - [`finite`]: the non-finite checks on every call and step; [`guard`]: the size guard that refuses
//!   runs that cannot fit in memory before anything is allocated.
//!
//! See `docs/architecture.md` for how a call flows: loop -> denoiser -> model -> cache -> chain.

pub mod cache;
pub mod chain;
pub mod config;
pub mod error;
pub mod finite;
pub mod guard;
pub mod hooks;
pub mod maths;
pub mod metadata;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod placement;
pub mod progress;
pub mod registry;
pub mod scope;
pub mod states;
pub mod sync;

pub use cache::{CacheHandle, CallCx, CallDecision, TimestepCache};
pub use chain::{BlockChain, Indicator, PerBlock, Streams};
pub use config::{BuildEnv, PromptSection, RunConfig, StrategyConfig};
pub use error::{Error, Result};
pub use hooks::{BlockHook, HookCx, HookOrder, HookRegistry};
pub use metadata::BlockMetadata;
pub use model::{ModelInfo, ScheduleMeta};
pub use pipeline::{CallEvent, Denoiser, Observer, Pipeline, Silent};
pub use placement::{Offload, Placement};
pub use registry::{
    ExportWeights, GeneratedWeights, ModelFamily, PresetExport, StrategyRegistration,
};
pub use scope::{Branch, GenerationPlan, ScopeKey, ScopePlan, StepsSpec};
pub use states::{ScopeSlot, ScopeStates};
pub use sync::{DecisionSync, SingleProcess};

pub use candle_core;
pub use inventory;
pub use typetag;
