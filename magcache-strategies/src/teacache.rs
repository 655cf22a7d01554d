//! TeaCache: decide before any block from a model-provided indicator.
//!
//! Per scope: the first and the last step compute (with `ret_steps`: the first 5 steps compute and the
//! last is not forced); otherwise `acc += poly(rel_l1(ind, ind_prev))` (its numerator
//! and denominator averaged over the ranks of a sequence-parallel run first), with `poly` the rescale
//! polynomial (coefficients highest power first); the call reuses while `acc < threshold`, else it
//! computes and sets `acc = 0`. `ind_prev` is updated on every call, computed or not. Residual and
//! reuse as MagCache (last block's hidden output minus first block's hidden input, added once at the
//! chain's input, no block run).
//!
//! Which model tensor serves as the indicator is part of the calibration: the TeaCache authors fit
//! Wan's coefficients on its timestep embedding (`timestep_modulation` with `ret_steps`) and FLUX's on
//! the first block's modulated input. Models publish that choice (and, per variant, the
//! coefficients) under the `teacache` key; `indicator = "..."` in the config overrides it.

use crate::guards::{few_step_warnings, Guards};
use crate::residual::{Estimator, ResidualCache};
use magcache_core::candle_core::Tensor;
use magcache_core::maths::tensor_bytes;
use magcache_core::registry::StrategyRegistration;
use magcache_core::sync::synced_rel_l1;
use magcache_core::{
    BlockChain, BuildEnv, CallDecision, DecisionSync, Error, GenerationPlan, Indicator, ModelInfo,
    Result, ScopeKey, ScopeStates, StrategyConfig, Streams, TimestepCache,
};
use serde::{Deserialize, Serialize};

/// `[cache] strategy = "teacache"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeaCacheConfig {
    /// Reuse while the accumulated rescaled distance stays below this.
    #[serde(default = "d_threshold")]
    pub threshold: f64,
    /// Rescale polynomial, highest power first; default: the model's published coefficients.
    #[serde(default)]
    pub coefficients: Option<Vec<f64>>,
    /// Use the published `ret_steps` coefficients and indicator, and force the first 5 steps (last
    /// step not forced).
    #[serde(default)]
    pub ret_steps: bool,
    /// The model tensor to measure; default: the one the model's published data names.
    #[serde(default)]
    pub indicator: Option<Indicator>,
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

/// What a model publishes for TeaCache under the `teacache` key.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct TeaPublished {
    /// Rescale polynomial fit for this model variant, highest power first.
    #[serde(default)]
    pub coefficients: Option<Vec<f64>>,
    /// The polynomial fit with `ret_steps`.
    #[serde(default)]
    pub coefficients_ret_steps: Option<Vec<f64>>,
    /// The tensor the coefficients were fit on.
    #[serde(default)]
    pub indicator: Option<Indicator>,
    /// The tensor the `ret_steps` coefficients were fit on (default: `indicator`).
    #[serde(default)]
    pub indicator_ret_steps: Option<Indicator>,
}

fn variant_note(model: &ModelInfo) -> String {
    model
        .variant
        .as_deref()
        .map(|v| format!(" variant `{v}`"))
        .unwrap_or_default()
}

fn d_threshold() -> f64 {
    0.08
}

impl Default for TeaCacheConfig {
    fn default() -> Self {
        TeaCacheConfig {
            threshold: d_threshold(),
            coefficients: None,
            ret_steps: false,
            indicator: None,
            estimator: Estimator::Reuse,
            warmup_steps: 0,
            last_steps: 0,
            max_consecutive: None,
            cfg_shared: false,
        }
    }
}

