//! The second floor: the runtime contract a model family implements to get the whole runner
//! (`magcache-cli`), on top of the cache framework of the crate root.
//!
//! - [`config`]: the TOML run file ([`config::RunConfig`]) and the typetag `[cache]` table
//!   ([`config::StrategyConfig`]) strategies register;
//! - [`hub`]: Hugging Face hub ids as weights, resolved in the local cache;
//! - [`keys`]: which keys of the run file core owns and which a family adds ([`keys::FamilyKeys`]);
//! - [`registry`]: model families ([`registry::ModelFamily`]: build, plan, presets) and strategies,
//!   collected at link time through `inventory`;
//! - [`resolved`]: a family's run file resolved once ([`resolved::ResolvedRun`]) before anything
//!   loads, and the registry entry points generic over it;
//! - [`pipeline`]: the [`pipeline::Pipeline`] a family builds and the runner drives;
//! - [`guard`]: the size guard that refuses runs that cannot fit in memory before anything is
//!   allocated; [`placement`]: device, dtype and offload settings;
//! - [`metrics`]: image metrics for `compare`; [`progress`]: stage timing and progress notes.
//!
//! Nothing in the cache framework imports this module.

pub mod config;
pub mod guard;
pub mod hub;
pub mod keys;
pub mod metrics;
mod named_files;
pub mod pipeline;
pub mod placement;
pub mod progress;
pub mod registry;
pub mod resolved;
