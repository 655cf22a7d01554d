//! The commands of the command line ([`crate::main`]), one function each, and the checks they
//! share (outputs planned before any work, `--fps`, `--video`).

use crate::args::{CalibrateArgs, CompareArgs, ExportArgs, FitArgs, PlanArgs, RunArgs, TuneArgs};
use crate::{generate, install_signal_cleanup, prepare, summary, Outputs, Verbosity};
use magcache_core::Result;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// `magcache calibrate`.
pub(crate) fn calibrate(a: CalibrateArgs) -> Result<()> {
    let CalibrateArgs {
        config,
        out,
        blocks,
        fit,
        budget,
        compute_steps,
        fit_args,
        data_range,
        quiet,
    } = a;
    let mut outs = Outputs::new();
    outs.run_inputs(&config)?;
    if let Some(start) = &fit_args.start_profile {
        // The fit continued is the user's: `--out` never replaces it.
        outs.input(start, "--start-profile");
    }
    outs.plan("--out", &out)?;
    if fit {
        if blocks {
            return Err(magcache_core::Error::msg(
                "calibrate: --blocks and --fit are separate runs: give one",
            ));
        }
        let opts = crate::FitOptions {
            budget,
            compute_steps,
            ..fit_options(fit_args, data_range, "calibrate")?
        };
        let (profile, report) = crate::fit(&config, &opts, !quiet)?;
        outs.write(&out, profile.to_toml()?.as_bytes())?;
        outs.commit()?;
        if !quiet {
            let f = profile.fitted.as_ref();
            println!(
                "fitted calls {:?} of {} in {:.1} s: iteration {} kept; calibration error {:.4e} -> {:.4e}, worst validation PSNR {:.2} -> {:.2} dB; profile written to {}",
                report.compute_steps,
                profile.meta.steps,
                report.wall_seconds,
                report.best_iteration,
                f.map_or(0.0, |f| f.calibration_error[0]),
                f.map_or(0.0, |f| f.calibration_error[1]),
                f.map_or(0.0, |f| f.validation_psnr_db[0]),
                f.map_or(0.0, |f| f.validation_psnr_db[1]),
                out.display()
            );
        }
        return Ok(());
    }
    refuse_fit_flags(&fit_args, "calibrate")?;
    if budget.is_some() || compute_steps.is_some() {
        return Err(magcache_core::Error::msg(
            "calibrate: --budget and --compute-steps choose the schedule of a fit: add --fit",
        ));
    }
    let (profile, report, stats) = crate::calibrate_with(&config, verbosity(quiet, false), blocks)?;
    outs.write(&out, profile.to_toml()?.as_bytes())?;
    outs.commit()?;
    if !quiet {
        if blocks {
            print!("{}", crate::blocks_text(&stats));
        }
        println!(
            "calibrated {} calls over {} steps in {:.3} s; profile written to {}",
            report.total_calls,
            profile.meta.steps,
            report.wall_seconds,
            out.display()
        );
    }
    Ok(())
}

/// The fit's options from its arguments (`command` names the command in errors); no schedule yet.
fn fit_options(a: FitArgs, data_range: Option<f64>, command: &str) -> Result<crate::FitOptions> {
    let d = crate::FitOptions::default();
    let FitArgs {
        iterations,
        learning_rate,
        history,
        calibration_seeds,
        validation_seeds,
        start_axis,
        start_profile,
        per_branch,
    } = a;
    if command == "tune" && start_profile.is_some() {
        return Err(magcache_core::Error::msg(
            "tune --fit: --start-profile continues a fit of `calibrate --fit` (tune chooses its own schedule)",
        ));
    }
    Ok(crate::FitOptions {
        budget: None,
        compute_steps: None,
        iterations: iterations.unwrap_or(d.iterations),
        learning_rate: learning_rate.unwrap_or(d.learning_rate),
        history,
        calibration_seeds: calibration_seeds.unwrap_or(d.calibration_seeds),
        validation_seeds: validation_seeds.unwrap_or(d.validation_seeds),
        data_range,
        start_axis: match start_axis.as_deref() {
            None => None,
            Some("sigma") => Some(magcache_strategies::residual::EstimatorAxis::Sigma),
            Some("step") => Some(magcache_strategies::residual::EstimatorAxis::Step),
            Some(other) => {
                return Err(magcache_core::Error::msg(format!(
                    "{command} --start-axis: `{other}` is not an axis (sigma or step)"
                )))
            }
        },
        start_profile,
        per_branch,
    })
}

