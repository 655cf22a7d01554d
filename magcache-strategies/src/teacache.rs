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

use crate::engine::{Cached, Call, Rule, SharedKeys, Wish};
use magcache_core::candle_core::Tensor;
use magcache_core::maths::tensor_bytes;
use magcache_core::runtime::registry::StrategyRegistration;
use magcache_core::sync::synced_rel_l1;
use magcache_core::{BuildEnv, Error, Indicator, ModelInfo, Result, StrategyConfig, TimestepCache};
use serde::Deserialize;

crate::strategy_config! {
    /// `[cache] strategy = "teacache"`.
    pub struct TeaCacheConfig {
        /// Reuse while the accumulated rescaled distance stays below this.
        pub threshold: f64 = 0.08,
        /// Rescale polynomial, highest power first; default: the model's published coefficients.
        pub coefficients: Option<Vec<f64>> = None,
        /// Use the published `ret_steps` coefficients and indicator, and force the first 5 steps
        /// (last step not forced).
        pub ret_steps: bool = false,
        /// The model tensor to measure; default: the one the model's published data names.
        pub indicator: Option<Indicator> = None,
    }
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

/// Rescale coefficients (highest power first), a run file's or a model's published ones: a
/// non-empty list of finite numbers, not all zero (a polynomial that is zero everywhere rescales every
/// distance to 0, and every call but the forced ones would be reused).
fn check_coefficients(file: &str, key: &str, c: &[f64]) -> Result<()> {
    if c.is_empty() || c.iter().any(|x| !x.is_finite()) {
        return Err(Error::config(
            file,
            key,
            "must be a non-empty list of finite numbers (highest power first)",
        ));
    }
    if c.iter().all(|&x| x == 0.0) {
        return Err(Error::config(
            file,
            key,
            "are all zero: the rescaled distance would be 0 on every call, and every call reused",
        ));
    }
    Ok(())
}

impl TeaCacheConfig {
    /// The run file's coefficients, else the model's published ones (checked, naming the table).
    fn coefficients(&self, env: &BuildEnv<'_>, published: &TeaPublished) -> Result<Vec<f64>> {
        let ret = if self.ret_steps {
            " with ret_steps"
        } else {
            ""
        };
        Ok(match &self.coefficients {
            Some(c) => c.clone(),
            None => {
                let c = if self.ret_steps {
                    published.coefficients_ret_steps.clone()
                } else {
                    published.coefficients.clone()
                };
                if let Some(c) = &c {
                    let key = if self.ret_steps {
                        "coefficients_ret_steps"
                    } else {
                        "coefficients"
                    };
                    let what = format!(
                        "{}{}: published TeaCache table",
                        env.model.family,
                        variant_note(env.model)
                    );
                    check_coefficients(&what, key, c)?;
                }
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
        })
    }
}

#[typetag::serde(name = "teacache")]
impl StrategyConfig for TeaCacheConfig {
    fn validate(&self, file: &str) -> Result<()> {
        crate::check_threshold(file, self.threshold)?;
        self.shared().validate(file)?;
        if let Some(c) = &self.coefficients {
            check_coefficients(file, "cache.coefficients", c)?;
        }
        Ok(())
    }

    fn build(&self, env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>> {
        self.validate(env.file)?;
        let published: TeaPublished = env.model.published("teacache")?.unwrap_or_default();
        let coefficients = self.coefficients(env, &published)?;
        let ret = if self.ret_steps {
            " with ret_steps"
        } else {
            ""
        };
        let published_indicator = if self.ret_steps {
            published.indicator_ret_steps.or(published.indicator)
        } else {
            published.indicator
        };
        // Published coefficients rescale the distance of the tensor they were fit on: another
        // indicator with them measures a distance the polynomial was not fit to.
        if let (None, Some(own), Some(fit)) =
            (&self.coefficients, self.indicator, published_indicator)
        {
            if own != fit {
                return Err(Error::config(
                    env.file,
                    "cache.indicator",
                    format!(
                        "\"{own}\" with the rescale coefficients published for model family `{}`{ret}, which were fit on \"{fit}\": give `coefficients` fitted on \"{own}\" too, or drop `indicator`",
                        env.model.family
                    ),
                ));
            }
        }
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
        // A model that lists its indicators is refused here, before any weights load, rather than
        // at its first call.
        if !env.model.indicators.is_empty() && !env.model.indicators.contains(&indicator) {
            return Err(Error::config(
                env.file,
                "cache.indicator",
                format!(
                    "model family `{}` offers no \"{indicator}\" indicator; it offers {}",
                    env.model.family,
                    env.model
                        .indicators
                        .iter()
                        .map(|i| format!("\"{i}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        // Published coefficients on weights that match no published variant are borrowed: said.
        let note = (self.coefficients.is_none() && env.model.variant.is_none()).then(|| format!(
            "TeaCache uses the rescale coefficients published for model family `{}` for these weights, which match no published variant (give `coefficients` fitted on them for their own)",
            env.model.family
        ));
        let cfg = TeaCacheConfig {
            coefficients: Some(coefficients),
            indicator: Some(indicator),
            ..self.clone()
        };
        Ok(Some(Box::new(TeaCache::with_note(cfg, note))))
    }

    fn metric_name(&self) -> &'static str {
        "TeaCache accumulated rescaled distance"
    }
    fn accumulates(&self) -> bool {
        true
    }

    fn threshold(&self) -> Option<f64> {
        Some(self.threshold)
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

/// One scope's accumulated distance and the indicator of its last call.
#[derive(Debug, Default)]
pub struct TeaState {
    acc: f64,
    prev: Option<Tensor>,
}

/// TeaCache's decision rule.
pub struct TeaRule {
    cfg: TeaCacheConfig,
    coefficients: Vec<f64>,
    indicator: Indicator,
    /// Where the coefficients come from when that is worth a note (published data borrowed).
    note: Option<String>,
}

/// The TeaCache strategy.
pub type TeaCache = Cached<TeaRule>;

impl Cached<TeaRule> {
    /// A TeaCache with resolved settings: without `cfg.coefficients` the distance is used as is
    /// (`[1, 0]`), without `cfg.indicator` the timestep embedding is measured (the config's `build`
    /// resolves both from the model's published data).
    pub fn new(cfg: TeaCacheConfig) -> Self {
        Self::with_note(cfg, None)
    }

    /// With a note on where the coefficients come from, shown with every run.
    fn with_note(cfg: TeaCacheConfig, note: Option<String>) -> Self {
        let coefficients = cfg.coefficients.clone().unwrap_or_else(|| vec![1.0, 0.0]);
        let indicator = cfg.indicator.unwrap_or(Indicator::TimestepEmbedding);
        let shared = cfg.shared();
        let rule = TeaRule {
            cfg,
            coefficients,
            indicator,
            note,
        };
        Cached::with_rule(rule, shared)
    }
}

impl Rule for TeaRule {
    type State = TeaState;

    fn notes(&self) -> Vec<String> {
        self.note.iter().cloned().collect()
    }

    fn name(&self) -> &str {
        "teacache"
    }

    /// The first and last call compute (`ret_steps`: the first 5); otherwise
    /// `acc += poly(rel_l1(ind, prev))` and the call reuses while `acc < threshold`.
    fn decide(&self, st: &mut TeaState, call: &Call<'_>) -> Result<Wish> {
        let ind = call.indicator(self.indicator)?;
        let (step, steps) = (call.step, call.steps);
        let forced = if self.cfg.ret_steps {
            step < 5
        } else {
            step == 0 || step + 1 == steps
        };
        let wish = match &st.prev {
            Some(prev) if !forced && !call.verdict.imposed() && call.has_residual => {
                // A change from an all-zero indicator is an infinite distance: compute.
                // Averaged over the ranks (sequence parallel): every rank accumulates alike.
                st.acc += poly(&self.coefficients, synced_rel_l1(&ind, prev, call.sync)?);
                Wish::reuse_if(
                    st.acc < self.cfg.threshold && st.acc.is_finite(),
                    Some(st.acc),
                )
            }
            _ if forced => Wish::force(None),
            _ => Wish::compute(),
        };
        st.prev = Some(ind);
        Ok(wish)
    }

    fn settle(&self, st: &mut TeaState, reused: bool, metric: Option<f64>) -> Option<f64> {
        if !reused {
            st.acc = 0.0;
        }
        metric
    }

    fn state_bytes(&self, st: &TeaState) -> usize {
        st.prev.as_ref().map(tensor_bytes).unwrap_or(0)
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
