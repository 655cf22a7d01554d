//! SeaCache (diffusers' `SeaCacheConfig`): TeaCache's accumulate-and-compare rule on a spectrally
//! filtered copy of the model's input latents, with residual extrapolation.
//!
//! Indicator, per batch element: the input latents `x_k` (before patch embedding) as `F h w C`, a
//! 3-D FFT over `(F, h, w)`, multiplied by the gain `G = g_F x g_h x g_w / mean(G)` with, per axis
//! of length `n`, `f = fftfreq(n)`, `P = 1 / (|f|^power_exp + 1e-16)`,
//! `g = a P / (a^2 P + s^2 + 1e-16)`, `s = clamp(sigma_k, 1e-6, 1 - 1e-6)`, `a = 1 - s`, and the real
//! part of the inverse FFT. The gain is separable, so the filter runs as three 1-D passes.
//!
//! Gate, per scope: forced compute when `step < retention_steps`, `step >= N - cache_end_steps`,
//! there is no previous indicator, or `max_consecutive_cached > 0` and that many calls in a row were
//! reused. Otherwise `distance = mean over batch of mean|I - I_prev| / (mean|I_prev| + 1e-16)`,
//! `metric = acc + distance`, compute iff `metric >= threshold`; then `acc = 0` on a compute, else
//! `acc = metric`. `I_prev` is replaced on every call. A reused call returns the chain's input plus
//! the residual forecast of order `residual_order` (0: the last residual, 1: linear extrapolation in
//! step index, see [`crate::residual`]).
//!
//! The model must offer [`Indicator::InputLatents`]: Wan does; FLUX does not (diffusers has no
//! SeaCache adapter for FLUX), and the strategy refuses such a model when it is built.

use crate::engine::{Cached, Call, Rule, Shared, SharedKeys, Wish};
use crate::guards::{GuardConfig, Verdict};
use crate::residual::Estimator;
use magcache_core::candle_core::{DType, Tensor};
use magcache_core::runtime::registry::StrategyRegistration;
use magcache_core::{BuildEnv, Error, Indicator, Result, StrategyConfig, TimestepCache};
use rustfft::num_complex::Complex;
use rustfft::FftPlanner;
use serde::{Deserialize, Serialize};

/// `[cache] strategy = "seacache"`, with diffusers' names and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeaCacheConfig {
    /// Compute once the accumulated indicator distance reaches this.
    #[serde(default = "d_threshold")]
    pub threshold: f64,
    /// Order of the residual forecast of a reused call: 0 (reuse), 1 (linear), 2 (quadratic).
    #[serde(default = "d_one")]
    pub residual_order: usize,
    /// First steps of each scope that always compute.
    #[serde(default = "d_one")]
    pub retention_steps: usize,
    /// Last steps of each scope that always compute.
    #[serde(default = "d_one")]
    pub cache_end_steps: usize,
    /// Most reused calls in a row (0: no cap).
    #[serde(default = "d_max_consecutive")]
    pub max_consecutive_cached: usize,
    /// Exponent of the spectral power law `P = 1 / |f|^power_exp`.
    #[serde(default = "d_power_exp")]
    pub power_exp: f64,
    /// The uncond call of a step takes the cond call's decision (see [`crate::guards`]; SeaCache's
    /// own knobs above are its other guards).
    #[serde(default)]
    pub cfg_shared: bool,
}

fn d_threshold() -> f64 {
    0.25
}
fn d_one() -> usize {
    1
}
fn d_max_consecutive() -> usize {
    2
}
fn d_power_exp() -> f64 {
    3.0
}

impl Default for SeaCacheConfig {
    fn default() -> Self {
        SeaCacheConfig {
            threshold: d_threshold(),
            residual_order: d_one(),
            retention_steps: d_one(),
            cache_end_steps: d_one(),
            max_consecutive_cached: d_max_consecutive(),
            power_exp: d_power_exp(),
            cfg_shared: false,
        }
    }
}

