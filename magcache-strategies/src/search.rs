//! The search of calibrated schedules ([`crate::schedule`]): the error model pricing a skipped
//! call from the calibration profile's tables ([`ErrorModel`]), and the dynamic programme that picks
//! the computed calls of a budget ([`search`], [`search_joint_within`]).

use crate::profile::ForecastErrors;
use crate::residual::{Estimator, EstimatorAxis};
use std::collections::{BTreeMap, HashMap};

/// Longest gap between two computed calls the calibration measures (at most `MAX_GAP - 1` reused
/// calls in a row in a searched schedule).
pub const MAX_GAP: usize = 8;

/// How the search prices a skipped call: the forecast error of call `k` from the computed calls
/// before it, as measured on the dense calibration run.
///
/// `reuse` and `taylor1` in step index read the profile's relative L1 tables (`reuse`, `taylor1`),
/// as schedules were searched before estimators in sigma; every other estimator and axis is priced
/// by the relative L2 error `||sum_j w_j r_j - r_k|| / ||r_k||` of its forecast, the weights `w_j`
/// being the estimator's Lagrange weights in its coordinate, computed from the profile's Gram matrix
/// of the residuals (`gram`). A profile without `gram` prices `taylor2` in step index by the order-1
/// table (its behaviour before) and cannot price the others.
#[derive(Clone, Debug)]
pub struct ErrorModel {
    estimator: Estimator,
    kind: ModelKind,
}

#[derive(Clone, Debug)]
enum ModelKind {
    Tables {
        reuse: HashMap<(usize, usize), f64>,
        taylor1: HashMap<(usize, usize, usize), f64>,
    },
    Gram {
        dots: HashMap<(usize, usize), f64>,
        coords: Vec<f64>,
        /// What call `k`'s error is relative to: `||r_k||^2` (absent: `dots[(k, k)]`).
        norms: Option<HashMap<usize, f64>>,
    },
}

impl ErrorModel {
    /// The model of `estimator` on `axis` (`sigmas`: the scope's sigma of every call, for the sigma
    /// axis); an error message naming the missing table.
    pub fn new(
        errors: &ForecastErrors,
        estimator: Estimator,
        axis: EstimatorAxis,
        sigmas: &[f64],
        n: usize,
    ) -> std::result::Result<ErrorModel, String> {
        let legacy = axis == EstimatorAxis::Step
            && (matches!(estimator, Estimator::Reuse | Estimator::Taylor1)
                || (estimator == Estimator::Taylor2 && errors.gram.is_empty()));
        let kind = if legacy {
            ModelKind::Tables {
                reuse: errors
                    .reuse
                    .iter()
                    .map(|r| ((r[0] as usize, r[1] as usize), r[2]))
                    .collect(),
                taylor1: errors
                    .taylor1
                    .iter()
                    .map(|r| ((r[0] as usize, r[1] as usize, r[2] as usize), r[3]))
                    .collect(),
            }
        } else {
            if errors.gram.is_empty() {
                return Err(format!(
                    "the profile has no `gram` table, needed to search for estimator = \"{}\" with estimator_axis = \"{}\" (written by an older `magcache calibrate`): calibrate again",
                    estimator.as_str(),
                    axis.as_str()
                ));
            }
            let coords = match axis {
                EstimatorAxis::Step => (0..n).map(|k| k as f64).collect(),
                EstimatorAxis::Sigma => {
                    if sigmas.len() < n {
                        return Err(format!(
                            "estimator_axis = \"sigma\" needs the sigma of each of the scope's {n} calls; the plan gives {}",
                            sigmas.len()
                        ));
                    }
                    let c = sigmas[..n].to_vec();
                    // A forecast through two calls at one sigma divides by their distance, 0.
                    if estimator != Estimator::Reuse {
                        for (i, a) in c.iter().enumerate() {
                            if let Some(j) = c[i + 1..].iter().position(|b| b == a) {
                                return Err(format!(
                                    "estimator_axis = \"sigma\" with estimator = \"{}\" needs distinct sigmas; calls {i} and {} share sigma {a}: use estimator_axis = \"step\"",
                                    estimator.as_str(),
                                    i + 1 + j
                                ));
                            }
                        }
                    }
                    c
                }
            };
            ModelKind::Gram {
                dots: errors
                    .gram
                    .iter()
                    .map(|r| ((r[0] as usize, r[1] as usize), r[2]))
                    .collect(),
                coords,
                norms: None,
            }
        };
        Ok(ErrorModel { estimator, kind })
    }