impl TeaCacheConfig {
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

#[typetag::serde(name = "teacache")]
impl StrategyConfig for TeaCacheConfig {
    fn validate(&self, file: &str) -> Result<()> {
        crate::check_threshold(file, self.threshold)?;
        self.guards().validate(file)?;
        if let Some(c) = &self.coefficients {
            if c.is_empty() || c.iter().any(|x| !x.is_finite()) {
                return Err(Error::config(
                    file,
                    "cache.coefficients",
                    "must be a non-empty list of finite numbers (highest power first)",
                ));
            }
        }
        Ok(())
    }

    fn build(&self, env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>> {
        let published: TeaPublished = env.model.published("teacache")?.unwrap_or_default();
        let ret = if self.ret_steps {
            " with ret_steps"
        } else {
            ""
        };
        let coefficients = match &self.coefficients {
            Some(c) => c.clone(),
            None => {
                let c = if self.ret_steps {
                    published.coefficients_ret_steps.clone()
                } else {
                    published.coefficients.clone()
                };
                c.ok_or_else(|| {
                    Error::config(
                        env.file,
                        "cache.coefficients",
                        format!(
                            "TeaCache needs rescale coefficients: none in the config and none published for model family `{}`{}{ret}",
                            env.model.family,
                            variant_note(env.model),
                        ),
                    )
                })?
            }
        };
        let published_indicator = if self.ret_steps {
            published.indicator_ret_steps.or(published.indicator)
        } else {
            published.indicator
        };
        let indicator = self.indicator.or(published_indicator).ok_or_else(|| {
            Error::config(
                env.file,
                "cache.indicator",
                format!(
                    "TeaCache needs an indicator: model family `{}` publishes none; set one of {}",
                    env.model.family,
                    Indicator::ALL.map(|i| format!("\"{i}\"")).join(", ")
                ),
            )
        })?;
        Ok(Some(Box::new(TeaCache::new(TeaCacheConfig {
            coefficients: Some(coefficients),
            indicator: Some(indicator),
            ..self.clone()
        }))))
    }

    fn threshold(&self) -> Option<f64> {
        Some(self.threshold)
    }

    fn metric_name(&self) -> &'static str {
        "TeaCache accumulated rescaled distance"
    }
}

inventory::submit! {
    StrategyRegistration { name: "teacache", description: "TeaCache: accumulated rescaled distance of a timestep-embedding indicator, decided before any block (decides from data)", defaults: || Box::new(TeaCacheConfig::default()) }
}

/// Horner evaluation, coefficients highest power first. Leading zeros are skipped, so an infinite `x`
/// gives an infinite value, never `0 * inf = NaN`.
pub fn poly(coefficients: &[f64], x: f64) -> f64 {
    let mut it = coefficients.iter().skip_while(|c| **c == 0.0);
    match it.next() {
        Some(&first) => it.fold(first, |y, c| y * x + c),
        None => 0.0,
    }
}

#[derive(Debug, Default)]
struct TeaState {
    acc: f64,
    prev: Option<Tensor>,
    cache: ResidualCache,
}

/// The TeaCache strategy.
pub struct TeaCache {
    cfg: TeaCacheConfig,
    coefficients: Vec<f64>,
    indicator: Indicator,
    guards: Guards,
    states: ScopeStates<TeaState>,
}

impl TeaCache {
    /// A TeaCache with resolved settings: without `cfg.coefficients` the distance is used as is
    /// (`[1, 0]`), without `cfg.indicator` the timestep embedding is measured (the config's `build`
    /// resolves both from the model's published data).
    pub fn new(cfg: TeaCacheConfig) -> Self {
        let coefficients = cfg.coefficients.clone().unwrap_or_else(|| vec![1.0, 0.0]);
        let indicator = cfg.indicator.unwrap_or(Indicator::TimestepEmbedding);
        TeaCache {
            guards: Guards::new(cfg.guards()),
            cfg,
            coefficients,
            indicator,
            states: ScopeStates::default(),
        }
    }
}

impl TimestepCache for TeaCache {
    fn name(&self) -> &str {
        "teacache"
    }

