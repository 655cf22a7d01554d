//! `magcache compare`: dense and cached runs of one config, side by side.

use crate::prepare::prepare;
use crate::report::Report;
use crate::run::{generate, Verbosity};
use candle_core::Tensor;
use magcache_core::Result;
use serde::Serialize;
use std::path::Path;

/// Dense and cached runs of one config, side by side.
#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    pub family: String,
    pub model: String,
    pub strategy: String,
    pub total_calls: usize,
    pub dense_computed_calls: usize,
    pub cached_computed_calls: usize,
    pub speedup_calls: f64,
    pub dense_wall_seconds: f64,
    pub cached_wall_seconds: f64,
    pub speedup_wall: f64,
    pub quality: magcache_core::metrics::Quality,
    pub threshold: Option<f64>,
    pub cached: Report,
}

/// The outcome of [`compare`]: both results, their image planes, and the report.
pub struct Comparison {
    pub dense: Tensor,
    pub cached: Tensor,
    pub dense_planes: Tensor,
    pub cached_planes: Tensor,
    pub report: CompareReport,
    /// What the strategy's per-call metric measures (plot label).
    pub metric_name: &'static str,
}

/// Runs the config dense and then with its cache, on the same inputs in one process.
pub fn compare(config: &Path, verbosity: Verbosity, data_range: Option<f64>) -> Result<Comparison> {
    let mut p = prepare(config)?;
    let cache = p.cache.take();
    let strategy = std::mem::replace(&mut p.strategy, "none".into());
    p.pipeline.set_cache(None)?;
    let (dense, dense_rep) = generate(&mut p, verbosity)?;
    p.pipeline.set_cache(cache.clone())?;
    p.cache = cache;
    p.strategy = strategy;
    let (cached, rep) = generate(&mut p, verbosity)?;
    let dense_planes = p.pipeline.to_planes(&dense)?;
    let cached_planes = p.pipeline.to_planes(&cached)?;
    let quality = magcache_core::metrics::quality(
        &dense,
        &cached,
        &dense_planes,
        &cached_planes,
        data_range,
    )?;
    let report = CompareReport {
        family: rep.family.clone(),
        model: rep.model.clone(),
        strategy: rep.strategy.clone(),
        total_calls: rep.total_calls,
        dense_computed_calls: dense_rep.computed_calls,
        cached_computed_calls: rep.computed_calls,
        speedup_calls: rep.total_calls as f64 / rep.computed_calls.max(1) as f64,
        dense_wall_seconds: dense_rep.wall_seconds,
        cached_wall_seconds: rep.wall_seconds,
        speedup_wall: dense_rep.wall_seconds / rep.wall_seconds.max(1e-9),
        quality,
        threshold: p.cfg.strategy().threshold(),
        cached: rep,
    };
    Ok(Comparison {
        metric_name: p.cfg.strategy().metric_name(),
        dense,
        cached,
        dense_planes,
        cached_planes,
        report,
    })
}

/// Human table of a comparison.
pub fn compare_text(r: &CompareReport) -> String {
    let q = &r.quality;
    let mut s = String::new();
    s.push_str(&format!("model: {}\n", r.model));
    s.push_str(&format!("| | dense | {} |\n|---|---|---|\n", r.strategy));
    s.push_str(&format!(
        "| transformer calls computed | {}/{} | {}/{} |\n",
        r.dense_computed_calls, r.total_calls, r.cached_computed_calls, r.total_calls
    ));
    s.push_str(&format!(
        "| wall time (s) | {:.3} | {:.3} |\n",
        r.dense_wall_seconds, r.cached_wall_seconds
    ));
    s.push_str(&format!(
        "| speedup (calls / wall) | 1.00x / 1.00x | {:.2}x / {:.2}x |\n",
        r.speedup_calls, r.speedup_wall
    ));
    s.push_str(&format!(
        "| PSNR vs dense (dB, range {:.3}) | - | {:.2} |\n",
        q.data_range, q.psnr_db
    ));
    s.push_str(&format!("| SSIM vs dense | - | {:.4} |\n", q.ssim));
    s.push_str(&format!(
        "| max / mean abs error | - | {:.4} / {:.5} |\n",
        q.max_abs, q.mean_abs
    ));
    let map: String = r
        .cached
        .calls
        .iter()
        .map(|c| if c.computed == Some(false) { '.' } else { '#' })
        .collect();
    s.push_str(&format!("calls (# computed, . reused): {map}\n"));
    for w in &r.cached.warnings {
        s.push_str(&format!("warning: {w}\n"));
    }
    s
}