    /// The model of the guided combination of a CFG step, `uncond + g (cond - uncond)`: both
    /// branches forecast with the same estimator from the same calls, so the error the guidance
    /// passes on is the forecast error of `d_k = g c_k - (g - 1) u_k` (`c`, `u`: the branches'
    /// residuals), whose dot products come from both branches' Gram tables and their cross
    /// products (`cross`):
    /// `<d_i, d_k> = g^2 <c_i, c_k> + (g - 1)^2 <u_i, u_k> - g (g - 1) (<c_i, u_k> + <u_i, c_k>)`.
    /// The error is relative to the cond residual's norm
    /// (at `g = 1` it is the cond branch's own error). Where the branches' forecast errors point the
    /// same way they cancel in the guided difference; where they do not, they add up to `2g - 1`
    /// times one branch's.
    pub fn guided(
        cond: &ForecastErrors,
        uncond: &ForecastErrors,
        g: f64,
        estimator: Estimator,
        axis: EstimatorAxis,
        sigmas: &[f64],
        n: usize,
    ) -> std::result::Result<ErrorModel, String> {
        if cond.cross.is_empty() || uncond.cross.is_empty() {
            return Err("the profile has no `cross` tables (written by an older `magcache calibrate`): calibrate again".into());
        }
        let ErrorModel {
            kind: ModelKind::Gram { coords, .. },
            ..
        } = ErrorModel::new(cond, Estimator::Taylor2, axis, sigmas, n)?
        else {
            return Err("the profile has no `gram` table: calibrate again".into());
        };
        let table = |t: &[[f64; 3]]| -> HashMap<(usize, usize), f64> {
            t.iter()
                .map(|r| ((r[0] as usize, r[1] as usize), r[2]))
                .collect()
        };
        let (cc, uu) = (table(&cond.gram), table(&uncond.gram));
        // x[(a, b)] = <c_a, u_b>: uncond's table has <c_i, u_k>, cond's <u_i, c_k>.
        let mut x = table(&uncond.cross);
        x.extend(
            cond.cross
                .iter()
                .map(|r| ((r[1] as usize, r[0] as usize), r[2])),
        );
        let mut dots = HashMap::new();
        let mut norms = HashMap::new();
        for (&(i, k), &c) in &cc {
            if i == k {
                norms.insert(k, c);
            }
            let (Some(u), Some(a), Some(b)) = (uu.get(&(i, k)), x.get(&(i, k)), x.get(&(k, i)))
            else {
                continue;
            };
            dots.insert(
                (i, k),
                g * g * c + (g - 1.0) * (g - 1.0) * u - g * (g - 1.0) * (a + b),
            );
        }
        Ok(ErrorModel {
            estimator,
            kind: ModelKind::Gram {
                dots,
                coords,
                norms: Some(norms),
            },
        })
    }

    /// True when the profile's relative L1 tables price it (`reuse` and `taylor1` in step index).
    pub fn is_tables(&self) -> bool {
        matches!(self.kind, ModelKind::Tables { .. })
    }

    /// How many computed calls the forecast reads (1 to 3).
    fn memory(&self) -> usize {
        self.estimator.order() + 1
    }

