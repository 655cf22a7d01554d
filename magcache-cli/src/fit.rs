//! `magcache calibrate --fit`: the fitted estimator's coefficients (see
//! `magcache_strategies::fitted`), fitted through whole cached runs with candle's autograd.
//!
//! 1. A dense calibration run on the first calibration seed gives the profile (and, with
//!    `--budget`, the schedule: searched for the order-1 forecast in sigma).
//! 2. Dense runs on every calibration and validation seed give the targets (`[inputs] seed` set,
//!    and `[inputs] classes` put in an order drawn from the seed, so a fit sees other class orders
//!    too).
//! 3. Each iteration runs the cached run on every calibration seed inside
//!    `magcache_layers::nn::Differentiable` (the blocks' fused ops without a backward swapped for
//!    their composite forms), with the coefficients as variables; the loss is the final latent's
//!    squared error against the dense run, relative to the dense latents' squared norm, summed
//!    over the batch; one backward per seed, the gradients summed, one Adam step. The backward is
//!    checkpointed (`magcache_core::checkpoint`): the run keeps no block activations, and each
//!    computed call's blocks are recomputed once, alone, for their part of the gradient.
//! 4. Guard against overfitting: every iterate (the start included) is scored on the validation
//!    seeds (worst PSNR against their dense runs); the kept iterate is the best there among those
//!    no worse than the start on the calibration batch. The start is the order-1 forecast (in
//!    sigma unless `--start-axis step`), or with `--start-profile` an earlier fit's coefficients
//!    (its schedule, axis and history, recorded in `[[fitted.earlier]]`): the fit never ends worse
//!    than its start on either set.

mod start;
use start::{check_start_fits, start_coefficients, start_profile};

use crate::prepare::{prepare_pipeline_text, Prepared};
use crate::run::{generate, Verbosity};
use candle_core::{Tensor, Var};
use magcache_core::checkpoint::{self, Checkpoint};
use magcache_core::runtime::metrics::quality;
use magcache_core::{CacheHandle, Error, Result};
use magcache_strategies::engine::Shared;
use magcache_strategies::fitted::{Coefficients, FittedProfile, DEFAULT_HISTORY};
use magcache_strategies::profile::Profile;
use magcache_strategies::residual::{Estimator, EstimatorAxis};
use magcache_strategies::schedule::{Schedule, ScheduleRule};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What `calibrate --fit` fits.
#[derive(Clone, Debug)]
pub struct FitOptions {
    /// Computed calls per scope (the schedule is searched), or
    pub budget: Option<usize>,
    /// the schedule itself.
    pub compute_steps: Option<Vec<usize>>,
    /// Adam iterations (0: the order-1 forecast, unchanged).
    pub iterations: usize,
    pub learning_rate: f64,
    /// Computed residuals each reused call combines (2 to 4; `None`: the start profile's, else 2,
    /// the order-1 forecast's).
    pub history: Option<usize>,
    pub calibration_seeds: Vec<u64>,
    pub validation_seeds: Vec<u64>,
    /// PSNR's data range (`compare --data-range`); default: the dense run's range.
    pub data_range: Option<f64>,
    /// The axis of the order-1 forecast the coefficients start from; `None`: sigma (the study's
    /// start) for `calibrate --fit`, the axis of the schedule it fits for `tune --fit`.
    pub start_axis: Option<EstimatorAxis>,
    /// A profile whose `[fitted]` table the fit continues (its schedule, axis, history and
    /// coefficients) instead of starting from the order-1 forecast.
    pub start_profile: Option<PathBuf>,
    /// One set of coefficients per CFG branch instead of one shared set (a per-branch start
    /// profile stays per branch).
    pub per_branch: bool,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            budget: None,
            compute_steps: None,
            iterations: 30,
            learning_rate: 0.01,
            history: None,
            calibration_seeds: vec![1000, 1001, 1002, 1003],
            validation_seeds: vec![2000, 2001],
            data_range: None,
            start_axis: None,
            start_profile: None,
            per_branch: false,
        }
    }
}

impl FitOptions {
    /// The axis the fit starts from (sigma unless given).
    pub fn axis(&self) -> EstimatorAxis {
        self.start_axis.unwrap_or(EstimatorAxis::Sigma)
    }
}

/// One iteration of the fit.
#[derive(Clone, Debug, Serialize)]
pub struct FitStep {
    pub iteration: usize,
    /// Relative squared error of the final latent over the calibration batch.
    pub calibration_error: f64,
    /// Worst PSNR (dB) over the validation seeds.
    pub validation_psnr_db: f64,
}

