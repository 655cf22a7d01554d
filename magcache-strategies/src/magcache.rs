//! MagCache: skip a call while the accumulated magnitude error of reusing the last residual stays
//! small.
//!
//! Per scope, with `retention = floor(retention_ratio * steps + 0.5)` and the scope's ratio curve
//! resampled to its steps: from step `retention` on, every call does `acc_ratio *= ratio[step]`,
//! `acc_steps += 1`, `acc_err += |1 - acc_ratio|`; it reuses when a residual exists,
//! `acc_err <= threshold` and `acc_steps <= max_skip_steps`, otherwise it computes and resets the three
//! accumulators. The residual is the chain's hidden output minus its hidden input; a reused call
//! returns the chain's input plus that residual (added once) and runs no block.

use crate::guards::{few_step_warnings, Guards, Verdict};
use crate::ratios::{RatioSource, RatioSpec, Resample};
use crate::residual::{Estimator, ResidualCache};
use magcache_core::registry::StrategyRegistration;
use magcache_core::{
    BlockChain, BuildEnv, CallDecision, DecisionSync, Error, GenerationPlan, Result, ScopeKey,
    ScopeStates, StrategyConfig, Streams, TimestepCache,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// `[cache] strategy = "magcache"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MagCacheConfig {
    /// Largest accumulated error a reused call may carry.
    #[serde(default = "d_threshold")]
    pub threshold: f64,
    /// K: most consecutive reused calls per scope.
    #[serde(default = "d_k")]
    pub max_skip_steps: usize,
    /// Fraction of each scope's first steps that always compute.
    #[serde(default = "d_retention")]
    pub retention_ratio: f64,
    /// Ratio curve(s); default: a profile, else the curves registered for the model.
    #[serde(default)]
    pub mag_ratios: Option<RatioSpec>,
    /// A calibration profile written by `magcache calibrate`.
    #[serde(default)]
    pub profile: Option<String>,
    /// How curves are mapped onto a scope's steps: `"index"` (default) or `"sigma"` (profiles).
    #[serde(default)]
    pub resample: Resample,
    /// Accepted for configs written for diffusers' `MagCacheConfig`; each scope counts its own steps
    /// from the run's plan, so a value that matches no scope is warned about, never used.
    #[serde(default)]
    pub num_inference_steps: Option<usize>,
    /// What a reused call returns: `"reuse"` (the last computed residual), `"taylor1"` or
    /// `"taylor2"` (its forecast from the last computed calls of the scope, see [`crate::residual`]).
    #[serde(default)]
    pub estimator: Estimator,
    /// Guards: see [`crate::guards`].
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub last_steps: usize,
    #[serde(default)]
    pub max_consecutive: Option<usize>,
    #[serde(default)]
    pub cfg_shared: bool,
}

fn d_threshold() -> f64 {
    0.24
}
fn d_k() -> usize {
    5
}
fn d_retention() -> f64 {
    0.1
}

impl Default for MagCacheConfig {
    fn default() -> Self {
        MagCacheConfig {
            threshold: d_threshold(),
            max_skip_steps: d_k(),
            retention_ratio: d_retention(),
            mag_ratios: None,
            profile: None,
            resample: Resample::Index,
            num_inference_steps: None,
            estimator: Estimator::Reuse,
            warmup_steps: 0,
            last_steps: 0,
            max_consecutive: None,
            cfg_shared: false,
        }
    }
}

impl MagCacheConfig {
    /// The guard keys of this config.
    pub fn guards(&self) -> crate::guards::GuardConfig {
        crate::guards::GuardConfig {
            warmup_steps: self.warmup_steps,
            last_steps: self.last_steps,
            max_consecutive: self.max_consecutive,
            cfg_shared: self.cfg_shared,
        }
    }
}

#[typetag::serde(name = "magcache")]
impl StrategyConfig for MagCacheConfig {
    fn validate(&self, file: &str) -> Result<()> {
        crate::check_threshold(file, self.threshold)?;
        self.guards().validate(file)?;
        if !(0.0..=1.0).contains(&self.retention_ratio) {
            return Err(Error::config(
                file,
                "cache.retention_ratio",
                format!("must lie in [0, 1], got {}", self.retention_ratio),
            ));
        }
        if let Some(r) = &self.mag_ratios {
            r.validate(file)?;
        }
        if self.mag_ratios.is_some() && self.profile.is_some() {
            return Err(Error::config(
                file,
                "cache.profile",
                "give either `mag_ratios` or `profile`, not both",
            ));
        }
        if self.resample == Resample::Sigma && self.profile.is_none() {
            return Err(Error::config(
                file,
                "cache.resample",
                "\"sigma\" maps a curve by the noise level of each calibrated step, which only a calibration profile records: give `profile = ...` or remove `resample`",
            ));
        }
        Ok(())
    }

