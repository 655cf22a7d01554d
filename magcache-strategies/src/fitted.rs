//! The fitted estimator (`estimator = "fitted"`, with `strategy = "schedule"`).
//!
//! A reused call `k` after the computed calls `a < b` of its scope returns
//! `r_k[c] = w_a[c] r_a[c] + w_b[c] r_b[c]` for each hidden channel `c`: one pair of coefficients
//! per skipped call and channel, shared by the samples, the tokens and both CFG branches (after
//! only one computed call, one coefficient; with `history = 3` or 4 in the profile, a coefficient
//! on each of the last three or four computed residuals; with `per_branch = true`, one set per
//! classifier-free-guidance branch: guidance scales the difference of the branches' errors, which
//! shared coefficients cannot weigh apart from their mean). They start at the order-1 forecast in the
//! estimator's axis (`w_a = -q`, `w_b = 1 + q`, `q = (s_k - s_b) / (s_b - s_a)`, 0 on older
//! residuals; one residual: `w = 1`, reuse)
//! and are fitted by `magcache calibrate --fit` so that the **final latent** of the whole cached
//! run matches the dense run's on a calibration batch: the smallest error at each call is not the
//! smallest error at the end of the run (fitting each call's residual alone lost 1-2 dB to plain
//! order-1 forecasting in the reference-stack study of issue 44; fitting the final latent gained
//! 2.3-2.7 dB held out).
//!
//! The coefficients live in the profile's `[fitted]` table ([`FittedProfile`]) with the schedule
//! they were fitted for, the seeds used and the held-out check. An encoder stream (none in the
//! schedule strategy's whole-chain residual) would keep the order-1 forecast.

use crate::residual::Combination;
use magcache_core::candle_core::{DType, Device, Tensor, Var};
use magcache_core::{Branch, Error, Result, ScopeKey};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

pub use crate::profile::{EarlierFit, FittedCall, FittedProfile, DEFAULT_HISTORY, MAX_HISTORY};

/// Which coefficient a fit's variable is: `(expert, branch, call, index within the call's from)`
/// (branch `None`: shared by the branches).
pub type VarKey = (usize, Option<Branch>, usize, usize);

/// A call's coefficients in the table: `(expert, branch, call)`, branch `None` when shared.
type Key = (usize, Option<Branch>, usize);

/// How a call without stored coefficients starts.
#[derive(Clone, Debug)]
enum Start {
    /// From the order-1 forecast, as plain tensors (zero iterations).
    Taylor,
    /// From the order-1 forecast, as variables of a fit.
    Trainable,
    /// Refused: the profile (named) has none for this call.
    Refuse(String),
}

/// One call's coefficients: the calls combined and one `[C]` tensor per call.
#[derive(Clone, Debug)]
struct Entry {
    from: Vec<usize>,
    weights: Vec<Tensor>,
    vars: Vec<Var>,
}

impl Entry {
    /// The coefficients `weights` on the residuals of `from`: plain tensors, or (`trainable`)
    /// variables a fit moves, which the runs then read.
    fn new(from: Vec<usize>, weights: Vec<Tensor>, trainable: bool) -> Result<Self> {
        if !trainable {
            return Ok(Entry {
                from,
                weights,
                vars: Vec::new(),
            });
        }
        let vars = weights
            .iter()
            .map(Var::from_tensor)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Entry {
            from,
            weights: vars.iter().map(|v| v.as_tensor().clone()).collect(),
            vars,
        })
    }
}

#[derive(Debug)]
struct Table {
    calls: BTreeMap<Key, Entry>,
    /// One set of coefficients per CFG branch (keys name it) rather than one shared set.
    per_branch: bool,
    /// Shared coefficients (`(expert, call)`) each branch starts from where a fit splits a shared
    /// profile per branch; `split_trainable`: the branches' copies are variables.
    split_from: BTreeMap<(usize, usize), Entry>,
    split_trainable: bool,
    start: Start,
    /// Computed residuals each reused call combines (the last ones stored; 2 by default).
    history: usize,
}

