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
use magcache_core::runtime::registry::StrategyRegistration;
use magcache_core::{
    Branch, BuildEnv, Error, GenerationPlan, Result, ScopePlan, StrategyConfig, TimestepCache,
};
use std::collections::BTreeMap;

pub use crate::profile::ForecastErrors;
pub use crate::search::{
    check_compute_steps, search, search_joint, search_joint_within, search_model, ErrorModel,
    MAX_GAP,
};

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
        if self.estimator == crate::residual::Estimator::Fitted {
            return crate::fitted::validate_config(
                file,
                &self.shared().guards,
                self.compute_steps.as_deref(),
                self.profile.is_some(),
            );
        }
        self.shared().validate(file)?;
        match (&self.compute_steps, &self.profile, self.budget) {
            (Some(s), None, None) => check_compute_steps(file, s),
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
        let fitted = self.estimator == crate::residual::Estimator::Fitted;
        let source = match (&self.compute_steps, &self.profile) {
            (Some(s), _) if !fitted => Source::Fixed(s.clone()),
            (_, Some(p)) => {
                let path = env.resolve(p);
                let prof = crate::profile::Profile::load_named(env.file, p, &path)?;
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
                if fitted {
                    let (list, steps, coefs, note) = crate::fitted::from_profile(
                        &prof,
                        &shown,
                        env.file,
                        self.compute_steps.as_deref(),
                        self.budget,
                    )?;
                    check_guards(env.file, &self.shared().guards, &list, steps)?;
                    Source::Fitted {
                        list,
                        steps: Some(steps),
                        coefs,
                        note: Some(note),
                        fitted_on: Some((shown, prof.meta.clone())),
                    }
                } else {
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
                        guidance: prof.meta.guidance_scale,
                        tables: prof.forecast_errors,
                    }
                }
            }
            (_, None) => unreachable!("validated"),
        };
        Ok(Some(Box::new(Schedule::with_rule(
            ScheduleRule {
                cfg: self.clone(),
                source,
                run_file: env.file.to_string(),
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
    /// A fitted schedule (`estimator = "fitted"`): the computed calls, the scope length it was
    /// fitted for, the reused calls' coefficients and a note on the fit for the run's notes.
    Fitted {
        list: Vec<usize>,
        steps: Option<usize>,
        coefs: crate::fitted::Coefficients,
        note: Option<String>,
        /// The profile's path and the noise schedule it was fitted on (its `[meta]`), for the
        /// run's warnings when the run's differs.
        fitted_on: Option<(String, crate::profile::ProfileMeta)>,
    },
    Searched {
        file: String,
        n_experts: usize,
        /// The calibration run's guidance scale (CFG profiles).
        guidance: Option<f64>,
        /// Per expert name, per branch name.
        tables: BTreeMap<String, BTreeMap<String, ForecastErrors>>,
    },
}

/// The schedule's rule: the calls of each scope that compute, fixed before the run.
pub struct ScheduleRule {
    cfg: ScheduleConfig,
    source: Source,
    /// The run file, for messages (`[cache]` for a rule built in code).
    run_file: String,
}

/// The schedule strategy.
pub type Schedule = Cached<ScheduleRule>;

impl ScheduleRule {
    /// The rule computing the calls `compute_steps` of every scope (`compute_steps = [...]`).
    pub fn fixed(compute_steps: Vec<usize>) -> Self {
        ScheduleRule {
            cfg: ScheduleConfig {
                compute_steps: Some(compute_steps.clone()),
                ..Default::default()
            },
            source: Source::Fixed(compute_steps),
            run_file: "[cache]".into(),
        }
    }

    /// The rule computing the calls `compute_steps` of every scope and estimating the others with
    /// the fitted estimator's `coefs` (a fit's trainable table, or [`Coefficients::taylor`]); pair
    /// with `estimator = "fitted"` in the shared keys.
    ///
    /// [`Coefficients::taylor`]: crate::fitted::Coefficients::taylor
    pub fn fitted(compute_steps: Vec<usize>, coefs: crate::fitted::Coefficients) -> Self {
        ScheduleRule {
            cfg: ScheduleConfig {
                compute_steps: Some(compute_steps.clone()),
                estimator: crate::residual::Estimator::Fitted,
                ..Default::default()
            },
            source: Source::Fitted {
                list: compute_steps,
                steps: None,
                coefs,
                note: None,
                fitted_on: None,
            },
            run_file: "[cache]".into(),
        }
    }

    /// The schedule the search picks from `prof` (read from `file`) for `budget` computed calls
    /// per scope with the order-1 forecast in sigma (where the fitted estimator starts), for the
    /// first scope of `plan` (a fitted schedule is one list for every scope).
    pub fn searched_for_fit(
        prof: &crate::profile::Profile,
        file: &str,
        budget: usize,
        plan: &GenerationPlan,
    ) -> Result<Vec<usize>> {
        let rule = ScheduleRule {
            cfg: ScheduleConfig {
                budget: Some(budget),
                estimator: crate::residual::Estimator::Taylor1,
                estimator_axis: crate::residual::EstimatorAxis::Sigma,
                ..Default::default()
            },
            source: Source::Searched {
                file: file.to_string(),
                n_experts: prof.ratios.len(),
                guidance: prof.meta.guidance_scale,
                tables: prof.forecast_errors.clone(),
            },
            run_file: "[cache]".into(),
        };
        let sp = plan
            .scopes
            .first()
            .ok_or_else(|| Error::msg("the run plans no transformer call"))?;
        let v = rule.schedule_for(sp, plan)?;
        Ok(v.iter()
            .enumerate()
            .filter(|(_, c)| c.0)
            .map(|(i, _)| i)
            .collect())
    }

    /// The computed calls of scope `key` with `steps` calls.
    /// Per call: whether it computes, and (searched schedules) the predicted forecast error of a
    /// reused call.
    fn schedule_for(
        &self,
        sp: &ScopePlan,
        plan: &GenerationPlan,
    ) -> Result<Vec<(bool, Option<f64>)>> {
        let (key, steps) = (sp.key, sp.steps);
        let (list, predicted) = match &self.source {
            Source::Fixed(s) => (s.clone(), None),
            Source::Fitted {
                list,
                steps: fitted_for,
                ..
            } => {
                crate::fitted::check_steps(&self.run_file, *fitted_for, key, steps)?;
                (list.clone(), None)
            }
            Source::Searched { .. } => {
                let (list, errors) = self.searched(sp, plan)?;
                (list, Some(errors))
            }
        };
        if let Some(bad) = list.iter().find(|&&i| i >= steps) {
            return Err(Error::config(
                &self.run_file,
                "cache.compute_steps",
                format!("call {bad} is beyond scope {key}, which runs {steps} calls (0..{steps})"),
            ));
        }
        let mut v: Vec<(bool, Option<f64>)> = vec![(false, None); steps];
        for i in list {
            v[i].0 = true;
        }
        if let Some(errors) = predicted {
            for (slot, e) in v.iter_mut().zip(errors) {
                if !slot.0 {
                    slot.1 = Some(e);
                }
            }
        }
        Ok(v)
    }

    /// The searched schedule of scope `sp` within the budget (its computed calls) and the
    /// predicted error of each of its calls were it reused.
    fn searched(&self, sp: &ScopePlan, plan: &GenerationPlan) -> Result<(Vec<usize>, Vec<f64>)> {
        let Source::Searched {
            file,
            n_experts,
            guidance,
            tables,
        } = &self.source
        else {
            return Err(Error::msg("internal: a fixed schedule searched"));
        };
        let (key, steps) = (sp.key, sp.steps);
        let name = crate::profile::expert_name(key.expert, (*n_experts).max(plan.experts().len()));
        let budget = self.cfg.budget.unwrap_or(steps);
        if budget > steps {
            return Err(Error::config(
                &self.run_file,
                "cache.budget",
                format!("{budget} computed calls is more than scope {key} runs ({steps} calls): a budget can be at most the calls (then every call computes); give budget <= {steps}"),
            ));
        }
        let weights = step_weights(sp, plan);
        let branches = tables.get(name);
        let (mut models, mut own, siblings) =
            self.sibling_models(sp, plan, file, name, branches)?;
        if let Some(m) = self.guided_model(*guidance, &siblings, &models, file, name, steps)? {
            models = vec![m];
            own = 0;
        }
        let longest = self.cfg.max_consecutive;
        let (list, mut errors) = search_joint_within(&models, steps, budget, &weights, longest)
            .ok_or_else(|| {
                Error::config(
                    file,
                    "forecast_errors",
                    format!("no schedule of {budget} computed calls out of {steps} reuses at most {} calls in a row (`max_consecutive`, or the {} the calibration measures): raise `budget`", longest.unwrap_or(MAX_GAP - 1).min(MAX_GAP - 1), MAX_GAP - 1),
                )
            })?;
        Ok((list, errors.swap_remove(own)))
    }

    /// One error model for each branch of the expert running the same steps as `sp` (CFG: one
    /// schedule for both), which of them is `sp`'s, and each one's tables and sigmas.
    #[allow(clippy::type_complexity)]
    fn sibling_models<'a>(
        &self,
        sp: &ScopePlan,
        plan: &'a GenerationPlan,
        file: &str,
        name: &str,
        branches: Option<&'a BTreeMap<String, ForecastErrors>>,
    ) -> Result<(
        Vec<ErrorModel>,
        usize,
        Vec<(Branch, &'a ForecastErrors, &'a [f64])>,
    )> {
        let (key, steps) = (sp.key, sp.steps);
        let (mut models, mut own, mut siblings) = (Vec::new(), 0, Vec::new());
        let same = |o: &&ScopePlan| o.key.expert == key.expert && o.step_indices == sp.step_indices;
        for o in plan.scopes.iter().filter(same) {
            let table = format!("forecast_errors.{name}.{}", o.key.branch);
            let t = branches
                .and_then(|b| b.get(o.key.branch.as_str()))
                .ok_or_else(|| {
                    let why = format!("missing: this run has scope {}", o.key);
                    Error::config(file, table.clone(), why)
                })?;
            let measured = t.reuse.iter().map(|r| r[1] as usize + 1).max().unwrap_or(0);
            if measured != steps {
                return Err(Error::config(
                    file,
                    "meta.steps",
                    format!("the profile's scope {} was calibrated over {measured} calls, this run gives it {steps}: a schedule is chosen per step count, calibrate at this step count", o.key),
                ));
            }
            let (estimator, axis) = (self.cfg.estimator, self.cfg.estimator_axis);
            let model = ErrorModel::new(t, estimator, axis, &o.sigmas, steps)
                .map_err(|m| Error::config(file, table, m))?;
            if o.key == key {
                own = models.len();
            }
            models.push(model);
            siblings.push((o.key.branch, t, o.sigmas.as_slice()));
        }
        Ok((models, own, siblings))
    }

    /// With CFG and a profile that measured the branches' cross products, one model of the guided
    /// combination stands for both branches, for the estimators priced by the Gram tables; `reuse`
    /// and `taylor1` in step index keep their L1 tables (priced by the guided L2 error, the digits
    /// model's searched 2.5x `taylor1` schedule lost 3.6 dB: 41.1 against 37.4).
    fn guided_model(
        &self,
        guidance: Option<f64>,
        siblings: &[(Branch, &ForecastErrors, &[f64])],
        models: &[ErrorModel],
        file: &str,
        name: &str,
        steps: usize,
    ) -> Result<Option<ErrorModel>> {
        let (Some(g), [(Branch::Cond, tc, sigmas), (Branch::Uncond, tu, _)]) = (guidance, siblings)
        else {
            return Ok(None);
        };
        if g <= 1.0
            || models.iter().any(ErrorModel::is_tables)
            || tc.cross.is_empty()
            || tu.cross.is_empty()
        {
            return Ok(None);
        }
        let (estimator, axis) = (self.cfg.estimator, self.cfg.estimator_axis);
        ErrorModel::guided(tc, tu, g, estimator, axis, sigmas, steps)
            .map(Some)
            .map_err(|m| Error::config(file, format!("forecast_errors.{name}"), m))
    }
}

/// Refuses guards that would compute a call the fitted schedule `list` (of a `steps`-call scope)
/// reuses: its coefficients are for the fitted calls' residuals only, and the run would stop at
/// that call.
fn check_guards(
    file: &str,
    guards: &crate::guards::GuardConfig,
    list: &[usize],
    steps: usize,
) -> Result<()> {
    let reused = |i: usize| !list.contains(&i);
    if let Some(i) = (1..guards.warmup_steps.min(steps)).find(|&i| reused(i)) {
        return Err(Error::config(
            file,
            "cache.warmup_steps",
            format!(
                "{} computes call {i}, which the fitted schedule {list:?} reuses: a fitted profile's coefficients are for its own calls (remove the key, or fit with these calls)",
                guards.warmup_steps
            ),
        ));
    }
    let tail = steps.saturating_sub(guards.last_steps);
    if let Some(i) = (tail..steps).find(|&i| reused(i)) {
        return Err(Error::config(
            file,
            "cache.last_steps",
            format!(
                "{} computes call {i}, which the fitted schedule {list:?} reuses: a fitted profile's coefficients are for its own calls (remove the key, or fit with these calls)",
                guards.last_steps
            ),
        ));
    }
    if let Some(cap) = guards.max_consecutive {
        let mut run = 0;
        for i in 0..steps {
            run = if reused(i) { run + 1 } else { 0 };
            if run > cap {
                return Err(Error::config(
                    file,
                    "cache.max_consecutive",
                    format!(
                        "{cap} would compute call {i}, which the fitted schedule {list:?} reuses ({run} in a row): a fitted profile's coefficients are for its own calls (remove the key, or fit with these calls)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Warnings for a fitted profile (`file`, fitted on `meta`'s noise schedule) used on a run whose
/// sampler, shift or expert boundary differs: the coefficients extrapolate between the fitted
/// run's noise levels.
fn fitted_schedule_warnings(
    file: &str,
    meta: &crate::profile::ProfileMeta,
    plan: &GenerationPlan,
) -> Vec<String> {
    use crate::ratios::Difference;
    let why = "its coefficients were fitted for that run's noise levels (fit again with `magcache calibrate --fit` on this run)";
    crate::ratios::schedule_differences(
        Some(&meta.scheduler),
        meta.shift,
        meta.boundary_ratio,
        plan,
    )
    .into_iter()
    .map(|d| match d {
        Difference::Sampler(a, b) => format!(
            "the fitted profile {file} was fitted with the `{a}` sampler, this run uses `{b}`: {why}"
        ),
        Difference::Shift(a, b) => format!(
            "the fitted profile {file} was fitted with shift {a}, this run uses shift {b}: {why}"
        ),
        Difference::Boundary(a, b) => format!(
            "the fitted profile {file} was fitted with boundary_ratio {a}, this run uses {b}: its experts' calls are split differently"
        ),
    })
    .collect()
}

/// The sigma interval of each of the scope's steps over the whole generation (what a reused
/// call's error weighs in the search).
fn step_weights(sp: &ScopePlan, plan: &GenerationPlan) -> Vec<f64> {
    let mut all = vec![0.0; plan.total_steps + 1];
    for s in &plan.scopes {
        for (&i, &sg) in s.step_indices.iter().zip(&s.sigmas) {
            if let Some(x) = all.get_mut(i) {
                *x = sg;
            }
        }
    }
    sp.step_indices
        .iter()
        .map(|&i| {
            (all.get(i).copied().unwrap_or(0.0) - all.get(i + 1).copied().unwrap_or(0.0)).abs()
        })
        .collect()
}

impl Rule for ScheduleRule {
    /// Per call of the scope: computes, and the predicted error when reused.
    type State = Vec<(bool, Option<f64>)>;

    fn name(&self) -> &str {
        "schedule"
    }

    fn init(&self, plan: &GenerationPlan, sp: &ScopePlan) -> Result<Self::State> {
        self.schedule_for(sp, plan)
    }

    fn history(&self) -> usize {
        match &self.source {
            Source::Fitted { coefs, .. } => coefs.history(),
            _ => 0,
        }
    }

    fn decide(&self, compute: &mut Self::State, call: &Call<'_>) -> Result<Wish> {
        let (scheduled, predicted) = compute.get(call.step).copied().unwrap_or((true, None));
        Ok(Wish::reuse_if(!scheduled, predicted))
    }

    fn warnings(&self, plan: &GenerationPlan) -> Vec<String> {
        match &self.source {
            Source::Fitted {
                fitted_on: Some((file, meta)),
                ..
            } => fitted_schedule_warnings(file, meta, plan),
            _ => Vec::new(),
        }
    }

    fn notes(&self) -> Vec<String> {
        match &self.source {
            Source::Fitted { note, .. } => note.iter().cloned().collect(),
            _ => Vec::new(),
        }
    }

    fn forecast(
        &self,
        _state: &Self::State,
        call: &Call<'_>,
        past: &[(usize, f64)],
        at: f64,
    ) -> Result<Option<crate::residual::Combination>> {
        let Source::Fitted { coefs, .. } = &self.source else {
            return Ok(None);
        };
        let input = call.input.ok_or_else(|| {
            Error::msg("fitted estimator: a reused call without its hidden input")
        })?;
        let channels = input.dim(magcache_core::candle_core::D::Minus1)?;
        let c = coefs.combination(call.scope, call.step, past, at, channels, input.device())?;
        Ok(Some(c))
    }

    fn data_free(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::residual::{Estimator, EstimatorAxis};

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

    /// The Gram table of residuals `r[k]` (every pair).
    fn gram_of(r: &[Vec<f64>]) -> ForecastErrors {
        let mut t = ForecastErrors::default();
        for k in 0..r.len() {
            for i in 0..=k {
                let d: f64 = r[i].iter().zip(&r[k]).map(|(a, b)| a * b).sum();
                t.gram.push([i as f64, k as f64, d]);
            }
        }
        t
    }

    fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
        let n: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let d: f64 = b.iter().map(|y| y * y).sum();
        (n / d).sqrt()
    }

    #[test]
    fn gram_errors_are_the_forecasts_relative_l2_errors() {
        // Residuals quadratic in sigma on an uneven schedule.
        let sig = [1.0, 0.93, 0.84, 0.7, 0.5, 0.27, 0.05];
        let r: Vec<Vec<f64>> = sig
            .iter()
            .map(|s| vec![1.0 + 2.0 * s, 0.5 - s * s, 3.0 * s - 1.0 + 0.2 * s * s])
            .collect();
        let g = gram_of(&r);
        let model = |e, a| ErrorModel::new(&g, e, a, &sig, sig.len()).unwrap();
        // Order 2 in sigma is exact on a quadratic in sigma; order 1 is not, and `foca` is off by
        // half of order 1's error vector.
        let t2 = model(Estimator::Taylor2, EstimatorAxis::Sigma);
        assert!(t2.error(&[1, 2, 4], 6).unwrap() < 1e-6);
        let t1 = model(Estimator::Taylor1, EstimatorAxis::Sigma);
        let lin: Vec<f64> = (0..3)
            .map(|j| r[4][j] + (r[4][j] - r[2][j]) * (sig[6] - sig[4]) / (sig[4] - sig[2]))
            .collect();
        let e1 = t1.error(&[2, 4], 6).unwrap();
        assert!((e1 - rel_l2(&lin, &r[6])).abs() < 1e-9 && e1 > 1e-3);
        let foca = model(Estimator::Foca, EstimatorAxis::Sigma);
        assert!((foca.error(&[1, 2, 4], 6).unwrap() - e1 / 2.0).abs() < 1e-6);
        // In step index the same residuals are not a polynomial: order 2 misses.
        let t2s = model(Estimator::Taylor2, EstimatorAxis::Step);
        assert!(t2s.error(&[1, 2, 4], 6).unwrap() > 1e-3);
        // A profile without the Gram table cannot price the sigma axis.
        let old = table(7);
        let e =
            ErrorModel::new(&old, Estimator::Taylor1, EstimatorAxis::Sigma, &sig, 7).unwrap_err();
        assert!(e.contains("gram") && e.contains("calibrate again"), "{e}");
        // ... but still prices `taylor2` in step index by its order-1 table.
        assert!(ErrorModel::new(&old, Estimator::Taylor2, EstimatorAxis::Step, &[], 7).is_ok());
    }

    /// The Gram and cross tables of two branches' residuals `c[k]`, `u[k]` (every pair).
    fn guided_tables(c: &[Vec<f64>], u: &[Vec<f64>]) -> (ForecastErrors, ForecastErrors) {
        let d = |a: &[f64], b: &[f64]| -> f64 { a.iter().zip(b).map(|(x, y)| x * y).sum() };
        let (mut tc, mut tu) = (gram_of(c), gram_of(u));
        for k in 0..c.len() {
            for i in 0..=k {
                // cond's table: the other branch (uncond) at i with cond at k; uncond's: cond at
                // i with uncond at k.
                if i < k {
                    tc.cross.push([i as f64, k as f64, d(&u[i], &c[k])]);
                }
                tu.cross.push([i as f64, k as f64, d(&c[i], &u[k])]);
            }
        }
        (tc, tu)
    }

    proptest::proptest! {
        /// The guided model's error of any forecast is the relative L2 error of that forecast of
        /// `g c - (g - 1) u`, relative to the cond residual; at `g = 1` it is the cond model's.
        #[test]
        fn guided_error_is_the_error_of_the_guided_combination(
            g in 1.0f64..8.0,
            seed in proptest::collection::vec(-1.0f64..1.0, 42),
            axis_sigma: bool,
            est in 0usize..4,
        ) {
            let sig = [1.0, 0.95, 0.88, 0.78, 0.62, 0.41, 0.12];
            let c: Vec<Vec<f64>> = (0..7).map(|k| seed[3 * k..3 * k + 3].to_vec()).collect();
            let u: Vec<Vec<f64>> = (0..7).map(|k| seed[21 + 3 * k..24 + 3 * k].to_vec()).collect();
            let (tc, tu) = guided_tables(&c, &u);
            let est = [Estimator::Reuse, Estimator::Taylor1, Estimator::Taylor2, Estimator::Foca][est];
            let axis = if axis_sigma { EstimatorAxis::Sigma } else { EstimatorAxis::Step };
            let m = ErrorModel::guided(&tc, &tu, g, est, axis, &sig, 7).unwrap();
            let coord = |k: usize| if axis_sigma { sig[k] } else { k as f64 };
            let hist = [1usize, 3, 4];
            let k = 6;
            let used = &hist[3 - (est.order() + 1)..];
            // The forecast of each branch, from the estimator itself.
            let fc = |r: &[Vec<f64>]| -> Vec<f64> {
                (0..3)
                    .map(|j| {
                        let ts: Vec<(f64, magcache_core::candle_core::Tensor)> = used
                            .iter()
                            .map(|&i| {
                                (coord(i), magcache_core::candle_core::Tensor::new(&[r[i][j]], &magcache_core::candle_core::Device::Cpu).unwrap())
                            })
                            .collect();
                        let refs: Vec<(f64, &magcache_core::candle_core::Tensor)> =
                            ts.iter().map(|(a, t)| (*a, t)).collect();
                        est.forecast(&refs, coord(k)).unwrap().to_vec1::<f64>().unwrap()[0]
                    })
                    .collect()
            };
            let (fcc, fcu) = (fc(&c), fc(&u));
            let err: Vec<f64> = (0..3)
                .map(|j| g * (fcc[j] - c[k][j]) - (g - 1.0) * (fcu[j] - u[k][j]))
                .collect();
            let want = (err.iter().map(|e| e * e).sum::<f64>()
                / c[k].iter().map(|e| e * e).sum::<f64>())
            .sqrt();
            let got = m.error(&hist, k).unwrap();
            proptest::prop_assert!((got - want).abs() <= 1e-6 * (1.0 + want), "{got} {want}");
            let m1 = ErrorModel::guided(&tc, &tu, 1.0, est, axis, &sig, 7).unwrap();
            let mc = ErrorModel::new(&tc, est, axis, &sig, 7).unwrap();
            // (`reuse`, and `taylor1` in step index, are priced by the L1 tables.)
            if est != Estimator::Reuse && (axis_sigma || est != Estimator::Taylor1) {
                let (a, b) = (m1.error(&hist, k).unwrap(), mc.error(&hist, k).unwrap());
                proptest::prop_assert!((a - b).abs() <= 1e-9 * (1.0 + b));
            }
        }
    }

    proptest::proptest! {
        /// A cap on the reused calls in a row (`max_consecutive`) is kept by the searched
        /// schedule, which is the cheapest of all schedules within the cap (brute force).
        #[test]
        fn capped_search_is_the_cheapest_schedule_within_the_cap(
            n in 6usize..11,
            budget in 2usize..5,
            cap in 1usize..5,
            errs in proptest::collection::vec(0.0f64..1.0, 11 * 11),
        ) {
            let mut t = ForecastErrors::default();
            for k in 0..n {
                for i in k.saturating_sub(MAX_GAP)..k {
                    t.reuse.push([i as f64, k as f64, errs[i * 11 + k] + 0.1 * (k - i) as f64]);
                }
            }
            let m = ErrorModel::new(&t, Estimator::Reuse, EstimatorAxis::Step, &[], n).unwrap();
            let price = |s: &[usize]| -> f64 {
                (0..n)
                    .filter(|k| !s.contains(k))
                    .map(|k| {
                        let last = s.iter().filter(|&&i| i < k).max().copied().unwrap();
                        m.error(&[last], k).unwrap()
                    })
                    .sum()
            };
            let within = |s: &[usize]| {
                s.windows(2).all(|w| w[1] - w[0] - 1 <= cap) && n - 1 - s[s.len() - 1] <= cap
            };
            // Brute force over the schedules starting with call 0.
            let mut best: Option<f64> = None;
            for mask in 0u32..(1 << (n - 1)) {
                if mask.count_ones() as usize != budget - 1 {
                    continue;
                }
                let s: Vec<usize> =
                    std::iter::once(0).chain((1..n).filter(|k| mask >> (k - 1) & 1 == 1)).collect();
                if within(&s) {
                    let p = price(&s);
                    best = Some(best.map_or(p, |b: f64| b.min(p)));
                }
            }
            let got = search_joint_within(std::slice::from_ref(&m), n, budget, &[], Some(cap));
            match (got, best) {
                (Some((s, _)), Some(b)) => {
                    proptest::prop_assert!(within(&s), "{s:?}");
                    proptest::prop_assert_eq!(s.len(), budget);
                    proptest::prop_assert!((price(&s) - b).abs() < 1e-9, "{s:?}: {} vs {b}", price(&s));
                }
                (None, None) => {}
                (g, b) => proptest::prop_assert!(false, "search {g:?}, brute force {b:?}"),
            }
        }
    }

    #[test]
    fn guided_search_needs_cross_tables() {
        let r: Vec<Vec<f64>> = (0..5).map(|k| vec![k as f64, 1.0]).collect();
        let g = gram_of(&r);
        let e = ErrorModel::guided(&g, &g, 4.0, Estimator::Taylor1, EstimatorAxis::Step, &[], 5)
            .unwrap_err();
        assert!(e.contains("cross") && e.contains("calibrate again"), "{e}");
    }

    #[test]
    fn four_step_distilled_schedule_leaves_the_tiny_last_call() {
        // The distilled digits model's sigmas: each call's weight is its sigma interval. Even when
        // the last call is the hardest to forecast (error 1 against 0.3), it spans 0.009 of the
        // noise range and is the one left out.
        let sig = [1.0, 0.858, 0.602, 0.0089];
        let next = [0.858, 0.602, 0.0089, 0.0];
        let w: Vec<f64> = sig.iter().zip(next).map(|(a, b)| a - b).collect();
        let mut t = ForecastErrors::default();
        for k in 1..4 {
            for i in 0..k {
                let e = if k == 3 { 1.0 } else { 0.3 };
                t.reuse.push([i as f64, k as f64, e]);
                for h in 0..i {
                    t.taylor1.push([h as f64, i as f64, k as f64, e]);
                }
            }
        }
        for e in [Estimator::Reuse, Estimator::Taylor1] {
            assert_eq!(search(&t, 4, 3, e, &w).unwrap(), [0, 1, 2], "{e:?}");
            // Unweighted, the hard last call is computed instead.
            assert_ne!(search(&t, 4, 3, e, &[]).unwrap(), [0, 1, 2], "{e:?}");
        }
    }

    #[test]
    fn order_two_search_keeps_three_calls_of_history() {
        // Residuals exactly quadratic in step index: order 2 forecasts every call from any three
        // computed ones, so any schedule costs 0 once three calls computed; the search finds a
        // zero-cost one, and its predicted errors are zero on every reused call.
        let r: Vec<Vec<f64>> = (0..12)
            .map(|k| {
                let k = k as f64;
                vec![1.0 + k * k, 2.0 - k, 0.5 * k * k - 3.0 * k]
            })
            .collect();
        let g = gram_of(&r);
        let m = ErrorModel::new(&g, Estimator::Taylor2, EstimatorAxis::Step, &[], 12).unwrap();
        let (s, errs) = search_model(&m, 12, 4, &[]).unwrap();
        assert_eq!(s.len(), 4);
        let after_three = s[2];
        for (k, e) in errs.iter().enumerate() {
            if k > after_three && !s.contains(&k) {
                assert!(*e < 1e-6, "call {k}: {e} ({s:?})");
            }
        }
        // Order 1 cannot do as well on the same residuals.
        let m1 = ErrorModel::new(
            &g,
            Estimator::Taylor1,
            EstimatorAxis::Sigma,
            &(0..12).map(|k| k as f64).collect::<Vec<_>>(),
            12,
        )
        .unwrap();
        let (_, e1) = search_model(&m1, 12, 4, &[]).unwrap();
        assert!(e1.iter().sum::<f64>() > errs.iter().sum::<f64>() + 1e-3);
    }

    #[test]
    fn branches_share_one_schedule_minimising_their_summed_error() {
        // Branch a forecasts odd calls exactly, branch b even ones: searched alone they pick
        // different calls; searched together, one schedule whose summed cost is no more than
        // either's own schedule priced on both.
        let tab = |exact_odd: bool| {
            let mut t = ForecastErrors::default();
            for k in 0..10usize {
                for i in k.saturating_sub(MAX_GAP)..k {
                    let e = if (k % 2 == 1) == exact_odd {
                        0.0
                    } else {
                        0.3 + 0.01 * k as f64
                    };
                    t.reuse.push([i as f64, k as f64, e]);
                }
            }
            t
        };
        let m = |odd| {
            ErrorModel::new(&tab(odd), Estimator::Reuse, EstimatorAxis::Step, &[], 10).unwrap()
        };
        let (a, b) = (m(true), m(false));
        let alone_a = search_model(&a, 10, 4, &[]).unwrap().0;
        let alone_b = search_model(&b, 10, 4, &[]).unwrap().0;
        assert_ne!(alone_a, alone_b);
        let (joint, errs) = search_joint(&[a.clone(), b.clone()], 10, 4, &[]).unwrap();
        assert_eq!(errs.len(), 2);
        let priced = |s: &[usize]| -> f64 {
            [&a, &b]
                .iter()
                .map(|m| {
                    (0..10)
                        .filter(|k| !s.contains(k))
                        .map(|k| {
                            let last = s.iter().filter(|&&i| i < k).max().copied().unwrap();
                            m.error(&[last], k).unwrap()
                        })
                        .sum::<f64>()
                })
                .sum()
        };
        assert!(priced(&joint) <= priced(&alone_a) + 1e-12);
        assert!(priced(&joint) <= priced(&alone_b) + 1e-12);
        let total: f64 = errs.iter().flatten().sum();
        assert!((total - priced(&joint)).abs() < 1e-9);
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
