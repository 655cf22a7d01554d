//! `magcache tune`: a strategy, estimator and setting for a quality or speed target, chosen from a
//! calibration run and a few real runs on the run's own inputs, written as a run file.
//!
//! 1. A calibration run (dense: every call computes) gives the reference result and the profile
//!    (forecast errors and residual Gram tables per scope, `magcache calibrate`).
//! 2. Candidates at a budget of `B` computed calls per scope: calibrated schedules searched from
//!    the profile for each estimator and axis (`taylor1`, `foca` in step index and in sigma), the
//!    `taylor1` search with at most one or two calls more than the even spread reused in a row
//!    (`max_consecutive`), and Spectrum with a window growth giving `B` computed calls. Each is
//!    run for real on the run's inputs and compared with the dense result (PSNR over
//!    `data_range`).
//! 3. `--target-speedup S`: `B = floor(steps / S)`; the candidate with the best PSNR wins.
//!    `--target-psnr P`: the smallest `B` whose best candidate keeps `P + margin` dB, found by
//!    bisection over `B` (quality grows with the computed calls); among its candidates the best
//!    PSNR wins.
//!
//! 4. `--fit`: the fitted estimator (`calibrate --fit`, [`crate::fit()`]) is fitted on the best
//!    schedule at the chosen budget (speedup target) or one call cheaper (PSNR target) and run as
//!    one more candidate (beyond `max_runs`: it was asked for), chosen where it beats the choice
//!    (speedup) or keeps `P + margin` with fewer calls (PSNR), never when the fit kept its start;
//!    the profile then carries its `[fitted]` table (`fit_stage.rs`).
//!
//! What was tried (setting, computed calls, PSNR) is reported; the chosen `[cache]` table replaces
//! the run file's in the file written, with the profile beside it.

mod fit_stage;
mod report;

pub use fit_stage::TuneFit;
pub use report::{tune_text, tuned_run_file};

use crate::prepare::{base_dir, prepare_pipeline, without_cache, Prepared};
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
    /// Also fit the fitted estimator (its options; the schedule is the tune's) and try it.
    pub fit: Option<crate::FitOptions>,
    /// Print the fit's progress on stderr.
    pub progress: bool,
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
    /// The calls of the first scope that computed.
    pub schedule: Vec<usize>,
}