/// The coefficients of a run's reused calls, per `(expert, call)`: read from a profile, or (a fit)
/// created at the order-1 forecast the first time a call is reused and trained between runs. Cheap
/// to clone: the clones share the table.
#[derive(Clone, Debug)]
pub struct Coefficients(Arc<Mutex<Table>>);

impl Coefficients {
    fn new(start: Start) -> Self {
        Coefficients(Arc::new(Mutex::new(Table {
            calls: BTreeMap::new(),
            per_branch: false,
            split_from: BTreeMap::new(),
            split_trainable: false,
            start,
            history: DEFAULT_HISTORY,
        })))
    }

    /// The same table with one set of coefficients per CFG branch (`calibrate --fit
    /// --per-branch`): calls not fitted yet start where shared ones would, for each branch apart.
    /// Refused on a table that already holds shared coefficients.
    pub fn per_branch(self) -> Result<Self> {
        let mut t = self.lock()?;
        if t.calls.keys().any(|k| k.1.is_none()) {
            return Err(Error::msg(
                "fitted estimator: a table of shared coefficients cannot become per-branch in place",
            ));
        }
        t.per_branch = true;
        drop(t);
        Ok(self)
    }

    /// Whether each CFG branch has its own coefficients.
    pub fn is_per_branch(&self) -> bool {
        self.lock().is_ok_and(|t| t.per_branch)
    }

    /// The same table combining the last `n` computed residuals (at least 2) in each reused call;
    /// the calls not fitted yet start at the order-1 forecast (0 on the older residuals).
    pub fn with_history(self, n: usize) -> Result<Self> {
        if let Some(why) = crate::profile::history_problem(n) {
            return Err(Error::msg(format!("fitted estimator: {why}")));
        }
        self.lock()?.history = n;
        Ok(self)
    }

    /// Computed residuals each reused call combines.
    pub fn history(&self) -> usize {
        self.lock().map_or(DEFAULT_HISTORY, |t| t.history)
    }

    /// Every call at the order-1 forecast (what zero fit iterations leave).
    pub fn taylor() -> Self {
        Self::new(Start::Taylor)
    }

    /// Every call at the order-1 forecast, as variables: run the cached run inside
    /// `magcache_layers::nn::Differentiable`, backpropagate a loss of its output, and read
    /// [`Coefficients::vars`].
    pub fn trainable() -> Self {
        Self::new(Start::Trainable)
    }

    /// The coefficients of a profile's `[fitted]` table (`file` names it in errors); `n_experts`:
    /// the run's experts, to name their tables.
    pub fn from_profile(fitted: &FittedProfile, file: &str, n_experts: usize) -> Result<Self> {
        Self::read(fitted, file, n_experts, false, false)
    }

    /// [`Coefficients::from_profile`] as variables of a fit that continues the profile's
    /// (`calibrate --fit --start-profile`); calls the profile has no coefficients for are refused.
    /// `per_branch`: each CFG branch gets its own copy of a shared profile's coefficients (a
    /// per-branch profile stays per branch either way).
    pub fn trainable_from(
        fitted: &FittedProfile,
        file: &str,
        n_experts: usize,
        per_branch: bool,
    ) -> Result<Self> {
        Self::read(fitted, file, n_experts, true, per_branch)
    }

    fn read(
        fitted: &FittedProfile,
        file: &str,
        n_experts: usize,
        trainable: bool,
        split: bool,
    ) -> Result<Self> {
        let c = Self::new(Start::Refuse(file.to_string()));
        let mut t = c.lock()?;
        t.per_branch = fitted.per_branch || split;
        t.split_trainable = trainable;
        for expert in 0..n_experts.max(1) {
            let name = crate::profile::expert_name(expert, n_experts.max(1));
            for call in fitted.calls.get(name).into_iter().flatten() {
                let weights = call
                    .weights
                    .iter()
                    .map(|w| Tensor::new(w.as_slice(), &Device::Cpu))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                if t.per_branch && call.branch.is_none() {
                    // Split lazily: a branch's copy is made when the branch first reuses the call.
                    let plain = Entry::new(call.from.clone(), weights, false)?;
                    t.split_from.insert((expert, call.step), plain);
                } else {
                    let entry = Entry::new(call.from.clone(), weights, trainable)?;
                    t.calls.insert((expert, call.branch, call.step), entry);
                }
            }
        }
        drop(t);
        c.with_history(fitted.history)
    }

