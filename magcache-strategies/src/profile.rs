//! Calibration profiles: the MagCache statistics of a dense run per scope, with what it ran on.
//!
//! ```toml
//! [meta]                       # family, model, steps, shift, scheduler, boundary_ratio, sigmas
//! [ratios.main]                # single model; two experts: [ratios.high_noise], [ratios.low_noise]
//! cond = [1.0, ...]
//! uncond = [1.0, ...]
//! [mag_stds.main]              # same shape
//! [cos_dists.main]
//! [sigmas]                     # the noise level of every step of each expert
//! main = [1.0, ...]
//! [forecast_errors.main.cond]  # what a calibrated schedule is searched on (crate::schedule)
//! reuse = [[i, k, err], ...]
//! taylor1 = [[h, i, k, err], ...]
//! gram = [[i, k, dot], ...]     # residual dot products: any estimator's error, in step or sigma
//! cross = [[i, k, dot], ...]    # with the other CFG branch's residuals: the guided error
//! [fitted]                     # `calibrate --fit`: a schedule, the fit's seeds and scores
//! compute_steps = [0, 6, ...]
//! [[fitted.calls.main]]        # one per reused call: the fitted estimator's coefficients
//! step = 1
//! from = [0]
//! weights = [[1.0, ...]]       # one row of per-channel coefficients per `from` call
//! ```

use crate::ratios::RatioCurves;
use magcache_core::runtime::config::parse_toml;
use magcache_core::{Branch, Error, Result, ScheduleMeta};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// What a profile was calibrated on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileMeta {
    pub family: String,
    /// Preset name, or a fingerprint of the weight files.
    pub model: String,
    pub steps: usize,
    #[serde(default)]
    pub shift: Option<f64>,
    pub scheduler: String,
    #[serde(default)]
    pub boundary_ratio: Option<f64>,
    /// Sigmas of every step of the run.
    pub sigmas: Vec<f64>,
    /// The run's classifier-free guidance scale (absent: no CFG, or a profile written before it
    /// was recorded); the schedule search prices the guided combination with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f64>,
}

/// Per expert name (`main`, `high_noise`, `low_noise`), per branch (`cond`, `uncond`).
pub type ScopeTable = BTreeMap<String, BTreeMap<String, Vec<f64>>>;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub meta: ProfileMeta,
    pub ratios: ScopeTable,
    pub mag_stds: ScopeTable,
    pub cos_dists: ScopeTable,
    /// Sigmas of each expert's own steps.
    pub sigmas: BTreeMap<String, Vec<f64>>,
    /// Per expert and branch, the forecast errors of [`crate::schedule`] (absent in profiles
    /// written before calibrated schedules).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub forecast_errors: BTreeMap<String, BTreeMap<String, ForecastErrors>>,
    /// Per expert and branch, each block's mean relative residual change between consecutive calls
    /// (`magcache calibrate --blocks`, [`crate::probe`]); absent without `--blocks`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub block_change: ScopeTable,
    /// A schedule with the fitted estimator's coefficients (`magcache calibrate --fit`,
    /// [`crate::fitted`]); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fitted: Option<FittedProfile>,
}

/// The forecast errors of one scope, measured on a dense run (profile tables `[forecast_errors.*]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForecastErrors {
    /// `[i, k, err]`: reuse of call `i`'s residual at call `k`.
    pub reuse: Vec<[f64; 3]>,
    /// `[h, i, k, err]`: the order-1 forecast from calls `h` and `i` at call `k`.
    pub taylor1: Vec<[f64; 4]>,
    /// `[i, k, dot]`: the dot product of the residuals of calls `i <= k` (up to `3 * MAX_GAP`
    /// apart), from which the search derives the relative L2 error of any linear forecast (absent
    /// in profiles written before estimators in sigma).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gram: Vec<[f64; 3]>,
    /// `[i, k, dot]` (CFG runs): the dot product of the other branch's residual at call `i <= k`
    /// with this branch's at call `k` (up to `3 * MAX_GAP` apart); the two branches' tables
    /// together give every cross product, from which the search prices the error of the guided
    /// combination (absent in profiles written before, and without CFG).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cross: Vec<[f64; 3]>,
}

/// The input file of a strategy's `profile` key, for the runner's output checks.
pub fn input_files(profile: &Option<String>) -> Vec<(&'static str, String)> {
    profile
        .iter()
        .map(|p| ("cache.profile", p.clone()))
        .collect()
}

/// The table name of an expert: `main` for single-model runs, else `high_noise` / `low_noise`.
pub fn expert_name(expert: usize, n_experts: usize) -> &'static str {
    match (n_experts, expert) {
        (1, _) => "main",
        (_, 0) => "high_noise",
        _ => "low_noise",
    }
}

