//! The commands of the command line ([`crate::main`]), one function each, and the checks they
//! share (outputs planned before any work, `--fps`, `--video`).

use crate::args::{CalibrateArgs, CompareArgs, ExportArgs, FitArgs, PlanArgs, RunArgs};
use crate::{generate, install_signal_cleanup, prepare, summary, Outputs, Verbosity};
use magcache_core::Result;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

mod tune;
pub(crate) use tune::tune;

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
    let video_kind = video_kind_of(&config, &video)?;
    let mut outs = plan_outputs(
        &config,
        &[("--plot", &plot), ("--png", &png), ("--video", &video)],
    )?;
    check_png_name(&png)?;
    check_extension("--plot", &plot, "svg", "the plot is written as SVG")?;
    let c = crate::compare(&config, verbosity(quiet, json), data_range, repeat)?;
    let r = &c.report;
    let mut late_warnings = Vec::new();
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
        late_warnings.extend(write_video(&mut outs, v, kind, frames, fps, (1, json))?);
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
    // The cached run's warnings, which the report lists, and those of writing its outputs.
    let mut r = c.report;
    r.cached.warnings.extend(late_warnings);
    if json {
        println!("{}", to_json(&r)?);
    } else if !quiet {
        print!("{}", crate::compare_text(&r));
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
    check_png_name(&png)?;
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
        // Before the report is written: it lists the warning too.
        rep.warnings
            .extend(write_video(&mut outs, v, kind, &frames, fps, (8, json))?);
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

/// `--png` writes PNG and `--plot` SVG: a name with another extension (`out.jpg`, `plot.png`)
/// is refused before any work (after the outputs are checked: an input named as either is
/// refused as such).
fn check_png_name(png: &Option<PathBuf>) -> Result<()> {
    check_extension("--png", png, "png", "the picture is written as PNG")
}

fn check_extension(flag: &str, path: &Option<PathBuf>, ext: &str, what: &str) -> Result<()> {
    let Some(p) = path else { return Ok(()) };
    match p
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
    {
        Some(e) if e != ext => Err(magcache_core::Error::msg(format!(
            "{flag} {}: {what}; give a .{ext} name",
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
/// `per_row` frames a row. A warning it printed (a GIF slower than `fps`; a JSON event where
/// `json`, stderr's form then) is returned for the report's warnings.
fn write_video(
    outs: &mut Outputs,
    path: &Path,
    kind: crate::video::VideoKind,
    frames: &crate::video::Frames,
    fps: u32,
    (per_row, json): (usize, bool),
) -> Result<Option<String>> {
    use crate::video::VideoKind;
    let mut warning = None;
    match kind {
        VideoKind::Png => outs.write(path, &frames.grid_png(per_row)?)?,
        VideoKind::Gif => {
            if fps > crate::video::GIF_MAX_FPS {
                let w = format!(
                    "--video {}: a GIF plays at most {} frames per second (its delays are whole hundredths of a second, and players slow shorter ones to 1/10 s): written at {}, not {fps} (an .mp4 keeps the rate)",
                    path.display(),
                    crate::video::GIF_MAX_FPS,
                    crate::video::GIF_MAX_FPS
                );
                crate::run::say(json, "warning", &w);
                warning = Some(w);
            }
            outs.write(path, &frames.gif(fps)?)?
        }
        VideoKind::Mp4 => {
            let bytes = frames.mp4(fps).map_err(|e| {
                magcache_core::Error::msg(format!("--video {}: {e}", path.display()))
            })?;
            outs.write(path, &bytes)?
        }
    }
    Ok(warning)
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
