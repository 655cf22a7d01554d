//! Calibrated schedules: which calls of a scope compute is fixed before the run, chosen once per
//! model and step count from a dense calibration run (LeMiCa-style), and the estimator fills in the
//! others.
//!
//! `magcache calibrate` records, per scope, how well each estimator would stand in for every
//! call from the calls computed before it, on the dense trajectory: the relative L1 error
//! `mean|est - r_k| / mean|r_k|` of the chain residual `r_k`, for reuse from any earlier call `i`
//! (`k - i <= MAX_GAP`) and for the order-1 forecast from any two earlier calls `h < i` (gaps up to
//! `MAX_GAP`). [`search`] then picks, for a budget of `B` computed calls, the set of calls (call 0
//! always among them) that minimises the summed error of the calls it skips, each weighted by its
//! step's sigma interval `sigma_k - sigma_(k+1)` (a flow sampler moves the sample by the model's
//! output times that interval, so an error in a call with a small step matters little: in
//! practice the search leaves the tiny last step of a shifted schedule to the forecast), by dynamic programming
//! over the last computed call (reuse) or the last two (taylor1, taylor2: the order-1 table stands
//! in for order 2). The result is exact for the proxy and found in `O(n * G^2 * B)`.
//!
//! `[cache] strategy = "schedule"` takes either `compute_steps = [...]` (the calls of every scope
//! that compute, 0-based within the scope) or `profile = "..."` with `budget = B`; `magcache plan`
//! shows the chosen schedule. Decisions do not depend on the data.

use crate::engine::{Cached, Call, Rule, SharedKeys, Wish};
use crate::residual::Estimator;
use magcache_core::runtime::registry::StrategyRegistration;
use magcache_core::{
    BuildEnv, Error, GenerationPlan, Result, ScopePlan, StrategyConfig, TimestepCache,
};
use std::collections::{BTreeMap, HashMap};

/// Longest gap between two computed calls the calibration measures (at most `MAX_GAP - 1` reused
/// calls in a row in a searched schedule).
pub const MAX_GAP: usize = 8;

pub use crate::profile::ForecastErrors;

crate::strategy_config! {
    /// `[cache] strategy = "schedule"`.
    pub struct ScheduleConfig {
        /// The calls of every scope that compute (0-based within the scope); the others reuse.
        pub compute_steps: Option<Vec<usize>> = None,
        /// A calibration profile with forecast errors (`magcache calibrate`), searched for
        /// `budget`.
        pub profile: Option<String> = None,
        /// Computed calls per scope when searching a profile (also what the search optimises
        /// for: the `estimator` key).
        pub budget: Option<usize> = None,
    }
}

