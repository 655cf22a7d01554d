//! Spectrum (Han et al., CVPR 2026, arXiv 2603.01623): the computed calls on a widening window, and
//! reused calls forecast by Chebyshev polynomials in time fitted by ridge regression over the
//! computed ones.
//!
//! **Which calls compute.** The first `warmup_steps` calls of a scope compute. After them, with `c`
//! the number of calls reused in a row and `W` the current window (starting at `window_size`), a
//! call computes when `(c + 1) mod floor(W) = 0`, and every such call widens the window:
//! `W <- W + flex_window` (the paper's `N` and `alpha`; its reference code and sglang round `W` to
//! three decimals). With the defaults (`window_size = 2`, `flex_window = 0.75`, 5 warm-up calls) a
//! 50-call scope computes 14 calls (the paper's 3.5x setting), with `flex_window = 3` 10 calls.
//! Decisions depend on the call count only: `magcache plan` shows them.
//!
//! **What a reused call returns.** The features `h_j` of the computed calls `j` of the scope (here the
//! residual of the cached blocks, what every estimator of the engine forecasts; the chain's input
//! is added back) at times `tau_j`, the last `history_size` of them, are fitted by
//! `h(tau) = sum_(i=0..m) c_i T_i(tau)` (Chebyshev polynomials of the first kind,
//! `T_0 = 1, T_1 = tau, T_(i+1) = 2 tau T_i - T_(i-1)`), by ridge regression:
//!
//! ```text
//! C = (X^T X + lam I)^-1 X^T H        X_(j,i) = T_i(tau_j),  H: one feature vector per row
//! h_cheb(tau*) = x*^T C = sum_j w_j h_j,   w = X (X^T X + lam I)^-1 x*,   x*_i = T_i(tau*)
//! ```
//!
//! and the forecast is `w * h_cheb + (1 - w) * h_taylor` (`w = 1`, the paper's predictor, by
//! default; the reference code's blend with a local forecast for `w < 1`), `h_taylor` being the
//! order-`taylor_order` forecast of the last computed features (the engine's `taylor1`/`taylor2`).
//! Time is the call index, `tau = 2 k / tau_num_steps - 1` with `tau_num_steps = 50` as in the
//! reference code and sglang (which fix it whatever the step count), or, with
//! `estimator_axis = "sigma"`, the noise level, `tau = 1 - 2 sigma`.
//!
//! Until two calls have computed the call computes (stable-diffusion.cpp's rule; with the default
//! warm-up it never matters). The engine's guards apply as for every rule (`last_steps`,
//! `max_consecutive`, `cfg_shared`); a call a guard forces to compute resets `c` without widening the
//! window.

use crate::engine::{Cached, Call, Rule, Shared, SharedKeys, Wish};
use crate::guards::GuardConfig;
use crate::residual::{Combination, Estimator, EstimatorAxis};
use magcache_core::runtime::registry::StrategyRegistration;
use magcache_core::{
    Branch, BuildEnv, Error, GenerationPlan, Result, ScopeKey, StepsSpec, StrategyConfig,
    TimestepCache,
};
use serde::{Deserialize, Serialize};

/// `[cache] strategy = "spectrum"`, with the published knobs (sglang's names) and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpectrumConfig {
    /// Initial window `N`: after the warm-up, one computed call every `floor(window)` calls.
    pub window_size: f64,
    /// Window growth `alpha` per computed call after the warm-up (larger: fewer computed calls).
    pub flex_window: f64,
    /// The first calls of every scope that compute (the shared warm-up guard).
    pub warmup_steps: usize,
    /// Share of the Chebyshev forecast in the estimate (1: the paper's predictor; the rest goes to
    /// the local Taylor forecast of order `taylor_order`).
    pub w: f64,
    /// Ridge regularisation `lambda`.
    pub lam: f64,
    /// Highest Chebyshev degree `M` (`M + 1` basis functions).
    pub m: usize,
    /// The last computed calls the fit reads (kept per scope: this many residuals at most).
    pub history_size: usize,
    /// Time scale of the call index: `tau = 2 k / tau_num_steps - 1`.
    pub tau_num_steps: usize,
    /// Order of the local forecast blended in when `w < 1` (1 or 2).
    pub taylor_order: usize,
    /// Time for the fit and the local forecast: `"step"` (the call index) or `"sigma"`.
    pub estimator_axis: EstimatorAxis,
    /// Guard: the last `n` calls of every scope compute.
    pub last_steps: usize,
    /// Guard: at most `n` reused calls in a row per scope (absent: no cap).
    pub max_consecutive: Option<usize>,
    /// Guard: the uncond call of a step takes the cond call's decision.
    pub cfg_shared: bool,
}

