//! `magcache calibrate`: a dense run that measures the MagCache statistics of every scope.

use crate::prepare::{base_dir, prepare_pipeline};
use crate::report::Report;
use crate::run::{generate, Verbosity};
use magcache_core::{CacheHandle, Error, Result, RunConfig};
use std::path::{Path, PathBuf};

/// Runs the configured generation without skipping and measures the MagCache statistics of every
/// scope; returns the profile `[cache] profile = ...` accepts.
pub fn calibrate(
    config: &Path,
    verbosity: Verbosity,
) -> Result<(magcache_strategies::profile::Profile, Report)> {
    use magcache_strategies::profile::{expert_name, Profile, ProfileMeta};
    let mut p = prepare_pipeline(config)?;
    let (cal, results) = magcache_strategies::calibrate::Calibrator::new();
    let handle = CacheHandle::new(Box::new(cal));
    p.pipeline.set_cache(Some(handle.clone()))?;
    p.cache = Some(handle);
    p.strategy = "calibrate".into();
    let (_, report) = generate(&mut p, verbosity)?;
    let plan = p.pipeline.plan();
    let n = plan.experts().len();
    let mut sigmas = vec![0.0; plan.total_steps];
    for sp in &plan.scopes {
        for (&step, &s) in sp.step_indices.iter().zip(&sp.sigmas) {
            *sigmas.get_mut(step).ok_or_else(|| {
                Error::msg(format!(
                    "calibrate: scope {} runs step {step} of a {}-step plan",
                    sp.key, plan.total_steps
                ))
            })? = s;
        }
    }
    let mut prof = Profile {
        meta: ProfileMeta {
            family: p.cfg.model.family.clone(),
            model: fingerprint(&p.cfg, &base_dir(config)),
            steps: plan.total_steps,
            shift: plan.shift,
            scheduler: plan.scheduler.clone(),
            boundary_ratio: plan.boundary_ratio,
            sigmas,
        },
        ..Default::default()
    };
    let res = results
        .lock()
        .map_err(|_| Error::msg("calibration results poisoned"))?;
    for sp in &plan.scopes {
        let name = expert_name(sp.key.expert, n).to_string();
        let c = res.get(&sp.key).cloned().unwrap_or_default();
        let b = sp.key.branch.to_string();
        prof.ratios
            .entry(name.clone())
            .or_default()
            .insert(b.clone(), c.ratios);
        prof.mag_stds
            .entry(name.clone())
            .or_default()
            .insert(b.clone(), c.stds);
        prof.cos_dists
            .entry(name.clone())
            .or_default()
            .insert(b.clone(), c.cos_dists);
        prof.forecast_errors
            .entry(name.clone())
            .or_default()
            .insert(b, c.forecast);
        prof.sigmas.insert(name, sp.sigmas.clone());
    }
    Ok((prof, report))
}

/// What identifies the model a profile was measured on: the preset and seed, or an FNV-1a
/// fingerprint of the weight files (sizes, first and last 64 KiB).
pub fn fingerprint(cfg: &RunConfig, base: &Path) -> String {
    if let Some(p) = &cfg.model.preset {
        return format!("preset {p} seed {}", cfg.model.seed);
    }
    let mut files: Vec<PathBuf> = Vec::new();
    for w in cfg
        .model
        .weights
        .as_ref()
        .map(|w| w.paths())
        .unwrap_or_default()
    {
        collect_safetensors(&base.join(w), 2, &mut files);
    }
    files.sort();
    let mut h: u64 = 0xcbf29ce484222325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    // The size and the first and last 64 KiB of each file (header and tail), read by seeking: a
    // checkpoint file can be larger than memory.
    let head_tail = |f: &Path| -> std::io::Result<(u64, Vec<u8>, Vec<u8>)> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open(f)?;
        let len = file.metadata()?.len();
        let mut head = vec![0u8; len.min(65536) as usize];
        file.read_exact(&mut head)?;
        let tail_len = len.min(65536);
        file.seek(SeekFrom::Start(len - tail_len))?;
        let mut tail = vec![0u8; tail_len as usize];
        file.read_exact(&mut tail)?;
        Ok((len, head, tail))
    };
    for f in &files {
        if let Ok((len, head, tail)) = head_tail(f) {
            feed(&len.to_le_bytes());
            feed(&head);
            feed(&tail);
        }
    }
    format!("weights fnv64:{h:016x} ({} files)", files.len())
}

fn collect_safetensors(p: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if p.is_file() {
        if p.extension().and_then(|e| e.to_str()) == Some("safetensors") {
            out.push(p.to_path_buf());
        }
    } else if p.is_dir() && depth > 0 {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                collect_safetensors(&e.path(), depth - 1, out);
            }
        }
    }
}