#[typetag::serde(name = "schedule")]
impl StrategyConfig for ScheduleConfig {
    fn validate(&self, file: &str) -> Result<()> {
        self.shared().validate(file)?;
        match (&self.compute_steps, &self.profile, self.budget) {
            (Some(s), None, None) => {
                if s.is_empty() || s[0] != 0 || s.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(Error::config(
                        file,
                        "cache.compute_steps",
                        "must start with 0 and increase strictly (call 0 has nothing to reuse)",
                    ));
                }
                Ok(())
            }
            (None, Some(_), Some(b)) if b >= 1 => Ok(()),
            (None, Some(_), _) => Err(Error::config(
                file,
                "cache.budget",
                "a profile is searched for a number of computed calls per scope: give `budget = N` (N >= 1)",
            )),
            (Some(_), _, _) => Err(Error::config(
                file,
                "cache.compute_steps",
                "give either `compute_steps` or `profile` with `budget`, not both",
            )),
            (None, None, _) => Err(Error::config(
                file,
                "cache.compute_steps",
                "the schedule strategy needs `compute_steps = [0, ...]`, or `profile = \"...\"` (from `magcache calibrate`) with `budget = N`",
            )),
        }
    }

    fn build(&self, env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>> {
        self.validate(env.file)?;
        let source = match (&self.compute_steps, &self.profile) {
            (Some(s), _) => Source::Fixed(s.clone()),
            (None, Some(p)) => {
                let path = env.resolve(p);
                let prof = crate::profile::Profile::load(&path)?;
                let shown = path.display().to_string();
                if prof.meta.family != env.model.family {
                    return Err(Error::config(
                        env.file,
                        "cache.profile",
                        format!(
                            "{shown} was calibrated on family `{}`, this run is `{}`",
                            prof.meta.family, env.model.family
                        ),
                    ));
                }
                if prof.forecast_errors.is_empty() {
                    return Err(Error::config(
                        &shown,
                        "forecast_errors",
                        "the profile has no forecast-error tables (written by an older `magcache calibrate`): calibrate again",
                    ));
                }
                Source::Searched {
                    file: shown,
                    n_experts: prof.ratios.len(),
                    tables: prof.forecast_errors,
                }
            }
            (None, None) => unreachable!("validated"),
        };
        Ok(Some(Box::new(Schedule::with_rule(
            ScheduleRule {
                cfg: self.clone(),
                source,
            },
            self.shared(),
        ))))
    }

    fn input_files(&self) -> Vec<(&'static str, String)> {
        crate::profile::input_files(&self.profile)
    }

    fn metric_name(&self) -> &'static str {
        "schedule: predicted forecast error of a reused call (searched schedules)"
    }
}

inventory::submit! {
    StrategyRegistration { name: "schedule", description: "Calibrated schedule: the computed calls are fixed before the run (`compute_steps`, or searched from a profile for a `budget`); pair with estimator = \"taylor1\"", defaults: || Box::new(ScheduleConfig::default()) }
}

/// Where the schedule comes from.
#[derive(Clone, Debug)]
enum Source {
    Fixed(Vec<usize>),
    Searched {
        file: String,
        n_experts: usize,
        /// Per expert name, per branch name.
        tables: BTreeMap<String, BTreeMap<String, ForecastErrors>>,
    },
}

/// The calls to compute among `n` for a budget of `budget`, minimising the summed forecast error of
/// the skipped calls under `estimator`, call `k`'s error weighted by `weights[k]` (missing: 1);
/// `None` when no schedule within the measured gaps exists.
pub fn search(
    errors: &ForecastErrors,
    n: usize,
    budget: usize,
    estimator: Estimator,
    weights: &[f64],
) -> Option<Vec<usize>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let budget = budget.clamp(1, n);
    let e0: HashMap<(usize, usize), f64> = errors
        .reuse
        .iter()
        .map(|r| ((r[0] as usize, r[1] as usize), r[2]))
        .collect();
    let e1: HashMap<(usize, usize, usize), f64> = errors
        .taylor1
        .iter()
        .map(|r| ((r[0] as usize, r[1] as usize, r[2] as usize), r[3]))
        .collect();
    let order1 = estimator != Estimator::Reuse;
    // Cost of the calls strictly between computed `i` and `j` (`j = n`: the calls after the last),
    // the computed call before `i` being `h` (`None`: `i` is the first).
    let gap_cost = |h: Option<usize>, i: usize, j: usize| -> Option<f64> {
        let mut c = 0.0;
        for k in i + 1..j {
            let e = match h {
                Some(h) if order1 => *e1.get(&(h, i, k))?,
                _ => *e0.get(&(i, k))?,
            };
            c += e * weights.get(k).copied().unwrap_or(1.0);
        }
        Some(c)
    };
    // best[(h, i, used)] = least cost of calls 0..=i with `used` computed, the last two h < i.
    type Key = (Option<usize>, usize, usize);
    // Ordered, so that among schedules of equal cost the same one is found every time.
    let mut best: BTreeMap<Key, (f64, Option<Key>)> = BTreeMap::new();
    best.insert((None, 0, 1), (0.0, None));
    for i in 0..n {
        for used in 1..=budget {
            let here: Vec<(Key, f64)> = best
                .iter()
                .filter(|((_, bi, bu), _)| *bi == i && *bu == used)
                .map(|(k, v)| (*k, v.0))
                .collect();
            for (key, cost) in here {
                if used == budget {
                    continue;
                }
                for j in i + 1..(i + MAX_GAP + 1).min(n) {
                    let Some(c) = gap_cost(key.0, i, j) else {
                        continue;
                    };
                    let next = (if order1 { Some(i) } else { None }, j, used + 1);
                    let total = cost + c;
                    if best.get(&next).is_none_or(|(b, _)| total < *b) {
                        best.insert(next, (total, Some(key)));
                    }
                }
            }
        }
    }
    let end = best
        .iter()
        .filter(|((_, _, u), _)| *u == budget)
        .filter_map(|(k, (c, _))| gap_cost(k.0, k.1, n).map(|t| (*k, c + t)))
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))?;
    let mut steps = Vec::new();
    let mut cur = Some(end.0);
    while let Some(k) = cur {
        steps.push(k.1);
        cur = best.get(&k).and_then(|v| v.1);
    }
    steps.reverse();
    Some(steps)
}