/// What `tune` tried and chose.
#[derive(Clone, Debug, Serialize)]
pub struct TuneReport {
    pub target: Target,
    pub steps_per_scope: usize,
    pub tried: Vec<Tried>,
    /// Index into `tried`; `None` when nothing met the target.
    pub chosen: Option<usize>,
    /// With `--fit`: the fit and its candidate (`None` where no schedule was there to fit).
    pub fit: Option<fit_stage::TuneFit>,
    /// What the report should say beyond the table (a fit asked for and not run, and why).
    pub notes: Vec<String>,
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
    // The search with shorter gaps: its price misses how an early error grows along a guided
    // trajectory, and left alone it opens with the longest gap measured (docs/quality.md).
    if budget > 0 && budget < steps {
        let even = (steps - budget).div_ceil(budget);
        for cap in [even + 1, even + 2] {
            if cap < magcache_strategies::schedule::MAX_GAP - 1 && cap < steps - budget {
                out.push((
                    format!("schedule taylor1 step max_consecutive {cap}"),
                    vec![
                        "strategy = \"schedule\"".into(),
                        format!("profile = {}", toml_string(profile)),
                        format!("budget = {budget}"),
                        "estimator = \"taylor1\"".into(),
                        format!("max_consecutive = {cap}"),
                    ],
                ));
            }
        }
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

/// One set of inputs a candidate is measured on: its pipeline and dense result.
struct Inputs {
    p: Prepared,
    dense: Tensor,
    dense_planes: Tensor,
}

struct Runner<'a> {
    /// The run's own inputs, then others (another noise seed).
    inputs: Vec<Inputs>,
    text: String,
    file: String,
    base: std::path::PathBuf,
    data_range: Option<f64>,
    verbosity: Verbosity,
    _config: &'a Path,
}

/// `text` with `[inputs] seed` one past the run's (inputs drawn from a seed only; `None` for
/// inputs read from a file).
fn reseeded(text: &str, file: &str) -> Result<Option<String>> {
    let mut t: toml::Table = text
        .parse()
        .map_err(|e| Error::msg(format!("{file}: {e}")))?;
    let model_seed = t
        .get("model")
        .and_then(|m| m.get("seed"))
        .and_then(|v| v.as_integer())
        .unwrap_or(0);
    let inputs = t
        .entry("inputs")
        .or_insert(toml::Value::Table(Default::default()));
    let Some(tbl) = inputs.as_table_mut() else {
        return Ok(None);
    };
    if tbl.contains_key("file") {
        return Ok(None);
    }
    let seed = tbl
        .get("seed")
        .and_then(|v| v.as_integer())
        .unwrap_or(model_seed);
    tbl.insert("seed".into(), toml::Value::Integer(seed.wrapping_add(1)));
    toml::to_string(&t)
        .map(Some)
        .map_err(|e| Error::msg(format!("{file}: {e}")))
}

impl Runner<'_> {
    /// Runs the candidate `[cache]` lines on every set of inputs; returns (computed calls, total
    /// calls, the worst PSNR, the calls of the first scope that computed).
    fn run(&mut self, cache: &[String]) -> Result<(usize, usize, f64, Vec<usize>)> {
        let text = format!("{}\n[cache]\n{}\n", self.text.trim_end(), cache.join("\n"));
        let cfg = RunConfig::parse(&text, &self.file)?;
        let strategy = cfg.strategy();
        let mut worst = f64::INFINITY;
        let mut first: Option<(usize, usize, Vec<usize>)> = None;
        for inp in &mut self.inputs {
            let info = inp.p.pipeline.model_info();
            let env = BuildEnv {
                file: &self.file,
                base_dir: &self.base,
                model: &info,
            };
            let handle = strategy.build(&env)?.map(CacheHandle::new);
            inp.p.use_cache(handle, strategy.typetag_name())?;
            let (out, rep) = generate(&mut inp.p, self.verbosity)?;
            let planes = inp.p.pipeline.to_planes(&out)?;
            let q = quality(
                &inp.dense,
                &out,
                &inp.dense_planes,
                &planes,
                self.data_range,
            )?;
            worst = worst.min(q.psnr_db);
            if first.is_none() {
                let key = rep.calls.first().map(|c| (c.expert, c.branch.clone()));
                let schedule = rep
                    .calls
                    .iter()
                    .filter(|c| key.as_ref() == Some(&(c.expert, c.branch.clone())))
                    .enumerate()
                    .filter(|(_, c)| c.computed != Some(false))
                    .map(|(i, _)| i)
                    .collect();
                first = Some((rep.computed_calls, rep.total_calls, schedule));
            }
        }
        let (computed, total, schedule) =
            first.ok_or_else(|| Error::msg("tune: no inputs to run on"))?;
        Ok((computed, total, worst, schedule))
    }
}

