//! The runner behind the `magcache` binary: reads a run file, builds the family's pipeline and the
//! strategy, runs the generation and reports every transformer call. See `docs/contract.md` (a copy of the
//! shared contract) for the contract.
//!
//! The command line itself is [`main`]: the `magcache` binary is `magcache_models::link();
//! magcache_cli::main()`, and a model crate's binary is `my_model::link(); magcache_cli::main()`
//! (see `examples/toy-model/src/bin/toy-magcache.rs`). The library names no model family: a
//! binary has exactly the families it links.

mod args;
mod calibrate;
mod cli;
mod commands;
mod compare;
mod export;
mod fit;
pub mod h264;
pub mod image;
mod list;
mod output;
mod plan;
mod prepare;
mod report;
mod run;
mod serve;
mod temps;
mod threshold;
mod tune;
pub mod video;

pub use calibrate::{blocks_text, calibrate, calibrate_with, fingerprint};
pub use cli::main;
pub use compare::{compare, compare_text, CompareReport, Comparison};
pub use export::{export, export_as, ExportReport, Format as ExportFormat};
pub use fit::{fit, FitOptions, FitReport, FitStep};
pub use list::list;
pub use output::{write_atomic, write_latents, Outputs};
pub use plan::{plan, plan_text, PlanReport};
pub use prepare::{prepare, prepare_pipeline, Prepared};
pub use report::{peak_rss_bytes, summary, CallReport, Report, ScopeSummary};
pub use run::{generate, Verbosity};
pub use temps::install_signal_cleanup;
pub use tune::{tune, tune_text, tuned_run_file, Target, Tried, TuneFit, TuneOptions, TuneReport};