impl Profile {
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::msg(format!("cannot write the profile: {e}")))
    }

    /// [`Profile::load`] of the profile the run file `run_file` names under `cache.profile` as
    /// `named`, resolved to `path`: one that is not there (or not a file) is the run file's error,
    /// naming the key.
    pub fn load_named(run_file: &str, named: &str, path: &Path) -> Result<Profile> {
        if let Some(why) = magcache_core::error::not_a_file(path) {
            return Err(Error::config(
                run_file,
                "cache.profile",
                format!("`{named}` {why}"),
            ));
        }
        Profile::load(path)
    }

    pub fn load(path: &Path) -> Result<Profile> {
        let shown = path.display().to_string();
        let text = magcache_core::error::read_text(path)?;
        let p: Profile = parse_toml(&text, &shown)?;
        p.check(&shown)?;
        Ok(p)
    }

    fn expert_names(&self) -> Vec<&'static str> {
        if self.ratios.contains_key("main") {
            vec!["main"]
        } else {
            vec!["high_noise", "low_noise"]
        }
    }

    fn check(&self, file: &str) -> Result<()> {
        if self.ratios.is_empty() {
            return Err(Error::config(
                file,
                "ratios",
                "the profile has no ratio tables",
            ));
        }
        for name in self.expert_names() {
            let t = self
                .ratios
                .get(name)
                .ok_or_else(|| Error::config(file, format!("ratios.{name}"), "missing"))?;
            for (branch, c) in t {
                if Branch::parse(branch).is_none() {
                    return Err(Error::config(
                        file,
                        format!("ratios.{name}.{branch}"),
                        "branches are `cond`, `uncond` and `inference` (one batched call)",
                    ));
                }
                if c.is_empty() || c.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                    return Err(Error::config(
                        file,
                        format!("ratios.{name}.{branch}"),
                        "ratios must be a non-empty list of positive numbers",
                    ));
                }
            }
        }
        self.check_numbers(file)?;
        if let Some(f) = &self.fitted {
            f.check(file)?;
        }
        Ok(())
    }

    /// Every measured number finite and in its range, and every call index of the forecast tables
    /// a call of the calibration's `meta.steps` in its order: a profile edited by hand (or
    /// damaged) is refused naming its table, never read as another schedule.
    fn check_numbers(&self, file: &str) -> Result<()> {
        let bad = |key: String, why: String| Err(Error::config(file, key, why));
        // What each table may hold: a cosine distance may round a hair below 0; a relative change
        // or error over a zero residual is infinite (never NaN).
        let finite_non_negative = |v: &f64| v.is_finite() && *v >= 0.0;
        let non_negative = |v: &f64| *v >= 0.0;
        let (finite, may_be_infinite) = (
            "a finite number, 0 or more",
            "a number 0 or more (infinite for a zero residual)",
        );
        type Rule<'a> = (&'a dyn Fn(&f64) -> bool, &'a str);
        let tables: [(&str, &ScopeTable, Rule<'_>); 3] = [
            ("mag_stds", &self.mag_stds, (&finite_non_negative, finite)),
            (
                "cos_dists",
                &self.cos_dists,
                (&|v: &f64| v.is_finite(), "a finite number"),
            ),
            (
                "block_change",
                &self.block_change,
                (&non_negative, may_be_infinite),
            ),
        ];
        let lists = tables
            .into_iter()
            .flat_map(|(t, table, rule)| {
                table.iter().flat_map(move |(e, b)| {
                    b.iter()
                        .map(move |(b, v)| (format!("{t}.{e}.{b}"), v, rule))
                })
            })
            .chain(self.sigmas.iter().map(|(e, v)| {
                let rule: Rule<'_> = (&finite_non_negative, finite);
                (format!("sigmas.{e}"), v, rule)
            }))
            .chain([(
                "meta.sigmas".to_string(),
                &self.meta.sigmas,
                (&finite_non_negative as &dyn Fn(&f64) -> bool, finite),
            )]);
        for (key, v, (ok, what)) in lists {
            if let Some(x) = v.iter().find(|x| !ok(x)) {
                return bad(key, format!("{x} is not {what}"));
            }
        }
        for (e, branches) in &self.forecast_errors {
            for (b, t) in branches {
                let key = |table: &str| format!("forecast_errors.{e}.{b}.{table}");
                let rows = t.reuse.iter().map(|r| (&r[..2], r[2], "reuse"));
                let rows = rows.chain(t.taylor1.iter().map(|r| (&r[..3], r[3], "taylor1")));
                for (calls, err, table) in rows {
                    if let Some(why) = self.calls_problem(calls, true).or_else(|| {
                        (!non_negative(&err))
                            .then(|| format!("error {err} is not {may_be_infinite}"))
                    }) {
                        return bad(key(table), format!("row {calls:?}: {why}"));
                    }
                }
                let dots = t.gram.iter().map(|r| (r, "gram"));
                for (r, table) in dots.chain(t.cross.iter().map(|r| (r, "cross"))) {
                    let diagonal = table == "gram" && r[0] == r[1];
                    let why = self.calls_problem(&r[..2], false).or_else(|| {
                        (!r[2].is_finite() || (diagonal && r[2] < 0.0)).then(|| {
                            format!(
                                "dot product {} is not a finite number{}",
                                r[2],
                                if diagonal { ", 0 or more" } else { "" }
                            )
                        })
                    });
                    if let Some(why) = why {
                        return bad(key(table), format!("row {:?}: {why}", &r[..2]));
                    }
                }
            }
        }
        Ok(())
    }

    /// Why `calls` (the call indices of a forecast table's row, earliest first) are not calls of
    /// the calibration: whole numbers below `meta.steps` in order (`strict`: each after the last;
    /// else not before it).
    fn calls_problem(&self, calls: &[f64], strict: bool) -> Option<String> {
        let steps = self.meta.steps as f64;
        if let Some(c) = calls
            .iter()
            .find(|c| !(c.fract() == 0.0 && **c >= 0.0 && **c < steps))
        {
            return Some(format!(
                "{c} is not a call of the calibration (a whole number below meta.steps = {steps})"
            ));
        }
        let ordered = calls
            .windows(2)
            .all(|w| if strict { w[0] < w[1] } else { w[0] <= w[1] });
        (!ordered).then(|| "the calls are not in their order, earliest first".to_string())
    }

    /// The ratio curves as strategies use them, with the schedule they were measured on.
    pub fn curves(&self, source: &str) -> RatioCurves {
        let names = self.expert_names();
        let experts = names
            .iter()
            .map(|n| {
                self.ratios
                    .get(*n)
                    .map(|t| {
                        t.iter()
                            .map(|(b, c)| (Branch::parse(b).unwrap_or(Branch::Cond), c.clone()))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect();
        let expert_sigmas = names
            .iter()
            .map(|n| self.sigmas.get(*n).cloned().unwrap_or_default())
            .collect();
        RatioCurves {
            experts,
            schedule: Some(ScheduleMeta {
                steps: self.meta.steps,
                shift: self.meta.shift,
                scheduler: Some(self.meta.scheduler.clone()),
                boundary_ratio: self.meta.boundary_ratio,
                sigmas: Some(self.meta.sigmas.clone()),
            }),
            expert_sigmas,
            source: format!("profile {source}"),
        }
    }
}

/// Computed residuals a fitted reused call combines unless the fit says otherwise (the order-1
/// forecast's).
pub const DEFAULT_HISTORY: usize = 2;
/// The most a fit may combine.
pub const MAX_HISTORY: usize = 4;

/// The profile's `[fitted]` table: a schedule and the coefficients of its reused calls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FittedProfile {
    /// The computed calls of every scope (0-based within the scope).
    pub compute_steps: Vec<usize>,
    /// Calls per scope the schedule was fitted for.
    pub steps: usize,
    /// The axis of the order-1 forecast the fit started from (`--start-axis`).
    pub axis: crate::residual::EstimatorAxis,
    /// Noise seeds of the calibration batch (the fit's loss).
    pub calibration_seeds: Vec<u64>,
    /// Noise seeds of the held-out slice that chose the iterate (early stopping).
    pub validation_seeds: Vec<u64>,
    /// Adam iterations run, and the one kept.
    pub iterations: usize,
    pub best_iteration: usize,
    pub learning_rate: f64,
    /// Computed residuals each reused call combines (`--history`; absent: 2, the order-1
    /// forecast's).
    #[serde(
        default = "default_history",
        skip_serializing_if = "is_default_history"
    )]
    pub history: usize,
    /// Relative squared error of the final latent on the calibration batch: at the start (the
    /// order-1 forecast, or the kept coefficients of the fit it continued) and for the kept ones.
    pub calibration_error: [f64; 2],
    /// Worst PSNR (dB) against the dense run over the held-out slice: at the start and kept.
    pub validation_psnr_db: [f64; 2],
    /// Per expert (`main`, `high_noise`, `low_noise`), the reused calls' coefficients.
    pub calls: BTreeMap<String, Vec<FittedCall>>,
    /// One set of coefficients per CFG branch (`calibrate --fit --per-branch`): every call of
    /// `calls` names its `branch`; absent: one set shared by the branches.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_branch: bool,
    /// The fits this one continued (`calibrate --fit --start-profile`), first first; empty when it
    /// started from the order-1 forecast.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<EarlierFit>,
}

/// A fit that a later one continued from (`[[fitted.earlier]]`): where its coefficients came from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlierFit {
    /// Its calibration batch's noise seeds.
    pub calibration_seeds: Vec<u64>,
    /// Its Adam iterations, and the one kept.
    pub iterations: usize,
    pub best_iteration: usize,
    pub learning_rate: f64,
}