    fn begin_generation(&mut self, plan: &GenerationPlan) -> Result<Vec<String>> {
        let e = self.cfg.estimator;
        self.guards.begin(plan);
        self.states.begin(plan, |_| {
            Ok(TeaState {
                cache: ResidualCache::new(e),
                ..Default::default()
            })
        })?;
        Ok(few_step_warnings("teacache", plan, self.guards.config()))
    }

    fn run(
        &mut self,
        scope: ScopeKey,
        chain: &dyn BlockChain,
        x: Streams,
        sync: &dyn DecisionSync,
    ) -> Result<(Streams, CallDecision)> {
        let kind = self.indicator;
        let ind = chain.indicator(kind)?.ok_or_else(|| {
            Error::msg(format!(
                "TeaCache: the model has no `{kind}` indicator; pick another with `cache.indicator`"
            ))
        })?;
        let ret = self.cfg.ret_steps;
        let (thr, coef) = (self.cfg.threshold, &self.coefficients);
        let (step, slot) = self.states.start_call(scope)?;
        let steps = slot.steps;
        let st = &mut slot.state;
        let forced = if ret {
            step < 5
        } else {
            step == 0 || step + 1 == steps
        };
        let verdict = self.guards.verdict(scope, step, steps);
        let has_residual = st.cache.has_residual();
        let (want, metric) = match &st.prev {
            Some(prev) if !forced && !verdict.imposed() && has_residual => {
                // A change from an all-zero indicator is an infinite distance: compute.
                // Averaged over the ranks (sequence parallel): every rank accumulates alike.
                st.acc += poly(coef, synced_rel_l1(&ind, prev, sync)?);
                let m = st.acc;
                (st.acc < thr && st.acc.is_finite(), Some(m))
            }
            _ => (false, None),
        };
        let compute = forced || !verdict.apply(want, has_residual);
        if compute {
            st.acc = 0.0;
        }
        self.guards.record(scope, step, !compute);
        st.prev = Some(ind);
        let out = st.cache.run("TeaCache", scope, step, chain, x, !compute)?;
        Ok((
            out,
            CallDecision {
                computed: compute,
                metric,
            },
        ))
    }

    fn cached_bytes_by_scope(&self) -> Vec<(ScopeKey, usize)> {
        self.states
            .iter()
            .map(|(k, s)| {
                (
                    *k,
                    s.state.cache.bytes() + s.state.prev.as_ref().map(tensor_bytes).unwrap_or(0),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use magcache_core::candle_core::{DType, Device};
    use magcache_core::maths::rel_l1;

    #[test]
    fn poly_is_highest_power_first() {
        assert_eq!(poly(&[2.0, 0.0, 0.0], 3.0), 18.0);
        assert_eq!(poly(&[0.5, 0.1], 2.0), 1.1);
        assert_eq!(poly(&[], 2.0), 0.0);
        assert_eq!(poly(&[0.0, 0.0, 3.0], f64::INFINITY), 3.0);
        assert_eq!(poly(&[0.0, 2.0, 1.0], f64::INFINITY), f64::INFINITY);
    }

    #[test]
    fn zero_previous_indicator_gives_no_nan() {
        let d = Device::Cpu;
        let zero = Tensor::zeros(8, DType::F32, &d).unwrap();
        let one = Tensor::ones(8, DType::F32, &d).unwrap();
        // Equal zero indicators: distance 0, the polynomial's constant term.
        let r = rel_l1(&zero, &zero).unwrap();
        assert_eq!(r, 0.0);
        assert_eq!(poly(&[1.0, 0.25], r), 0.25);
        // A change from a zero indicator: infinite distance, a forced compute, never NaN.
        let r = rel_l1(&one, &zero).unwrap();
        assert!(r.is_infinite());
        let acc = poly(&[1.0, 0.0], r);
        assert!(!acc.is_nan());
        assert!(acc >= 0.5, "an infinite distance must not reuse");
    }
}
