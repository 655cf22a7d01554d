//! MagCache: skip a call while the accumulated magnitude error of reusing the last residual stays
//! small.
//!
//! Per scope, with `retention = floor(retention_ratio * steps + 0.5)` and the scope's ratio curve
//! resampled to its steps: from step `retention` on, every call does `acc_ratio *= ratio[step]`,
//! `acc_steps += 1`, `acc_err += |1 - acc_ratio|`; it reuses when a residual exists,
//! `acc_err <= threshold` and `acc_steps <= max_skip_steps`, otherwise it computes and resets the three
//! accumulators. The residual is the chain's hidden output minus its hidden input; a reused call
//! returns the chain's input plus that residual (added once) and runs no block.

use crate::engine::{Cached, Call, Rule, SharedKeys, Wish};
use crate::ratios::{RatioSource, RatioSpec, Resample};
use magcache_core::runtime::registry::StrategyRegistration;
use magcache_core::{
    BuildEnv, Error, GenerationPlan, Result, ScopeKey, ScopePlan, StrategyConfig, TimestepCache,
};

crate::strategy_config! {
    /// `[cache] strategy = "magcache"`.
    pub struct MagCacheConfig {
        /// Largest accumulated error a reused call may carry.
        pub threshold: f64 = 0.24,
        /// K: most consecutive reused calls per scope.
        pub max_skip_steps: usize = 5,
        /// Fraction of each scope's first steps that always compute.
        pub retention_ratio: f64 = 0.1,
        /// Ratio curve(s); default: a profile, else the curves registered for the model.
        pub mag_ratios: Option<RatioSpec> = None,
        /// A calibration profile written by `magcache calibrate`.
        pub profile: Option<String> = None,
        /// How curves are mapped onto a scope's steps: `"index"` (default) or `"sigma"` (profiles).
        pub resample: Resample = Resample::Index,
        /// Accepted for configs written for diffusers' `MagCacheConfig`; each scope counts its own
        /// steps from the run's plan, so a value that matches no scope is warned about, never used.
        pub num_inference_steps: Option<usize> = None,
    }
}