impl SharedKeys for SeaCacheConfig {
    /// diffusers' knobs as the shared keys: `retention_steps` is the warm-up, `cache_end_steps`
    /// the last steps, `max_consecutive_cached` (0: none) the cap, `residual_order` the estimator.
    fn shared(&self) -> Shared {
        Shared {
            guards: GuardConfig {
                warmup_steps: self.retention_steps,
                last_steps: self.cache_end_steps,
                max_consecutive: (self.max_consecutive_cached > 0)
                    .then_some(self.max_consecutive_cached),
                cfg_shared: self.cfg_shared,
                names: crate::guards::GuardNames {
                    warmup: "retention_steps",
                    last: "cache_end_steps",
                },
            },
            estimator: Estimator::from_order(self.residual_order).unwrap_or(Estimator::Taylor2),
            estimator_axis: Default::default(),
        }
    }
}

#[typetag::serde(name = "seacache")]
impl StrategyConfig for SeaCacheConfig {
    fn validate(&self, file: &str) -> Result<()> {
        crate::check_threshold(file, self.threshold)?;
        if Estimator::from_order(self.residual_order).is_none() {
            return Err(Error::config(
                file,
                "cache.residual_order",
                format!("must be 0, 1 or 2, got {}", self.residual_order),
            ));
        }
        if !(self.power_exp.is_finite() && self.power_exp > 0.0) {
            return Err(Error::config(
                file,
                "cache.power_exp",
                format!("must be a positive number, got {}", self.power_exp),
            ));
        }
        Ok(())
    }

    fn build(&self, env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>> {
        self.validate(env.file)?;
        if !env.model.indicators.contains(&Indicator::InputLatents) {
            return Err(Error::config(
                env.file,
                "cache.strategy",
                format!(
                    "\"seacache\" filters the model's input latents (the `{}` indicator), which model family `{}` does not offer (diffusers' SeaCache has adapters for Wan only); use \"teacache\", \"magcache\" or \"fbcache\"",
                    Indicator::InputLatents,
                    env.model.family
                ),
            ));
        }
        self.validate(env.file)?;
        Ok(Some(Box::new(SeaCache::new(self.clone()))))
    }

    fn threshold(&self) -> Option<f64> {
        Some(self.threshold)
    }

    fn metric_name(&self) -> &'static str {
        "SeaCache accumulated distance of the spectrally filtered input"
    }
    fn accumulates(&self) -> bool {
        true
    }
}

inventory::submit! {
    StrategyRegistration { name: "seacache", description: "SeaCache: accumulated relative L1 change of the spectrally filtered input latents, residual extrapolation (decides from data; Wan only)", defaults: || Box::new(SeaCacheConfig::default()) }
}

/// The per-axis gain of length `n` (before normalisation).
fn axis_gain(n: usize, sigma: f64, power_exp: f64) -> Vec<f64> {
    let s = sigma.clamp(1e-6, 1.0 - 1e-6);
    let a = 1.0 - s;
    (0..n)
        .map(|k| {
            let f = k.min(n - k) as f64 / n as f64;
            let p = 1.0 / (f.powf(power_exp) + 1e-16);
            a * p / (a * a * p + s * s + 1e-16)
        })
        .collect()
}

/// Filters `data` (one batch element, `dims = [F, h, w, C]`, channels last) in place along `axis`
/// (0, 1, 2) with the frequency gain `gain` (length `dims[axis]`).
fn filter_axis(
    planner: &mut FftPlanner<f64>,
    data: &mut [f64],
    dims: [usize; 4],
    axis: usize,
    gain: &[f64],
) {
    let n = dims[axis];
    if n == 0 {
        return;
    }
    let strides = [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1];
    let stride = strides[axis];
    let fwd = planner.plan_fft_forward(n);
    let inv = planner.plan_fft_inverse(n);
    let mut line = vec![Complex::new(0.0, 0.0); n];
    let total: usize = dims.iter().product();
    // Every start index whose coordinate along `axis` is 0.
    for start in (0..total).filter(|i| (i / stride).is_multiple_of(n)) {
        for (j, c) in line.iter_mut().enumerate() {
            *c = Complex::new(data[start + j * stride], 0.0);
        }
        fwd.process(&mut line);
        for (c, g) in line.iter_mut().zip(gain) {
            *c *= g;
        }
        inv.process(&mut line);
        for (j, c) in line.iter().enumerate() {
            data[start + j * stride] = c.re / n as f64;
        }
    }
}