    fn check_experts(&self, file: &str, family: &str, experts: usize) -> Result<()> {
        if experts < 2 {
            if let Some(RatioSpec::PerExpert(_)) = &self.mag_ratios {
                return Err(Error::config(
                    file,
                    "cache.mag_ratios.high_noise",
                    format!("per-expert curves (`high_noise` / `low_noise`) are for a two-expert wan2.2; this {family} run has one model: give one curve, `mag_ratios = [...]`"),
                ));
            }
        }
        Ok(())
    }

    fn build(&self, env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>> {
        let source = match (&self.mag_ratios, &self.profile) {
            (Some(_), Some(_)) => {
                return Err(Error::config(env.file, "cache.profile", "give either `mag_ratios` or `profile`, not both"))
            }
            (Some(spec), None) => RatioSource::Config(spec.clone()),
            (None, Some(p)) => {
                let path = env.resolve(p);
                let prof = crate::profile::Profile::load(&path)?;
                if prof.meta.family != env.model.family {
                    return Err(Error::config(
                        env.file,
                        "cache.profile",
                        format!("{} was calibrated on family `{}`, this run is `{}`", path.display(), prof.meta.family, env.model.family),
                    ));
                }
                RatioSource::Registered(prof.curves(&path.display().to_string()))
            }
            (None, None) => match crate::ratios::published_curves(env.model)? {
                Some(rc) => RatioSource::Registered(rc),
                None => {
                    return Err(Error::config(
                        env.file,
                        "cache.mag_ratios",
                        format!(
                            "MagCache needs ratios: no `mag_ratios` or `profile` in the config and none registered for model family `{}`{} (run `magcache calibrate` to measure them)",
                            env.model.family,
                            env.model.variant.as_deref().map(|v| format!(" variant `{v}`")).unwrap_or_default()
                        ),
                    ))
                }
            },
        };
        if self.resample == Resample::Sigma
            && !matches!(source, RatioSource::Registered(ref rc) if !rc.expert_sigmas.is_empty())
        {
            return Err(Error::config(
                env.file,
                "cache.resample",
                "resample = \"sigma\" needs a calibration profile (`profile = ...`), which records the sigma of every step",
            ));
        }
        Ok(Some(Box::new(MagCache::new(self.clone(), source))))
    }

    fn decides_from_data(&self) -> bool {
        false
    }

    fn metric_name(&self) -> &'static str {
        "MagCache accumulated error"
    }

    fn input_files(&self) -> Vec<(&'static str, String)> {
        self.profile
            .iter()
            .map(|p| ("cache.profile", p.clone()))
            .collect()
    }

    fn threshold(&self) -> Option<f64> {
        Some(self.threshold)
    }
}

inventory::submit! {
    StrategyRegistration { name: "magcache", description: "MagCache: accumulated magnitude-ratio error over a calibrated curve (decisions known before the run)", defaults: || Box::new(MagCacheConfig::default()) }
}

#[derive(Debug, Default)]
struct MagState {
    ratios: Vec<f64>,
    retention: usize,
    acc_ratio: f64,
    acc_err: f64,
    acc_steps: usize,
    cache: ResidualCache,
}

/// The MagCache strategy.
pub struct MagCache {
    cfg: MagCacheConfig,
    source: RatioSource,
    guards: Guards,
    states: ScopeStates<MagState>,
    /// The current generation's plan (predictions replay all of its calls, `cfg_shared` included).
    plan: GenerationPlan,
}

impl MagCache {
    pub fn new(cfg: MagCacheConfig, source: RatioSource) -> Self {
        MagCache {
            guards: Guards::new(cfg.guards()),
            cfg,
            source,
            states: ScopeStates::default(),
            plan: GenerationPlan::default(),
        }
    }
}

/// The decision rule on the accumulators of one scope under the guards' `verdict`; returns
/// `(reuse, metric)`.
fn decide(
    cfg: &MagCacheConfig,
    st: &mut MagState,
    step: usize,
    has_residual: bool,
    verdict: Verdict,
) -> (bool, f64) {
    let mut reuse = false;
    if step >= st.retention {
        let scale = st.ratios.get(step).copied().unwrap_or(1.0);
        st.acc_ratio *= scale;
        st.acc_steps += 1;
        st.acc_err += (1.0 - st.acc_ratio).abs();
        let want = st.acc_err <= cfg.threshold && st.acc_steps <= cfg.max_skip_steps;
        reuse = verdict.apply(want, has_residual);
        if !reuse {
            st.acc_ratio = 1.0;
            st.acc_steps = 0;
            st.acc_err = 0.0;
        }
    }
    (reuse, st.acc_err)
}

