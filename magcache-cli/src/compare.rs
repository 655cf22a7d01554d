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
    /// Median wall time of the timed dense runs.
    pub dense_wall_seconds: f64,
    /// Median wall time of the timed cached runs.
    pub cached_wall_seconds: f64,
    /// `dense_wall_seconds / cached_wall_seconds` (medians).
    pub speedup_wall: f64,
    /// Timed runs of each kind (`--repeat`).
    pub repeat: usize,
    /// Every timed dense run's wall time, in the order run.
    pub dense_wall_runs: Vec<f64>,
    /// Every timed cached run's wall time, in the order run.
    pub cached_wall_runs: Vec<f64>,
    /// The untimed run made before timing: `"cached"` (one full run with the cache).
    pub warmup: String,
    /// The cached result against the dense one: on the decoded pixels for a prompted run (both
    /// finals decoded; [`magcache_core::runtime::metrics::pixel_quality`]), else on the final
    /// latents (which are the pixels for models without a decoder, the digits model).
    pub quality: magcache_core::runtime::metrics::Quality,
    /// What `quality` was measured on: `"pixels"` or `"latents"`.
    pub quality_on: String,
    /// The final latents' figures of a prompted run (where `quality` is the pixels'); absent
    /// otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latent_quality: Option<magcache_core::runtime::metrics::Quality>,
    pub threshold: Option<f64>,
    pub cached: Report,
}

/// The outcome of [`compare`]: both results, their image planes, and the report.
pub struct Comparison {
    pub dense: Tensor,
    pub cached: Tensor,
    pub dense_planes: Tensor,
    pub cached_planes: Tensor,
    /// Both finals decoded (`[B, F, H, W, 3]` or `[B, H, W, 3]` in [0, 1]) for a prompted run.
    pub decoded: Option<(Tensor, Tensor)>,
    /// Frames per second of the family's videos (`Pipeline::frame_rate`).
    pub frame_rate: Option<u32>,
    pub report: CompareReport,
    /// What the strategy's per-call metric measures (plot label).
    pub metric_name: &'static str,
}

/// The median of `v` (the mean of the middle two for an even count); 0 for none.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Runs the config dense and with its cache, on the same inputs in one process.
///
/// Timing: first one untimed run with the cache (the shorter kind; it pays the cold-start costs,
/// first allocations, page faults of the weights, lazy initialisation, for both kinds since they
/// share the model), then `repeat` timed runs of each kind, alternated (dense first in odd rounds,
/// cached first in even ones) so neither kind always runs on a warmer or a busier machine. The
/// wall times reported are the medians. Results are those of the first timed runs (every run of a
/// kind is the same computation on the same inputs).
pub fn compare(
    config: &Path,
    verbosity: Verbosity,
    data_range: Option<f64>,
    repeat: usize,
) -> Result<Comparison> {
    if repeat == 0 {
        return Err(magcache_core::Error::msg(
            "--repeat 0: must be at least 1 (timed runs of each kind)",
        ));
    }
    let mut p = prepare(config)?;
    let (dense_runs, cached_runs, dense_first, cached_first) =
        alternated(&mut p, repeat, verbosity)?;
    let (Some((dense, mut dense_rep)), Some((cached, mut rep))) = (dense_first, cached_first)
    else {
        return Err(magcache_core::Error::msg("compare: no timed run"));
    };
    let dense_wall = median(&dense_runs);
    let cached_wall = median(&cached_runs);
    dense_rep.wall_seconds = dense_wall;
    rep.wall_seconds = cached_wall;
    let dense_planes = p.pipeline.to_planes(&dense)?;
    let cached_planes = p.pipeline.to_planes(&cached)?;
    let latent = magcache_core::runtime::metrics::quality(
        &dense,
        &cached,
        &dense_planes,
        &cached_planes,
        data_range,
    )?;
    // A prompted run decodes both finals (the decoder the run would use); quality is then measured
    // on what a person sees.
    let decoded_of = |d: Option<magcache_core::Decoded>| d.map(|d| d.pixels);
    // Both generations are done: the transformer is not needed to decode.
    p.pipeline.release_models();
    let dense_decoded = decoded_of(p.pipeline.finish(&dense)?);
    let cached_decoded = match dense_decoded {
        Some(_) => decoded_of(p.pipeline.finish(&cached)?),
        None => None,
    };
    let decoded = dense_decoded.zip(cached_decoded);
    let (quality, quality_on, latent_quality) = match &decoded {
        Some((d, c)) => (
            magcache_core::runtime::metrics::pixel_quality(d, c)?,
            "pixels",
            Some(latent),
        ),
        None => (latent, "latents", None),
    };
    let report = CompareReport {
        family: rep.family.clone(),
        model: rep.model.clone(),
        strategy: rep.strategy.clone(),
        total_calls: rep.total_calls,
        dense_computed_calls: dense_rep.computed_calls,
        cached_computed_calls: rep.computed_calls,
        speedup_calls: rep.total_calls as f64 / rep.computed_calls.max(1) as f64,
        dense_wall_seconds: dense_wall,
        cached_wall_seconds: cached_wall,
        speedup_wall: dense_wall / cached_wall.max(1e-9),
        repeat,
        dense_wall_runs: dense_runs,
        cached_wall_runs: cached_runs,
        warmup: "cached".into(),
        quality,
        quality_on: quality_on.into(),
        latent_quality,
        threshold: p.cfg.strategy().threshold(),
        cached: rep,
    };
    Ok(Comparison {
        metric_name: p.cfg.strategy().metric_name(),
        dense,
        cached,
        dense_planes,
        cached_planes,
        decoded,
        frame_rate: p.pipeline.frame_rate(),
        report,
    })
}