    fn lock(&self) -> Result<MutexGuard<'_, Table>> {
        self.0
            .lock()
            .map_err(|_| Error::msg("fitted coefficients: lock poisoned"))
    }

    /// The estimate of reused call `step` of `scope` (its expert, and its CFG branch where the
    /// table is per branch): the stored residuals `past` (`(call,
    /// coordinate)`, oldest first) weighted per channel; `at`: the call's coordinate, `channels` the
    /// hidden width, `device` the residuals'.
    pub fn combination(
        &self,
        scope: ScopeKey,
        step: usize,
        past: &[(usize, f64)],
        at: f64,
        channels: usize,
        device: &Device,
    ) -> Result<Combination> {
        let scalars = taylor_weights(past, at)?;
        let from: Vec<usize> = past.iter().map(|p| p.0).collect();
        let (expert, branch) = (scope.expert, scope.branch);
        let mut guard = self.lock()?;
        let t = &mut *guard;
        let history = t.history;
        let key = (expert, t.per_branch.then_some(branch), step);
        let entry = match t.calls.entry(key) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let taylor = || {
                    scalars
                        .iter()
                        .map(|&w| Tensor::full(w as f32, channels, device))
                        .collect::<std::result::Result<Vec<_>, _>>()
                };
                // Only a call's first reuse looks for the shared coefficients a branch splits from.
                let split = t.split_from.get(&(expert, step));
                let entry = match (&t.start, split) {
                    (_, Some(s)) => Entry::new(s.from.clone(), s.weights.clone(), t.split_trainable)?,
                    (Start::Refuse(file), None) => {
                        return Err(Error::config(
                            file,
                            "fitted.calls",
                            format!("no coefficients for reused call {step} of expert {expert}{}: the profile was fitted for another schedule, step count or set of CFG branches (fit again: magcache calibrate --fit)", match key.1 {
                                Some(b) => format!(", branch {}", b.as_str()),
                                None => String::new(),
                            }),
                        ))
                    }
                    (Start::Taylor, None) => Entry::new(from.clone(), taylor()?, false)?,
                    (Start::Trainable, None) => Entry::new(from.clone(), taylor()?, true)?,
                };
                v.insert(entry)
            }
        };
        if entry.from != from {
            return Err(Error::msg(format!(
                "fitted estimator: reused call {step} of expert {expert} has coefficients for the residuals of calls {:?}, the run stores calls {from:?} (at most the last {history} computed): the schedule or `fitted.history` differs from the fitted one",
                entry.from
            )));
        }
        let mut out = Vec::with_capacity(entry.weights.len());
        for w in &entry.weights {
            if w.dims() != [channels] {
                let from = match &t.start {
                    Start::Refuse(file) => format!("{file}: "),
                    _ => String::new(),
                };
                return Err(Error::msg(format!(
                    "{from}fitted estimator: reused call {step} of expert {expert} has {} coefficients per residual, the model's hidden states have {channels} channels (a profile fitted on another model size)",
                    w.elem_count()
                )));
            }
            out.push(w.to_device(device)?.to_dtype(DType::F32)?);
        }
        Ok(Combination {
            weights: scalars,
            share: 1.0,
            channels: Some(out),
        })
    }

    /// The variables of a trainable table, with `(expert, call, index within from)` of each, in a
    /// fixed order.
    pub fn vars(&self) -> Result<Vec<(VarKey, Var)>> {
        let t = self.lock()?;
        Ok(t.calls
            .iter()
            .flat_map(|(&(e, b, k), entry)| {
                entry
                    .vars
                    .iter()
                    .enumerate()
                    .map(move |(j, v)| ((e, b, k, j), v.clone()))
            })
            .collect())
    }

    /// A copy whose tensors are plain (not variables) and no longer follow the fit: for forward
    /// runs that need no graph. Calls not reused yet start at the order-1 forecast.
    pub fn frozen(&self) -> Result<Self> {
        let t = self.lock()?;
        let mut calls = BTreeMap::new();
        for (&key, e) in &t.calls {
            let weights = e
                .weights
                .iter()
                .map(|w| w.detach().copy())
                .collect::<std::result::Result<Vec<_>, _>>()?;
            calls.insert(
                key,
                Entry {
                    from: e.from.clone(),
                    weights,
                    vars: Vec::new(),
                },
            );
        }
        Ok(Coefficients(Arc::new(Mutex::new(Table {
            calls,
            per_branch: t.per_branch,
            split_from: t.split_from.clone(),
            split_trainable: false,
            start: Start::Taylor,
            history: t.history,
        }))))
    }

    /// The table as the profile stores it (`n_experts` names the experts).
    pub fn to_profile_calls(&self, n_experts: usize) -> Result<BTreeMap<String, Vec<FittedCall>>> {
        let t = self.lock()?;
        let mut out: BTreeMap<String, Vec<FittedCall>> = BTreeMap::new();
        for (&(expert, branch, step), e) in &t.calls {
            let weights = e
                .weights
                .iter()
                .map(|w| w.to_dtype(DType::F32)?.to_vec1::<f32>())
                .collect::<std::result::Result<Vec<_>, _>>()?;
            out.entry(crate::profile::expert_name(expert, n_experts.max(1)).to_string())
                .or_default()
                .push(FittedCall {
                    step,
                    branch,
                    from: e.from.clone(),
                    weights,
                });
        }
        Ok(out)
    }
}

