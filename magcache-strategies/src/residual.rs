//! What a reused call returns, shared by every strategy: the estimator.
//!
//! Every computed call stores its residual (the chain's output minus its input: for MagCache,
//! TeaCache and SeaCache the whole chain's hidden residual, for FBCache the residual of the blocks
//! after the first) with its coordinate. A reused call returns the chain's input plus an estimate of
//! the residual, added once, with no block run:
//! - `reuse` (the default): the last computed residual;
//! - `taylor1`: linear extrapolation from the last two computed residuals,
//!   `r2 + (r2 - r1) * (k - s2) / (s2 - s1)` (SeaCache's `residual_order = 1`);
//! - `taylor2`: quadratic extrapolation (Newton's divided differences) from the last three;
//! - `foca`: forecast then correct, the mean of the order-1 and order-2 forecasts (half each): the
//!   order-2 term corrects the linear forecast by half its curvature, which damps order 2's
//!   amplification of the differences of residuals far apart (see [`Estimator::Foca`]).
//!
//! The coordinate `s` is the call's index within its scope (`estimator_axis = "step"`, the default)
//! or its noise level sigma (`estimator_axis = "sigma"`): on a shifted schedule the sigmas are
//! unevenly spaced, and the residual changes smoothly with the noise level, not with the index.
//!
//! With fewer computed residuals than the order needs, the highest order they allow is used (one
//! residual: reuse). An encoder-stream residual (FBCache on FLUX) is forecast the same way.

use magcache_core::candle_core::Tensor;
use magcache_core::{Error, Result, Streams};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// `estimator = "reuse" | "taylor1" | "taylor2" | "foca" | "fitted"`: what a reused call returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Estimator {
    /// The last computed residual, as it is.
    #[default]
    Reuse,
    /// First-order forecast (finite difference of the last two computed residuals).
    Taylor1,
    /// Second-order forecast (divided differences of the last three computed residuals).
    Taylor2,
    /// Forecast then correct: `(taylor1 + taylor2) / 2` from the last three computed residuals.
    /// FoCa (arXiv 2508.16211) corrects a forecast with a second, higher-order one; this is the
    /// blend the reference-stack study of issue 29 measured (39.3 dB at 4x on the digits model,
    /// against 38.4 dB for order 1 alone), not the paper's solver-based corrector, which needs the
    /// model's output at the forecast point.
    Foca,
    /// Per-channel coefficients per reused call, fitted to the final latent of whole cached runs
    /// (`magcache calibrate --fit`, [`crate::fitted`]); `strategy = "schedule"` with a fitted
    /// profile only. Starts from (and with no fit is) `taylor1`.
    Fitted,
}

impl Estimator {
    /// The highest forecast order it uses: 0, 1 or 2 (it keeps `order + 1` residuals).
    pub fn order(self) -> usize {
        match self {
            Estimator::Reuse => 0,
            Estimator::Taylor1 | Estimator::Fitted => 1,
            Estimator::Taylor2 | Estimator::Foca => 2,
        }
    }

    /// The Taylor estimator of forecast order `order` (0, 1, 2).
    pub fn from_order(order: usize) -> Option<Estimator> {
        match order {
            0 => Some(Estimator::Reuse),
            1 => Some(Estimator::Taylor1),
            2 => Some(Estimator::Taylor2),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Estimator::Reuse => "reuse",
            Estimator::Taylor1 => "taylor1",
            Estimator::Taylor2 => "taylor2",
            Estimator::Foca => "foca",
            Estimator::Fitted => "fitted",
        }
    }

    /// The estimate at `at` from `hist` (`(coordinate, value)`, oldest first, at most
    /// `order + 1` of them used: the newest).
    pub fn forecast(self, hist: &[(f64, &Tensor)], at: f64) -> Result<Tensor> {
        let newest = |n: usize| &hist[hist.len().saturating_sub(n)..];
        match self {
            Estimator::Foca if hist.len() >= 3 => {
                let lin = extrapolate(newest(2), at)?;
                let quad = extrapolate(newest(3), at)?;
                Ok(((lin + quad)? * 0.5)?)
            }
            Estimator::Fitted => Err(Error::msg(
                "estimator = \"fitted\" reads its coefficients from a fitted profile: use strategy = \"schedule\" with profile = \"...\" from `magcache calibrate --fit`",
            )),
            e => extrapolate(newest(e.order() + 1), at),
        }
    }
}

