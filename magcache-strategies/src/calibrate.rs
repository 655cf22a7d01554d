//! Calibration: a cache that never skips and records, per scope and step, the MagCache statistics of
//! the residual (the chain's hidden output minus its hidden input) against the previous
//! step's: `ratio` (mean per-token norm ratio; 1.0 at the first step), its std, and the cosine distance;
//! and the forecast errors a calibrated schedule is searched on ([`crate::schedule`]): for every call
//! `k`, the relative L1 error of reusing call `i`'s residual and of the order-1 forecast from calls
//! `h < i`, for gaps up to [`crate::schedule::MAX_GAP`]; and the Gram matrix of the residuals (their
//! dot products, for calls up to `3 * MAX_GAP` apart), from which the search derives the relative L2
//! error of any linear forecast (any estimator, in step index or in sigma). The last `3 * MAX_GAP`
//! residuals of a scope are kept meanwhile. With CFG, each branch's residual is also dotted with
//! the other branch's residuals up to the same call (`cross`), from which the search prices the
//! guided combination `uncond + g (cond - uncond)` rather than each branch alone.

use crate::profile::ForecastErrors;
use crate::residual::extrapolate;
use crate::schedule::MAX_GAP;
use magcache_core::candle_core::{DType, Tensor};
use magcache_core::maths::{mag_stats, rel_l1, tensor_bytes};
use magcache_core::{
    BlockChain, Branch, CallDecision, DecisionSync, Error, GenerationPlan, Result, ScopeKey,
    ScopeStates, Streams, TimestepCache,
};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

/// The statistics of one scope, one entry per step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScopeCalibration {
    pub ratios: Vec<f64>,
    pub stds: Vec<f64>,
    pub cos_dists: Vec<f64>,
    pub forecast: ForecastErrors,
}

/// Results shared between the calibrator (inside the hooks) and whoever reads them after the run.
pub type CalibrationResults = Arc<Mutex<BTreeMap<ScopeKey, ScopeCalibration>>>;

#[derive(Default)]
struct CalState {
    prev: Option<Tensor>,
    /// `(call, residual)` of the last `3 * MAX_GAP` calls.
    window: VecDeque<(usize, Tensor)>,
}

/// A never-skipping cache that measures the ratio curves.
pub struct Calibrator {
    states: ScopeStates<CalState>,
    out: CalibrationResults,
}

impl Calibrator {
    /// The calibrator and the handle its results appear in.
    pub fn new() -> (Self, CalibrationResults) {
        let out: CalibrationResults = Arc::new(Mutex::new(BTreeMap::new()));
        (
            Calibrator {
                states: ScopeStates::default(),
                out: out.clone(),
            },
            out,
        )
    }
}

impl TimestepCache for Calibrator {
    fn name(&self) -> &str {
        "calibrate"
    }

    fn begin_generation(&mut self, plan: &GenerationPlan) -> Result<Vec<String>> {
        self.states.begin(plan, |_| Ok(CalState::default()))?;
        let mut out = self
            .out
            .lock()
            .map_err(|_| Error::msg("calibration results poisoned"))?;
        out.clear();
        for sp in &plan.scopes {
            out.insert(sp.key, ScopeCalibration::default());
        }
        Ok(Vec::new())
    }