/// The order-1 forecast's weights on the stored residuals `past` (`(call, coordinate)`, oldest
/// first) at coordinate `at`: `[1]` for one residual, `[-q, 1 + q]` for the last two.
pub fn taylor_weights(past: &[(usize, f64)], at: f64) -> Result<Vec<f64>> {
    match past {
        [] => Err(Error::msg(
            "fitted estimator: a reused call without a computed residual",
        )),
        [_] => Ok(vec![1.0]),
        [.., (_, sa), (_, sb)] => {
            let d = sb - sa;
            if d == 0.0 || !d.is_finite() {
                return Err(Error::msg(format!(
                    "fitted estimator: two computed calls at the same coordinate ({sa})"
                )));
            }
            let q = (at - sb) / d;
            let mut w = vec![0.0; past.len() - 2];
            w.extend([-q, 1.0 + q]);
            Ok(w)
        }
    }
}

/// `[cache]` checks of `estimator = "fitted"` (with `strategy = "schedule"`): a `profile`, and
/// `compute_steps` (optional, checked against the profile's at build) well formed.
pub fn validate_config(
    file: &str,
    guards: &crate::guards::GuardConfig,
    compute_steps: Option<&[usize]>,
    has_profile: bool,
) -> Result<()> {
    guards.validate(file)?;
    if !has_profile {
        return Err(Error::config(
            file,
            "cache.profile",
            "estimator = \"fitted\" needs profile = \"...\" with a [fitted] table (written by `magcache calibrate --fit`)",
        ));
    }
    match compute_steps {
        Some(s) => crate::search::check_compute_steps(file, s),
        None => Ok(()),
    }
}

