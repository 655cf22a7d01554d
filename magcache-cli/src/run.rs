//! Running a prepared generation: the observer that collects the calls, the progress display.

use crate::prepare::Prepared;
use crate::report::{CallReport, Report};
use candle_core::Tensor;
use magcache_core::denoise::{CallEvent, Observer};
use magcache_core::{Error, Result};

/// The linear layers' time in a denoise from which an f32 CPU run notes that oneDNN could run
/// them faster on this CPU (`nn::onednn::f32_hint`).
const HINT_LINEAR_SECONDS: f64 = 5.0;

/// What the runner shows while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verbosity {
    /// `--quiet`: warnings and errors only.
    Quiet,
    /// Nothing, warnings included: the runner's own repeated runs (compare's warm-up and repeats,
    /// tune's candidates), whose warnings are those of the runs it reports.
    Silent,
    Normal,
    /// One JSON object per transformer call on stderr (machine-readable progress).
    Json,
}

struct Collector {
    json: bool,
    silent: bool,
    /// `--quiet`: notes are not printed (they stay in the report).
    quiet: bool,
    calls: Vec<CallReport>,
    /// Each call as the threshold check reads it (`CallDecision::compared`).
    compared: Vec<crate::threshold::Compared>,
    warnings: Vec<String>,
    notes: Vec<String>,
    bar: Option<indicatif::ProgressBar>,
    last: String,
}

impl Collector {
    /// Prints a `kind` line (`warning`, `note`) on stderr: a JSON event with `--json` (stderr
    /// carries JSON events only), above a visible bar, or directly (a hidden bar, stderr not a
    /// terminal, would swallow the line).
    fn say(&self, kind: &str, msg: &str) {
        match &self.bar {
            Some(b) if !self.json && !b.is_hidden() => b.println(format!("{kind}: {msg}")),
            _ => say(self.json, kind, msg),
        }
    }
}

/// A `kind` line (`warning`, `note`) on stderr: a JSON event with `--json` (stderr carries JSON
/// events only), else `kind: msg`.
pub(crate) fn say(json: bool, kind: &str, msg: &str) {
    match json {
        true => eprintln!("{}", serde_json::json!({"event": kind, "message": msg})),
        false => eprintln!("{kind}: {msg}"),
    }
}

impl Observer for Collector {
    fn warning(&mut self, msg: &str) {
        // `--quiet` keeps warnings (docs/runner.md): only progress and summaries go.
        if !self.silent {
            self.say("warning", msg);
        }
        self.warnings.push(msg.to_string());
    }
    fn note(&mut self, msg: &str) {
        if !(self.silent || self.quiet) {
            self.say("note", msg);
        }
        self.notes.push(msg.to_string());
    }
    fn call(&mut self, ev: &CallEvent) {
        let computed = ev.decision.map(|d| d.computed);
        if self.json {
            let line = serde_json::json!({
                "event": "call", "step": ev.step, "branch": ev.branch.as_str(), "expert": ev.expert,
                "computed": computed, "metric": ev.decision.and_then(|d| d.metric),
            });
            eprintln!("{line}");
        }
        self.last = format!(
            "expert {} {} {}",
            ev.expert,
            ev.branch,
            match computed {
                Some(false) => "reused",
                _ => "computed",
            }
        );
        self.compared.push(crate::threshold::Compared {
            expert: ev.expert,
            branch: ev.branch.to_string(),
            computed: computed != Some(false),
            value: ev.decision.and_then(|d| d.compared),
        });
        self.calls.push(CallReport {
            step: ev.step,
            branch: ev.branch.to_string(),
            context: ev.branch.to_string(),
            expert: ev.expert,
            timestep: ev.timestep,
            computed,
            metric: ev.decision.and_then(|d| d.metric),
        });
    }
    fn step(&mut self, done: usize, total: usize) {
        match &self.bar {
            Some(b) => {
                b.set_position(done as u64);
                b.set_message(self.last.clone());
            }
            // Not a terminal: a line every few seconds at most (when notes are on).
            None => magcache_core::runtime::progress::tick("denoise: step", done, total),
        }
    }
}

/// Runs the generation of a prepared run; returns the final latents and the report.
pub fn generate(p: &mut Prepared, verbosity: Verbosity) -> Result<(Tensor, Report)> {
    use std::io::IsTerminal;
    let bar = if verbosity == Verbosity::Normal && std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::with_draw_target(
            Some(p.cfg.sampling.steps as u64),
            indicatif::ProgressDrawTarget::stderr(),
        );
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] step {pos}/{len} {msg} ({elapsed})",
            )
            .map_err(|e| Error::msg(format!("progress bar template: {e}")))?
            .progress_chars("=> "),
        );
        b.set_prefix(format!("{} {}", p.cfg.model.family, p.strategy));
        Some(b)
    } else {
        None
    };
    let mut col = Collector {
        json: verbosity == Verbosity::Json,
        silent: verbosity == Verbosity::Silent,
        quiet: verbosity == Verbosity::Quiet,
        calls: Vec::new(),
        compared: Vec::new(),
        warnings: p.notes.clone(),
        notes: Vec::new(),
        bar,
        last: String::new(),
    };
    // The loop's own stage: resets the memory high-water mark, so its peak is the loop's.
    let stage = magcache_core::runtime::progress::Stage::begin("denoise");
    let cpu_before = magcache_layers::nn::timing::cpu_time();
    let out = p.pipeline.generate(&mut col);
    let cpu_time = magcache_layers::nn::timing::cpu_time().since(&cpu_before);
    let denoise = stage.end();
    if let Some(b) = &col.bar {
        b.finish_and_clear();
    }
    let out = out?;
    let bytes = match &p.cache {
        Some(c) => c.lock()?.cached_bytes_by_scope(),
        None => Vec::new(),
    };
    // A scope that computed (nearly) every call says why: its values against the threshold.
    let st = p.cfg.strategy();
    let checks = crate::threshold::threshold_checks(
        &col.compared,
        st.threshold(),
        st.metric_name(),
        st.accumulates(),
    );
    for c in &checks {
        col.warning(&c.warning(&p.strategy));
    }
    // A long f32 denoise on the CPU says where its linear layers could run faster (a short one,
    // the digits model's, would only read the note).
    if p.cfg.model.device == "cpu"
        && p.cfg.model.dtype == "f32"
        && cpu_time.linear_seconds >= HINT_LINEAR_SECONDS
        && magcache_core::runtime::progress::visible()
    {
        // Once per process (`compare` denoises twice).
        static SAID: std::sync::Once = std::sync::Once::new();
        if let Some(h) = magcache_layers::nn::onednn::f32_hint() {
            SAID.call_once(|| {
                eprintln!(
                    "note: the linear layers took {:.1} s of the denoise; {h}",
                    cpu_time.linear_seconds
                )
            });
        }
    }
    let mut report = Report::from_calls(p, col.calls, &denoise, &bytes, col.warnings);
    report.notes = col.notes;
    report.cpu_time =
        (cpu_time.linear_seconds + cpu_time.attention_seconds > 0.0).then_some(cpu_time);
    for c in checks {
        if let Some(sc) = report
            .scopes
            .iter_mut()
            .find(|sc| sc.expert == c.expert && sc.branch == c.branch)
        {
            sc.threshold_check = Some(c);
        }
    }
    Ok((out, report))
}