/// The runs a `tune` measures candidates on: the run file's own inputs (its pipeline `p` and
/// dense result `dense`) and, where the run has a seed, a second noise.
fn runner<'a>(
    config: &'a Path,
    opts: &TuneOptions,
    p: Prepared,
    dense: Tensor,
) -> Result<Runner<'a>> {
    let quiet = Verbosity::Silent;
    let dense_planes = p.pipeline.to_planes(&dense)?;
    let file = config.display().to_string();
    let text = without_cache(&magcache_core::error::read_text(config)?);
    let mut inputs = vec![Inputs {
        p,
        dense,
        dense_planes,
    }];
    // A second noise: a setting is judged by its worse PSNR of the two, so that one lucky noise
    // does not choose it.
    if let Some(other) = reseeded(&text, &file)? {
        let mut p = crate::prepare::prepare_pipeline_text(&other, config)?;
        let (dense, _) = generate(&mut p, quiet)?;
        let dense_planes = p.pipeline.to_planes(&dense)?;
        inputs.push(Inputs {
            p,
            dense,
            dense_planes,
        });
    }
    Ok(Runner {
        inputs,
        file,
        base: base_dir(config),
        text,
        data_range: opts.data_range,
        verbosity: quiet,
        _config: config,
    })
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
    let quiet = Verbosity::Silent;
    if let Some(fo) = &opts.fit {
        fit_stage::precheck(config, fo)?;
    }
    let (profile, _, _, dense) = crate::calibrate::calibrate_run(config, quiet, false)?;
    write(profile_out, profile.to_toml()?.as_bytes())?;
    let p = prepare_pipeline(config)?;
    let plan = p.pipeline.plan();
    let steps = plan.scopes.iter().map(|s| s.steps).max().ok_or_else(|| {
        Error::msg(format!(
            "{}: the run has no transformer calls",
            config.display()
        ))
    })?;
    let mut r = runner(config, opts, p, dense)?;
    // The candidates name the profile relative to the run file's folder: give it absolute.
    let profile_abs = std::path::absolute(profile_out)
        .map_err(|e| Error::msg(format!("{}: {e}", profile_out.display())))?
        .display()
        .to_string();
    let single_scope_steps = plan.scopes.iter().all(|sp| sp.steps == steps);
    // A budget is per scope and may not exceed any scope's calls (scopes of two experts run
    // different step counts): the search stays within the shortest scope.
    let most = plan.scopes.iter().map(|s| s.steps).min().unwrap_or(steps);
    let mut tried: Vec<Tried> = Vec::new();
    let mut ctx = Ctx {
        runner: &mut r,
        tried: &mut tried,
        progress,
        max_runs: opts.max_runs,
        profile_name,
        profile_abs,
        steps,
        best: BTreeMap::new(),
        not_run: 0,
    };
    let chosen = match opts.target {
        Target::Speedup(s) => {
            let b = speedup_budget(&plan, most, s)?;
            let i = ctx.at_budget(b)?;
            let i = match i {
                Some(i) if single_scope_steps => Some(ctx.refine(i, None)?),
                i => i,
            };
            // The budget aims at the target; what the run measured decides (guards or scopes
            // with other step counts can compute more calls than the budget).
            i.filter(|&i| ctx.tried[i].speedup_calls + 1e-9 >= s)
        }
        Target::Psnr(p) => ctx.smallest_budget(p + opts.margin, most, single_scope_steps)?,
    };
    // A search cut short by `--runs` says so (the candidates or moves it did not run).
    let spent = (ctx.not_run > 0).then(|| {
        format!(
            "--runs {}: the run budget was spent before the search ended (at least one more candidate or schedule move was left unrun); a larger --runs may find a better setting",
            opts.max_runs
        )
    });
    let (chosen, fit, mut notes) = match &opts.fit {
        Some(fo) => fit_stage::stage(
            &mut ctx,
            config,
            opts,
            fo,
            &profile,
            profile_out,
            write,
            chosen,
        )?,
        None => (chosen, None, Vec::new()),
    };
    notes.extend(spent);
    Ok(TuneReport {
        target: opts.target,
        steps_per_scope: steps,
        tried,
        chosen,
        fit,
        notes,
    })
}

/// The runs of one `tune`.
struct Ctx<'a, 'r> {
    runner: &'a mut Runner<'r>,
    tried: &'a mut Vec<Tried>,
    progress: &'a mut dyn FnMut(&Tried),
    max_runs: usize,
    profile_name: &'a str,
    /// The calibration profile, absolute (the candidates name it).
    profile_abs: String,
    /// Calls per scope.
    steps: usize,
    /// Best candidate per budget: index into `tried`.
    best: BTreeMap<usize, usize>,
    /// Candidates not run because `max_runs` was spent.
    not_run: usize,
}