impl Default for SpectrumConfig {
    fn default() -> Self {
        SpectrumConfig {
            window_size: 2.0,
            flex_window: 0.75,
            warmup_steps: 5,
            w: 1.0,
            lam: 0.1,
            m: 4,
            history_size: 100,
            tau_num_steps: 50,
            taylor_order: 1,
            estimator_axis: EstimatorAxis::Step,
            last_steps: 0,
            max_consecutive: None,
            cfg_shared: false,
        }
    }
}

impl SpectrumConfig {
    /// The calls a scope of `steps` calls computes under these keys (the guards included): the
    /// engine's prediction of a data-free rule.
    pub fn computed_calls(&self, steps: usize) -> Result<usize> {
        let sigmas: Vec<f64> = (0..steps).map(|k| 1.0 - k as f64 / steps as f64).collect();
        let plan =
            GenerationPlan::from_steps(&StepsSpec::new("count", "euler", &sigmas, &[Branch::Cond]));
        let mut c = Spectrum::with_rule(SpectrumRule { cfg: self.clone() }, self.shared());
        c.begin_generation(&plan)?;
        let d = c
            .predict(ScopeKey::new(0, Branch::Cond))
            .ok_or_else(|| Error::msg("spectrum: decisions could not be predicted"))?;
        Ok(d.iter().filter(|d| d.computed).count())
    }
}

impl SharedKeys for SpectrumConfig {
    /// `warmup_steps` is the shared warm-up; `taylor_order` the estimator of the blend.
    fn shared(&self) -> Shared {
        Shared {
            guards: GuardConfig::new(
                self.warmup_steps,
                self.last_steps,
                self.max_consecutive,
                self.cfg_shared,
            ),
            estimator: Estimator::from_order(self.taylor_order).unwrap_or(Estimator::Taylor1),
            estimator_axis: self.estimator_axis,
        }
    }
}

#[typetag::serde(name = "spectrum")]
impl StrategyConfig for SpectrumConfig {
    fn validate(&self, file: &str) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::config(file, format!("cache.{key}"), msg));
        if !(self.window_size.is_finite() && self.window_size >= 1.0) {
            return bad(
                "window_size",
                format!("must be at least 1, got {}", self.window_size),
            );
        }
        if !(self.flex_window.is_finite() && self.flex_window >= 0.0) {
            return bad(
                "flex_window",
                format!("must be a non-negative number, got {}", self.flex_window),
            );
        }
        if !(0.0..=1.0).contains(&self.w) {
            return bad("w", format!("must be within [0, 1], got {}", self.w));
        }
        if !(self.lam.is_finite() && self.lam >= 0.0) {
            return bad(
                "lam",
                format!("must be a non-negative number, got {}", self.lam),
            );
        }
        if self.m > 12 {
            return bad(
                "m",
                format!(
                    "degree {} is beyond what a window of calls can fit: at most 12",
                    self.m
                ),
            );
        }
        if self.history_size < 2 {
            return bad(
                "history_size",
                format!(
                    "the fit needs at least 2 computed calls, got {}",
                    self.history_size
                ),
            );
        }
        if self.tau_num_steps == 0 {
            return bad("tau_num_steps", "must be at least 1".into());
        }
        if !(1..=2).contains(&self.taylor_order) {
            return bad(
                "taylor_order",
                format!("must be 1 or 2, got {}", self.taylor_order),
            );
        }
        self.shared().validate(file)
    }

    fn build(&self, env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>> {
        self.validate(env.file)?;
        Ok(Some(Box::new(Spectrum::with_rule(
            SpectrumRule { cfg: self.clone() },
            self.shared(),
        ))))
    }

    // No `threshold`: the window is not a value the metric is compared with (the reports'
    // threshold hint and plot line would read `flex_window` as one).

    fn metric_name(&self) -> &'static str {
        "spectrum: the window (calls per computed call) when the call was decided"
    }
}