/// `estimator_axis = "step" | "sigma"`: the coordinate the forecasts extrapolate in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EstimatorAxis {
    /// The call's index within its scope.
    #[default]
    Step,
    /// The call's noise level (the plan's sigma).
    Sigma,
}

impl EstimatorAxis {
    pub fn as_str(self) -> &'static str {
        match self {
            EstimatorAxis::Step => "step",
            EstimatorAxis::Sigma => "sigma",
        }
    }

    /// The coordinate of call `step` at noise level `sigma`; an error on the sigma axis without a
    /// sigma.
    pub fn coordinate(self, step: usize, sigma: Option<f64>) -> Result<f64> {
        match self {
            EstimatorAxis::Step => Ok(step as f64),
            EstimatorAxis::Sigma => sigma.filter(|s| s.is_finite()).ok_or_else(|| {
                Error::msg(format!(
                    "estimator_axis = \"sigma\": call {step} has no sigma in the plan (use estimator_axis = \"step\")"
                ))
            }),
        }
    }
}

/// Extrapolates `hist` (`(coordinate, value)`, oldest first, 1 to 3 entries with distinct
/// coordinates) to `at` by Newton's divided differences.
pub fn extrapolate(hist: &[(f64, &Tensor)], at: f64) -> Result<Tensor> {
    let distinct = |a: f64, b: f64| -> Result<f64> {
        let d = b - a;
        if d != 0.0 && d.is_finite() {
            Ok(d)
        } else {
            Err(Error::msg(format!(
                "residual forecast from two calls at the same coordinate ({a})"
            )))
        }
    };
    match hist {
        [] => Err(Error::msg("residual forecast without a computed residual")),
        [(_, r)] => Ok((*r).clone()),
        [(s1, r1), (s2, r2)] => {
            let c = (at - s2) / distinct(*s1, *s2)?;
            Ok((*r2 + ((*r2 - *r1)? * c)?)?)
        }
        [(s1, r1), (s2, r2), (s3, r3)] => {
            let d1 = ((*r3 - *r2)? / distinct(*s2, *s3)?)?;
            let d1p = ((*r2 - *r1)? / distinct(*s1, *s2)?)?;
            let d2 = ((&d1 - &d1p)? / distinct(*s1, *s3)?)?;
            let lin = (*r3 + (&d1 * (at - s3))?)?;
            Ok((lin + (d2 * ((at - s3) * (at - s2)))?)?)
        }
        _ => Err(Error::msg(format!(
            "residual forecast of order {} is not supported (at most 2)",
            hist.len() - 1
        ))),
    }
}

/// A forecast of a reused call's residual as a linear combination of the stored computed residuals
/// (a rule's own forecaster, Spectrum's Chebyshev fit say), blended with the estimator's.
#[derive(Clone, Debug)]
pub struct Combination {
    /// One weight per stored residual, oldest first ([`ResidualHistory::points`]).
    pub weights: Vec<f64>,
    /// The combination's share of the estimate: `share * sum_j w_j r_j + (1 - share) * (the
    /// estimator's forecast)`.
    pub share: f64,
    /// Per-channel weights (one `[C]` tensor per stored residual, broadcast over the hidden
    /// stream's last axis) that replace `weights` on the hidden stream (the fitted estimator);
    /// `weights` still weigh an encoder stream.
    pub channels: Option<Vec<Tensor>>,
}

/// The last computed residuals of one scope and the estimate a reused call returns.
#[derive(Debug, Default)]
pub struct ResidualHistory {
    estimator: Estimator,
    /// How many computed residuals are kept (at least what the estimator reads).
    keep: usize,
    /// `(step, coordinate, residual)` of the last `keep` computed calls, oldest first.
    hist: VecDeque<(usize, f64, Streams)>,
}

