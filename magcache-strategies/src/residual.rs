//! What a reused call returns, shared by every strategy: the estimator axis.
//!
//! Every computed call stores its residual (the chain's output minus its input: for MagCache,
//! TeaCache and SeaCache the whole chain's hidden residual, for FBCache the residual of the blocks
//! after the first) with the step (the call's index within its scope). A reused call returns the
//! chain's input plus an estimate of the residual, added once, with no block run:
//! - `reuse` (the default): the last computed residual;
//! - `taylor1`: linear extrapolation in step index from the last two computed residuals,
//!   `r2 + (r2 - r1) * (k - s2) / (s2 - s1)` (SeaCache's `residual_order = 1`);
//! - `taylor2`: quadratic extrapolation (Newton's divided differences) from the last three.
//!
//! With fewer computed residuals than the order needs, the highest order they allow is used (one
//! residual: reuse). An encoder-stream residual (FBCache on FLUX) is forecast the same way.

use magcache_core::candle_core::Tensor;
use magcache_core::{Error, Result, Streams};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// `estimator = "reuse" | "taylor1" | "taylor2"`: what a reused call returns.
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
}

impl Estimator {
    /// The forecast order: 0, 1 or 2.
    pub fn order(self) -> usize {
        match self {
            Estimator::Reuse => 0,
            Estimator::Taylor1 => 1,
            Estimator::Taylor2 => 2,
        }
    }

    /// The estimator of forecast order `order` (0, 1, 2).
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
        }
    }
}

/// Extrapolates `hist` (`(step, value)`, oldest first, 1 to 3 entries, strictly increasing steps)
/// to `step`.
pub fn extrapolate(hist: &[(usize, &Tensor)], step: usize) -> Result<Tensor> {
    let k = step as f64;
    match hist {
        [] => Err(Error::msg("residual forecast without a computed residual")),
        [(_, r)] => Ok((*r).clone()),
        [(s1, r1), (s2, r2)] => {
            let (s1, s2) = (*s1 as f64, *s2 as f64);
            let c = (k - s2) / (s2 - s1);
            Ok((*r2 + ((*r2 - *r1)? * c)?)?)
        }
        [(s1, r1), (s2, r2), (s3, r3)] => {
            let (s1, s2, s3) = (*s1 as f64, *s2 as f64, *s3 as f64);
            let d1 = ((*r3 - *r2)? / (s3 - s2))?;
            let d1p = ((*r2 - *r1)? / (s2 - s1))?;
            let d2 = ((&d1 - &d1p)? / (s3 - s1))?;
            let lin = (*r3 + (&d1 * (k - s3))?)?;
            Ok((lin + (d2 * ((k - s3) * (k - s2)))?)?)
        }
        _ => Err(Error::msg(format!(
            "residual forecast of order {} is not supported (at most 2)",
            hist.len() - 1
        ))),
    }
}

/// The last computed residuals of one scope and the estimate a reused call returns.
#[derive(Debug, Default)]
pub struct ResidualHistory {
    estimator: Estimator,
    /// `(step, residual)` of the last `order + 1` computed calls, oldest first.
    hist: VecDeque<(usize, Streams)>,
}

impl ResidualHistory {
    pub fn new(estimator: Estimator) -> Self {
        ResidualHistory {
            estimator,
            hist: VecDeque::new(),
        }
    }

    pub fn estimator(&self) -> Estimator {
        self.estimator
    }

    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// Stores the residual of the computed call at `step`, dropping what the estimator no longer
    /// needs.
    pub fn push(&mut self, step: usize, residual: Streams) {
        // A step computed twice (never in a plan) replaces its residual.
        if self.hist.back().is_some_and(|(s, _)| *s >= step) {
            self.hist.clear();
        }
        self.hist.push_back((step, residual));
        while self.hist.len() > self.estimator.order() + 1 {
            self.hist.pop_front();
        }
    }

    /// The residual estimate for a reused call at `step`; `None` without a computed residual.
    pub fn estimate(&self, step: usize) -> Result<Option<Streams>> {
        if self.hist.is_empty() {
            return Ok(None);
        }
        let hidden: Vec<(usize, &Tensor)> =
            self.hist.iter().map(|(s, r)| (*s, &r.hidden)).collect();
        let encoder: Option<Vec<(usize, &Tensor)>> = self
            .hist
            .iter()
            .map(|(s, r)| r.encoder.as_ref().map(|e| (*s, e)))
            .collect();
        Ok(Some(Streams {
            hidden: extrapolate(&hidden, step)?,
            encoder: encoder.map(|e| extrapolate(&e, step)).transpose()?,
        }))
    }

    /// Bytes of the stored residuals.
    pub fn bytes(&self) -> usize {
        self.hist.iter().map(|(_, r)| r.bytes()).sum()
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
        let mut h = ResidualHistory::new(e);
        for (s, v) in points {
            h.push(*s, Streams::joint(t(v), t(v)));
        }
        let out = h.estimate(step).unwrap().unwrap();
        let hid = out.hidden.to_vec1::<f32>().unwrap();
        assert_eq!(hid, out.encoder.unwrap().to_vec1::<f32>().unwrap());
        hid
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
    fn history_keeps_order_plus_one() {
        let mut h = ResidualHistory::new(Estimator::Taylor1);
        for s in 0..5 {
            h.push(s, Streams::hidden(t(&[s as f32])));
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
    }
}
