//! A fit's start: `--start-profile` (the fit it continues, checked against the run), else the
//! order-1 forecast.

use super::FitOptions;
use magcache_core::{Error, Result};
use magcache_strategies::fitted::{Coefficients, EarlierFit, FittedProfile, DEFAULT_HISTORY};
use magcache_strategies::profile::Profile;

/// The coefficients a fit starts from, and the fits it continues: `start`'s (which the caller has
/// checked against the run with [`check_start_fits`]), else the order-1 forecast; per CFG branch
/// with `opts.per_branch`. `profile` is the run's calibration profile.
pub(super) fn start_coefficients(
    start: Option<&StartProfile>,
    opts: &FitOptions,
    profile: &Profile,
) -> Result<(Coefficients, Vec<EarlierFit>)> {
    let n_experts = profile.ratios.len();
    // Branches are the ratio tables' keys per expert (`cond`, `uncond`; a run without CFG, or with
    // CFG in one batched call, has one).
    if opts.per_branch && profile.ratios.values().all(|b| b.len() < 2) {
        return Err(Error::msg(
            "--per-branch: this run has one branch per expert (no CFG, or CFG in one batched call): there is nothing to fit per branch",
        ));
    }
    if let Some((_, f, shown)) = start {
        let mut earlier = f.earlier.clone();
        earlier.push(EarlierFit::of(f));
        let c = Coefficients::trainable_from(f, shown, n_experts, opts.per_branch)?;
        return Ok((c, earlier));
    }
    let c = Coefficients::trainable().with_history(opts.history.unwrap_or(DEFAULT_HISTORY))?;
    let c = if opts.per_branch { c.per_branch()? } else { c };
    Ok((c, Vec::new()))
}

/// A `--start-profile`: the profile (its `[fitted]` table taken out), that table, its name.
pub(super) type StartProfile = (Profile, FittedProfile, String);

/// `opts` with the schedule, axis and history of its `--start-profile` (refused where they
/// differ from the ones given), and that profile; `opts` itself without one.
pub(super) fn start_profile(opts: &FitOptions) -> Result<(Option<StartProfile>, FitOptions)> {
    let Some(path) = &opts.start_profile else {
        return Ok((None, opts.clone()));
    };
    let shown = path.display().to_string();
    let mut prof = Profile::load(path)?;
    let Some(f) = prof.fitted.take() else {
        return Err(Error::config(
            &shown,
            "fitted",
            "--start-profile: the profile has no [fitted] table to continue (write one with `magcache calibrate --fit`)",
        ));
    };
    let differs = |flag: &str, given: String, theirs: String| {
        Err(Error::msg(format!(
            "calibrate --fit: {flag} {given} differs from the fit in {shown} ({theirs}), which --start-profile continues: leave {flag} out"
        )))
    };
    if let Some(s) = opts
        .compute_steps
        .as_ref()
        .filter(|s| **s != f.compute_steps)
    {
        return differs(
            "--compute-steps",
            format!("{s:?}"),
            format!("{:?}", f.compute_steps),
        );
    }
    if let Some(a) = opts.start_axis.filter(|a| *a != f.axis) {
        return differs("--start-axis", format!("{a:?}"), format!("{:?}", f.axis));
    }
    if let Some(h) = opts.history.filter(|h| *h != f.history) {
        return differs("--history", h.to_string(), f.history.to_string());
    }
    let resolved = FitOptions {
        compute_steps: Some(f.compute_steps.clone()),
        start_axis: Some(f.axis),
        history: Some(f.history),
        ..opts.clone()
    };
    Ok((Some((prof, f, shown)), resolved))
}

/// Refuses a start profile (`shown`, its fit `fitted`) fitted for another model or schedule than
/// the run's calibration `profile` with `steps` calls per scope.
pub(super) fn check_start_fits(
    start: &Profile,
    fitted: &FittedProfile,
    shown: &str,
    profile: &Profile,
    steps: usize,
) -> Result<()> {
    let why = if start.meta.family != profile.meta.family {
        Some(format!(
            "it is a profile of `{}`, the run is `{}`",
            start.meta.family, profile.meta.family
        ))
    } else if start.ratios.len() != profile.ratios.len() {
        Some("its experts are not the run's".to_string())
    } else if fitted.steps != steps
        || start.meta.sigmas.len() != profile.meta.sigmas.len()
        || start
            .meta
            .sigmas
            .iter()
            .zip(&profile.meta.sigmas)
            .any(|(a, b)| (a - b).abs() > 1e-6)
    {
        Some("its noise schedule is not the run's (steps, shift or scheduler differ)".to_string())
    } else {
        None
    };
    match why {
        Some(why) => Err(Error::config(
            shown,
            "fitted",
            format!("--start-profile: cannot continue this fit: {why}"),
        )),
        None => Ok(()),
    }
}