impl ResidualHistory {
    pub fn new(estimator: Estimator) -> Self {
        Self::keeping(estimator, 0)
    }

    /// A history that keeps the last `keep` computed residuals, or what the estimator reads when
    /// that is more.
    pub fn keeping(estimator: Estimator, keep: usize) -> Self {
        ResidualHistory {
            estimator,
            keep: keep.max(estimator.order() + 1),
            hist: VecDeque::new(),
        }
    }

    /// `(step, coordinate)` of the stored residuals, oldest first.
    pub fn points(&self) -> Vec<(usize, f64)> {
        self.hist.iter().map(|(k, s, _)| (*k, *s)).collect()
    }

    pub fn estimator(&self) -> Estimator {
        self.estimator
    }

    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// Stores the residual of the computed call at `step` (coordinate `at` on the estimator's
    /// axis), dropping what the estimator no longer needs.
    pub fn push(&mut self, step: usize, at: f64, residual: Streams) {
        // A step computed twice (never in a plan) replaces its residual.
        if self.hist.back().is_some_and(|(s, _, _)| *s >= step) {
            self.hist.clear();
        }
        self.hist.push_back((step, at, residual));
        while self.hist.len() > self.keep {
            self.hist.pop_front();
        }
    }

    /// The residual estimate for a reused call at coordinate `at`; `None` without a computed
    /// residual.
    pub fn estimate(&self, at: f64) -> Result<Option<Streams>> {
        if self.hist.is_empty() {
            return Ok(None);
        }
        let hidden: Vec<(f64, &Tensor)> =
            self.hist.iter().map(|(_, s, r)| (*s, &r.hidden)).collect();
        let encoder: Option<Vec<(f64, &Tensor)>> = self
            .hist
            .iter()
            .map(|(_, s, r)| r.encoder.as_ref().map(|e| (*s, e)))
            .collect();
        let e = self.estimator;
        Ok(Some(Streams {
            hidden: e.forecast(&hidden, at)?,
            encoder: encoder.map(|h| e.forecast(&h, at)).transpose()?,
        }))
    }

    /// The estimate for a reused call at `at` with a rule's `combination` blended in (see
    /// [`Combination`]); `None` without a computed residual.
    pub fn estimate_with(
        &self,
        at: f64,
        combination: Option<&Combination>,
    ) -> Result<Option<Streams>> {
        let Some(c) = combination else {
            return self.estimate(at);
        };
        if c.weights.len() != self.hist.len() {
            return Err(Error::msg(format!(
                "a forecast of {} weights for {} stored residuals",
                c.weights.len(),
                self.hist.len()
            )));
        }
        if self.hist.is_empty() {
            return Ok(None);
        }
        let mixed = self.combine(&c.weights, c.share, c.channels.as_deref())?;
        if c.share >= 1.0 {
            return Ok(Some(mixed));
        }
        let Some(local) = self.estimate(at)? else {
            return Ok(None);
        };
        let rest = 1.0 - c.share;
        Ok(Some(Streams {
            hidden: (mixed.hidden + (local.hidden * rest)?)?,
            encoder: match (mixed.encoder, local.encoder) {
                (Some(m), Some(l)) => Some((m + (l * rest)?)?),
                _ => None,
            },
        }))
    }

    /// `scale * sum_j w_j r_j` over the stored residuals.
    fn combine(&self, weights: &[f64], scale: f64, channels: Option<&[Tensor]>) -> Result<Streams> {
        let mut hidden: Option<Tensor> = None;
        let mut encoder: Option<Option<Tensor>> = None;
        for (j, ((_, _, r), w)) in self.hist.iter().zip(weights).enumerate() {
            let w = w * scale;
            let h = match channels.and_then(|c| c.get(j)) {
                Some(c) => (r.hidden.broadcast_mul(c)? * scale)?,
                None => (&r.hidden * w)?,
            };
            hidden = Some(match hidden {
                Some(acc) => (acc + h)?,
                None => h,
            });
            let e = r.encoder.as_ref().map(|e| e * w).transpose()?;
            encoder = Some(match (encoder, e) {
                (None, e) => e,
                (Some(Some(acc)), Some(e)) => Some((acc + e)?),
                _ => None,
            });
        }
        let hidden =
            hidden.ok_or_else(|| Error::msg("residual forecast without a computed residual"))?;
        Ok(Streams {
            hidden,
            encoder: encoder.flatten(),
        })
    }