/// Predicted decisions of one scope from its resampled curve alone: `(computed, metric)` per call,
/// under the single-scope guards (`warmup_steps`, `last_steps`, `max_consecutive`).
/// MagCache decisions do not depend on the data, so this is exact.
pub fn predict(cfg: &MagCacheConfig, ratios: &[f64], steps: usize) -> Vec<(bool, f64)> {
    let mut st = MagState {
        ratios: ratios.to_vec(),
        retention: retention_steps(cfg.retention_ratio, steps),
        acc_ratio: 1.0,
        ..Default::default()
    };
    let mut guards = Guards::new(cfg.guards());
    guards.begin(&GenerationPlan::default());
    let key = ScopeKey::new(0, magcache_core::Branch::Cond);
    let mut has_residual = false;
    (0..steps)
        .map(|step| {
            let v = guards.verdict(key, step, steps);
            let (reuse, m) = decide(cfg, &mut st, step, has_residual, v);
            guards.record(key, step, reuse);
            has_residual |= !reuse;
            (!reuse, m)
        })
        .collect()
}

/// `floor(retention_ratio * steps + 0.5)`.
pub fn retention_steps(retention_ratio: f64, steps: usize) -> usize {
    (retention_ratio * steps as f64 + 0.5).floor() as usize
}

impl TimestepCache for MagCache {
    fn name(&self) -> &str {
        "magcache"
    }

    fn begin_generation(&mut self, plan: &GenerationPlan) -> Result<Vec<String>> {
        let cfg = &self.cfg;
        let source = &self.source;
        self.states.begin(plan, |sp| {
            Ok(MagState {
                ratios: source.curve_for_mode(plan, sp, cfg.resample)?,
                retention: retention_steps(cfg.retention_ratio, sp.steps),
                acc_ratio: 1.0,
                cache: ResidualCache::new(cfg.estimator),
                ..Default::default()
            })
        })?;
        self.guards.begin(plan);
        self.plan = plan.clone();
        let mut warnings = self.source.schedule_warnings(plan, self.cfg.resample);
        warnings.extend(few_step_warnings("magcache", plan, self.guards.config()));
        if let Some(n) = self.cfg.num_inference_steps {
            if n != plan.total_steps && plan.scopes.iter().all(|s| s.steps != n) {
                warnings.push(format!(
                    "cache.num_inference_steps = {n} is not used: this run has {} steps and each cache scope counts its own ({})",
                    plan.total_steps,
                    plan.scopes.iter().map(|s| format!("{} {}", s.key, s.steps)).collect::<Vec<_>>().join(", ")
                ));
            }
        }
        Ok(warnings)
    }

    fn run(
        &mut self,
        scope: ScopeKey,
        chain: &dyn BlockChain,
        x: Streams,
        _sync: &dyn DecisionSync,
    ) -> Result<(Streams, CallDecision)> {
        let (step, slot) = self.states.start_call(scope)?;
        let verdict = self.guards.verdict(scope, step, slot.steps);
        let st = &mut slot.state;
        let has_residual = st.cache.has_residual();
        let (reuse, metric) = decide(&self.cfg, st, step, has_residual, verdict);
        self.guards.record(scope, step, reuse);
        let out = st.cache.run("MagCache", scope, step, chain, x, reuse)?;
        Ok((
            out,
            CallDecision {
                computed: !reuse,
                metric: Some(metric),
            },
        ))
    }

    fn predict(&self, scope: ScopeKey) -> Option<Vec<CallDecision>> {
        // Replays every call of the plan in order on fresh accumulators: exact, since the
        // decisions depend on the curves and the guards only.
        self.states.get(scope).ok()?;
        let mut states: HashMap<ScopeKey, (MagState, bool)> = HashMap::new();
        for (k, s) in self.states.iter() {
            let st = MagState {
                ratios: s.state.ratios.clone(),
                retention: s.state.retention,
                acc_ratio: 1.0,
                ..Default::default()
            };
            states.insert(*k, (st, false));
        }
        let mut guards = Guards::new(self.cfg.guards());
        guards.begin(&self.plan);
        let mut out = Vec::new();
        for (_, key, i) in self.plan.calls() {
            let steps = self.states.get(key).ok()?.steps;
            let (st, has_residual) = states.get_mut(&key)?;
            let v = guards.verdict(key, i, steps);
            let (reuse, m) = decide(&self.cfg, st, i, *has_residual, v);
            guards.record(key, i, reuse);
            *has_residual |= !reuse;
            if key == scope {
                out.push(CallDecision {
                    computed: !reuse,
                    metric: Some(m),
                });
            }
        }
        Some(out)
    }

    fn cached_bytes_by_scope(&self) -> Vec<(ScopeKey, usize)> {
        self.states
            .iter()
            .map(|(k, s)| (*k, s.state.cache.bytes()))
            .collect()
    }
}