    /// The error of call `k` forecast from the computed calls `hist` (oldest first, the newest
    /// `memory()` used); `None` when the profile did not measure it.
    pub fn error(&self, hist: &[usize], k: usize) -> Option<f64> {
        let hist = &hist[hist.len().saturating_sub(self.memory())..];
        match &self.kind {
            ModelKind::Tables { reuse, taylor1 } => match hist {
                [.., h, i] if self.estimator != Estimator::Reuse => {
                    taylor1.get(&(*h, *i, k)).copied()
                }
                [.., i] => reuse.get(&(*i, k)).copied(),
                [] => None,
            },
            ModelKind::Gram {
                dots,
                coords,
                norms,
            } => {
                let dot = |a: usize, b: usize| dots.get(&(a.min(b), a.max(b))).copied();
                let at = *coords.get(k)?;
                let pts: Vec<f64> = hist
                    .iter()
                    .map(|&i| coords.get(i).copied())
                    .collect::<Option<_>>()?;
                let mut w = vec![0.0; hist.len()];
                let lagrange = |w: &mut [f64], from: usize, share: f64| {
                    for j in from..pts.len() {
                        let mut l = 1.0;
                        for m in from..pts.len() {
                            if m != j {
                                l *= (at - pts[m]) / (pts[j] - pts[m]);
                            }
                        }
                        w[j] += share * l;
                    }
                };
                if self.estimator == Estimator::Foca && hist.len() == 3 {
                    lagrange(&mut w, 1, 0.5);
                    lagrange(&mut w, 0, 0.5);
                } else {
                    lagrange(&mut w, 0, 1.0);
                }
                // ||sum_j w_j r_j - r_k||^2 from the dot products.
                let mut idx: Vec<(usize, f64)> = hist.iter().copied().zip(w).collect();
                idx.push((k, -1.0));
                let mut sq = 0.0;
                for &(a, wa) in &idx {
                    for &(b, wb) in &idx {
                        sq += wa * wb * dot(a, b)?;
                    }
                }
                let norm = match norms {
                    Some(n) => *n.get(&k)?,
                    None => dot(k, k)?,
                };
                if !sq.is_finite() {
                    return None;
                }
                Some(if norm > 0.0 {
                    (sq.max(0.0) / norm).sqrt()
                } else {
                    0.0
                })
            }
        }
    }
}

/// The calls to compute among `n` for a budget of `budget`, minimising the summed forecast error of
/// the skipped calls under `estimator` in step index (the relative L1 tables; see [`ErrorModel`]),
/// call `k`'s error weighted by `weights[k]` (missing: 1); `None` when no schedule within the
/// measured gaps exists.
pub fn search(
    errors: &ForecastErrors,
    n: usize,
    budget: usize,
    estimator: Estimator,
    weights: &[f64],
) -> Option<Vec<usize>> {
    let model = ErrorModel::new(errors, estimator, EstimatorAxis::Step, &[], n).ok()?;
    search_model(&model, n, budget, weights).map(|(s, _)| s)
}

/// As [`search`], for any [`ErrorModel`]; returns the schedule and the predicted (weighted-out)
/// error of every call (0 for computed calls).
pub fn search_model(
    model: &ErrorModel,
    n: usize,
    budget: usize,
    weights: &[f64],
) -> Option<(Vec<usize>, Vec<f64>)> {
    let (steps, mut errors) = search_joint(std::slice::from_ref(model), n, budget, weights)?;
    Some((steps, errors.pop().unwrap_or_default()))
}

/// As [`search_model`], one schedule for several scopes (the branches of an expert, whose calls
/// are the same steps), minimising the sum of their weighted errors; returns the schedule and each
/// model's predicted error of every call.
///
/// The branches of a CFG step must share their schedule: a step where one branch computes while
/// the other forecasts puts the forecast's whole error into the guided difference `cond - uncond`
/// (times the guidance scale), where two forecasts of the same kind largely cancel (on the digits
/// model, 20.5 dB against 33.0 dB for the same calls at 4x, foca in sigma).
pub fn search_joint(
    models: &[ErrorModel],
    n: usize,
    budget: usize,
    weights: &[f64],
) -> Option<(Vec<usize>, Vec<Vec<f64>>)> {
    search_joint_within(models, n, budget, weights, None)
}