/// The schedule's rule: the calls of each scope that compute, fixed before the run.
pub struct ScheduleRule {
    cfg: ScheduleConfig,
    source: Source,
}

/// The schedule strategy.
pub type Schedule = Cached<ScheduleRule>;

impl ScheduleRule {
    /// The computed calls of scope `key` with `steps` calls.
    fn schedule_for(&self, sp: &ScopePlan, plan: &GenerationPlan) -> Result<Vec<bool>> {
        let (key, steps, n_plan) = (sp.key, sp.steps, plan.experts().len());
        let list = match &self.source {
            Source::Fixed(s) => {
                if let Some(bad) = s.iter().find(|&&i| i >= steps) {
                    return Err(Error::config(
                        "[cache]",
                        "cache.compute_steps",
                        format!("call {bad} is beyond scope {key}, which runs {steps} calls (0..{steps})"),
                    ));
                }
                s.clone()
            }
            Source::Searched {
                file,
                n_experts,
                tables,
            } => {
                let name = crate::profile::expert_name(key.expert, (*n_experts).max(n_plan));
                let t = tables
                    .get(name)
                    .and_then(|b| b.get(key.branch.as_str()))
                    .ok_or_else(|| {
                        Error::config(
                            file,
                            format!("forecast_errors.{name}.{}", key.branch),
                            format!("missing: this run has scope {key}"),
                        )
                    })?;
                let measured = t.reuse.iter().map(|r| r[1] as usize + 1).max().unwrap_or(0);
                if measured != steps {
                    return Err(Error::config(
                        file,
                        "meta.steps",
                        format!("the profile's scope {key} was calibrated over {measured} calls, this run gives it {steps}: a schedule is chosen per step count, calibrate at this step count"),
                    ));
                }
                let budget = self.cfg.budget.unwrap_or(steps);
                if budget > steps {
                    return Err(Error::config(
                        "[cache]",
                        "cache.budget",
                        format!("{budget} computed calls is more than scope {key} runs ({steps} calls): a budget can be at most the calls (then every call computes); give budget <= {steps}"),
                    ));
                }
                // The sigma interval of each of the scope's steps over the whole generation.
                let mut all = vec![0.0; plan.total_steps + 1];
                for s in &plan.scopes {
                    for (&i, &sg) in s.step_indices.iter().zip(&s.sigmas) {
                        if let Some(x) = all.get_mut(i) {
                            *x = sg;
                        }
                    }
                }
                let weights: Vec<f64> = sp
                    .step_indices
                    .iter()
                    .map(|&i| {
                        (all.get(i).copied().unwrap_or(0.0)
                            - all.get(i + 1).copied().unwrap_or(0.0))
                        .abs()
                    })
                    .collect();
                search(t, steps, budget, self.cfg.estimator, &weights).ok_or_else(|| {
                    Error::config(
                        file,
                        "forecast_errors",
                        format!("no schedule of {budget} computed calls out of {steps} keeps every gap under {MAX_GAP} calls: raise `budget`"),
                    )
                })?
            }
        };
        let mut v = vec![false; steps];
        for i in list {
            v[i] = true;
        }
        Ok(v)
    }
}