/// The SeaCache indicator of `latents` (`[B, F, h, w, C]`, what [`Indicator::InputLatents`] gives)
/// at noise level `sigma`, as `B` rows of `F*h*w*C` values.
pub fn sea_filter(latents: &Tensor, sigma: f64, power_exp: f64) -> Result<Vec<Vec<f64>>> {
    let (b, f, h, w, c) = latents.dims5().map_err(|_| {
        Error::msg(format!(
            "SeaCache: the input-latents indicator has shape {:?}, expected [B, F, h, w, C]",
            latents.dims()
        ))
    })?;
    let dims = [f, h, w, c];
    let gains: Vec<Vec<f64>> = (0..3)
        .map(|ax| {
            let g = axis_gain(dims[ax], sigma, power_exp);
            let mean = g.iter().sum::<f64>() / g.len().max(1) as f64;
            g.into_iter().map(|x| x / mean).collect()
        })
        .collect();
    let rows = latents
        .to_dtype(DType::F64)?
        .reshape((b, f * h * w * c))?
        .to_vec2::<f64>()?;
    let mut planner = FftPlanner::new();
    Ok(rows
        .into_iter()
        .map(|mut row| {
            for (ax, g) in gains.iter().enumerate() {
                filter_axis(&mut planner, &mut row, dims, ax, g);
            }
            row
        })
        .collect())
}

/// [`sea_filter`] as a tensor of the input's shape (float32, on the input's device).
pub fn sea_indicator(latents: &Tensor, sigma: f64, power_exp: f64) -> Result<Tensor> {
    let rows = sea_filter(latents, sigma, power_exp)?;
    let flat: Vec<f32> = rows.into_iter().flatten().map(|x| x as f32).collect();
    Ok(Tensor::from_vec(flat, latents.dims(), latents.device())?)
}

/// `mean over rows of mean|a - b| / (mean|b| + 1e-16)`.
pub fn sea_distance(cur: &[Vec<f64>], prev: &[Vec<f64>]) -> Result<f64> {
    if cur.len() != prev.len() || cur.is_empty() {
        return Err(Error::msg(format!(
            "SeaCache: indicator batch changed from {} to {} within a generation",
            prev.len(),
            cur.len()
        )));
    }
    let mut sum = 0.0;
    for (a, b) in cur.iter().zip(prev) {
        if a.len() != b.len() {
            return Err(Error::msg(
                "SeaCache: the input size changed within a generation",
            ));
        }
        let n = a.len().max(1) as f64;
        let num = a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / n;
        let den = b.iter().map(|y| y.abs()).sum::<f64>() / n;
        sum += num / (den + 1e-16);
    }
    Ok(sum / cur.len() as f64)
}

/// One scope's accumulated distance and the filtered indicator of its last call.
#[derive(Debug, Default)]
pub struct SeaState {
    acc: f64,
    prev: Option<Vec<Vec<f64>>>,
}

/// SeaCache's decision rule.
pub struct SeaRule {
    cfg: SeaCacheConfig,
}

/// The SeaCache strategy.
pub type SeaCache = Cached<SeaRule>;

impl Cached<SeaRule> {
    pub fn new(cfg: SeaCacheConfig) -> Self {
        let shared = cfg.shared();
        Cached::with_rule(SeaRule { cfg }, shared)
    }
}