/// As [`search_joint`], with at most `longest` reused calls in a row (the `max_consecutive`
/// guard; `None`: what the calibration measured, `MAX_GAP - 1` between computed calls). The priced error of a long gap
/// misses how its errors grow along the trajectory: on the digits model at guidance 4 every
/// unconstrained search opens with the longest gap allowed (`[0, 8, ...]`) and loses 2-7 dB
/// against schedules with shorter gaps (docs/quality.md).
pub fn search_joint_within(
    models: &[ErrorModel],
    n: usize,
    budget: usize,
    weights: &[f64],
    longest: Option<usize>,
) -> Option<(Vec<usize>, Vec<Vec<f64>>)> {
    // Between computed calls, and after the last (whose errors the tables bound by themselves).
    let (inner, tail) = match longest {
        Some(l) => (l.min(MAX_GAP - 1), l),
        None => (MAX_GAP - 1, n),
    };
    if n == 0 || models.is_empty() {
        return Some((Vec::new(), vec![Vec::new(); models.len()]));
    }
    let budget = budget.clamp(1, n);
    let keep = models.iter().map(ErrorModel::memory).max().unwrap_or(1) - 1;
    let error =
        |hist: &[usize], k: usize| -> Option<f64> { models.iter().map(|m| m.error(hist, k)).sum() };
    // Errors of the calls strictly between computed `i` and `j` (`j = n`: the calls after the
    // last), forecast from the computed calls `prev` (oldest first) and `i`.
    let gap = |prev: [Option<usize>; 2], i: usize, j: usize| -> Option<Vec<f64>> {
        let hist: Vec<usize> = prev.iter().flatten().copied().chain([i]).collect();
        (i + 1..j).map(|k| error(&hist, k)).collect()
    };
    let cost = |errs: &[f64], i: usize| -> f64 {
        errs.iter()
            .enumerate()
            .map(|(d, e)| e * weights.get(i + 1 + d).copied().unwrap_or(1.0))
            .sum()
    };
    // layers[i][(prev, used)] = (least cost of calls 0..=i with `used` computed, the last computed
    // ones before `i` being `prev`; the state it came from). Ordered, so that among schedules of
    // equal cost the same one is found every time.
    type Key = ([Option<usize>; 2], usize);
    type Layer = BTreeMap<Key, (f64, Option<(usize, Key)>)>;
    let mut layers: Vec<Layer> = vec![BTreeMap::new(); n];
    layers[0].insert(([None, None], 1), (0.0, None));
    for i in 0..n {
        let here: Vec<(Key, f64)> = layers[i].iter().map(|(k, v)| (*k, v.0)).collect();
        for ((prev, used), c0) in here {
            if used == budget {
                continue;
            }
            #[allow(clippy::needless_range_loop)] // `j` is a call index as well as a layer
            for j in i + 1..(i + inner + 2).min(n) {
                let Some(errs) = gap(prev, i, j) else {
                    continue;
                };
                let next_prev = match keep {
                    0 => [None, None],
                    1 => [None, Some(i)],
                    _ => [prev[1], Some(i)],
                };
                let total = c0 + cost(&errs, i);
                let slot = layers[j].entry((next_prev, used + 1));
                match slot {
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        if total < o.get().0 {
                            o.insert((total, Some((i, (prev, used)))));
                        }
                    }
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert((total, Some((i, (prev, used)))));
                    }
                }
            }
        }
    }
    let mut end: Option<(usize, Key, f64)> = None;
    for (i, layer) in layers.iter().enumerate() {
        for (key, (c, _)) in layer {
            if key.1 != budget || n - i - 1 > tail {
                continue;
            }
            let Some(errs) = gap(key.0, i, n) else {
                continue;
            };
            let total = c + cost(&errs, i);
            if end.as_ref().is_none_or(|e| total < e.2) {
                end = Some((i, *key, total));
            }
        }
    }
    let (i_end, key_end, _) = end?;
    let mut steps = Vec::new();
    let mut cur = Some((i_end, key_end));
    while let Some((i, key)) = cur {
        steps.push(i);
        cur = layers[i].get(&key).and_then(|v| v.1);
    }
    steps.reverse();
    let per_model = models
        .iter()
        .map(|m| reused_errors(m, &steps, n, keep))
        .collect();
    Some((steps, per_model))
}

/// Each of `n` calls' error under `model` when the calls `steps` compute (0 for those), forecast
/// from the last `keep + 1` computed calls before it.
fn reused_errors(model: &ErrorModel, steps: &[usize], n: usize, keep: usize) -> Vec<f64> {
    let mut errors = vec![0.0; n];
    for (a, &i) in steps.iter().enumerate() {
        let j = steps.get(a + 1).copied().unwrap_or(n);
        let hist: Vec<usize> = steps[a.saturating_sub(keep)..=a].to_vec();
        for (k, e) in errors.iter_mut().enumerate().take(j).skip(i + 1) {
            *e = model.error(&hist, k).unwrap_or(f64::NAN);
        }
    }
    errors
}

/// `compute_steps` starts with call 0 and increases strictly; else an error naming `file` and the
/// key.
pub fn check_compute_steps(file: &str, s: &[usize]) -> magcache_core::Result<()> {
    if s.first() != Some(&0) || s.windows(2).any(|w| w[0] >= w[1]) {
        return Err(magcache_core::Error::config(
            file,
            "cache.compute_steps",
            "must start with 0 and increase strictly (call 0 has nothing to reuse)",
        ));
    }
    Ok(())
}
