//! What `tune` prints and writes: the table of settings tried and the tuned run file.

use super::{Target, Tried, TuneReport};
use crate::prepare::without_cache;

/// The run file `tune` writes: the original (`from`, named in its first line) without its `[cache]`
/// table and its opening comment, then the chosen table.
pub fn tuned_run_file(config_text: &str, from: &str, report: &TuneReport, t: &Tried) -> String {
    let target = match report.target {
        Target::Psnr(p) => format!("PSNR >= {p} dB"),
        Target::Speedup(s) => format!("speedup >= {s}x"),
    };
    // The source's opening comment (its first block of comment lines) described that file (often
    // "dense, no cache"): it is replaced by where this one comes from. Later comments stay.
    let body = without_cache(config_text);
    let body = body
        .lines()
        .skip_while(|l| l.trim_start().starts_with('#'))
        .skip_while(|l| l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    // A path is one comment line, whatever it holds.
    let from: String = from
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    format!(
        "# Written by `magcache tune` from {from}, with the cache table it chose.\n{}\n# Chosen by `magcache tune` for {target}: {} ({}/{} calls computed, {:.2}x fewer; {:.1} dB\n# against the dense run on these inputs; {} settings tried).\n[cache]\n{}\n",
        body.trim_end(),
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
    let mut s =
        String::from("budget  setting                          computed  speedup  PSNR (dB)\n");
    for (i, t) in r.tried.iter().enumerate() {
        s.push_str(&format!(
            "{:>6}  {:<32} {:>5}/{:<3} {:>6.2}x  {:>8.2}{}\n",
            t.budget,
            t.label,
            t.computed_calls,
            t.total_calls,
            t.speedup_calls,
            t.psnr_db,
            if r.chosen == Some(i) {
                "  <- chosen"
            } else {
                ""
            }
        ));
    }
    s.push_str(&super::fit_stage::text(r));
    if r.chosen.is_none() {
        s.push_str("no setting met the target\n");
    }
    s
}
