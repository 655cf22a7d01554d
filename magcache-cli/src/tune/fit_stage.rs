//! `tune --fit`: the fitted estimator (`calibrate --fit`, [`crate::fit()`]) fitted on the schedule
//! the tune found and run as one more candidate.
//!
//! - `--target-speedup`: the best schedule at the chosen budget; the fitted candidate (same calls)
//!   wins if its PSNR beats the choice's.
//! - `--target-psnr`: the best schedule one call cheaper than the choice; the fitted candidate wins
//!   if it keeps the target plus the margin.
//!
//! The fit starts from the order-1 forecast (`taylor1`) in the axis that schedule was chosen for
//! (unless `--start-axis` says). A fit that keeps its start (no iterate better on its validation
//! seeds) fitted nothing: its candidate is run for the table but never chosen. Where the fitted
//! candidate wins, the profile written carries the run's calibration and the fit's `[fitted]`
//! table; where it does not, the calibration alone.

use super::{reseeded, toml_string, Ctx, Target, TuneOptions, TuneReport};
use crate::prepare::without_cache;
use magcache_core::{Error, Result};
use magcache_strategies::profile::Profile;
use magcache_strategies::residual::EstimatorAxis;
use serde::Serialize;
use std::path::Path;

/// The fit `tune --fit` ran.
#[derive(Clone, Debug, Serialize)]
pub struct TuneFit {
    /// Index into `tried` of the schedule fitted, and of the fitted candidate.
    pub from: usize,
    pub fitted: usize,
    /// The fit's record (schedule, iterations, wall time).
    pub report: crate::FitReport,
}

/// An error of the fit as `tune --fit` reports it.
fn renamed(e: Error) -> Error {
    Error::msg(e.to_string().replace("calibrate --fit", "tune --fit"))
}

/// Refuses, before the tune's runs, what the fit would refuse.
pub(super) fn precheck(config: &Path, fo: &crate::FitOptions) -> Result<()> {
    crate::fit::check_common(fo).map_err(renamed)?;
    let file = config.display().to_string();
    let text = without_cache(&magcache_core::error::read_text(config)?);
    if reseeded(&text, &file)?.is_none() {
        return Err(Error::config(
            &file,
            "inputs.file",
            "`tune --fit` draws the fit's inputs from seeds: give a run with seeded inputs",
        ));
    }
    crate::fit::check_one_step_count(&text, &file, config, "tune --fit")
}

/// The best schedule candidate tried at budget `b` (a fit starts from a schedule).
fn best_schedule(ctx: &Ctx<'_, '_>, b: usize) -> Option<usize> {
    (0..ctx.tried.len())
        .filter(|&i| {
            let t = &ctx.tried[i];
            t.budget == b && t.cache.iter().any(|l| l == "strategy = \"schedule\"")
        })
        .max_by(|&i, &j| ctx.tried[i].psnr_db.total_cmp(&ctx.tried[j].psnr_db))
}

/// The schedule to fit after the tune chose `chosen` (with a PSNR target `want` dB: a plain
/// candidate run here one call cheaper that keeps it becomes the choice), or why there is none.
fn schedule_to_fit(
    ctx: &mut Ctx<'_, '_>,
    target: Target,
    want: f64,
    chosen: &mut Option<usize>,
) -> Result<std::result::Result<usize, &'static str>> {
    let Some(mut c) = *chosen else {
        return Ok(Err("no setting met the target, so no schedule was fitted"));
    };
    if let Target::Speedup(_) = target {
        return Ok(best_schedule(ctx, ctx.tried[c].budget).ok_or(
            "the chosen setting is not a schedule and no schedule at its budget was run; nothing fitted",
        ));
    }
    loop {
        let b = ctx.tried[c].budget;
        if b <= 1 {
            return Ok(Err(
                "the chosen setting computes one call per scope; none cheaper to fit",
            ));
        }
        match ctx.at_budget(b - 1)? {
            Some(i) if ctx.tried[i].psnr_db >= want => {
                c = i;
                *chosen = Some(i);
            }
            _ => break,
        }
    }
    let b = ctx.tried[c].budget;
    Ok(best_schedule(ctx, b - 1).ok_or(
        "no schedule one call cheaper than the chosen setting was run (raise --runs); nothing fitted",
    ))
}