/// Refuses the fit's flags given without `--fit` (they would do nothing).
fn refuse_fit_flags(a: &FitArgs, command: &str) -> Result<()> {
    match a.first_given() {
        Some(flag) => Err(magcache_core::Error::msg(format!(
            "{command}: {flag} sets the fit: add --fit"
        ))),
        None => Ok(()),
    }
}

/// `magcache plan`.
pub(crate) fn plan(a: PlanArgs) -> Result<()> {
    let PlanArgs { config, json } = a;
    let r = crate::plan(&config)?;
    if json {
        println!("{}", to_json(&r)?);
    } else {
        for w in &r.warnings {
            eprintln!("warning: {w}");
        }
        for n in &r.notes {
            eprintln!("note: {n}");
        }
        print!("{}", crate::plan_text(&r));
    }
    Ok(())
}

/// `magcache list`.
pub(crate) fn list() -> Result<()> {
    print!("{}", crate::list());
    Ok(())
}

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

/// `tune`'s numbers other than its target: `--data-range`, `--runs`, `--margin`.
fn check_tune_numbers(data_range: Option<f64>, runs: usize, margin: f64) -> Result<()> {
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
    Ok(())
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
    if let (Some(m), None) = (margin, target_psnr) {
        return Err(magcache_core::Error::msg(format!(
            "tune: --margin {m} applies to --target-psnr only (dB kept above it)"
        )));
    }
    let margin = margin.unwrap_or(0.5);
    check_tune_numbers(data_range, runs, margin)?;
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
        if json {
            println!("{}", to_json(&r)?);
        } else if !quiet {
            print!("{}", crate::tune_text(&r));
        }
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
    if !reads_profile {
        outs.discard(&profile);
    }
    outs.commit()?;
    if json {
        println!("{}", to_json(&r)?);
    } else if !quiet {
        print!("{}", crate::tune_text(&r));
        match reads_profile {
            true => println!("wrote {} and {}", out.display(), profile.display()),
            false => println!("wrote {} (its setting reads no profile)", out.display()),
        }
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

/// `magcache export`.
pub(crate) fn export(a: ExportArgs) -> Result<()> {
    let ExportArgs {
        config,
        out,
        shard_gb,
        gguf,
        pipeline,
        quiet,
    } = a;
    if !(shard_gb.is_finite() && shard_gb > 0.0) {
        return Err(magcache_core::Error::msg(format!(
            "--shard-gb must be a positive number of GB, got {shard_gb}"
        )));
    }
    install_signal_cleanup();
    let t0 = std::time::Instant::now();
    let mut progress = |line: &str| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    let shard_bytes = (shard_gb * 1e9) as u64;
    let format = match gguf {
        Some(quant) => crate::export::Format::Gguf { quant },
        None if pipeline => crate::export::Format::Pipeline { shard_bytes },
        None => crate::export::Format::Safetensors { shard_bytes },
    };
    let r = crate::export_as(&config, &out, &format, &mut progress)?;
    if !quiet {
        println!(
            "wrote {}: {} tensors, {:.2} GB in {:.1} s",
            r.out.display(),
            r.tensors,
            r.bytes as f64 / 1e9,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `magcache compare`.
pub(crate) fn compare(a: CompareArgs) -> Result<()> {
    let CompareArgs {
        config,
        plot,
        png,
        video,
        fps,
        data_range,
        repeat,
        quiet,
        json,
    } = a;
    if repeat == 0 {
        return Err(magcache_core::Error::msg(
            "--repeat 0: must be at least 1 (timed runs of each kind)",
        ));
    }
    crate::args::check_data_range(data_range)?;
    check_fps(fps)?;
    check_png_name(&png)?;
    let video_kind = video_kind_of(&config, &video)?;
    let mut outs = plan_outputs(
        &config,
        &[("--plot", &plot), ("--png", &png), ("--video", &video)],
    )?;
    let c = crate::compare(&config, verbosity(quiet, json), data_range, repeat)?;
    let r = &c.report;
    if let Some(f) = &plot {
        let title = format!(
            "{} {} ({} computed of {} calls)",
            r.family, r.strategy, r.cached_computed_calls, r.total_calls
        );
        let svg = crate::image::calls_svg(&title, &r.cached.calls, r.threshold, c.metric_name);
        outs.write(f, svg.as_bytes())?;
    }
    let side_by_side = match &c.decoded {
        Some((d, k)) => Some(crate::video::Frames::comparison(d, k, 4.0)?),
        None => None,
    };
    if let (Some(v), Some(kind)) = (&video, video_kind) {
        let frames = side_by_side.as_ref().ok_or_else(|| {
            magcache_core::Error::msg(format!(
                "--video {}: the run produced no decoded frames",
                v.display()
            ))
        })?;
        let fps = fps.or(c.frame_rate).unwrap_or(16);
        write_video(&mut outs, v, kind, frames, fps, 1)?;
    }
    if let (Some(f), Some(frames)) = (&png, &side_by_side) {
        // A video's picture: at most 9 frames, evenly spaced, one row each.
        outs.write(f, &frames.evenly(9).grid_png(1)?)?;
    } else if let Some(f) = &png {
        let (lo, hi) = picture_range(&c.dense_planes, data_range)?;
        let diff = ((&c.dense_planes - &c.cached_planes)?.abs()? * 4.0)?;
        let diff = (diff + lo as f64)?;
        let bytes = crate::image::planes_png(
            &[c.dense_planes.clone(), c.cached_planes.clone(), diff],
            lo,
            hi,
            16,
            4,
        )?;
        outs.write(f, &bytes)?;
    }
    outs.commit()?;
    if json {
        println!("{}", to_json(r)?);
    } else if !quiet {
        print!("{}", crate::compare_text(r));
        print!("{}", crate::report::warnings_tail(&r.cached.warnings));
    }
    Ok(())
}

/// `magcache run`.
pub(crate) fn run(a: RunArgs) -> Result<()> {
    let RunArgs {
        config,
        out,
        report,
        quiet,
        json,
        png,
        video,
        fps,
    } = a;
    let start = std::time::Instant::now();
    check_fps(fps)?;
    check_png_name(&png)?;
    let video_kind = video_kind_of(&config, &video)?;
    let mut outs = plan_outputs(
        &config,
        &[
            ("--out", &out),
            ("--report", &report),
            ("--png", &png),
            ("--video", &video),
        ],
    )?;
    // Stage notes on stderr; not on a terminal, only for long stages (a log shows a long
    // stage is alive; a short or failing run prints nothing more).
    let terminal = std::io::stderr().is_terminal();
    magcache_core::runtime::progress::set_visible(!quiet && !json, terminal);
    let mut p = prepare(&config)?;
    if !quiet && !json && terminal {
        eprintln!("{}", p.pipeline.describe());
    }
    let (latents, mut rep) = generate(&mut p, verbosity(quiet, json))?;
    // The transformer is not needed to decode: freed first.
    p.pipeline.release_models();
    let finished = p.pipeline.finish(&latents)?;
    rep.set_stages(p.pipeline.stages(), start);
    if let Some(o) = &out {
        let mut tensors = vec![("final", &latents)];
        tensors.extend(finished.iter().flat_map(|d| d.named()));
        outs.write_tensors(o, &tensors)?;
    }
    let decoded = finished.as_ref().map(|d| &d.pixels);
    if let Some(f) = &png {
        let bytes = match decoded {
            Some(d) => crate::video::Frames::from_decoded(d)?.grid_png(8)?,
            None => {
                let planes = p.pipeline.to_planes(&latents)?;
                let (lo, hi) = picture_range(&planes, None)?;
                crate::image::planes_png(&[planes], lo, hi, 16, 4)?
            }
        };
        outs.write(f, &bytes)?;
    }
    if let (Some(v), Some(kind)) = (&video, video_kind) {
        let d = decoded.ok_or_else(|| {
            magcache_core::Error::msg("--video: the run produced no decoded frames")
        })?;
        let frames = crate::video::Frames::from_decoded(d)?;
        let fps = fps.or(p.pipeline.frame_rate()).unwrap_or(16);
        write_video(&mut outs, v, kind, &frames, fps, 8)?;
    }
    if let Some(r) = &report {
        let text = serde_json::to_string_pretty(&rep)
            .map_err(|e| magcache_core::Error::msg(e.to_string()))?;
        outs.write(r, text.as_bytes())?;
    }
    outs.commit()?;
    if json {
        println!("{}", to_json(&rep)?);
    } else if !quiet {
        print!("{}", summary(&rep));
        print!("{}", crate::report::warnings_tail(&rep.warnings));
    }
    Ok(())
}

fn verbosity(quiet: bool, json: bool) -> Verbosity {
    if json {
        Verbosity::Json
    } else if quiet {
        Verbosity::Quiet
    } else {
        Verbosity::Normal
    }
}

/// The outputs of a command over `config`, each checked (not an input, not another output, a
/// writable folder) before any work.
fn plan_outputs(config: &Path, outputs: &[(&str, &Option<PathBuf>)]) -> Result<Outputs> {
    let mut o = Outputs::new();
    o.run_inputs(config)?;
    for (flag, path) in outputs {
        if let Some(p) = path {
            o.plan(flag, p)?;
        }
    }
    Ok(o)
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| magcache_core::Error::msg(e.to_string()))
}

/// `--png` writes PNG: a name with another extension (`out.jpg`) is refused before any work.
fn check_png_name(png: &Option<PathBuf>) -> Result<()> {
    let Some(p) = png else { return Ok(()) };
    match p
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
    {
        Some(e) if e != "png" => Err(magcache_core::Error::msg(format!(
            "--png {}: the picture is written as PNG; give a .png name",
            p.display()
        ))),
        _ => Ok(()),
    }
}

/// `--fps` must be 1 to 1000 (frames per second of `--video`), checked before any work.
fn check_fps(fps: Option<u32>) -> Result<()> {
    match fps {
        Some(f) if f == 0 || f > 1000 => Err(magcache_core::Error::msg(format!(
            "--fps {f}: must be 1 to 1000 (frames per second of --video)"
        ))),
        _ => Ok(()),
    }
}

/// The container `--video` asks for, checked before any work: only a prompted run (a `[prompt]`
/// table) has decoded frames.
fn video_kind_of(
    config: &Path,
    video: &Option<PathBuf>,
) -> Result<Option<crate::video::VideoKind>> {
    let Some(v) = video else {
        return Ok(None);
    };
    let cfg = magcache_core::RunConfig::load(config)?;
    if cfg.prompt.is_none() {
        return Err(magcache_core::Error::msg(format!(
            "--video {}: only a prompted run (a `[prompt]` table) has decoded frames to write",
            v.display()
        )));
    }
    Ok(Some(crate::video::video_kind("--video", v)?))
}

/// Writes `frames` at `fps` as `kind` into `path` (through the planned outputs); a PNG grid holds
/// `per_row` frames a row.
fn write_video(
    outs: &mut Outputs,
    path: &Path,
    kind: crate::video::VideoKind,
    frames: &crate::video::Frames,
    fps: u32,
    per_row: usize,
) -> Result<()> {
    use crate::video::VideoKind;
    match kind {
        VideoKind::Png => outs.write(path, &frames.grid_png(per_row)?),
        VideoKind::Gif => outs.write(path, &frames.gif(fps)?),
        VideoKind::Mp4 => {
            let bytes = frames.mp4(fps).map_err(|e| {
                magcache_core::Error::msg(format!("--video {}: {e}", path.display()))
            })?;
            outs.write(path, &bytes)
        }
    }
}

/// The value range pictures are drawn with: `data_range` centred on the data, or its min..max.
fn picture_range(
    planes: &candle_core::Tensor,
    data_range: Option<f64>,
) -> magcache_core::Result<(f32, f32)> {
    let v = planes.flatten_all()?.to_vec1::<f32>()?;
    let (lo, hi) = v
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
    Ok(match data_range {
        Some(r) => {
            let mid = (lo + hi) / 2.0;
            (mid - r as f32 / 2.0, mid + r as f32 / 2.0)
        }
        None => (lo, hi),
    })
}