inventory::submit! {
    StrategyRegistration { name: "spectrum", description: "Spectrum: after `warmup_steps`, one computed call per window of floor(W) calls, W growing by `flex_window` from `window_size`; reused calls forecast by Chebyshev polynomials in time (degree `m`) fitted by ridge regression (`lam`) over the computed calls; data-free decisions", defaults: || Box::new(SpectrumConfig::default()) }
}

/// Per scope: the window and the count of reused calls in a row.
#[derive(Clone, Debug, Default)]
pub struct SpectrumState {
    /// The current window `W` (`None` until the first call sets it to `window_size`).
    window: Option<f64>,
    /// Calls reused in a row.
    reused_in_a_row: usize,
    /// Computed calls so far.
    computed: usize,
    /// Whether this call's compute is the window's (it widens the window).
    widens: bool,
}

/// Spectrum's rule.
pub struct SpectrumRule {
    pub cfg: SpectrumConfig,
}

/// The Spectrum strategy.
pub type Spectrum = Cached<SpectrumRule>;

impl SpectrumRule {
    /// The time `tau` of coordinate `c` on the configured axis.
    pub fn tau(&self, c: f64) -> f64 {
        match self.cfg.estimator_axis {
            EstimatorAxis::Step => 2.0 * c / self.cfg.tau_num_steps as f64 - 1.0,
            EstimatorAxis::Sigma => 1.0 - 2.0 * c,
        }
    }
}

impl Rule for SpectrumRule {
    fn predicted_metric(&self) -> &'static str {
        "window (calls per computed call)"
    }

    type State = SpectrumState;

    fn name(&self) -> &str {
        "spectrum"
    }

    fn decide(&self, st: &mut SpectrumState, call: &Call<'_>) -> Result<Wish> {
        let window = *st.window.get_or_insert(self.cfg.window_size);
        let size = window.floor().max(1.0);
        st.widens = false;
        if call.step < self.cfg.warmup_steps || st.computed < 2 {
            return Ok(Wish::force(Some(size)));
        }
        let compute = (st.reused_in_a_row + 1).is_multiple_of(size as usize);
        st.widens = compute;
        Ok(Wish::reuse_if(!compute, Some(size)))
    }

    fn settle(&self, st: &mut SpectrumState, reused: bool, metric: Option<f64>) -> Option<f64> {
        if reused {
            st.reused_in_a_row += 1;
        } else {
            st.reused_in_a_row = 0;
            st.computed += 1;
            if st.widens {
                let w = st.window.unwrap_or(self.cfg.window_size) + self.cfg.flex_window;
                st.window = Some((w * 1000.0).round() / 1000.0);
            }
        }
        metric
    }

    fn history(&self) -> usize {
        self.cfg.history_size
    }

    fn forecast(
        &self,
        _st: &SpectrumState,
        _call: &Call<'_>,
        past: &[(usize, f64)],
        at: f64,
    ) -> Result<Option<Combination>> {
        if self.cfg.w <= 0.0 || past.is_empty() {
            return Ok(None);
        }
        let from = past.len().saturating_sub(self.cfg.history_size);
        let taus: Vec<f64> = past[from..].iter().map(|(_, c)| self.tau(*c)).collect();
        let fit = ridge_weights(&taus, self.cfg.m, self.cfg.lam, self.tau(at))?;
        let mut weights = vec![0.0; from];
        weights.extend(fit);
        Ok(Some(Combination {
            weights,
            share: self.cfg.w,
            channels: None,
        }))
    }

    fn data_free(&self) -> bool {
        true
    }
}

/// `T_0(tau) .. T_m(tau)`.
pub fn chebyshev(tau: f64, m: usize) -> Vec<f64> {
    let mut t = vec![1.0, tau];
    while t.len() < m + 1 {
        let n = t.len();
        t.push(2.0 * tau * t[n - 1] - t[n - 2]);
    }
    t.truncate(m + 1);
    t
}

