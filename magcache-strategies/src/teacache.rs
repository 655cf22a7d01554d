//! TeaCache: decide before any block from a model-provided indicator.
//!
//! Per scope: the first and the last step compute (with `ret_steps`: the first 5 steps compute and the
//! last is not forced); otherwise `acc += poly(rel_l1(ind, ind_prev))`, with `poly` the rescale
//! polynomial (coefficients highest power first); the call reuses while `acc < threshold`, else it
//! computes and sets `acc = 0`. `ind_prev` is updated on every call, computed or not. Residual and
//! reuse as MagCache (last block's hidden output minus first block's hidden input, added once at the
//! head).

use crate::residual::ResidualCache;
use magcache_core::candle_core::Tensor;
use magcache_core::hooks::indicator;
use magcache_core::maths::{rel_l1, tensor_bytes};
use magcache_core::registry::StrategyRegistration;
use magcache_core::{
    BuildEnv, CallDecision, Error, GenerationPlan, HeadAction, HookCx, Result, ScopeKey,
    ScopeStates, StrategyConfig, TimestepCache,
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
    /// Use the timestep-projection indicator and force the first 5 steps (last step not forced).
    #[serde(default)]
    pub ret_steps: bool,
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
        }
    }
}

#[typetag::serde(name = "teacache")]
impl StrategyConfig for TeaCacheConfig {
    fn validate(&self, file: &str) -> Result<()> {
        crate::check_threshold(file, self.threshold)?;
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
        let coefficients = match &self.coefficients {
            Some(c) => c.clone(),
            None => {
                let published = env.model.tea_coefficients.as_ref();
                let c = if self.ret_steps {
                    published.and_then(|p| p.ret_steps.clone())
                } else {
                    published.map(|p| p.plain.clone())
                };
                c.ok_or_else(|| {
                    Error::config(
                        env.file,
                        "cache.coefficients",
                        format!(
                            "TeaCache needs rescale coefficients: none in the config and none published for model family `{}`{}{}",
                            env.model.family,
                            env.model.variant.as_deref().map(|v| format!(" variant `{v}`")).unwrap_or_default(),
                            if self.ret_steps { " with ret_steps" } else { "" }
                        ),
                    )
                })?
            }
        };
        Ok(Some(Box::new(TeaCache::new(TeaCacheConfig {
            coefficients: Some(coefficients),
            ..self.clone()
        }))))
    }

    fn threshold(&self) -> Option<f64> {
        Some(self.threshold)
    }
}

inventory::submit! {
    StrategyRegistration { name: "teacache", description: "TeaCache: accumulated rescaled distance of a timestep-embedding indicator, decided before any block (decides from data)" }
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
    last: Option<CallDecision>,
}

/// The TeaCache strategy.
pub struct TeaCache {
    cfg: TeaCacheConfig,
    coefficients: Vec<f64>,
    states: ScopeStates<TeaState>,
}

impl TeaCache {
    /// `cfg.coefficients` must be set (the config's `build` resolves them).
    pub fn new(cfg: TeaCacheConfig) -> Self {
        let coefficients = cfg.coefficients.clone().unwrap_or_else(|| vec![1.0, 0.0]);
        TeaCache {
            cfg,
            coefficients,
            states: ScopeStates::default(),
        }
    }

    fn indicator_name(&self) -> &'static str {
        if self.cfg.ret_steps {
            indicator::TEACACHE_RET_STEPS
        } else {
            indicator::TEACACHE
        }
    }
}

impl TimestepCache for TeaCache {
    fn name(&self) -> &str {
        "teacache"
    }

    fn begin_generation(&mut self, plan: &GenerationPlan) -> Result<Vec<String>> {
        self.states.begin(plan, |_| Ok(TeaState::default()))?;
        Ok(Vec::new())
    }

    fn indicators(&self) -> Vec<String> {
        vec![self.indicator_name().to_string()]
    }

    fn head(&mut self, cx: &HookCx<'_>, inputs: &[Tensor]) -> Result<HeadAction> {
        let name = self.indicator_name();
        let ind = cx
            .indicators
            .get(name)
            .ok_or_else(|| Error::msg(format!("TeaCache: the model published no `{name}` indicator; this model does not support TeaCache")))?
            .clone();
        let ret = self.cfg.ret_steps;
        let (thr, coef) = (self.cfg.threshold, &self.coefficients);
        let (step, slot) = self.states.start_call(cx.scope)?;
        let steps = slot.steps;
        let st = &mut slot.state;
        let forced = if ret {
            step < 5
        } else {
            step == 0 || step + 1 == steps
        };
        let (compute, metric) = match &st.prev {
            Some(prev) if !forced && st.cache.has_residual() => {
                // A change from an all-zero indicator is an infinite distance: compute.
                st.acc += poly(coef, rel_l1(&ind, prev)?);
                let m = st.acc;
                let compute = st.acc >= thr || !st.acc.is_finite();
                if compute {
                    st.acc = 0.0;
                }
                (compute, Some(m))
            }
            _ => {
                st.acc = 0.0;
                (true, None)
            }
        };
        st.prev = Some(ind);
        st.last = Some(CallDecision {
            computed: compute,
            metric,
        });
        st.cache.head("TeaCache", cx, inputs, !compute)
    }

    fn is_reusing(&self, scope: ScopeKey) -> bool {
        self.states
            .get(scope)
            .map(|s| s.state.cache.is_reusing())
            .unwrap_or(false)
    }

    fn tail(&mut self, cx: &HookCx<'_>, outputs: &[Tensor]) -> Result<()> {
        self.states
            .get_mut(cx.scope)?
            .state
            .cache
            .tail("TeaCache", cx, outputs)
    }

    fn last_decision(&self, scope: ScopeKey) -> Option<CallDecision> {
        self.states.get(scope).ok().and_then(|s| s.state.last)
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