/// The fit's record: every iteration, and the wall time.
#[derive(Clone, Debug, Serialize)]
pub struct FitReport {
    pub compute_steps: Vec<usize>,
    pub steps: Vec<FitStep>,
    pub best_iteration: usize,
    pub wall_seconds: f64,
}

/// One seed's run: its pipeline and dense result.
struct Sample {
    p: Prepared,
    dense: Tensor,
    dense_planes: Tensor,
}

/// `text` with `[inputs] seed = seed` and, where it lists `classes`, those in an order drawn from
/// the seed (a Fisher-Yates shuffle on a 64-bit LCG).
fn seeded(text: &str, file: &str, seed: u64) -> Result<String> {
    let mut t: toml::Table = text
        .parse()
        .map_err(|e| Error::msg(format!("{file}: {e}")))?;
    let inputs = t
        .entry("inputs")
        .or_insert(toml::Value::Table(Default::default()));
    let Some(tbl) = inputs.as_table_mut() else {
        return Err(Error::config(file, "inputs", "must be a table"));
    };
    if tbl.contains_key("file") {
        return Err(Error::config(
            file,
            "inputs.file",
            "`calibrate --fit` draws its calibration and validation inputs from seeds: give a run with seeded inputs",
        ));
    }
    let as_i64 =
        |s: u64| i64::try_from(s).map_err(|_| Error::msg(format!("seed {s} is too large")));
    tbl.insert("seed".into(), toml::Value::Integer(as_i64(seed)?));
    if let Some(toml::Value::Array(classes)) = tbl.get_mut("classes") {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        for i in (1..classes.len()).rev() {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let j = ((state >> 33) % (i as u64 + 1)) as usize;
            classes.swap(i, j);
        }
    }
    toml::to_string(&t).map_err(|e| Error::msg(format!("{file}: {e}")))
}

/// The dense run of `config`'s text on `seed`.
fn sample(text: &str, config: &Path, file: &str, seed: u64) -> Result<Sample> {
    let mut p = prepare_pipeline_text(&seeded(text, file, seed)?, config)?;
    let (dense, _) = generate(&mut p, Verbosity::Silent)?;
    let dense_planes = p.pipeline.to_planes(&dense)?;
    Ok(Sample {
        p,
        dense,
        dense_planes,
    })
}

/// Runs `s` with the fitted estimator's `coefs` on `list` (calls not fitted yet start at the
/// order-1 forecast in `axis`); returns the final latents.
fn cached(
    s: &mut Sample,
    list: &[usize],
    coefs: &Coefficients,
    axis: EstimatorAxis,
) -> Result<Tensor> {
    let shared = Shared {
        estimator: Estimator::Fitted,
        estimator_axis: axis,
        ..Default::default()
    };
    let rule = ScheduleRule::fitted(list.to_vec(), coefs.clone());
    let handle = CacheHandle::new(Box::new(Schedule::with_rule(rule, shared)));
    s.p.use_cache(Some(handle), "schedule")?;
    let out = generate(&mut s.p, Verbosity::Silent)?.0;
    // The strategy's stored residuals would keep this run's graph alive past its backward.
    s.p.use_cache(None, "none")?;
    Ok(out)
}

/// Worst PSNR of `coefs` over `samples`.
fn worst_psnr(
    samples: &mut [Sample],
    list: &[usize],
    coefs: &Coefficients,
    range: Option<f64>,
    axis: EstimatorAxis,
) -> Result<f64> {
    let mut worst = f64::INFINITY;
    for s in samples.iter_mut() {
        let out = cached(s, list, coefs, axis)?;
        let planes = s.p.pipeline.to_planes(&out)?;
        let q = quality(&s.dense, &out, &s.dense_planes, &planes, range)?;
        worst = worst.min(q.psnr_db);
    }
    Ok(worst)
}

/// Adam's moments of one variable.
struct Moments {
    m: Tensor,
    v: Tensor,
}