    fn run(
        &mut self,
        scope: ScopeKey,
        chain: &dyn BlockChain,
        x: Streams,
        _sync: &dyn DecisionSync,
    ) -> Result<(Streams, CallDecision)> {
        let (k, slot) = self.states.start_call(scope)?;
        let st = &mut slot.state;
        let input = x.hidden.clone();
        let out = chain.run(0..chain.num_blocks(), x)?;
        let res = (&out.hidden - &input)?;
        let (ratio, std, cos) = match &st.prev {
            None => (1.0, 0.0, 0.0),
            Some(prev) => {
                let s = mag_stats(&res, prev)?;
                (s.ratio, s.std, s.cos_dist)
            }
        };
        let mut forecast = ForecastErrors::default();
        for (a, (i, ri)) in st.window.iter().enumerate() {
            if k - i > MAX_GAP {
                continue;
            }
            forecast
                .reuse
                .push([*i as f64, k as f64, rel_l1(ri, &res)?]);
            for (h, rh) in st.window.iter().take(a) {
                if i - h <= MAX_GAP && k - h <= 2 * MAX_GAP {
                    let f = extrapolate(&[(*h as f64, rh), (*i as f64, ri)], k as f64)?;
                    forecast
                        .taylor1
                        .push([*h as f64, *i as f64, k as f64, rel_l1(&f, &res)?]);
                }
            }
        }
        let res64 = res.to_dtype(DType::F64)?;
        for (i, ri) in &st.window {
            forecast
                .gram
                .push([*i as f64, k as f64, dot(&ri.to_dtype(DType::F64)?, &res64)?]);
        }
        forecast
            .gram
            .push([k as f64, k as f64, dot(&res64, &res64)?]);
        st.window.push_back((k, res.clone()));
        while st.window.len() > 3 * MAX_GAP {
            st.window.pop_front();
        }
        st.prev = Some(res);
        // The other CFG branch of this expert: its residuals up to this call against this one.
        let other = match scope.branch {
            Branch::Cond => Some(Branch::Uncond),
            Branch::Uncond => Some(Branch::Cond),
            Branch::Batched => None,
        }
        .map(|b| ScopeKey::new(scope.expert, b));
        if let Some(Ok(o)) = other.map(|k| self.states.get(k)) {
            for (i, ri) in &o.state.window {
                if *i <= k && k - i <= 3 * MAX_GAP {
                    forecast.cross.push([
                        *i as f64,
                        k as f64,
                        dot(&ri.to_dtype(DType::F64)?, &res64)?,
                    ]);
                }
            }
        }
        let mut results = self
            .out
            .lock()
            .map_err(|_| Error::msg("calibration results poisoned"))?;
        let c = results.entry(scope).or_default();
        c.ratios.push(ratio);
        c.stds.push(std);
        c.cos_dists.push(cos);
        c.forecast.reuse.extend(forecast.reuse);
        c.forecast.taylor1.extend(forecast.taylor1);
        c.forecast.gram.extend(forecast.gram);
        c.forecast.cross.extend(forecast.cross);
        Ok((out, CallDecision::computed(Some(ratio))))
    }

    fn cached_bytes_by_scope(&self) -> Vec<(ScopeKey, usize)> {
        self.states
            .iter()
            .map(|(k, s)| {
                let window: usize = s.state.window.iter().map(|(_, t)| tensor_bytes(t)).sum();
                (*k, window)
            })
            .collect()
    }
}

/// `sum(a * b)` in f64.
fn dot(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a * b)?.sum_all()?.to_scalar::<f64>()?)
}

/// The measured curves of a calibration run as MagCache uses them (`RatioSource::Registered`):
/// per expert and branch, with the sigma of every step and the schedule of `plan`.
pub fn curves(
    results: &BTreeMap<ScopeKey, ScopeCalibration>,
    plan: &GenerationPlan,
    source: &str,
) -> crate::RatioCurves {
    let n_experts = plan.experts().last().map(|e| e + 1).unwrap_or(0);
    let mut experts = vec![BTreeMap::new(); n_experts];
    let mut expert_sigmas = vec![Vec::new(); n_experts];
    for sp in &plan.scopes {
        if let (Some(c), Some(slot)) = (results.get(&sp.key), experts.get_mut(sp.key.expert)) {
            slot.insert(sp.key.branch, c.ratios.clone());
        }
        if let Some(s) = expert_sigmas.get_mut(sp.key.expert) {
            *s = sp.sigmas.clone();
        }
    }
    let mut sigmas = vec![0.0; plan.total_steps];
    for sp in &plan.scopes {
        for (&step, &s) in sp.step_indices.iter().zip(&sp.sigmas) {
            if let Some(x) = sigmas.get_mut(step) {
                *x = s;
            }
        }
    }
    crate::RatioCurves {
        experts,
        schedule: Some(magcache_core::ScheduleMeta {
            steps: plan.total_steps,
            shift: plan.shift,
            scheduler: Some(plan.scheduler.clone()),
            boundary_ratio: plan.boundary_ratio,
            sigmas: Some(sigmas),
        }),
        expert_sigmas,
        source: source.to_string(),
    }
}