#[typetag::serde(name = "magcache")]
impl StrategyConfig for MagCacheConfig {
    fn validate(&self, file: &str) -> Result<()> {
        crate::check_threshold(file, self.threshold)?;
        self.shared().validate(file)?;
        if self.max_skip_steps == 0 {
            return Err(Error::config(
                file,
                "cache.max_skip_steps",
                "0 reuses no call (a dense run): give at least 1, or strategy = \"none\"",
            ));
        }
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
        self.validate(env.file)?;
        let mut borrowed = None;
        let source = match (&self.mag_ratios, &self.profile) {
            (Some(_), Some(_)) => {
                return Err(Error::config(
                    env.file,
                    "cache.profile",
                    "give either `mag_ratios` or `profile`, not both",
                ))
            }
            (Some(spec), None) => RatioSource::Config(spec.clone()),
            (None, Some(p)) => {
                let path = env.resolve(p);
                let prof = crate::profile::Profile::load_named(env.file, p, &path)?;
                if prof.meta.family != env.model.family {
                    return Err(Error::config(
                        env.file,
                        "cache.profile",
                        format!(
                            "{} was calibrated on family `{}`, this run is `{}`",
                            path.display(),
                            prof.meta.family,
                            env.model.family
                        ),
                    ));
                }
                RatioSource::Registered(prof.curves(&path.display().to_string()))
            }
            (None, None) => match crate::ratios::published_curves(env.model)? {
                Some(rc) => {
                    // Published data on weights that match no published variant (a checkpoint of
                    // the family's architecture at another size, say) is borrowed: said.
                    if env.model.variant.is_none() {
                        borrowed = Some(format!(
                            "MagCache uses the {} of model family `{}` for these weights, which match no published variant (give `mag_ratios` or a `profile` from `magcache calibrate` for a curve of their own)",
                            rc.source, env.model.family
                        ));
                    }
                    RatioSource::Registered(rc)
                }
                None => {
                    return Err(Error::config(
                        env.file,
                        "cache.mag_ratios",
                        format!(
                            "MagCache needs ratios: no `mag_ratios` or `profile` in the config and none registered for {} (run `magcache calibrate` to measure them)",
                            match env.model.variant.as_deref() {
                                Some(v) => format!("model family `{}` variant `{v}`", env.model.family),
                                // The published curves (`magcache list`) are per released variant.
                                None => format!("these `{}` weights, which match no published variant (`magcache list` shows the variants with curves)", env.model.family),
                            }
                        ),
                    ));
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
        Ok(Some(Box::new(MagCache::with_note(
            self.clone(),
            source,
            borrowed,
        ))))
    }

    fn metric_name(&self) -> &'static str {
        "MagCache accumulated error"
    }
    fn accumulates(&self) -> bool {
        true
    }

    fn input_files(&self) -> Vec<(&'static str, String)> {
        crate::profile::input_files(&self.profile)
    }

    fn threshold(&self) -> Option<f64> {
        Some(self.threshold)
    }
}

inventory::submit! {
    StrategyRegistration { name: "magcache", description: "MagCache: accumulated magnitude-ratio error over a calibrated curve (decisions known before the run)", defaults: || Box::new(MagCacheConfig::default()) }
}

/// One scope's accumulators and its resampled curve.
#[derive(Debug, Default)]
pub struct MagState {
    ratios: Vec<f64>,
    retention: usize,
    acc_ratio: f64,
    acc_err: f64,
    acc_steps: usize,
}

impl MagState {
    fn new(ratios: Vec<f64>, retention: usize) -> Self {
        MagState {
            ratios,
            retention,
            acc_ratio: 1.0,
            ..Default::default()
        }
    }
}

/// MagCache's decision rule over the ratio curves of `source`.
pub struct MagRule {
    cfg: MagCacheConfig,
    source: RatioSource,
    /// Where the curve comes from when that is worth a note (published data borrowed).
    note: Option<String>,
}

/// The MagCache strategy.
pub type MagCache = Cached<MagRule>;

impl Cached<MagRule> {
    pub fn new(cfg: MagCacheConfig, source: RatioSource) -> Self {
        Self::with_note(cfg, source, None)
    }

    /// With a note on where the curve comes from, shown with every run.
    fn with_note(cfg: MagCacheConfig, source: RatioSource, note: Option<String>) -> Self {
        let shared = cfg.shared();
        Cached::with_rule(MagRule { cfg, source, note }, shared)
    }
}

impl Rule for MagRule {
    type State = MagState;

    fn name(&self) -> &str {
        "magcache"
    }

    fn init(&self, plan: &GenerationPlan, sp: &ScopePlan) -> Result<MagState> {
        let ratios = self.source.curve_for_mode(plan, sp, self.cfg.resample)?;
        Ok(MagState::new(
            ratios,
            retention_steps(self.cfg.retention_ratio, sp.steps),
        ))
    }

    fn notes(&self) -> Vec<String> {
        self.note.iter().cloned().collect()
    }

    fn warnings(&self, plan: &GenerationPlan) -> Vec<String> {
        let mut warnings = self.source.schedule_warnings(plan, self.cfg.resample);
        if let Some(n) = self.cfg.num_inference_steps {
            if n != plan.total_steps && plan.scopes.iter().all(|s| s.steps != n) {
                warnings.push(format!(
                    "cache.num_inference_steps = {n} is not used: this run has {} steps and each cache scope counts its own ({})",
                    plan.total_steps,
                    plan.scopes.iter().map(|s| format!("{} {}", s.key, s.steps)).collect::<Vec<_>>().join(", ")
                ));
            }
        }
        // The retained warm-up covering a whole scope leaves nothing to reuse, as the guards'
        // warm-up and last steps do (their own warning).
        if let Some(sp) = plan
            .scopes
            .iter()
            .find(|sp| retention_steps(self.cfg.retention_ratio, sp.steps) >= sp.steps)
        {
            warnings.push(format!(
                "magcache: cache.retention_ratio ({}) retains all {} calls of scope {} as warm-up: nothing can be reused (the run is dense)",
                self.cfg.retention_ratio, sp.steps, sp.key
            ));
        }
        warnings
    }

    /// From step `retention` on: `acc_ratio *= ratio[step]`, `acc_steps += 1`,
    /// `acc_err += |1 - acc_ratio|`; reuse while `acc_err <= threshold` and `acc_steps <= K`.
    fn decide(&self, st: &mut MagState, call: &Call<'_>) -> Result<Wish> {
        let step = call.step;
        if step < st.retention {
            return Ok(Wish::force(Some(st.acc_err)));
        }
        st.acc_ratio *= st.ratios.get(step).copied().unwrap_or(1.0);
        st.acc_steps += 1;
        st.acc_err += (1.0 - st.acc_ratio).abs();
        let want = st.acc_err <= self.cfg.threshold && st.acc_steps <= self.cfg.max_skip_steps;
        Ok(Wish::reuse_if(want, None))
    }

    /// The accumulated error the call was decided from (before a computed call resets it).
    fn compared(&self, st: &MagState, _wish: &Wish) -> Option<f64> {
        Some(st.acc_err)
    }

    /// A computed call resets the accumulators; the call reports the error after that.
    fn settle(&self, st: &mut MagState, reused: bool, _metric: Option<f64>) -> Option<f64> {
        if !reused {
            st.acc_ratio = 1.0;
            st.acc_steps = 0;
            st.acc_err = 0.0;
        }
        Some(st.acc_err)
    }

    fn data_free(&self) -> bool {
        true
    }
}

/// Predicted decisions of one scope from its resampled curve alone: `(computed, metric)` per call,
/// under the single-scope guards (`warmup_steps`, `last_steps`, `max_consecutive`).
/// MagCache decisions do not depend on the data, so this is exact.
pub fn predict(cfg: &MagCacheConfig, ratios: &[f64], steps: usize) -> Vec<(bool, f64)> {
    // The curve as the scope's own (a missing entry is a ratio of 1), replayed by the engine on a
    // one-scope plan: the same decisions a run takes.
    let mut curve = ratios.to_vec();
    curve.resize(steps, 1.0);
    let cfg = MagCacheConfig {
        resample: Resample::Index,
        ..cfg.clone()
    };
    let mut m = MagCache::new(cfg, RatioSource::Config(RatioSpec::Curve(curve)));
    let plan = GenerationPlan::from_steps(&magcache_core::StepsSpec::new(
        "",
        "",
        &vec![0.0; steps],
        &[magcache_core::Branch::Cond],
    ));
    let key = ScopeKey::new(0, magcache_core::Branch::Cond);
    let decisions = match m.begin_generation(&plan) {
        Ok(_) => m.predict(key).unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    decisions
        .into_iter()
        .map(|d| (d.computed, d.metric.unwrap_or(0.0)))
        .collect()
}

/// `floor(retention_ratio * steps + 0.5)`.
pub fn retention_steps(retention_ratio: f64, steps: usize) -> usize {
    (retention_ratio * steps as f64 + 0.5).floor() as usize
}