/// A fitted profile's schedule for a run: `(compute_steps, scope length, coefficients, note)`;
/// `compute_steps` and `budget` from `[cache]` (of `run_file`), when given, must be the fitted
/// schedule's. The profile (`file`) is the run's family's (the caller checks).
pub fn from_profile(
    prof: &crate::profile::Profile,
    file: &str,
    run_file: &str,
    compute_steps: Option<&[usize]>,
    budget: Option<usize>,
) -> Result<(Vec<usize>, usize, Coefficients, String)> {
    let Some(f) = &prof.fitted else {
        return Err(Error::config(
            file,
            "fitted",
            "the profile has no [fitted] table: fit one with `magcache calibrate --fit --budget N` (or `--compute-steps`)",
        ));
    };
    if let Some(s) = compute_steps {
        if s != f.compute_steps.as_slice() {
            return Err(Error::config(
                run_file,
                "cache.compute_steps",
                format!("{s:?} is not the schedule {file} was fitted for ({:?}): leave it out, or fit this one", f.compute_steps),
            ));
        }
    }
    if let Some(b) = budget {
        if b != f.compute_steps.len() {
            return Err(Error::config(
                run_file,
                "cache.budget",
                format!("{b} computed calls, but {file} was fitted for {} ({:?}): leave it out, or fit for this budget", f.compute_steps.len(), f.compute_steps),
            ));
        }
    }
    let coefs = Coefficients::from_profile(f, file, prof.ratios.len())?;
    // The earlier fits, oldest first, as `[[fitted.earlier]]` lists them.
    let continued = if f.earlier.is_empty() {
        String::new()
    } else {
        let fits: Vec<String> = f
            .earlier
            .iter()
            .map(|e| {
                format!(
                    "{} (iteration {} of {} kept)",
                    seed_list(&e.calibration_seeds),
                    e.best_iteration,
                    e.iterations
                )
            })
            .collect();
        format!(", continuing earlier fits on {}", fits.join(", then "))
    };
    let note = format!(
        "fitted estimator from {file}: computes calls {:?} of {}; each reused call combines the last {} computed residuals per channel{}; fitted on {} (iteration {} of {} Adam iterations kept{continued}); final-latent relative error on them {:.3e} -> {:.3e}, worst held-out PSNR ({}) {:.2} -> {:.2} dB (start: {})",
        f.compute_steps,
        f.steps,
        f.history,
        if f.per_branch { " and CFG branch" } else { "" },
        seed_list(&f.calibration_seeds),
        f.best_iteration,
        f.iterations,
        f.calibration_error[0],
        f.calibration_error[1],
        seed_list(&f.validation_seeds),
        f.validation_psnr_db[0],
        f.validation_psnr_db[1],
        if f.earlier.is_empty() {
            "order-1 forecasting"
        } else {
            "the fit it continued"
        },
    );
    Ok((f.compute_steps.clone(), f.steps, coefs, note))
}

/// Seeds for a note, with their count, runs of consecutive seeds as `a-b`: `64 seeds 1000-1063`,
/// `2 seeds 2000, 2002`, `seed 7`.
pub fn seed_list(seeds: &[u64]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seeds.len() {
        let mut j = i;
        while j + 1 < seeds.len() && seeds[j + 1] == seeds[j].wrapping_add(1) {
            j += 1;
        }
        parts.push(if j > i {
            format!("{}-{}", seeds[i], seeds[j])
        } else {
            seeds[i].to_string()
        });
        i = j + 1;
    }
    match seeds.len() {
        0 => "no seeds".into(),
        1 => format!("seed {}", parts.join(", ")),
        n => format!("{n} seeds {}", parts.join(", ")),
    }
}