impl Rule for SeaRule {
    type State = SeaState;

    fn name(&self) -> &str {
        "seacache"
    }

    /// `m = acc + distance(filtered input, previous filtered input)`; compute once `m` reaches
    /// `threshold`. The indicator comes from the transformer's input latents, which every rank of
    /// a sequence-parallel run holds whole: the metric is the same on every rank without a
    /// collective.
    fn decide(&self, st: &mut SeaState, call: &Call<'_>) -> Result<Wish> {
        let latents = call.indicator(Indicator::InputLatents)?;
        let sigma = call.sigma.ok_or_else(|| {
            Error::msg(format!(
                "SeaCache scope {}: the plan gives no sigma for step {}",
                call.scope, call.step
            ))
        })?;
        let ind = sea_filter(&latents, sigma, self.cfg.power_exp)?;
        let wish = match &st.prev {
            Some(prev) if call.verdict == Verdict::Free && call.has_residual => {
                let m = st.acc + sea_distance(&ind, prev)?;
                Wish::reuse_if(m < self.cfg.threshold && m.is_finite(), Some(m))
            }
            _ => Wish::compute(),
        };
        st.prev = Some(ind);
        Ok(wish)
    }

    fn settle(&self, st: &mut SeaState, reused: bool, metric: Option<f64>) -> Option<f64> {
        st.acc = match (reused, metric) {
            (true, Some(m)) => m,
            (true, None) => st.acc,
            (false, _) => 0.0,
        };
        metric
    }

    fn state_bytes(&self, st: &SeaState) -> usize {
        st.prev
            .as_ref()
            .map(|p| p.iter().map(|r| r.len() * 8).sum())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use magcache_core::candle_core::Device;

    #[test]
    fn gain_is_symmetric_and_favours_low_frequencies() {
        let g = axis_gain(8, 0.5, 3.0);
        for k in 1..8 {
            assert!((g[k] - g[8 - k]).abs() < 1e-12);
        }
        assert!(g[0] > g[1] && g[1] > g[4]);
    }

    #[test]
    fn constant_input_is_kept_up_to_the_dc_gain() {
        // A constant signal has only the zero frequency: the output is the input times g(0)/mean(g)
        // on every axis of length 1 (where the normalised gain is exactly 1).
        let x = Tensor::ones((1, 1, 1, 1, 3), DType::F32, &Device::Cpu).unwrap();
        let y = sea_indicator(&x, 0.3, 3.0).unwrap();
        for v in y.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            assert!((v - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn a_model_without_input_latents_is_refused() {
        let model = magcache_core::ModelInfo {
            family: "flux".into(),
            indicators: vec![Indicator::TimestepEmbedding, Indicator::ModulatedInput],
            ..Default::default()
        };
        let env = BuildEnv {
            file: "run.toml",
            base_dir: std::path::Path::new("."),
            model: &model,
        };
        let e = SeaCacheConfig::default()
            .build(&env)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("run.toml") && e.contains("cache.strategy") && e.contains("flux"),
            "{e}"
        );
        let wan = magcache_core::ModelInfo {
            family: "wan2.1".into(),
            indicators: vec![Indicator::InputLatents],
            ..Default::default()
        };
        let env = BuildEnv { model: &wan, ..env };
        assert!(SeaCacheConfig::default().build(&env).unwrap().is_some());
    }

    #[test]
    fn distance_of_equal_indicators_is_zero() {
        let a = vec![vec![1.0, -2.0], vec![0.5, 0.5]];
        assert_eq!(sea_distance(&a, &a).unwrap(), 0.0);
        let b = vec![vec![2.0, -4.0], vec![0.5, 0.5]];
        // Row 0: mean|b - a| / mean|a| = 1.5 / 1.5 = 1; row 1: 0.
        assert!((sea_distance(&b, &a).unwrap() - 0.5).abs() < 1e-12);
    }
}