impl Rule for ScheduleRule {
    /// Per call of the scope: computes.
    type State = Vec<bool>;

    fn name(&self) -> &str {
        "schedule"
    }

    fn init(&self, plan: &GenerationPlan, sp: &ScopePlan) -> Result<Vec<bool>> {
        self.schedule_for(sp, plan)
    }

    fn decide(&self, compute: &mut Vec<bool>, call: &Call<'_>) -> Result<Wish> {
        let scheduled = compute.get(call.step).copied().unwrap_or(true);
        Ok(Wish::reuse_if(!scheduled, None))
    }

    fn data_free(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Errors that grow with the gap; the forecast is exact on even calls only.
    fn table(n: usize) -> ForecastErrors {
        let mut t = ForecastErrors::default();
        for k in 0..n {
            for i in k.saturating_sub(MAX_GAP)..k {
                t.reuse.push([i as f64, k as f64, (k - i) as f64 * 0.1]);
                for h in i.saturating_sub(MAX_GAP)..i {
                    let e = if k % 2 == 0 { 0.0 } else { 0.5 };
                    t.taylor1.push([h as f64, i as f64, k as f64, e]);
                }
            }
        }
        t
    }

    #[test]
    fn reuse_search_spreads_the_budget_evenly() {
        let s = search(&table(9), 9, 3, Estimator::Reuse, &[]).unwrap();
        assert_eq!(s, [0, 3, 6]);
        // Full budget computes everything; budget 1 cannot cover 9 calls with gaps of 8.
        assert_eq!(
            search(&table(9), 9, 9, Estimator::Reuse, &[]).unwrap(),
            (0..9).collect::<Vec<_>>()
        );
        assert_eq!(search(&table(10), 10, 1, Estimator::Reuse, &[]), None);
    }

    #[test]
    fn taylor1_search_computes_the_calls_it_cannot_forecast() {
        // Odd calls forecast badly, even ones exactly: computing odd calls only leaves zero error.
        let s = search(&table(8), 8, 5, Estimator::Taylor1, &[]).unwrap();
        assert_eq!(s[0], 0);
        assert_eq!(s.len(), 5);
        assert!(s[1..].iter().all(|i| i % 2 == 1), "{s:?}");
    }

    #[test]
    fn weights_leave_a_negligible_call_to_the_forecast() {
        // Uniform weights give the even spread [0, 3, 6]; with the last two calls weightless, the
        // budget moves away from the end (cost 0.5 against 0.6).
        let w: Vec<f64> = (0..9).map(|k| if k >= 7 { 0.0 } else { 1.0 }).collect();
        let s = search(&table(9), 9, 3, Estimator::Reuse, &w).unwrap();
        assert_eq!(s.len(), 3);
        assert!(s[2] < 6, "{s:?}");
    }

    #[test]
    fn config_needs_one_source() {
        let bad = ScheduleConfig::default();
        assert!(bad.validate("r.toml").is_err());
        let bad = ScheduleConfig {
            compute_steps: Some(vec![1, 2]),
            ..Default::default()
        };
        assert!(bad
            .validate("r.toml")
            .unwrap_err()
            .to_string()
            .contains("start with 0"));
        let bad = ScheduleConfig {
            profile: Some("p.toml".into()),
            ..Default::default()
        };
        assert!(bad
            .validate("r.toml")
            .unwrap_err()
            .to_string()
            .contains("cache.budget"));
    }
}