/// The weights `w = X (X^T X + lam I)^-1 x*` of the ridge fit of degree `m` over points at `taus`,
/// evaluated at `at`: the forecast is `sum_j w_j h_j`.
pub fn ridge_weights(taus: &[f64], m: usize, lam: f64, at: f64) -> Result<Vec<f64>> {
    let p = m + 1;
    let x: Vec<Vec<f64>> = taus.iter().map(|&t| chebyshev(t, m)).collect();
    let mut a = vec![vec![0.0; p]; p];
    for (i, row) in a.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = x.iter().map(|r| r[i] * r[j]).sum::<f64>() + if i == j { lam } else { 0.0 };
        }
    }
    let star = chebyshev(at, m);
    let v = cholesky_solve(&a, &star).or_else(|| {
        // As the reference code: jitter an ill-conditioned system once.
        let jitter = 1e-6 * (0..p).map(|i| a[i][i]).sum::<f64>() / p as f64;
        let mut b = a.clone();
        for (i, row) in b.iter_mut().enumerate() {
            row[i] += jitter.max(1e-12);
        }
        cholesky_solve(&b, &star)
    });
    let v = v.ok_or_else(|| {
        Error::msg(format!(
            "spectrum: the ridge system of {} calls and degree {m} is singular (raise `lam`)",
            taus.len()
        ))
    })?;
    Ok(x.iter()
        .map(|r| r.iter().zip(&v).map(|(a, b)| a * b).sum())
        .collect())
}

/// Solves `a x = b` for a symmetric positive definite `a`; `None` when it is not.
fn cholesky_solve(a: &[Vec<f64>], b: &[f64]) -> Option<Vec<f64>> {
    let n = b.len();
    let mut l = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                let d = a[i][i] - s;
                if d.is_nan() || d <= 0.0 {
                    return None;
                }
                l[i][j] = d.sqrt();
            } else {
                l[i][j] = (a[i][j] - s) / l[j][j];
            }
        }
    }
    let mut y = vec![0.0; n];
    for i in 0..n {
        y[i] = (b[i] - (0..i).map(|k| l[i][k] * y[k]).sum::<f64>()) / l[i][i];
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        x[i] = (y[i] - (i + 1..n).map(|k| l[k][i] * x[k]).sum::<f64>()) / l[i][i];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keys_defaults_and_errors() {
        let c: SpectrumConfig = toml::from_str("flex_window = 3.0\nw = 0.5").unwrap();
        assert_eq!((c.flex_window, c.w, c.m, c.warmup_steps), (3.0, 0.5, 4, 5));
        assert_eq!(c.shared().guards.warmup_steps, 5);
        assert!(toml::from_str::<SpectrumConfig>("estimator = \"taylor1\"").is_err());
        // The reference code's counts at 50 steps: 14 computed calls, 10 with flex_window 3.
        assert_eq!(SpectrumConfig::default().computed_calls(50).unwrap(), 14);
        assert_eq!(c.computed_calls(50).unwrap(), 10);
        for (key, bad) in [
            ("w", "w = 1.5"),
            ("window_size", "window_size = 0.5"),
            ("taylor_order", "taylor_order = 3"),
            ("history_size", "history_size = 1"),
        ] {
            let c: SpectrumConfig = toml::from_str(bad).unwrap();
            let e = c.validate("r.toml").unwrap_err().to_string();
            assert!(
                e.contains("r.toml") && e.contains(&format!("cache.{key}")),
                "{e}"
            );
        }
    }

    #[test]
    fn chebyshev_polynomials() {
        // T_3(x) = 4x^3 - 3x, T_4(x) = 8x^4 - 8x^2 + 1.
        let t = chebyshev(0.3, 4);
        assert!((t[3] - (4.0 * 0.027 - 0.9)).abs() < 1e-12);
        assert!((t[4] - (8.0 * 0.0081 - 8.0 * 0.09 + 1.0)).abs() < 1e-12);
        assert_eq!(chebyshev(0.3, 0), vec![1.0]);
    }

    #[test]
    fn ridge_weights_reproduce_polynomials_without_regularisation() {
        // Degree 2, no ridge, 5 points of a parabola: the fit is exact at any tau.
        let taus = [-1.0, -0.8, -0.7, -0.5, -0.2];
        let f = |t: f64| 0.3 - 1.2 * t + 2.0 * t * t;
        let w = ridge_weights(&taus, 2, 0.0, 0.1).unwrap();
        let got: f64 = w.iter().zip(&taus).map(|(w, t)| w * f(*t)).sum();
        assert!((got - f(0.1)).abs() < 1e-9, "{got}");
        // Ridge shrinks: with a large lambda the forecast of a constant falls short of it.
        let w = ridge_weights(&taus, 2, 10.0, 0.1).unwrap();
        assert!(w.iter().sum::<f64>() < 0.9);
    }
}