/// A fitted schedule runs a scope only at the step count it was fitted for (`fitted_for`; `None`: a
/// fit in progress); `file`: the run file, for the message.
pub fn check_steps(
    file: &str,
    fitted_for: Option<usize>,
    key: magcache_core::ScopeKey,
    steps: usize,
) -> Result<()> {
    match fitted_for {
        Some(n) if n != steps => Err(Error::config(
            file,
            "cache.profile",
            format!("the fitted schedule is for {n} calls per scope, scope {key} runs {steps}: fit at this step count"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::residual::{Estimator, ResidualHistory};
    use magcache_core::Streams;
    use proptest::prelude::*;

    #[test]
    fn a_profile_with_rows_of_two_widths_is_refused_at_load() {
        let call = |step: usize, width: usize| FittedCall {
            step,
            from: vec![0],
            weights: vec![vec![1.0; width]],
            ..Default::default()
        };
        let mut f = FittedProfile {
            compute_steps: vec![0, 3],
            steps: 5,
            ..Default::default()
        };
        f.calls.insert("main".into(), vec![call(1, 4), call(2, 4)]);
        assert!(f.check("p.toml").is_ok());
        f.calls.insert("main".into(), vec![call(1, 4), call(2, 3)]);
        let e = f.check("p.toml").unwrap_err().to_string();
        assert!(
            e.contains("p.toml") && e.contains("fitted.calls.main") && e.contains("rows of 4"),
            "{e}"
        );
    }

    #[test]
    fn seed_lists_read_as_ranges() {
        let r: Vec<u64> = (1000..1064).collect();
        assert_eq!(seed_list(&r), "64 seeds 1000-1063");
        assert_eq!(seed_list(&[2000, 2001, 2002]), "3 seeds 2000-2002");
        assert_eq!(seed_list(&[2000, 2002]), "2 seeds 2000, 2002");
        assert_eq!(seed_list(&[1, 2, 5, 7, 8]), "5 seeds 1-2, 5, 7-8");
        assert_eq!(seed_list(&[7]), "seed 7");
        assert_eq!(seed_list(&[]), "no seeds");
    }

    /// `c`'s combination for reused call `step` of expert 0's `branch`, on the CPU.
    fn reused(
        branch: Branch,
        c: &Coefficients,
        step: usize,
        past: &[(usize, f64)],
        at: f64,
        channels: usize,
    ) -> Result<Combination> {
        c.combination(
            ScopeKey::new(0, branch),
            step,
            past,
            at,
            channels,
            &Device::Cpu,
        )
    }

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, v.len()))
            .unwrap()
    }

    proptest! {
        /// Coefficients at their start (zero iterations) give exactly the order-1 forecast: the
        /// engine's estimate through them equals `taylor1`'s at the same coordinates.
        #[test]
        fn the_start_is_the_order_1_forecast(
            sa in -3.0f64..3.0, gap in 0.05f64..2.0, ahead in 0.0f64..3.0,
            ra in proptest::collection::vec(-5.0f32..5.0, 4),
            rb in proptest::collection::vec(-5.0f32..5.0, 4),
            two in any::<bool>(),
            older in proptest::option::of(proptest::collection::vec(-5.0f32..5.0, 4)),
        ) {
            let sb = sa + gap;
            let at = sb + ahead;
            // With a third, older residual stored (`--history 3`) the start gives it no weight.
            let mut h = ResidualHistory::keeping(Estimator::Taylor1, 3);
            if let (Some(r0), true) = (&older, two) {
                h.push(0, sa - 1.0, Streams::hidden(t(r0)));
            }
            if two {
                h.push(1, sa, Streams::hidden(t(&ra)));
            }
            h.push(2, sb, Streams::hidden(t(&rb)));
            let want = h.estimate(at).unwrap().unwrap().hidden;
            let c = Coefficients::taylor().with_history(3).unwrap();
            let comb = reused(Branch::Cond, &c, 3, &h.points(), at, 4).unwrap();
            let got = h.estimate_with(at, Some(&comb)).unwrap().unwrap().hidden;
            let d = (got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap()
                .to_scalar::<f32>().unwrap();
            let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            prop_assert!(d <= 1e-5 * (1.0 + scale), "{d}");
        }
    }

    #[test]
    fn a_profile_round_trips_and_refuses_other_calls() {
        let c = Coefficients::trainable();
        let past = [(0usize, 1.0f64), (3, 0.5)];
        reused(Branch::Cond, &c, 4, &past, 0.4, 3).unwrap();
        reused(Branch::Cond, &c, 1, &past[..1], 0.9, 3).unwrap();
        let vars = c.vars().unwrap();
        assert_eq!(vars.len(), 3);
        vars[0]
            .1
            .set(&Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap())
            .unwrap();
        let calls = c.to_profile_calls(1).unwrap();
        let fitted = FittedProfile {
            compute_steps: vec![0, 3],
            steps: 5,
            calls,
            ..Default::default()
        };
        fitted.check("p.toml").unwrap();
        let back = Coefficients::from_profile(&fitted, "p.toml", 1).unwrap();
        let comb = reused(Branch::Cond, &back, 1, &past[..1], 0.9, 3).unwrap();
        let w = comb.channels.unwrap()[0].to_vec1::<f32>().unwrap();
        assert_eq!(w, vec![0.5, -1.0, 2.0]);
        // Call 2 was never fitted; call 4 from other calls: both refused, naming the profile.
        let e = reused(Branch::Cond, &back, 2, &past, 0.45, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.toml") && e.contains("call 2"), "{e}");
        let e = reused(Branch::Cond, &back, 4, &[(1, 0.8), (3, 0.5)], 0.4, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[0, 3]"), "{e}");
        let e = reused(Branch::Cond, &back, 1, &past[..1], 0.9, 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("5 channels"), "{e}");
        let mut bad = fitted.clone();
        bad.calls.get_mut("main").unwrap()[0].weights[0][1] = f32::NAN;
        assert!(bad
            .check("p.toml")
            .unwrap_err()
            .to_string()
            .contains("fitted.calls.main"));
        // Three residuals per call need `history = 3` (the profile's, read back with it).
        let c3 = Coefficients::trainable().with_history(3).unwrap();
        let three = [(0usize, 1.0f64), (3, 0.5), (6, 0.3)];
        reused(Branch::Cond, &c3, 7, &three, 0.2, 3).unwrap();
        let mut f3 = FittedProfile {
            compute_steps: vec![0, 3, 6],
            steps: 8,
            calls: c3.to_profile_calls(1).unwrap(),
            ..Default::default()
        };
        let e = f3.check("p.toml").unwrap_err().to_string();
        assert!(
            e.contains("fitted.calls.main") && e.contains("one to 2"),
            "{e}"
        );
        f3.history = 3;
        f3.check("p.toml").unwrap();
        let back3 = Coefficients::from_profile(&f3, "p.toml", 1).unwrap();
        assert_eq!(back3.history(), 3);
        let comb = reused(Branch::Cond, &back3, 7, &three, 0.2, 3).unwrap();
        assert_eq!(
            comb.channels.unwrap()[0].to_vec1::<f32>().unwrap(),
            [0.0; 3]
        );
        f3.history = 9;
        assert!(f3
            .check("p.toml")
            .unwrap_err()
            .to_string()
            .contains("fitted.history"));
        assert!(Coefficients::taylor().with_history(1).is_err());
    }

    /// A continued fit starts at the profile's coefficients, as variables the fit moves; the
    /// calls the profile lacks are refused, not started afresh.
    #[test]
    fn a_continued_fit_starts_at_the_profile() {
        let c = Coefficients::trainable().with_history(3).unwrap();
        let past = [(0usize, 1.0f64), (3, 0.5), (6, 0.3)];
        reused(Branch::Cond, &c, 7, &past, 0.2, 2).unwrap();
        for (j, (_, v)) in c.vars().unwrap().into_iter().enumerate() {
            v.set(&Tensor::new(&[j as f32, -(j as f32)], &Device::Cpu).unwrap())
                .unwrap();
        }
        let fitted = FittedProfile {
            compute_steps: vec![0, 3, 6],
            steps: 8,
            history: 3,
            calls: c.to_profile_calls(1).unwrap(),
            ..Default::default()
        };
        let go = Coefficients::trainable_from(&fitted, "p.toml", 1, false).unwrap();
        assert_eq!(go.history(), 3);
        let vars = go.vars().unwrap();
        assert_eq!(vars.len(), 3);
        assert_eq!(go.to_profile_calls(1).unwrap(), fitted.calls);
        // The variables are what the runs read: a step of the fit moves the estimate.
        vars[2]
            .1
            .set(&Tensor::new(&[5.0f32, 6.0], &Device::Cpu).unwrap())
            .unwrap();
        let comb = reused(Branch::Cond, &go, 7, &past, 0.2, 2).unwrap();
        assert_eq!(
            comb.channels.unwrap()[2].to_vec1::<f32>().unwrap(),
            [5.0, 6.0]
        );
        let e = reused(Branch::Cond, &go, 5, &past[..2], 0.35, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.toml") && e.contains("call 5"), "{e}");
        assert!(Coefficients::from_profile(&fitted, "p.toml", 1)
            .unwrap()
            .vars()
            .unwrap()
            .is_empty());
    }

    /// A shared profile split per branch (`--per-branch`) starts each branch at the shared
    /// coefficients, as variables of their own; the table written back names the branches, and a
    /// per-branch profile read back gives each branch its own.
    #[test]
    fn branches_split_from_shared_coefficients() {
        let past = [(0usize, 1.0f64), (3, 0.5)];
        let c = Coefficients::trainable();
        reused(Branch::Cond, &c, 4, &past, 0.4, 2).unwrap();
        c.vars().unwrap()[0]
            .1
            .set(&Tensor::new(&[0.25f32, -0.5], &Device::Cpu).unwrap())
            .unwrap();
        let shared = FittedProfile {
            compute_steps: vec![0, 3],
            steps: 5,
            calls: c.to_profile_calls(1).unwrap(),
            ..Default::default()
        };
        shared.check("p.toml").unwrap();
        // Read shared, the branches read the same coefficients.
        let plain = Coefficients::from_profile(&shared, "p.toml", 1).unwrap();
        assert!(!plain.is_per_branch());
        let w = |c: &Coefficients, b: Branch| {
            reused(b, c, 4, &past, 0.4, 2).unwrap().channels.unwrap()[0]
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(w(&plain, Branch::Uncond), [0.25, -0.5]);
        let split = Coefficients::trainable_from(&shared, "p.toml", 1, true).unwrap();
        assert!(split.is_per_branch());
        assert_eq!(w(&split, Branch::Cond), [0.25, -0.5]);
        assert_eq!(w(&split, Branch::Uncond), [0.25, -0.5]);
        let vars = split.vars().unwrap();
        let keys: Vec<VarKey> = vars.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                (0, Some(Branch::Cond), 4, 0),
                (0, Some(Branch::Cond), 4, 1),
                (0, Some(Branch::Uncond), 4, 0),
                (0, Some(Branch::Uncond), 4, 1)
            ]
        );
        // Each branch's variables are its own: moving cond's leaves uncond's.
        vars[0]
            .1
            .set(&Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(w(&split, Branch::Cond), [3.0, 4.0]);
        assert_eq!(w(&split, Branch::Uncond), [0.25, -0.5]);
        let frozen = split.frozen().unwrap();
        assert_eq!(w(&frozen, Branch::Cond), [3.0, 4.0]);
        let mut per = FittedProfile {
            per_branch: true,
            calls: split.to_profile_calls(1).unwrap(),
            ..shared.clone()
        };
        per.check("p.toml").unwrap();
        let text = toml::to_string(&per).unwrap();
        assert!(text.contains("per_branch = true") && text.contains("branch = \"uncond\""));
        let back = Coefficients::from_profile(&per, "p.toml", 1).unwrap();
        assert!(back.is_per_branch());
        assert_eq!(w(&back, Branch::Cond), [3.0, 4.0]);
        assert_eq!(w(&back, Branch::Uncond), [0.25, -0.5]);
        // A branch the per-branch profile has no coefficients for is refused.
        let e = reused(Branch::Batched, &back, 4, &past, 0.4, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("p.toml") && e.contains("call 4") && e.contains("branch inference"),
            "{e}"
        );
        // The flag and the calls' branches agree, or the profile is refused.
        per.per_branch = false;
        assert!(per
            .check("p.toml")
            .unwrap_err()
            .to_string()
            .contains("fitted.calls.main"));
        let mut mixed = shared.clone();
        mixed.per_branch = true;
        assert!(mixed
            .check("p.toml")
            .unwrap_err()
            .to_string()
            .contains("per_branch"));
        assert!(split.per_branch().is_ok());
        assert!(plain.per_branch().is_err());
    }
}
