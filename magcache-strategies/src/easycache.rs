//! EasyCache (Zhou et al., arXiv 2507.02860): runtime-adaptive reuse from the model's own
//! transformation rate, with no calibration.
//!
//! The paper reuses the transformation vector `Δ_i = v_i - x_i` of the last computed call `i`
//! (output minus input: the engine's residual) while the output is estimated to change little. Its
//! estimate rests on the transformation rate, stable over most of the run,
//!
//! ```text
//! k = ||v_i - v_h||_1 / ||x_i - x_h||_1        (h < i: the last two computed calls)
//! ```
//!
//! which predicts the relative output change of call `t` from its input change alone:
//!
//! ```text
//! ε_t = k * ||x_t - x_(t-1)||_1 / ||v_i||_1     (x_(t-1): the previous call's input, computed or not)
//! E_t = E_(t-1) + ε_t                          (E = 0 after every computed call)
//! ```
//!
//! The call reuses while `E_t < threshold`, else it computes (and `E` restarts). Here `x` and `v`
//! are the hidden streams entering and leaving the cached blocks (the whole chain: EasyCache has no
//! front blocks), the chain-level counterparts of the paper's latent input and model output, and
//! `||.||_1` is a mean of absolute values (its numerator and denominator averaged over the ranks of
//! a sequence-parallel run in one collective). Until two calls have computed, `k` is unknown and the
//! call computes whatever the guards say (the rule's own warm-up); the paper's longer warm-up of `R`
//! dense steps is the shared `warmup_steps` guard.

use crate::engine::{Cached, Call, Rule, SharedKeys, Wish};
use magcache_core::candle_core::Tensor;
use magcache_core::maths::{mean_abs, safe_ratio, tensor_bytes};
use magcache_core::runtime::registry::StrategyRegistration;
use magcache_core::{BuildEnv, Error, Result, StrategyConfig, TimestepCache};

crate::strategy_config! {
    /// `[cache] strategy = "easycache"`.
    pub struct EasyCacheConfig {
        /// Reuse while the accumulated estimated relative output change `E` stays below this.
        pub threshold: f64 = 0.05,
    }
}

#[typetag::serde(name = "easycache")]
impl StrategyConfig for EasyCacheConfig {
    fn validate(&self, file: &str) -> Result<()> {
        crate::check_threshold(file, self.threshold)?;
        self.shared().validate(file)
    }

    fn build(&self, env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>> {
        self.validate(env.file)?;
        Ok(Some(Box::new(EasyCache::with_rule(
            EasyCacheRule {
                threshold: self.threshold,
            },
            self.shared(),
        ))))
    }

    fn threshold(&self) -> Option<f64> {
        Some(self.threshold)
    }

    fn metric_name(&self) -> &'static str {
        "accumulated estimated relative output change (EasyCache)"
    }
    fn accumulates(&self) -> bool {
        true
    }
}

inventory::submit! {
    StrategyRegistration { name: "easycache", description: "EasyCache: reuse while the output change predicted by the transformation rate k (from the last two computed calls) times the input change, accumulated, stays below `threshold`; no calibration", defaults: || Box::new(EasyCacheConfig::default()) }
}

/// Per scope.
#[derive(Default)]
pub struct EasyState {
    /// The input of the previous call (computed or not).
    prev_input: Option<Tensor>,
    /// `(x_i, v_i)` of the last computed call.
    last: Option<(Tensor, Tensor)>,
    /// Local `(mean|v_i - v_h|, mean|x_i - x_h|)` of the last two computed calls (`k`'s parts).
    rate: Option<(f64, f64)>,
    /// Local `mean|v_i|`.
    out_norm: f64,
    /// `E`: the accumulated estimate since the last computed call.
    acc: f64,
    /// This call's `ε`.
    pending: f64,
}

/// EasyCache's rule.
pub struct EasyCacheRule {
    pub threshold: f64,
}

/// The EasyCache strategy.
pub type EasyCache = Cached<EasyCacheRule>;

impl Rule for EasyCacheRule {
    type State = EasyState;

    fn name(&self) -> &str {
        "easycache"
    }

    fn decide(&self, st: &mut EasyState, call: &Call<'_>) -> Result<Wish> {
        let x = call.input.ok_or_else(|| {
            Error::msg("easycache: decisions depend on the model's data and cannot be predicted")
        })?;
        let prev = st.prev_input.replace(x.clone());
        st.pending = 0.0;
        let (Some(prev), Some((rate_num, rate_den))) = (prev, st.rate) else {
            // No transformation rate yet (fewer than two computed calls), or the scope's first
            // call: compute.
            return Ok(Wish::force(None));
        };
        let dx = mean_abs(&(x - &prev)?)?;
        let m = call
            .sync
            .all_reduce_mean(&[dx, st.out_norm, rate_num, rate_den])?;
        let [dx, norm, num, den] = m.as_slice() else {
            return Err(Error::msg(format!(
                "decision sync returned {} values for 4",
                m.len()
            )));
        };
        let k = safe_ratio(*num, *den);
        let eps = if *dx == 0.0 {
            0.0
        } else {
            k * safe_ratio(*dx, *norm)
        };
        st.pending = eps;
        let e = st.acc + eps;
        Ok(Wish::reuse_if(e < self.threshold, Some(e)))
    }

    fn settle(&self, st: &mut EasyState, reused: bool, metric: Option<f64>) -> Option<f64> {
        if reused {
            st.acc += st.pending;
        } else {
            st.acc = 0.0;
        }
        metric
    }

    fn observe(&self, st: &mut EasyState, input: &Tensor, output: &Tensor) -> Result<()> {
        if let Some((x_h, v_h)) = &st.last {
            st.rate = Some((mean_abs(&(output - v_h)?)?, mean_abs(&(input - x_h)?)?));
        }
        st.out_norm = mean_abs(output)?;
        st.last = Some((input.clone(), output.clone()));
        Ok(())
    }

    fn state_bytes(&self, st: &EasyState) -> usize {
        let last = st
            .last
            .as_ref()
            .map(|(x, v)| tensor_bytes(x) + tensor_bytes(v))
            .unwrap_or(0);
        last + st.prev_input.as_ref().map(tensor_bytes).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keys_and_threshold() {
        let c: EasyCacheConfig =
            toml::from_str("threshold = 0.1\nwarmup_steps = 3\nestimator = \"taylor1\"").unwrap();
        assert_eq!(c.threshold, 0.1);
        assert_eq!(c.shared().guards.warmup_steps, 3);
        assert!(toml::from_str::<EasyCacheConfig>("thresh = 0.1").is_err());
        let bad = EasyCacheConfig {
            threshold: -1.0,
            ..Default::default()
        };
        let e = bad.validate("r.toml").unwrap_err().to_string();
        assert!(e.contains("r.toml") && e.contains("cache.threshold"), "{e}");
    }
}