impl Ctx<'_, '_> {
    /// The best candidate at budget `b` (each candidate run once, remembered).
    fn at_budget(&mut self, b: usize) -> Result<Option<usize>> {
        if let Some(&i) = self.best.get(&b) {
            return Ok(Some(i));
        }
        let mut top: Option<usize> = None;
        for (label, lines) in candidates(&self.profile_abs, self.steps, b) {
            let Some(i) = self.try_run(label, lines, b)? else {
                break;
            };
            if top.is_none_or(|j| self.tried[j].psnr_db < self.tried[i].psnr_db) {
                top = Some(i);
            }
        }
        if let Some(i) = top {
            self.best.insert(b, i);
        }
        Ok(top)
    }

    /// Bisection for the smallest budget (up to `most`) whose best candidate keeps `want` dB;
    /// then, with real runs left and one step count, the best setting one budget below refined
    /// one move at a time, which may reach `want` with a call fewer.
    fn smallest_budget(&mut self, want: f64, most: usize, refine: bool) -> Result<Option<usize>> {
        let psnr =
            |ctx: &Self, i: Option<usize>| i.map_or(f64::NEG_INFINITY, |i| ctx.tried[i].psnr_db);
        let (mut lo, mut hi) = (2usize.min(most), most);
        let mut found: Option<usize> = None;
        while lo < hi {
            let mid = (lo + hi) / 2;
            let i = self.at_budget(mid)?;
            if psnr(self, i) >= want {
                found = i;
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        if refine {
            if let Some(&below) = found
                .map(|i| self.tried[i].budget.saturating_sub(1))
                .and_then(|b| self.best.get(&b))
            {
                let j = self.refine(below, Some(want))?;
                if self.tried[j].psnr_db >= want {
                    found = Some(j);
                }
            }
        }
        Ok(found)
    }

    /// Runs candidate `lines` and records it; `None` once the run budget is spent.
    fn try_run(
        &mut self,
        label: String,
        lines: Vec<String>,
        budget: usize,
    ) -> Result<Option<usize>> {
        if self.tried.len() >= self.max_runs {
            self.not_run += 1;
            return Ok(None);
        }
        self.record_run(label, lines, budget).map(Some)
    }

    /// Runs candidate `lines` and records it, whatever the run budget (a fit's candidate).
    fn record_run(&mut self, label: String, lines: Vec<String>, budget: usize) -> Result<usize> {
        let (computed, total, psnr, schedule) = self.runner.run(&lines)?;
        let t = Tried {
            cache: lines
                .iter()
                .map(|l| {
                    if l.starts_with("profile = ") {
                        format!("profile = {}", toml_string(self.profile_name))
                    } else {
                        l.clone()
                    }
                })
                .collect(),
            label,
            budget,
            computed_calls: computed,
            total_calls: total,
            speedup_calls: total as f64 / computed.max(1) as f64,
            psnr_db: psnr,
            schedule,
        };
        (self.progress)(&t);
        self.tried.push(t);
        Ok(self.tried.len() - 1)
    }

    /// Hill-climbs the schedule of `tried[start]` (a schedule strategy) by moving one computed
    /// call (never call 0) one step earlier or later, keeping a move that raises the PSNR, until
    /// no move does, `stop` dB is reached, or the run budget is spent. Returns the best index.
    fn refine(&mut self, start: usize, stop: Option<f64>) -> Result<usize> {
        let base = &self.tried[start];
        if !base.cache.iter().any(|l| l == "strategy = \"schedule\"") {
            return Ok(start);
        }
        let keep: Vec<String> = base
            .cache
            .iter()
            .filter(|l| {
                // A moved list is explicit: the search's cap (`max_consecutive`, also a guard at
                // run time) would only add computed calls to it.
                !(l.starts_with("profile")
                    || l.starts_with("budget")
                    || l.starts_with("compute_steps")
                    || l.starts_with("max_consecutive"))
            })
            .cloned()
            .collect();
        let budget = base.budget;
        let n = self
            .runner
            .inputs
            .first()
            .and_then(|i| i.p.pipeline.plan().scopes.first().map(|s| s.steps))
            .unwrap_or(0);
        let mut best = start;
        let mut seen: Vec<Vec<usize>> = vec![self.tried[start].schedule.clone()];
        'improve: loop {
            if stop.is_some_and(|w| self.tried[best].psnr_db >= w) {
                break;
            }
            let cur = self.tried[best].schedule.clone();
            for pos in 1..cur.len() {
                for delta in [-1i64, 1] {
                    let moved = cur[pos] as i64 + delta;
                    let mut s = cur.clone();
                    if moved <= 0 || moved as usize >= n {
                        continue;
                    }
                    s[pos] = moved as usize;
                    if s.windows(2).any(|w| w[0] >= w[1]) || seen.contains(&s) {
                        continue;
                    }
                    seen.push(s.clone());
                    let mut lines = keep.clone();
                    lines.insert(1, format!("compute_steps = {s:?}"));
                    let label = format!("schedule {s:?}");
                    let Some(i) = self.try_run(label, lines, budget)? else {
                        break 'improve;
                    };
                    if self.tried[i].psnr_db > self.tried[best].psnr_db {
                        best = i;
                        continue 'improve;
                    }
                }
            }
            break;
        }
        Ok(best)
    }
}

/// The budget a speedup target `s` is tried at: the largest that meets it, where a budget computes
/// that many calls of every scope (all of a shorter one's; `most`: the shortest scope's calls), so
/// the run's speedup is over its scopes together (two experts may run different counts). A
/// target past what the fewest calls allowed give is refused.
fn speedup_budget(plan: &magcache_core::GenerationPlan, most: usize, s: f64) -> Result<usize> {
    // A scope computes at least one call of every MAX_GAP (the searched schedules reuse at most
    // MAX_GAP - 1 in a row).
    let gap = magcache_strategies::schedule::MAX_GAP;
    let fewest = most.div_ceil(gap).max(1);
    let calls: usize = plan.scopes.iter().map(|sc| sc.steps).sum();
    let speedup = |b: usize| {
        let computed: usize = plan.scopes.iter().map(|sc| b.min(sc.steps)).sum();
        calls as f64 / computed.max(1) as f64
    };
    if s > speedup(fewest) + 1e-9 {
        return Err(Error::msg(format!(
            "--target-speedup {s}: at most {:.2}x on this run (its shortest scope runs {most} calls, and a schedule computes at least one call of every {gap})",
            speedup(fewest)
        )));
    }
    Ok((fewest..=most)
        .rev()
        .find(|&b| speedup(b) + 1e-9 >= s)
        .unwrap_or(fewest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(steps: usize, budget: usize) -> Vec<String> {
        candidates("p.toml", steps, budget)
            .into_iter()
            .flat_map(|(_, lines)| lines)
            .filter(|l| l.starts_with("max_consecutive"))
            .collect()
    }

    /// The capped searches allow one or two reused calls in a row more than the even spread, and
    /// only where that is a cap at all.
    #[test]
    fn capped_candidates_around_the_even_spread() {
        assert_eq!(caps(20, 6), ["max_consecutive = 4", "max_consecutive = 5"]);
        assert_eq!(caps(20, 5), ["max_consecutive = 4", "max_consecutive = 5"]);
        assert_eq!(caps(20, 4), ["max_consecutive = 5", "max_consecutive = 6"]);
        // Past what the calibration measures, or more than the calls left to reuse: none.
        assert!(caps(20, 2).is_empty());
        assert!(caps(20, 19).is_empty());
        // Every candidate is a valid `[cache]` table.
        for (label, lines) in candidates("p.toml", 20, 6) {
            let t: toml::Table = lines.join("\n").parse().unwrap();
            assert!(t.contains_key("strategy"), "{label}");
        }
    }
}
