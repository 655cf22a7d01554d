//! Stages of a run outside the denoising loop (encoding the text, decoding): their wall time and the
//! peak memory at their end, and a one-line progress note on stderr when the runner enables it (a
//! terminal, not `--quiet`).

use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static SHOW: AtomicBool = AtomicBool::new(false);

/// Whether stage notes are printed on stderr (the runner sets it when stderr is a terminal).
pub fn set_visible(on: bool) {
    SHOW.store(on, Ordering::Relaxed);
}

/// One stage: its name, wall time and the process's peak resident memory when it ended.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageTime {
    pub name: String,
    pub wall_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// A stage under way; [`Stage::end`] records it.
pub struct Stage {
    name: String,
    start: Instant,
}

impl Stage {
    pub fn begin(name: &str) -> Stage {
        if SHOW.load(Ordering::Relaxed) {
            eprintln!("{name} ...");
        }
        Stage {
            name: name.to_string(),
            start: Instant::now(),
        }
    }

    pub fn end(self) -> StageTime {
        let t = StageTime {
            name: self.name,
            wall_seconds: self.start.elapsed().as_secs_f64(),
            peak_rss_bytes: peak_rss_bytes(),
        };
        if SHOW.load(Ordering::Relaxed) {
            eprintln!("{} done in {:.1} s", t.name, t.wall_seconds);
        }
        t
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes; `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
