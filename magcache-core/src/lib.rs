//! # magcache-core
//!
//! The framework the strategies and the models meet in:
//! - [`TimestepCache`]: the strategy trait (head decision, tail record);
//! - [`HookRegistry`]: hooks composed around each block of a model's cache chain;
//! - [`BlockMetadata`]: where hidden and encoder states sit in a block's tuples;
//! - [`ScopeKey`] / [`ScopeStates`]: per (expert, branch) state and step accounting;
//! - [`maths`]: curve resampling and calibration statistics; [`profile`]: calibration profiles;
//! - [`config`]: the TOML run file and the typetag strategy table;
//! - [`registry`]: model families and strategies registered through `inventory`;
//! - [`Pipeline`]: the denoising loop interface the runner drives.
//!
//! See `docs/architecture.md` for how a call flows: loop -> model -> registry -> hooks -> strategy.

pub mod cache;
pub mod config;
pub mod error;
pub mod hooks;
pub mod maths;
pub mod metadata;
pub mod metrics;
pub mod pipeline;
pub mod profile;
pub mod registry;
pub mod scope;
pub mod states;

pub use cache::{CacheHandle, CallDecision, HeadAction, TimestepCache};
pub use config::{BuildEnv, RunConfig, StrategyConfig};
pub use error::{Error, Result};
pub use hooks::{BlockHook, HookCx, HookOrder, HookRegistry};
pub use metadata::BlockMetadata;
pub use pipeline::{CallEvent, Observer, Pipeline};
pub use registry::{ModelFamily, ModelInfo, RatioCurves, ScheduleMeta, StrategyRegistration};
pub use scope::{Branch, GenerationPlan, ScopeKey, ScopePlan};
pub use states::{ScopeSlot, ScopeStates};

pub use candle_core;
pub use inventory;
pub use typetag;