/// One Adam step on `vars` with gradients `grads` (iteration `t`, 1-based).
fn adam_step(
    vars: &[Var],
    grads: &[Tensor],
    moments: &mut Vec<Moments>,
    t: usize,
    lr: f64,
) -> Result<()> {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    if moments.is_empty() {
        for g in grads {
            moments.push(Moments {
                m: g.zeros_like()?,
                v: g.zeros_like()?,
            });
        }
    }
    let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
    for ((var, g), mo) in vars.iter().zip(grads).zip(moments.iter_mut()) {
        mo.m = ((&mo.m * b1)? + (g * (1.0 - b1))?)?;
        mo.v = ((&mo.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
        let step = ((&mo.m / c1)? / ((&mo.v / c2)?.sqrt()? + eps)?)?;
        var.set(&(var.as_tensor() - (step * lr)?)?)?;
    }
    Ok(())
}

/// Checks `opts` before any run.
fn check_options(opts: &FitOptions) -> Result<()> {
    check_common(opts)?;
    if opts.start_profile.is_some() {
        return match opts.budget {
            Some(_) => Err(Error::msg(
                "calibrate --fit: --budget searches a schedule, --start-profile continues the profile's: give one",
            )),
            None => Ok(()),
        };
    }
    match (&opts.compute_steps, opts.budget) {
        (Some(_), None) => Ok(()),
        (None, Some(b)) if b >= 1 => Ok(()),
        _ => Err(Error::msg(
            "calibrate --fit: give either --budget N (N >= 1: the schedule is searched) or --compute-steps 0,...",
        )),
    }
}

/// Checks the options of `opts` other than its schedule (seeds, history, learning rate).
pub(crate) fn check_common(opts: &FitOptions) -> Result<()> {
    if opts.calibration_seeds.is_empty() || opts.validation_seeds.is_empty() {
        return Err(Error::msg(
            "calibrate --fit: give at least one calibration seed and one validation seed",
        ));
    }
    if let Some(s) = opts
        .calibration_seeds
        .iter()
        .find(|s| opts.validation_seeds.contains(s))
    {
        return Err(Error::msg(format!(
            "calibrate --fit: seed {s} is both a calibration and a validation seed: the validation slice must be noise the fit does not see"
        )));
    }
    Coefficients::taylor()
        .with_history(opts.history.unwrap_or(DEFAULT_HISTORY))
        .map_err(|e| Error::msg(format!("calibrate --fit --history: {e}")))?;
    if !(opts.learning_rate.is_finite() && opts.learning_rate > 0.0) {
        return Err(Error::msg(
            "calibrate --fit: --learning-rate must be a positive number",
        ));
    }
    for (what, seeds) in [
        ("calibration", &opts.calibration_seeds),
        ("validation", &opts.validation_seeds),
    ] {
        if let Some(s) = crate::args::repeated(seeds) {
            return Err(Error::msg(format!(
                "calibrate --fit: {what} seed {s} is given twice"
            )));
        }
    }
    crate::args::check_data_range(opts.data_range)
}

/// The schedule of the fit: `opts.compute_steps` checked against the scope's `steps` calls, or the
/// one searched in `profile` for `opts.budget`.
fn schedule(
    opts: &FitOptions,
    profile: &Profile,
    file: &str,
    plan: &magcache_core::GenerationPlan,
    steps: usize,
) -> Result<Vec<usize>> {
    match &opts.compute_steps {
        Some(s) => {
            if s.first() != Some(&0)
                || s.windows(2).any(|w| w[0] >= w[1])
                || s.iter().any(|&k| k >= steps)
            {
                return Err(Error::msg(format!(
                    "calibrate --fit: --compute-steps must start with 0, increase strictly and stay below the scope's {steps} calls"
                )));
            }
            Ok(s.clone())
        }
        None => {
            let budget = opts.budget.unwrap_or(1);
            if budget > steps {
                return Err(Error::msg(format!(
                    "calibrate --fit: --budget {budget} is more than the scope's {steps} calls"
                )));
            }
            ScheduleRule::searched_for_fit(profile, file, budget, plan)
        }
    }
}

/// The fit's loop over its calibration samples `cal` (relative to `norm`) and validation samples
/// `val`: returns the kept coefficients, their iteration and every iteration's record.
fn train(
    cal: &mut [Sample],
    val: &mut [Sample],
    norm: f64,
    list: &[usize],
    opts: &FitOptions,
    coefs: Coefficients,
    progress: bool,
) -> Result<(Coefficients, usize, Vec<FitStep>)> {
    let mut moments = Vec::new();
    let mut record: Vec<FitStep> = Vec::new();
    let (mut best, mut best_it, mut best_psnr) = (None, 0usize, f64::NEG_INFINITY);
    // An iterate past the first whose run overflows (a step too large) ends the fit, which keeps
    // its best iterate so far: it never ends worse than its start.
    let diverged = |it: usize, e: Error| -> Result<()> {
        match e {
            Error::NonFinite { .. } if it > 0 => {
                eprintln!(
                    "warning: calibrate --fit: iteration {it} diverged ({e}): --learning-rate {} is too large for it; the fit stops and keeps its best iterate",
                    opts.learning_rate
                );
                Ok(())
            }
            e => Err(e),
        }
    };
    for it in 0..=opts.iterations {
        let last = it == opts.iterations;
        let (err, grads, vars) = match calibration_pass(cal, norm, list, opts, &coefs, last) {
            Ok(v) => v,
            Err(e) => {
                diverged(it, e)?;
                break;
            }
        };
        if !err.is_finite() && it > 0 {
            eprintln!(
                "warning: calibrate --fit: iteration {it} diverged (a calibration error of {err}): --learning-rate {} is too large for it; the fit stops and keeps its best iterate",
                opts.learning_rate
            );
            break;
        }
        if !err.is_finite() {
            return Err(Error::msg(format!(
                "calibrate --fit: the calibration error is not finite at iteration {it} (lower --learning-rate)"
            )));
        }
        let frozen = coefs.frozen()?;
        let psnr = match worst_psnr(val, list, &frozen, opts.data_range, opts.axis()) {
            Ok(p) => p,
            Err(e) => {
                diverged(it, e)?;
                break;
            }
        };
        let start_err = record.first().map_or(err, |r| r.calibration_error);
        if err <= start_err && psnr > best_psnr {
            (best, best_it, best_psnr) = (Some(frozen), it, psnr);
        }
        if progress {
            eprintln!(
                "fit: iteration {it}/{}: calibration error {err:.4e}, validation worst PSNR {psnr:.2} dB{}",
                opts.iterations,
                if best_it == it { " (best)" } else { "" }
            );
        }
        record.push(FitStep {
            iteration: it,
            calibration_error: err,
            validation_psnr_db: psnr,
        });
        if !last {
            adam_step(&vars, &grads, &mut moments, it + 1, opts.learning_rate)?;
        }
    }
    let best = best.ok_or_else(|| Error::msg("calibrate --fit: no iterate kept"))?;
    Ok((best, best_it, record))
}

/// One pass over the calibration samples `cal` with `coefs`: the summed error (relative to
/// `norm`) and, unless `last`, its gradients with the variables they are for.
fn calibration_pass(
    cal: &mut [Sample],
    norm: f64,
    list: &[usize],
    opts: &FitOptions,
    coefs: &Coefficients,
    last: bool,
) -> Result<(f64, Vec<Tensor>, Vec<Var>)> {
    let (mut err, mut grads, mut vars) = (0.0, Vec::<Tensor>::new(), Vec::<Var>::new());
    for s in cal.iter_mut() {
        let _d = magcache_layers::nn::Differentiable::enter();
        // The blocks keep no graph: the backward recomputes one chain invocation at a time
        // (`magcache_core::checkpoint`), so memory holds one call's activations, not the run's.
        let rec = Checkpoint::record()?;
        let out = cached(s, list, coefs, opts.axis())?;
        let tape = rec.finish()?;
        let loss = ((out - &s.dense)?.sqr()?.sum_all()? / norm)?;
        err += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if last {
            continue;
        }
        let g = checkpoint::backward(&loss, tape, || {
            cached(s, list, coefs, opts.axis()).map(drop)
        })?;
        if vars.is_empty() {
            vars = coefs.vars()?.into_iter().map(|(_, v)| v).collect();
        }
        for (j, v) in vars.iter().enumerate() {
            let gj = match g.get(v.as_tensor()) {
                Some(t) => t.clone(),
                None => v.as_tensor().zeros_like()?,
            };
            match grads.get_mut(j) {
                Some(acc) => *acc = (&*acc + gj)?,
                None => grads.push(gj),
            }
        }
    }
    Ok((err, grads, vars))
}

/// Refuses, from the plan alone (no weights, before any run), a run whose scopes run different
/// step counts (two experts): a fit is one schedule for every scope, which a run then refuses for
/// the scope it does not fit (`what`: the command, for the message).
pub(crate) fn check_one_step_count(
    text: &str,
    file: &str,
    config: &Path,
    what: &str,
) -> Result<()> {
    crate::prepare::link_strategies();
    let cfg = magcache_core::RunConfig::parse(text, file)?;
    let fam = crate::prepare::family_of(&cfg, file)?;
    let plan = (fam.plan)(&cfg, file, &crate::prepare::base_dir(config))?.plan;
    let counts: std::collections::BTreeSet<usize> = plan.scopes.iter().map(|s| s.steps).collect();
    if counts.len() > 1 {
        return Err(Error::msg(format!(
            "{file}: `{what}` fits one schedule for every scope, and this run's scopes run different step counts ({counts:?} calls: two experts): the fitted estimator does not apply to it (a `schedule` with another estimator does)"
        )));
    }
    Ok(())
}

/// Fits the fitted estimator for the run `config` (its `[cache]` is ignored); returns the profile
/// (the dense calibration's tables and the `[fitted]` table) and the fit's record. `progress`
/// prints a line per iteration on stderr.
pub fn fit(config: &Path, opts: &FitOptions, progress: bool) -> Result<(Profile, FitReport)> {
    let started = std::time::Instant::now();
    let file = config.display().to_string();
    let text = crate::prepare::without_cache(&magcache_core::error::read_text(config)?);
    check_options(opts)?;
    check_one_step_count(&text, &file, config, "calibrate --fit")?;
    let (start, opts) = start_profile(opts)?;
    let opts = &opts;
    // Every seed's pipeline reads the same checkpoint: keep its tensors once (as `serve` does)
    // instead of one copy of the weights per seed.
    magcache_layers::weights::warm::keep_warm();
    // The calibration profile, on the first calibration seed.
    let first = opts.calibration_seeds[0];
    let mut p0 = prepare_pipeline_text(&seeded(&text, &file, first)?, config)?;
    let (mut profile, _, _, dense0) =
        crate::calibrate::calibrate_on(&mut p0, config, Verbosity::Silent, false)?;
    let plan = p0.pipeline.plan();
    let steps = plan
        .scopes
        .first()
        .map(|s| s.steps)
        .ok_or_else(|| Error::msg("the run plans no transformer call"))?;
    // A start profile for another model or schedule is refused first, before its calls are
    // checked as if given.
    if let Some((sp, f, shown)) = &start {
        check_start_fits(sp, f, shown, &profile, steps)?;
    }
    let list = schedule(opts, &profile, &file, &plan, steps)?;
    if list.len() >= steps {
        return Err(Error::msg(format!(
            "calibrate --fit: the schedule {list:?} computes every one of the scope's {steps} calls: there is nothing to fit"
        )));
    }
    let dense_planes = p0.pipeline.to_planes(&dense0)?;
    let mut cal = vec![Sample {
        p: p0,
        dense: dense0,
        dense_planes,
    }];
    for &s in &opts.calibration_seeds[1..] {
        cal.push(sample(&text, config, &file, s)?);
    }
    let mut val = opts
        .validation_seeds
        .iter()
        .map(|&s| sample(&text, config, &file, s))
        .collect::<Result<Vec<_>>>()?;
    let norm: f64 = cal
        .iter()
        .map(|s| {
            let n = s
                .dense
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?;
            Ok(n.to_scalar::<f64>()?)
        })
        .sum::<Result<f64>>()?
        .max(f64::MIN_POSITIVE);
    let n_experts = profile.ratios.len();
    let (coefs, earlier) = start_coefficients(start.as_ref(), opts, &profile)?;
    let per_branch = coefs.is_per_branch();
    let history = coefs.history();
    let (best, best_it, record) = train(&mut cal, &mut val, norm, &list, opts, coefs, progress)?;
    profile.fitted = Some(FittedProfile {
        compute_steps: list.clone(),
        steps,
        axis: opts.axis(),
        calibration_seeds: opts.calibration_seeds.clone(),
        validation_seeds: opts.validation_seeds.clone(),
        iterations: opts.iterations,
        best_iteration: best_it,
        learning_rate: opts.learning_rate,
        history,
        calibration_error: [
            record[0].calibration_error,
            record[best_it].calibration_error,
        ],
        validation_psnr_db: [
            record[0].validation_psnr_db,
            record[best_it].validation_psnr_db,
        ],
        calls: best.to_profile_calls(n_experts)?,
        per_branch,
        earlier,
    });
    Ok((
        profile,
        FitReport {
            compute_steps: list,
            steps: record,
            best_iteration: best_it,
            wall_seconds: started.elapsed().as_secs_f64(),
        },
    ))
}
