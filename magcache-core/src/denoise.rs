//! The denoising kit: what a model crate's loop needs around its transformer calls (the runner drives
//! the loop through [`crate::runtime::pipeline::Pipeline`]).
//!
//! A loop builds its [`GenerationPlan`] with [`GenerationPlan::from_steps`], starts a [`Denoiser`]
//! (which announces the plan to the cache and forwards its warnings and notes), and runs every transformer call
//! through [`Denoiser::call`]: the closure gets the call's [`CallCx`] (scope and cache) to hand to the
//! model, and the denoiser reports the call with the cache's decision. No scope is set or unset by
//! hand and no cache is locked by the loop.

use crate::cache::{CacheHandle, CallCx, CallDecision};
use crate::error::Result;
use crate::scope::{Branch, GenerationPlan, ScopeKey};
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
    /// A user-facing note: information on the run's settings, not a warning (printed unless
    /// quiet, kept in the report's notes).
    fn note(&mut self, msg: &str) {
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
    /// Checked before every transformer call: `true` ends the generation with
    /// [`crate::Error::Cancelled`] (a server's cancelled job, within one call).
    fn cancelled(&self) -> bool {
        false
    }
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// Drives the transformer calls of one generation: scopes, the cache's generation start, the call
/// log and the observer's events.
pub struct Denoiser<'a> {
    cache: Option<&'a CacheHandle>,
    obs: &'a mut dyn Observer,
    index: usize,
    total_steps: usize,
}

impl<'a> Denoiser<'a> {
    /// Starts a generation: announces `plan` to the cache (if any) and passes its warnings on.
    pub fn start(
        plan: &GenerationPlan,
        cache: Option<&'a CacheHandle>,
        obs: &'a mut dyn Observer,
    ) -> Result<Self> {
        if let Some(c) = cache {
            let mut c = c.lock()?;
            for w in c.begin_generation(plan)? {
                obs.warning(&w);
            }
            for n in c.notes() {
                obs.note(&n);
            }
        }
        Ok(Denoiser {
            cache,
            obs,
            index: 0,
            total_steps: plan.total_steps,
        })
    }

    /// One transformer call of sampler step `step`, expert `expert`, CFG branch `branch` at model
    /// timestep `timestep` (0..1000). `forward` runs the model with the call's context. The output is
    /// checked finite (one reduction); NaN or infinite values stop the run with an
    /// [`Error::NonFinite`](crate::Error::NonFinite) naming the step and the call.
    pub fn call(
        &mut self,
        step: usize,
        expert: usize,
        branch: Branch,
        timestep: f64,
        forward: impl FnOnce(&CallCx<'_>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if crate::cancel::cancelled() || self.obs.cancelled() {
            return Err(crate::Error::Cancelled);
        }
        let key = ScopeKey::new(expert, branch);
        let cx = CallCx::new(key, self.cache);
        let out = forward(&cx)?;
        crate::finite::ensure_finite(
            &out,
            &format!("sampler step {step}, call {key} at timestep {timestep:.1}"),
            "the transformer output",
            "check the magnitude of the inputs and of sampling.guidance_scale, and the weights",
        )?;
        self.obs.call(&CallEvent {
            index: self.index,
            step,
            branch,
            expert,
            timestep,
            decision: cx.decision(),
        });
        self.index += 1;
        Ok(out)
    }

    /// Reports that sampler step `step` (0-based) is done, with the latents it produced. The latents
    /// are checked finite (one reduction): NaN or infinite values stop the run with an
    /// [`Error::NonFinite`](crate::Error::NonFinite) naming the step.
    pub fn step_done(&mut self, step: usize, latents: &Tensor) -> Result<()> {
        crate::finite::ensure_finite(
            latents,
            &format!("sampler step {step}"),
            "the latents after the step",
            "the update overflowed: check sampling.guidance_scale, sampling.shift and the inputs' magnitude",
        )?;
        self.obs.step(step + 1, self.total_steps);
        Ok(())
    }

    /// Passes a warning to the observer.
    pub fn warning(&mut self, msg: &str) {
        self.obs.warning(msg);
    }
}
