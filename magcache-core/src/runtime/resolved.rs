//! A family's run, resolved once: the run file's keys typed, the placement, the pipeline folder and
//! every size fixed before anything loads, then shared by `plan`, the size guard, `build` and
//! `export`. A family implements [`ResolvedRun`] and registers the generic entry points
//! ([`build_run`], [`plan_run`], [`estimate_run`], [`export_run`]) for its type:
//!
//! ```ignore
//! inventory::submit! {
//!     ModelFamily { name: "my-family", /* description, blocks, presets, ... */
//!                   ..ModelFamily::resolved::<MyRun>() }
//! }
//! ```

use crate::error::{Error, Result};
use crate::model::ModelInfo;
use crate::runtime::config::RunConfig;
use crate::runtime::guard::Footprint;
use crate::runtime::pipeline::Pipeline;
use crate::runtime::registry::GeneratedWeights;
use crate::scope::GenerationPlan;
use std::path::Path;

/// A run file as one family reads it, resolved before anything loads.
pub trait ResolvedRun: Sized {
    /// Reads and checks the run file's keys and the configs it points to (never a weight).
    fn resolve(cfg: &RunConfig, file: &str, base_dir: &Path) -> Result<Self>;
    /// The cache scopes of the generation and what strategies may know of the model.
    fn plan(&self) -> Result<(GenerationPlan, ModelInfo)>;
    /// What resolving found that the user should know (settings the family does not use, sizes it
    /// rounds): `magcache plan` prints them, as the built pipeline reports them at every
    /// generation. Default: none.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
    /// Each stage's memory estimate, in the order the stages run.
    fn estimate(&self) -> Vec<(String, Footprint)>;
    /// Runs the stages up to the denoising loop and returns the pipeline ([`build_run`] has
    /// checked every stage's estimate against the size guard first).
    fn build(&self) -> Result<Box<dyn Pipeline>>;
    /// A preset run's transformers as generated weights (`magcache export`); `None`: this run has
    /// no preset to export.
    fn export(&self) -> Result<Option<Vec<GeneratedWeights>>> {
        Ok(None)
    }
}

/// [`crate::runtime::registry::BuildPipeline`] of a [`ResolvedRun`]: the size guard on every
/// stage's estimate, then the build.
pub fn build_run<R: ResolvedRun>(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
) -> Result<Box<dyn Pipeline>> {
    let run = R::resolve(cfg, file, base)?;
    for (_, fp) in run.estimate() {
        fp.check(file)?;
    }
    run.build()
}

/// [`crate::runtime::registry::PlanRun`] of a [`ResolvedRun`]: its plan, info and warnings.
pub fn plan_run<R: ResolvedRun>(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
) -> Result<crate::runtime::registry::RunPlan> {
    let run = R::resolve(cfg, file, base)?;
    let (plan, info) = run.plan()?;
    Ok(crate::runtime::registry::RunPlan {
        plan,
        info,
        warnings: run.warnings(),
    })
}

/// [`crate::runtime::registry::EstimateRun`] of a [`ResolvedRun`].
pub fn estimate_run<R: ResolvedRun>(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
) -> Result<Vec<(String, Footprint)>> {
    Ok(R::resolve(cfg, file, base)?.estimate())
}

/// [`crate::runtime::registry::ExportWeights`] of a [`ResolvedRun`]: an error naming
/// `model.weights` when the run is not a preset.
pub fn export_run<R: ResolvedRun>(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
) -> Result<Vec<GeneratedWeights>> {
    R::resolve(cfg, file, base)?.export()?.ok_or_else(|| {
        Error::config(
            file,
            "model.weights",
            "magcache export writes presets; this run has weights",
        )
    })
}

impl crate::runtime::registry::ModelFamily {
    /// The registration of a family whose runs resolve through `R`: `build`, `plan` and the size
    /// guard's estimates from `R`, blocks streamed with `offload = "stream"`, no published data or
    /// keys of its own. The family fills in the rest with struct update syntax (`ModelFamily {
    /// name: "...", description: "...", blocks: &[...], ..ModelFamily::resolved::<MyRun>() }`).
    pub const fn resolved<R: ResolvedRun>() -> Self {
        crate::runtime::registry::ModelFamily {
            name: "",
            description: "",
            blocks: &[],
            presets: &[],
            published: &[],
            keys: &[],
            streams: true,
            build: build_run::<R>,
            plan: plan_run::<R>,
            estimate: Some(estimate_run::<R>),
        }
    }
}
