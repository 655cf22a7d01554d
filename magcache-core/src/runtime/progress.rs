//! Stages of a run (encoding the text, loading, denoising, decoding): their wall time and their own
//! peak memory, the run's true peak, and progress notes on stderr.
//!
//! **Peaks.** Linux keeps one high-water mark of resident memory per process (`VmHWM`). A stage's
//! own peak needs that mark reset when the stage begins: [`Stage::begin`] first folds the mark into
//! the run's peak ([`run_peak_rss_bytes`]), then resets it by writing `5` to `/proc/self/clear_refs`
//! (Linux 4.0 and later). Where the reset is refused, a stage's figure is the process's peak so far
//! and [`StageTime::own_peak`] says so.
//!
//! **Notes.** When the runner enables them ([`set_visible`]: not `--quiet`, not `--json`), long
//! stages report [`tick`]s, at most one line every [`TICK_SECONDS`] seconds ([`PROGRESS_SECONDS_ENV`]
//! changes it) (the first after a stage
//! has run that long), and a stage that took that long prints `NAME done in T s (peak M GB)`, on a
//! terminal or not: a log file shows a long run is alive without filling up, and a short run (or a
//! failing one: errors are one line) prints nothing more. On a terminal every stage also prints
//! `NAME ...` when it begins and its `done` line.

use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static SHOW: AtomicBool = AtomicBool::new(false);
static TERMINAL: AtomicBool = AtomicBool::new(false);
/// The largest `VmHWM` seen before a reset, in bytes.
static RUN_PEAK: AtomicU64 = AtomicU64::new(0);
/// When the last tick line was printed.
static LAST_TICK: Mutex<Option<Instant>> = Mutex::new(None);

/// At most one [`tick`] line per this many seconds (by default; [`PROGRESS_SECONDS_ENV`] sets it).
pub const TICK_SECONDS: f64 = 5.0;

/// The environment variable that sets the seconds between progress lines (`0`: every unit, and every
/// stage's `done` line).
pub const PROGRESS_SECONDS_ENV: &str = "MAGCACHE_PROGRESS_SECONDS";

/// Refuses a [`PROGRESS_SECONDS_ENV`] that is set and is not a number of seconds, 0 or more (one
/// line naming it), before a command starts.
pub fn check_env() -> crate::Result<()> {
    match std::env::var(PROGRESS_SECONDS_ENV) {
        Ok(v) if !v.is_empty() && !v.trim().parse::<f64>().is_ok_and(|s| s.is_finite() && s >= 0.0) => {
            Err(crate::Error::msg(format!(
                "{PROGRESS_SECONDS_ENV}={v:?}: expected seconds between progress lines, a number 0 or more (unset: {TICK_SECONDS})"
            )))
        }
        _ => Ok(()),
    }
}

/// The interval in milliseconds (set by [`set_visible`]).
static INTERVAL_MS: AtomicU64 = AtomicU64::new(5000);

fn interval() -> f64 {
    INTERVAL_MS.load(Ordering::Relaxed) as f64 / 1000.0
}

/// Whether stage notes and ticks are printed on stderr (`on`), and whether stderr is a terminal
/// (every stage's begin and end then, else only long stages').
pub fn set_visible(on: bool, terminal: bool) {
    let secs = std::env::var(PROGRESS_SECONDS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(TICK_SECONDS);
    INTERVAL_MS.store((secs * 1000.0) as u64, Ordering::Relaxed);
    SHOW.store(on, Ordering::Relaxed);
    TERMINAL.store(terminal, Ordering::Relaxed);
}

fn terminal() -> bool {
    TERMINAL.load(Ordering::Relaxed)
}

/// Whether stage notes and ticks are printed on stderr.
pub fn visible() -> bool {
    SHOW.load(Ordering::Relaxed)
}

/// One stage: its name, wall time and peak resident memory.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageTime {
    pub name: String,
    pub wall_seconds: f64,
    /// The stage's own peak resident memory when `own_peak`, else the process's peak so far.
    pub peak_rss_bytes: Option<u64>,
    /// Whether `peak_rss_bytes` is this stage's own (the high-water mark was reset when it began).
    pub own_peak: bool,
}