/// The first run of each kind and every run's wall time: a cached warm-up (untimed), then
/// `repeat` rounds, dense and cached alternated (dense first on even rounds), progress shown on the
/// first round only; the prepared run is left with its cache.
#[allow(clippy::type_complexity)]
fn alternated(
    p: &mut crate::prepare::Prepared,
    repeat: usize,
    verbosity: Verbosity,
) -> Result<(
    Vec<f64>,
    Vec<f64>,
    Option<(Tensor, Report)>,
    Option<(Tensor, Report)>,
)> {
    let cache = p.cache.take();
    let strategy = std::mem::replace(&mut p.strategy, "none".into());
    let run_dense = |p: &mut crate::prepare::Prepared, v: Verbosity| -> Result<_> {
        p.use_cache(None, "none")?;
        generate(p, v)
    };
    let set_cached = |p: &mut crate::prepare::Prepared| p.use_cache(cache.clone(), &strategy);
    set_cached(p)?;
    generate(p, Verbosity::Silent)?;
    let (mut dense_runs, mut cached_runs) = (Vec::new(), Vec::new());
    let mut dense_first: Option<(Tensor, Report)> = None;
    let mut cached_first: Option<(Tensor, Report)> = None;
    for round in 0..repeat {
        // Progress of the repeats would only repeat the first runs' lines.
        let v = if round == 0 {
            verbosity
        } else {
            Verbosity::Silent
        };
        for use_cache in [round % 2 == 1, round % 2 == 0] {
            if use_cache {
                set_cached(p)?;
                let (t, r) = generate(p, v)?;
                cached_runs.push(r.wall_seconds);
                cached_first.get_or_insert((t, r));
            } else {
                let (t, r) = run_dense(p, v)?;
                dense_runs.push(r.wall_seconds);
                dense_first.get_or_insert((t, r));
            }
        }
    }
    set_cached(p)?;
    Ok((dense_runs, cached_runs, dense_first, cached_first))
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
    let label = if r.repeat > 1 {
        format!("wall time (s, median of {})", r.repeat)
    } else {
        "wall time (s)".to_string()
    };
    s.push_str(&format!(
        "| {label} | {:.3} | {:.3} |\n",
        r.dense_wall_seconds, r.cached_wall_seconds
    ));
    s.push_str(&format!(
        "| speedup (calls / wall) | 1.00x / 1.00x | {:.2}x / {:.2}x |\n",
        r.speedup_calls, r.speedup_wall
    ));
    if r.quality_on == "pixels" {
        s.push_str(&format!(
            "| PSNR vs dense, decoded pixels (dB, per frame) | - | {:.2} |\n",
            q.psnr_db
        ));
        if let Some(w) = q.worst_sample {
            s.push_str(&format!(
                "| worst sample's PSNR vs dense, decoded pixels (dB) | - | {:.2} (sample {} of {}) |\n",
                w.psnr_db, w.index, w.of
            ));
        }
        s.push_str(&format!(
            "| SSIM vs dense, decoded pixels | - | {:.4} |\n",
            q.ssim
        ));
        s.push_str(&format!(
            "| max / mean abs error, pixels in [0, 1] | - | {:.4} / {:.5} |\n",
            q.max_abs, q.mean_abs
        ));
    }
    let l = r.latent_quality.as_ref().unwrap_or(q);
    let on = if r.latent_quality.is_some() {
        ", latents"
    } else {
        ""
    };
    s.push_str(&format!(
        "| PSNR vs dense{on} (dB, range {:.3}) | - | {:.2} |\n",
        l.data_range, l.psnr_db
    ));
    if let Some(w) = l.worst_sample {
        s.push_str(&format!(
            "| worst sample's PSNR vs dense{on} (dB) | - | {:.2} (sample {} of {}) |\n",
            w.psnr_db, w.index, w.of
        ));
    }
    s.push_str(&format!("| SSIM vs dense{on} | - | {:.4} |\n", l.ssim));
    s.push_str(&format!(
        "| max / mean abs error{on} | - | {:.4} / {:.5} |\n",
        l.max_abs, l.mean_abs
    ));
    let map: String = r
        .cached
        .calls
        .iter()
        .map(|c| if c.computed == Some(false) { '.' } else { '#' })
        .collect();
    s.push_str(&format!("calls (# computed, . reused): {map}\n"));
    s
}