impl EarlierFit {
    /// The record of `f` as an earlier fit.
    pub fn of(f: &FittedProfile) -> Self {
        EarlierFit {
            calibration_seeds: f.calibration_seeds.clone(),
            iterations: f.iterations,
            best_iteration: f.best_iteration,
            learning_rate: f.learning_rate,
        }
    }
}

impl Default for FittedProfile {
    fn default() -> Self {
        FittedProfile {
            compute_steps: Vec::new(),
            steps: 0,
            axis: Default::default(),
            calibration_seeds: Vec::new(),
            validation_seeds: Vec::new(),
            iterations: 0,
            best_iteration: 0,
            learning_rate: 0.0,
            history: default_history(),
            calibration_error: [0.0; 2],
            validation_psnr_db: [0.0; 2],
            calls: BTreeMap::new(),
            per_branch: false,
            earlier: Vec::new(),
        }
    }
}

/// Why `n` residuals per reused call cannot be fitted or read (`None`: they can).
pub(crate) fn history_problem(n: usize) -> Option<String> {
    (!(DEFAULT_HISTORY..=MAX_HISTORY).contains(&n))
        .then(|| format!("{n} residuals per reused call: from {DEFAULT_HISTORY} to {MAX_HISTORY}"))
}

fn default_history() -> usize {
    DEFAULT_HISTORY
}

