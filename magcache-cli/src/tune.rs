//! `magcache tune`: a strategy, estimator and setting for a quality or speed target, chosen from a
//! calibration run and a few real runs on the run's own inputs, written as a run file.
//!
//! 1. A calibration run (dense: every call computes) gives the reference result and the profile
//!    (forecast errors and residual Gram tables per scope, `magcache calibrate`).
//! 2. Candidates at a budget of `B` computed calls per scope: calibrated schedules searched from
//!    the profile for each estimator and axis (`taylor1`, `foca` in step index and in sigma), and
//!    Spectrum with a window growth giving `B` computed calls. Each is run for real on the run's
//!    inputs and compared with the dense result (PSNR over `data_range`).
//! 3. `--target-speedup S`: `B = floor(steps / S)`; the candidate with the best PSNR wins.
//!    `--target-psnr P`: the smallest `B` whose best candidate keeps `P + margin` dB, found by
//!    bisection over `B` (quality grows with the computed calls); among its candidates the best
//!    PSNR wins.
//!
//! What was tried (setting, computed calls, PSNR) is reported; the chosen `[cache]` table replaces
//! the run file's in the file written, with the profile beside it.

use crate::prepare::{base_dir, prepare_pipeline, Prepared};
use crate::run::{generate, Verbosity};
use candle_core::Tensor;
use magcache_core::runtime::metrics::quality;
use magcache_core::{BuildEnv, CacheHandle, Error, Result, RunConfig};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// What `tune` aims for.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Target {
    /// At least this PSNR (dB) against the dense result, with the fewest computed calls.
    Psnr(f64),
    /// At least this call speedup, with the best PSNR.
    Speedup(f64),
}

/// `tune`'s knobs.
#[derive(Clone, Debug)]
pub struct TuneOptions {
    pub target: Target,
    /// Value range for PSNR (default: the dense result's max - min).
    pub data_range: Option<f64>,
    /// With a PSNR target: dB above the target a candidate must keep on the tuning inputs (other
    /// inputs land within about this much).
    pub margin: f64,
    /// Most real runs (besides the calibration run).
    pub max_runs: usize,
}

/// One candidate run.
#[derive(Clone, Debug, Serialize)]
pub struct Tried {
    /// The `[cache]` table's lines (the profile named by its path).
    pub cache: Vec<String>,
    pub label: String,
    pub budget: usize,
    pub computed_calls: usize,
    pub total_calls: usize,
    pub speedup_calls: f64,
    pub psnr_db: f64,
}

/// What `tune` tried and chose.
#[derive(Clone, Debug, Serialize)]
pub struct TuneReport {
    pub target: Target,
    pub steps_per_scope: usize,
    pub tried: Vec<Tried>,
    /// Index into `tried`; `None` when nothing met the target.
    pub chosen: Option<usize>,
}

impl TuneReport {
    pub fn chosen(&self) -> Option<&Tried> {
        self.chosen.and_then(|i| self.tried.get(i))
    }
}

/// The `[cache]` candidates at `budget` computed calls per scope of `steps`: searched schedules and
/// the Spectrum setting with that many computed calls, if one exists.
fn candidates(profile: &str, steps: usize, budget: usize) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for (est, axis) in [
        ("taylor1", "step"),
        ("taylor1", "sigma"),
        ("foca", "sigma"),
        ("foca", "step"),
    ] {
        out.push((
            format!("schedule {est} {axis}"),
            vec![
                "strategy = \"schedule\"".into(),
                format!("profile = {}", toml_string(profile)),
                format!("budget = {budget}"),
                format!("estimator = \"{est}\""),
                format!("estimator_axis = \"{axis}\""),
            ],
        ));
    }
    if let Some(flex) = spectrum_flex(steps, budget) {
        out.push((
            format!("spectrum flex_window {flex}"),
            vec![
                "strategy = \"spectrum\"".into(),
                format!("flex_window = {flex}"),
                "w = 0.5".into(),
            ],
        ));
    }
    out
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The smallest Spectrum `flex_window` (in steps of 0.25, default warm-up and window) computing
/// exactly `budget` of `steps` calls.
fn spectrum_flex(steps: usize, budget: usize) -> Option<f64> {
    (0..=40).map(|i| i as f64 * 0.25).find(|&f| {
        magcache_strategies::SpectrumConfig {
            flex_window: f,
            ..Default::default()
        }
        .computed_calls(steps)
        .is_ok_and(|n| n == budget)
    })
}

/// The run file's text without its `[cache]` table.
fn without_cache(text: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            skipping = t.starts_with("[cache]");
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

struct Runner<'a> {
    p: Prepared,
    text: String,
    file: String,
    base: std::path::PathBuf,
    dense: Tensor,
    dense_planes: Tensor,
    data_range: Option<f64>,
    verbosity: Verbosity,
    _config: &'a Path,
}

impl Runner<'_> {
    /// Runs the candidate `[cache]` lines; returns (computed calls, total calls, PSNR).
    fn run(&mut self, cache: &[String]) -> Result<(usize, usize, f64)> {
        let text = format!("{}\n[cache]\n{}\n", self.text.trim_end(), cache.join("\n"));
        let cfg = RunConfig::parse(&text, &self.file)?;
        let info = self.p.pipeline.model_info();
        let env = BuildEnv {
            file: &self.file,
            base_dir: &self.base,
            model: &info,
        };
        let strategy = cfg.strategy();
        let handle = strategy.build(&env)?.map(CacheHandle::new);
        self.p.pipeline.set_cache(handle.clone())?;
        self.p.cache = handle;
        self.p.strategy = strategy.typetag_name().to_string();
        let (out, rep) = generate(&mut self.p, self.verbosity)?;
        let planes = self.p.pipeline.to_planes(&out)?;
        let q = quality(&self.dense, &out, &self.dense_planes, &planes, self.data_range)?;
        Ok((rep.computed_calls, rep.total_calls, q.psnr_db))
    }
}

