//! The denoising-loop interface the runner drives: a family's pipeline owns its model(s), sampler and
//! inputs, runs the transformer calls in order, sets each call's cache scope and reports every call.

use crate::cache::{CacheHandle, CallDecision};
use crate::error::Result;
use crate::registry::ModelInfo;
use crate::scope::{Branch, GenerationPlan};
use candle_core::Tensor;

/// One transformer call of a generation, as reported.
#[derive(Clone, Debug, PartialEq)]
pub struct CallEvent {
    /// Position of the call in the generation.
    pub index: usize,
    /// Sampler step (over the whole generation).
    pub step: usize,
    pub branch: Branch,
    pub expert: usize,
    /// Model timestep of the call (0..1000 scale).
    pub timestep: f64,
    /// `None` when no cache ran.
    pub decision: Option<CallDecision>,
}

/// Receives progress from a generation.
pub trait Observer {
    /// A user-facing warning (printed on stderr and kept in the report).
    fn warning(&mut self, msg: &str) {
        let _ = msg;
    }
    /// After every transformer call.
    fn call(&mut self, ev: &CallEvent) {
        let _ = ev;
    }
    /// After every sampler step (`done` of `total`).
    fn step(&mut self, done: usize, total: usize) {
        let _ = (done, total);
    }
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// A runnable denoising pipeline of one family.
pub trait Pipeline {
    fn family(&self) -> &str;
    /// One line describing the model (architecture, sizes, where the weights came from).
    fn describe(&self) -> String;
    /// Scopes and step counts of a generation with the current sampling settings.
    fn plan(&self) -> GenerationPlan;
    /// Family, variant and published curves, for strategies.
    fn model_info(&self) -> ModelInfo;
    /// Attaches a cache to every expert (replacing any previous one); `None` removes it.
    fn set_cache(&mut self, cache: Option<CacheHandle>) -> Result<()>;
    /// The final latents as 2-D image planes `[N, H, W]` (every sample, channel and frame), for image
    /// metrics. This is the named "latents to pixels" stage: for models whose latents are the pixels
    /// (the digits model) the planes are the picture; a VAE decoder would take its place.
    fn to_planes(&self, latents: &Tensor) -> Result<Tensor>;
    /// Runs the whole loop and returns the final latents. With a cache attached, the pipeline starts a
    /// new cache generation first (warnings go to the observer).
    fn generate(&mut self, obs: &mut dyn Observer) -> Result<Tensor>;
}