/// A stage under way; [`Stage::end`] records it.
pub struct Stage {
    name: String,
    start: Instant,
    own_peak: bool,
}

impl Stage {
    /// Begins a stage: resets the memory high-water mark (after folding it into the run's peak) and
    /// prints `NAME ...` when notes are visible.
    pub fn begin(name: &str) -> Stage {
        if visible() && terminal() {
            eprintln!("{name} ...");
        }
        // The first tick of this stage comes TICK_SECONDS after its start.
        if let Ok(mut last) = LAST_TICK.lock() {
            *last = Some(Instant::now());
        }
        let own_peak = reset_peak();
        Stage {
            name: name.to_string(),
            start: Instant::now(),
            own_peak,
        }
    }

    /// Ends the stage: its wall time and peak.
    pub fn end(self) -> StageTime {
        let peak = peak_rss_bytes();
        if let Some(p) = peak {
            RUN_PEAK.fetch_max(p, Ordering::Relaxed);
        }
        let t = StageTime {
            name: self.name,
            wall_seconds: self.start.elapsed().as_secs_f64(),
            peak_rss_bytes: peak,
            own_peak: self.own_peak,
        };
        if visible() && (terminal() || t.wall_seconds >= interval()) {
            eprintln!(
                "{} done in {:.1} s{}",
                t.name,
                t.wall_seconds,
                t.peak_rss_bytes
                    .map(|b| format!(" (peak {:.2} GB)", b as f64 / 1e9))
                    .unwrap_or_default()
            );
        }
        t
    }
}

/// Progress inside a long stage: `what` `done`/`total`, printed when notes are visible and the last
/// tick line (or the stage's start) is at least [`TICK_SECONDS`] old.
pub fn tick(what: &str, done: usize, total: usize) {
    if !visible() {
        return;
    }
    let Ok(mut last) = LAST_TICK.lock() else {
        return;
    };
    let due = last.is_none_or(|t| t.elapsed().as_secs_f64() >= interval());
    if due {
        eprintln!("  {what} {done}/{total}");
        *last = Some(Instant::now());
    }
}

/// Folds the current high-water mark into the run's peak and resets it; whether the reset worked.
fn reset_peak() -> bool {
    if let Some(p) = peak_rss_bytes() {
        RUN_PEAK.fetch_max(p, Ordering::Relaxed);
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's resident-memory high-water mark (Linux `VmHWM`) since the last stage began (or
/// since the start), in bytes; `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// The run's true peak resident memory: the largest high-water mark over every stage and now.
pub fn run_peak_rss_bytes() -> Option<u64> {
    let now = peak_rss_bytes()?;
    Some(now.max(RUN_PEAK.load(Ordering::Relaxed)))
}

fn status_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_reports_its_own_peak_and_the_run_keeps_the_largest() {
        if peak_rss_bytes().is_none() {
            return; // not Linux
        }
        // A first stage that touches 256 MB, then a small one.
        let s = Stage::begin("big");
        let v = vec![1u8; 256 << 20];
        let sum: u64 = v.iter().step_by(4096).map(|&x| x as u64).sum();
        assert!(sum > 0);
        drop(v);
        let big = s.end();
        let s = Stage::begin("small");
        let small = s.end();
        let big_peak = big.peak_rss_bytes.unwrap_or(0);
        assert!(big_peak >= 256 << 20, "{big:?}");
        assert!(run_peak_rss_bytes().unwrap_or(0) >= big_peak);
        if small.own_peak {
            // The reset worked: the small stage did not inherit the big one's peak.
            assert!(
                small.peak_rss_bytes.unwrap_or(u64::MAX) + (128 << 20) < big_peak,
                "{small:?} vs {big:?}"
            );
        }
    }
}