/// The fit stage: fits, runs the fitted candidate and returns the choice (the fitted candidate
/// where it wins), the fit and the notes for the report. `profile` is the run's calibration, at
/// `profile_out` (rewritten through `write`).
#[allow(clippy::too_many_arguments)]
pub(super) fn stage(
    ctx: &mut Ctx<'_, '_>,
    config: &Path,
    opts: &TuneOptions,
    fo: &crate::FitOptions,
    profile: &Profile,
    profile_out: &Path,
    write: &mut dyn FnMut(&Path, &[u8]) -> Result<()>,
    chosen: Option<usize>,
) -> Result<(Option<usize>, Option<TuneFit>, Vec<String>)> {
    let mut chosen = chosen;
    let want = match opts.target {
        Target::Psnr(p) => p + opts.margin,
        Target::Speedup(_) => f64::INFINITY,
    };
    let from = match schedule_to_fit(ctx, opts.target, want, &mut chosen)? {
        Ok(i) => i,
        Err(why) => return Ok((chosen, None, vec![format!("--fit: {why}")])),
    };
    // Unless told, the fit starts from the forecast the schedule was chosen for.
    let chosen_for = if ctx.tried[from]
        .cache
        .iter()
        .any(|l| l == "estimator_axis = \"sigma\"")
    {
        EstimatorAxis::Sigma
    } else {
        EstimatorAxis::Step
    };
    let fo = crate::FitOptions {
        budget: None,
        compute_steps: Some(ctx.tried[from].schedule.clone()),
        start_axis: Some(fo.start_axis.unwrap_or(chosen_for)),
        ..fo.clone()
    };
    let (fitted, report) = crate::fit(config, &fo, opts.progress).map_err(renamed)?;
    // A fit that kept its start fitted nothing: its candidate is run (the start's PSNR on these
    // inputs, for the table) but never chosen.
    let fitted_something = report.best_iteration > 0;
    // The run's calibration with the fit's table: the other candidates' searches read the same
    // tables as before.
    let mut merged = profile.clone();
    merged.fitted = fitted.fitted;
    write(profile_out, merged.to_toml()?.as_bytes())?;
    let lines = vec![
        "strategy = \"schedule\"".to_string(),
        format!("profile = {}", toml_string(&ctx.profile_abs)),
        "estimator = \"fitted\"".to_string(),
    ];
    let label = format!(
        "fitted {:?}{}",
        ctx.tried[from].schedule,
        if fitted_something {
            ""
        } else {
            " (start kept)"
        }
    );
    let i = ctx.record_run(label, lines, ctx.tried[from].budget)?;
    let t = &ctx.tried[i];
    let wins = fitted_something
        && match opts.target {
            Target::Speedup(s) => {
                t.speedup_calls + 1e-9 >= s
                    && chosen.is_none_or(|c| t.psnr_db > ctx.tried[c].psnr_db)
            }
            Target::Psnr(_) => {
                t.psnr_db >= want
                    && chosen.is_none_or(|c| t.computed_calls < ctx.tried[c].computed_calls)
            }
        };
    if !wins {
        write(profile_out, profile.to_toml()?.as_bytes())?;
    }
    let fit = TuneFit {
        from,
        fitted: i,
        report,
    };
    let notes = if fitted_something {
        Vec::new()
    } else {
        vec!["--fit: the fit kept its start (no iterate beat the order-1 forecast on the validation seeds), so its candidate was not chosen".to_string()]
    };
    Ok((if wins { Some(i) } else { chosen }, Some(fit), notes))
}

/// The report's line on the fit (empty without one).
pub(super) fn text(r: &TuneReport) -> String {
    let Some(f) = &r.fit else {
        return String::new();
    };
    let rec = &f.report;
    let (first, kept) = (rec.steps.first(), rec.steps.get(rec.best_iteration));
    let at = |x: Option<&crate::FitStep>, g: fn(&crate::FitStep) -> f64| x.map_or(f64::NAN, g);
    format!(
        "fit of {} ({} iterations in {:.1} s, iteration {} kept): calibration error {:.4e} -> {:.4e}, worst validation PSNR {:.2} -> {:.2} dB; its candidate was {}chosen\n",
        r.tried.get(f.from).map_or("?", |t| t.label.as_str()),
        rec.steps.len().saturating_sub(1),
        rec.wall_seconds,
        rec.best_iteration,
        at(first, |x| x.calibration_error),
        at(kept, |x| x.calibration_error),
        at(first, |x| x.validation_psnr_db),
        at(kept, |x| x.validation_psnr_db),
        if r.chosen == Some(f.fitted) { "" } else { "not " }
    )
}