    /// Bytes of the stored residuals.
    pub fn bytes(&self) -> usize {
        self.hist.iter().map(|(_, _, r)| r.bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use magcache_core::candle_core::Device;
    use proptest::prelude::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn forecast(e: Estimator, points: &[(usize, Vec<f32>)], step: usize) -> Vec<f32> {
        let at: Vec<(usize, f64, Vec<f32>)> = points
            .iter()
            .map(|(s, v)| (*s, *s as f64, v.clone()))
            .collect();
        forecast_at(e, &at, step as f64)
    }

    /// `points`: `(step, coordinate, value)`.
    fn forecast_at(e: Estimator, points: &[(usize, f64, Vec<f32>)], at: f64) -> Vec<f32> {
        let mut h = ResidualHistory::new(e);
        for (s, c, v) in points {
            h.push(*s, *c, Streams::joint(t(v), t(v)));
        }
        let out = h.estimate(at).unwrap().unwrap();
        let hid = out.hidden.to_vec1::<f32>().unwrap();
        assert_eq!(hid, out.encoder.unwrap().to_vec1::<f32>().unwrap());
        hid
    }

    /// Three decreasing, unevenly spaced sigmas in (0, 1] and a smaller target.
    fn sigmas() -> impl Strategy<Value = (f64, f64, f64, f64)> {
        (0.05f64..0.3, 0.05f64..0.3, 0.05f64..0.3, 0.0f64..0.3).prop_map(|(a, b, c, d)| {
            let s1 = 1.0 - a;
            let s2 = s1 - b;
            let s3 = s2 - c;
            (s1, s2, s3, s3 - d * s3)
        })
    }

    #[test]
    fn reuse_returns_the_last_residual() {
        let p = vec![(0, vec![1.0, 2.0]), (2, vec![3.0, 5.0])];
        assert_eq!(forecast(Estimator::Reuse, &p, 7), vec![3.0, 5.0]);
    }

    #[test]
    fn lower_order_with_too_few_residuals() {
        let p = vec![(3, vec![1.0, 2.0])];
        assert_eq!(forecast(Estimator::Taylor2, &p, 5), vec![1.0, 2.0]);
        let p = vec![(1, vec![1.0]), (3, vec![3.0])];
        assert_eq!(forecast(Estimator::Taylor2, &p, 4), vec![4.0]);
    }

    #[test]
    fn seacache_order1_formula() {
        // r2 + (r2 - r1) * (k - s2) / (s2 - s1)
        let p = vec![(2, vec![1.0]), (4, vec![2.0])];
        assert_eq!(forecast(Estimator::Taylor1, &p, 5), vec![2.5]);
    }

    #[test]
    fn foca_is_the_mean_of_orders_one_and_two() {
        // Points of f(s) = s^2 at 0, 1, 2: order 1 at 4 gives 4 + 3 * 2 = 10, order 2 gives 16.
        let p = vec![(0, vec![0.0]), (1, vec![1.0]), (2, vec![4.0])];
        assert_eq!(forecast(Estimator::Taylor1, &p, 4), vec![10.0]);
        assert_eq!(forecast(Estimator::Taylor2, &p, 4), vec![16.0]);
        assert_eq!(forecast(Estimator::Foca, &p, 4), vec![13.0]);
        // With two residuals it is order 1, with one it reuses.
        assert_eq!(forecast(Estimator::Foca, &p[1..], 4), vec![10.0]);
        assert_eq!(forecast(Estimator::Foca, &p[2..], 4), vec![4.0]);
    }

    #[test]
    fn axis_coordinates_and_coincident_points() {
        assert_eq!(EstimatorAxis::Step.coordinate(3, Some(0.5)).unwrap(), 3.0);
        assert_eq!(EstimatorAxis::Sigma.coordinate(3, Some(0.5)).unwrap(), 0.5);
        let e = EstimatorAxis::Sigma.coordinate(3, None).unwrap_err();
        assert!(e.to_string().contains("estimator_axis"), "{e}");
        // Two calls at the same sigma cannot be extrapolated from: an error, not a NaN.
        let (a, b) = (t(&[1.0]), t(&[2.0]));
        assert!(extrapolate(&[(0.5, &a), (0.5, &b)], 0.2).is_err());
    }

    #[test]
    fn history_keeps_order_plus_one() {
        let mut h = ResidualHistory::new(Estimator::Taylor1);
        for s in 0..5 {
            h.push(s, s as f64, Streams::hidden(t(&[s as f32])));
        }
        assert_eq!(h.hist.len(), 2);
        assert_eq!(h.bytes(), 8);
    }

    proptest! {
        #[test]
        fn taylor1_is_exact_on_lines(a in -3.0f32..3.0, b in -3.0f32..3.0,
                                     s1 in 0usize..10, g in 1usize..4, k in 1usize..6) {
            let f = |s: usize| a + b * s as f32;
            let s2 = s1 + g;
            let p = vec![(s1, vec![f(s1)]), (s2, vec![f(s2)])];
            let got = forecast(Estimator::Taylor1, &p, s2 + k)[0];
            prop_assert!((got - f(s2 + k)).abs() <= 1e-3 * (1.0 + f(s2 + k).abs()));
        }

        #[test]
        fn taylor2_is_exact_on_parabolas(a in -3.0f32..3.0, b in -3.0f32..3.0, c in -1.0f32..1.0,
                                         s1 in 0usize..10, g1 in 1usize..4, g2 in 1usize..4,
                                         k in 1usize..5) {
            let f = |s: usize| { let s = s as f32; a + b * s + c * s * s };
            let (s2, s3) = (s1 + g1, s1 + g1 + g2);
            let p = vec![(s1, vec![f(s1)]), (s2, vec![f(s2)]), (s3, vec![f(s3)])];
            let got = forecast(Estimator::Taylor2, &p, s3 + k)[0];
            prop_assert!((got - f(s3 + k)).abs() <= 1e-3 * (1.0 + f(s3 + k).abs()));
        }

        /// On the sigma axis, with unevenly spaced decreasing sigmas: order 1 is exact on lines in
        /// sigma, and so is `foca` (both its forecasts are).
        #[test]
        fn sigma_taylor1_and_foca_are_exact_on_lines(a in -3.0f64..3.0, b in -3.0f64..3.0,
                                                     (s1, s2, s3, at) in sigmas()) {
            let f = |s: f64| (a + b * s) as f32;
            let p = vec![(0, s1, vec![f(s1)]), (2, s2, vec![f(s2)]), (3, s3, vec![f(s3)])];
            for e in [Estimator::Taylor1, Estimator::Foca] {
                let got = forecast_at(e, &p, at)[0];
                prop_assert!((got - f(at)).abs() <= 1e-3 * (1.0 + f(at).abs()), "{e:?}");
            }
        }

        /// On the sigma axis: order 2 is exact on parabolas in sigma, and `foca` misses by exactly
        /// half of order 1's miss.
        #[test]
        fn sigma_taylor2_exact_and_foca_halves_order_one(a in -3.0f64..3.0, b in -3.0f64..3.0,
                                                          c in -3.0f64..3.0,
                                                          (s1, s2, s3, at) in sigmas()) {
            let f = |s: f64| (a + b * s + c * s * s) as f32;
            let p = vec![(1, s1, vec![f(s1)]), (2, s2, vec![f(s2)]), (4, s3, vec![f(s3)])];
            let t2 = forecast_at(Estimator::Taylor2, &p, at)[0];
            prop_assert!((t2 - f(at)).abs() <= 1e-3 * (1.0 + f(at).abs()));
            let t1 = forecast_at(Estimator::Taylor1, &p, at)[0];
            let foca = forecast_at(Estimator::Foca, &p, at)[0];
            prop_assert!((foca - f(at) - (t1 - f(at)) / 2.0).abs() <= 1e-3 * (1.0 + f(at).abs()));
        }
    }
}