fn is_default_history(n: &usize) -> bool {
    *n == DEFAULT_HISTORY
}

/// One reused call's coefficients in the profile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FittedCall {
    /// The call (0-based within its scope).
    pub step: usize,
    /// The CFG branch (`cond`, `uncond`, `inference`) whose call it is, in a per-branch table
    /// (`fitted.per_branch`); absent: shared by the branches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<magcache_core::Branch>,
    /// The computed calls whose residuals it combines, oldest first.
    pub from: Vec<usize>,
    /// One row of per-channel coefficients per entry of `from`.
    pub weights: Vec<Vec<f32>>,
}

impl FittedProfile {
    /// Checks the table's shape; errors name `file` and the key.
    pub fn check(&self, file: &str) -> Result<()> {
        let bad = |key: &str, why: String| Err(Error::config(file, format!("fitted.{key}"), why));
        let s = &self.compute_steps;
        if s.first() != Some(&0)
            || s.windows(2).any(|w| w[0] >= w[1])
            || s[s.len() - 1] >= self.steps
        {
            return bad(
                "compute_steps",
                format!(
                    "must start with 0, increase strictly and stay below steps = {}",
                    self.steps
                ),
            );
        }
        if let Some(why) = history_problem(self.history) {
            return bad("history", why);
        }
        // Every row is one hidden width, across the calls too: a short one is the file's error
        // at load, not a run's at that call.
        let mut widths = self
            .calls
            .iter()
            .flat_map(|(e, calls)| calls.iter().map(move |c| (e, c)))
            .filter_map(|(e, c)| c.weights.first().map(|w| (e, c.step, w.len())));
        if let Some((e0, s0, w0)) = widths.next() {
            if let Some((e, s, w)) = widths.find(|x| x.2 != w0) {
                return bad(
                    &format!("calls.{e}"),
                    format!("rows of {w0} coefficients (call {s0} of `{e0}`) and {w} (call {s}): every row holds one coefficient per hidden channel"),
                );
            }
        }
        for (expert, calls) in &self.calls {
            for c in calls {
                let width = c.weights.first().map_or(0, Vec::len);
                if c.from.is_empty()
                    || c.from.len() > self.history
                    || c.weights.len() != c.from.len()
                    || width == 0
                    || c.weights.iter().any(|w| w.len() != width)
                    || c.weights.iter().flatten().any(|w| !w.is_finite())
                {
                    return bad(
                        &format!("calls.{expert}"),
                        format!("call {}: one to {} `from` calls (`fitted.history` = {}), one row of finite coefficients of one width each", c.step, self.history, self.history),
                    );
                }
                if c.from.windows(2).any(|w| w[0] >= w[1])
                    || c.from.last().is_some_and(|&f| f >= c.step)
                {
                    return bad(
                        &format!("calls.{expert}"),
                        format!(
                            "call {}: `from` = {:?} must name calls before it, oldest first",
                            c.step, c.from
                        ),
                    );
                }
                if c.branch.is_some() != self.per_branch {
                    return bad(
                        &format!("calls.{expert}"),
                        format!(
                            "call {}: {}",
                            c.step,
                            if self.per_branch {
                                "names no `branch`, but `fitted.per_branch` is true: each call needs cond, uncond or inference"
                            } else {
                                "names a `branch`, but `fitted.per_branch` is not set: set it (every call then needs one) or leave the branch out"
                            }
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}
