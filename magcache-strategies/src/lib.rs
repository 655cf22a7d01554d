//! # magcache-strategies
//!
//! Timestep-caching strategies behind [`magcache_core::TimestepCache`], each configured by a typetag
//! `[cache]` table:
//! - [`magcache`]: MagCache, magnitude-ratio error model over calibrated curves (`strategy = "magcache"`);
//! - [`fbcache`]: First-Block Cache, relative change of the first block's residual (`strategy =
//!   "fbcache"`), and DBCache, its generalisation to `Fn` front and `Bn` back blocks (`strategy =
//!   "dbcache"`);
//! - [`teacache`]: TeaCache, rescaled distance of a model-provided indicator (`strategy = "teacache"`);
//! - [`seacache`]: SeaCache, accumulated distance of the spectrally filtered input latents with
//!   residual extrapolation (`strategy = "seacache"`);
//! - [`easycache`]: EasyCache, reuse while the output change predicted from the model's own
//!   transformation rate stays small (`strategy = "easycache"`);
//! - [`spectrum`]: Spectrum, computed calls on a widening window and reused calls forecast by
//!   Chebyshev polynomials in time fitted by ridge regression (`strategy = "spectrum"`);
//! - [`schedule`]: calibrated schedules, the computed calls fixed before the run, given or searched
//!   from a calibration profile (`strategy = "schedule"`).
//!
//! Each strategy is its decision [`Rule`] (what it would do with one call, and its metric) on one
//! shared [`engine`] ([`Cached`]), which owns the per-scope state, the guards (warm-up, last steps,
//! consecutive cap, CFG sharing, few-step warnings: [`guards`]), the residual store and the estimator
//! axis ([`residual`]: what a reused call returns), running the chain, decision synchronisation and
//! predictions. [`strategy_config!`] declares a config with the shared keys once.
//!
//! Strategies know nothing of a model's internals: they see a call's block chain through
//! [`magcache_core::BlockChain`] (run a range of blocks, ask for an [`magcache_core::Indicator`]) and
//! keep per-scope state in [`magcache_core::ScopeStates`].

pub mod calibrate;
pub mod easycache;
pub mod engine;
pub mod fbcache;
pub mod fitted;
pub mod guards;
pub mod magcache;
pub mod probe;
pub mod profile;
pub mod ratios;
pub mod residual;
pub mod schedule;
pub mod seacache;
pub mod search;
pub mod spectrum;
pub mod teacache;

pub use easycache::{EasyCache, EasyCacheConfig};
pub use engine::{Cached, Call, Rule, Shared, SharedKeys, Want, Wish};
pub use fbcache::{DbCacheConfig, FbCache, FbCacheConfig, HeadMetric};
pub use guards::GuardConfig;
pub use magcache::{MagCache, MagCacheConfig};
pub use ratios::{RatioCurves, RatioSource, RatioSpec, Resample};
pub use residual::{Combination, Estimator, EstimatorAxis};
pub use schedule::{Schedule, ScheduleConfig};
pub use seacache::{SeaCache, SeaCacheConfig};
pub use spectrum::{Spectrum, SpectrumConfig};
pub use teacache::{TeaCache, TeaCacheConfig};

/// Every strategy's `threshold`: a finite, non-negative number.
pub fn check_threshold(file: &str, threshold: f64) -> magcache_core::Result<()> {
    if threshold.is_finite() && threshold >= 0.0 {
        Ok(())
    } else {
        Err(magcache_core::Error::config(
            file,
            "cache.threshold",
            format!("must be a non-negative number, got {threshold}"),
        ))
    }
}

/// Call this from a binary or test that uses the strategies only through config files: it keeps the
/// linker from dropping the crate and with it the typetag and inventory registrations.
#[inline(never)]
pub fn link() {
    std::hint::black_box(magcache::MagCacheConfig::default());
    std::hint::black_box(fbcache::FbCacheConfig::default());
    std::hint::black_box(fbcache::DbCacheConfig::default());
    std::hint::black_box(teacache::TeaCacheConfig::default());
    std::hint::black_box(seacache::SeaCacheConfig::default());
    std::hint::black_box(schedule::ScheduleConfig::default());
    std::hint::black_box(easycache::EasyCacheConfig::default());
    std::hint::black_box(spectrum::SpectrumConfig::default());
}