/// Tunes `config` for `opts.target`; the profile of the calibration run is written to
/// `profile_out` (the candidates read it) and named in the candidates' tables as `profile_name`.
pub fn tune(
    config: &Path,
    opts: &TuneOptions,
    profile_out: &Path,
    profile_name: &str,
    write: &mut dyn FnMut(&Path, &[u8]) -> Result<()>,
    progress: &mut dyn FnMut(&Tried),
) -> Result<TuneReport> {
    let quiet = Verbosity::Quiet;
    let (profile, _, _, dense) = crate::calibrate::calibrate_run(config, quiet, false)?;
    write(profile_out, profile.to_toml()?.as_bytes())?;
    let p = prepare_pipeline(config)?;
    let plan = p.pipeline.plan();
    let steps = plan
        .scopes
        .iter()
        .map(|s| s.steps)
        .max()
        .ok_or_else(|| Error::msg(format!("{}: the run has no transformer calls", config.display())))?;
    let dense_planes = p.pipeline.to_planes(&dense)?;
    let text = without_cache(&magcache_core::error::read_text(config)?);
    let mut r = Runner {
        file: config.display().to_string(),
        base: base_dir(config),
        p,
        text,
        dense,
        dense_planes,
        data_range: opts.data_range,
        verbosity: quiet,
        _config: config,
    };
    let profile_abs = profile_out.display().to_string();
    let mut tried: Vec<Tried> = Vec::new();
    // Best candidate per budget: index into `tried`.
    let mut best: BTreeMap<usize, usize> = BTreeMap::new();
    let mut at_budget = |r: &mut Runner<'_>, b: usize, tried: &mut Vec<Tried>| -> Result<usize> {
        if let Some(&i) = best.get(&b) {
            return Ok(i);
        }
        let mut top: Option<usize> = None;
        for (label, lines) in candidates(&profile_abs, steps, b) {
            if tried.len() >= opts.max_runs {
                break;
            }
            let (computed, total, psnr) = r.run(&lines)?;
            let t = Tried {
                cache: lines
                    .iter()
                    .map(|l| {
                        if l.starts_with("profile = ") {
                            format!("profile = {}", toml_string(profile_name))
                        } else {
                            l.clone()
                        }
                    })
                    .collect(),
                label,
                budget: b,
                computed_calls: computed,
                total_calls: total,
                speedup_calls: total as f64 / computed.max(1) as f64,
                psnr_db: psnr,
            };
            progress(&t);
            tried.push(t);
            let i = tried.len() - 1;
            if top.is_none_or(|j| tried[j].psnr_db < psnr) {
                top = Some(i);
            }
        }
        let i = top.ok_or_else(|| {
            Error::msg(format!(
                "tune: the run budget (--runs {}) is spent before budget {b} was tried",
                opts.max_runs
            ))
        })?;
        best.insert(b, i);
        Ok(i)
    };
    let chosen = match opts.target {
        Target::Speedup(s) => {
            let b = ((steps as f64 / s).floor() as usize).clamp(1, steps);
            Some(at_budget(&mut r, b, &mut tried)?)
        }
        Target::Psnr(p) => {
            let want = p + opts.margin;
            // Bisection for the smallest budget meeting `want` (budget `steps`: dense, always).
            let (mut lo, mut hi) = (2usize.min(steps), steps);
            let mut found: Option<usize> = None;
            while lo < hi {
                let mid = (lo + hi) / 2;
                let i = at_budget(&mut r, mid, &mut tried)?;
                if tried[i].psnr_db >= want {
                    found = Some(i);
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            found.or_else(|| {
                // Every measured budget below `hi` misses: `hi` itself, if measured and meeting it.
                best.get(&hi)
                    .copied()
                    .filter(|&i| tried[i].psnr_db >= want)
            })
        }
    };
    Ok(TuneReport {
        target: opts.target,
        steps_per_scope: steps,
        tried,
        chosen,
    })
}

/// The run file `tune` writes: the original without its `[cache]`, then the chosen table.
pub fn tuned_run_file(config_text: &str, report: &TuneReport, t: &Tried) -> String {
    let target = match report.target {
        Target::Psnr(p) => format!("PSNR >= {p} dB"),
        Target::Speedup(s) => format!("speedup >= {s}x"),
    };
    format!(
        "{}\n# Chosen by `magcache tune` for {target}: {} ({}/{} calls computed, {:.2}x fewer; {:.1} dB\n# against the dense run on these inputs; {} settings tried).\n[cache]\n{}\n",
        without_cache(config_text).trim_end(),
        t.label,
        t.computed_calls,
        t.total_calls,
        t.speedup_calls,
        t.psnr_db,
        report.tried.len(),
        t.cache.join("\n")
    )
}

/// The table `tune` prints.
pub fn tune_text(r: &TuneReport) -> String {
    let mut s = String::from("budget  setting                          computed  speedup  PSNR (dB)\n");
    for (i, t) in r.tried.iter().enumerate() {
        s.push_str(&format!(
            "{:>6}  {:<32} {:>5}/{:<3} {:>6.2}x  {:>8.2}{}\n",
            t.budget,
            t.label,
            t.computed_calls,
            t.total_calls,
            t.speedup_calls,
            t.psnr_db,
            if r.chosen == Some(i) { "  <- chosen" } else { "" }
        ));
    }
    if r.chosen.is_none() {
        s.push_str("no setting met the target\n");
    }
    s
}
