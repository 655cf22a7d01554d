//! `magcache tune`: the flags checked, the outputs planned (the run file and its profile), the
//! search run, and what it chose written.

use super::{fit_options, plan_outputs, refuse_fit_flags, to_json};
use crate::args::TuneArgs;
use magcache_core::Result;
use std::path::Path;

/// `tune`'s target from its two flags (exactly one given).
fn tune_target(target_psnr: Option<f64>, target_speedup: Option<f64>) -> Result<crate::Target> {
    Ok(match (target_psnr, target_speedup) {
        (Some(p), None) if p.is_finite() => crate::Target::Psnr(p),
        (None, Some(s)) if s.is_finite() && s >= 1.0 => crate::Target::Speedup(s),
        (None, None) => {
            return Err(magcache_core::Error::msg(
                "tune: give --target-psnr DB or --target-speedup S",
            ))
        }
        _ => {
            return Err(magcache_core::Error::msg(
                "tune: --target-psnr must be a number of dB, --target-speedup a number >= 1",
            ))
        }
    })
}

/// `tune`'s numbers other than its target: `--data-range`, `--runs`, `--margin` (a PSNR target's
/// only, default 0.5 dB: returned).
fn check_tune_numbers(
    data_range: Option<f64>,
    runs: usize,
    margin: Option<f64>,
    target_psnr: Option<f64>,
) -> Result<f64> {
    if let (Some(m), None) = (margin, target_psnr) {
        return Err(magcache_core::Error::msg(format!(
            "tune: --margin {m} applies to --target-psnr only (dB kept above it)"
        )));
    }
    let margin = margin.unwrap_or(0.5);
    crate::args::check_data_range(data_range)?;
    if runs == 0 {
        return Err(magcache_core::Error::msg(
            "tune: --runs 0 runs no candidate; give at least 1 (default 24)",
        ));
    }
    if !(margin.is_finite() && margin >= 0.0) {
        return Err(magcache_core::Error::msg(format!(
            "tune: --margin {margin}: must be a finite number of dB >= 0"
        )));
    }
    Ok(margin)
}

/// `magcache tune`.
pub(crate) fn tune(a: TuneArgs) -> Result<()> {
    let TuneArgs {
        config,
        out,
        target_psnr,
        target_speedup,
        data_range,
        margin,
        runs,
        fit,
        fit_args,
        quiet,
        json,
    } = a;
    let target = tune_target(target_psnr, target_speedup)?;
    let margin = check_tune_numbers(data_range, runs, margin, target_psnr)?;
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "tuned".into());
    let profile_name = format!("{stem}.profile.toml");
    let profile = out.with_file_name(&profile_name);
    profile_is_replaceable(&out, &profile, &profile_name)?;
    let mut outs = plan_outputs(
        &config,
        &[
            ("--out", &Some(out.clone())),
            ("--out (profile)", &Some(profile.clone())),
        ],
    )?;
    let opts = crate::TuneOptions {
        target,
        data_range,
        margin,
        max_runs: runs,
        fit: if fit {
            Some(fit_options(fit_args, data_range, "tune")?)
        } else {
            refuse_fit_flags(&fit_args, "tune")?;
            None
        },
        progress: !quiet && !json,
    };
    crate::prepare::refuse_moved_paths(&config, &out)?;
    // The candidates read the profile while tuning: it is written into the profile
    // output's temporary (an existing NAME.profile.toml stays as it is) and put in place
    // with the run file, both or neither; a failure or a signal removes the temporary.
    let tmp_profile = outs
        .temporary(&profile)
        .ok_or_else(|| magcache_core::Error::msg("internal: the profile output was not planned"))?;
    let mut write = |_: &Path, bytes: &[u8]| outs.write(&profile, bytes);
    let mut progress = |t: &crate::Tried| {
        if !quiet && !json {
            eprintln!(
                "tried {:<32} {:>3}/{} calls  {:.2} dB",
                t.label, t.computed_calls, t.total_calls, t.psnr_db
            );
        }
    };
    let r = crate::tune(
        &config,
        &opts,
        &tmp_profile,
        &profile_name,
        &mut write,
        &mut progress,
    )?;
    // What the tune could not do that was asked (a fit that ran nothing, a search cut short by
    // --runs), even when quiet.
    for n in &r.notes {
        eprintln!("warning: {n}");
    }
    let Some(t) = r.chosen() else {
        show(&r, json, quiet)?;
        return Err(magcache_core::Error::msg(format!(
            "tune: no setting of the {} tried met the target; nothing written",
            r.tried.len()
        )));
    };
    let text = magcache_core::error::read_text(&config)?;
    let from = config.display().to_string();
    outs.write(&out, crate::tuned_run_file(&text, &from, &r, t).as_bytes())?;
    // The profile goes in place only where the chosen setting reads it.
    let reads_profile = t.cache.iter().any(|l| l.starts_with("profile = "));
    commit(outs, &out, &profile, reads_profile)?;
    show(&r, json, quiet)?;
    if !quiet && !json {
        match reads_profile {
            true => println!("wrote {} and {}", out.display(), profile.display()),
            false => println!("wrote {} (its setting reads no profile)", out.display()),
        }
    }
    Ok(())
}

/// Puts the run file in place, and the profile where the chosen setting reads one. A profile there
/// now is the replaced run file's (checked at start): with a setting that reads none, it goes
/// with that run file.
fn commit(mut outs: crate::Outputs, out: &Path, profile: &Path, reads_profile: bool) -> Result<()> {
    let stale = !reads_profile && std::fs::symlink_metadata(profile).is_ok();
    if !reads_profile {
        outs.discard(profile);
    }
    outs.commit()?;
    if stale {
        if let Err(e) = std::fs::remove_file(profile) {
            eprintln!(
                "warning: {}: the earlier tune's profile, which {} no longer names, could not be removed: {e}",
                profile.display(),
                out.display()
            );
        }
    }
    Ok(())
}

/// The report on stdout: JSON, or the table unless quiet.
fn show(r: &crate::TuneReport, json: bool, quiet: bool) -> Result<()> {
    if json {
        println!("{}", to_json(r)?);
    } else if !quiet {
        print!("{}", crate::tune_text(r));
    }
    Ok(())
}

/// `tune --out NAME.toml` writes its profile to `NAME.profile.toml`, a name the user did not
/// give: a file there is replaced only when it is the profile of the run file `--out` replaces
/// (its `[cache] profile` names it, as an earlier tune's does), and refused otherwise.
fn profile_is_replaceable(out: &Path, profile: &Path, name: &str) -> Result<()> {
    match std::fs::symlink_metadata(profile) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        _ => {}
    }
    let names_it = std::fs::read_to_string(out)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| {
            let cache = t.get("cache")?.as_table()?;
            Some(cache.get("profile")?.as_str()? == name)
        })
        .unwrap_or(false);
    if names_it {
        return Ok(());
    }
    Err(magcache_core::Error::io(
        profile.display().to_string(),
        format!(
            "--out (profile): tune writes its profile here, and this file is not the profile of {} (an earlier tune's); move it or give --out another name",
            out.display()
        ),
    ))
}
