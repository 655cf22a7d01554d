//! `magcache calibrate`: a dense run that measures the MagCache statistics of every scope.

use crate::prepare::{base_dir, prepare_pipeline};
use crate::report::Report;
use crate::run::{generate, Verbosity};
use magcache_core::{CacheHandle, Error, Result, RunConfig};
use magcache_strategies::probe::{BlockProbes, BlockStat};
use std::path::{Path, PathBuf};

/// Runs the configured generation without skipping and measures the MagCache statistics of every
/// scope; returns the profile `[cache] profile = ...` accepts.
pub fn calibrate(
    config: &Path,
    verbosity: Verbosity,
) -> Result<(magcache_strategies::profile::Profile, Report)> {
    let (prof, report, _) = calibrate_with(config, verbosity, false)?;
    Ok((prof, report))
}

/// [`calibrate`], and with `blocks` also every block's residual change and time per scope, measured
/// by two hooks on every block of the model's chains ([`magcache_strategies::probe`]); the changes
/// go into the profile's `block_change` tables. A family whose pipeline offers no hook registry is
/// refused with `blocks`.
pub fn calibrate_with(
    config: &Path,
    verbosity: Verbosity,
    blocks: bool,
) -> Result<(
    magcache_strategies::profile::Profile,
    Report,
    Vec<BlockStat>,
)> {
    let (prof, report, stats, _) = calibrate_run(config, verbosity, blocks)?;
    Ok((prof, report, stats))
}

/// A calibration: the profile, the run's report, the block probes' statistics and the dense run's
/// final latents.
pub(crate) type Calibration = (
    magcache_strategies::profile::Profile,
    Report,
    Vec<BlockStat>,
    candle_core::Tensor,
);

/// [`calibrate_with`], also returning the final latents of the dense run.
pub(crate) fn calibrate_run(
    config: &Path,
    verbosity: Verbosity,
    blocks: bool,
) -> Result<Calibration> {
    let mut p = prepare_pipeline(config)?;
    calibrate_on(&mut p, config, verbosity, blocks)
}

/// [`calibrate_run`] on a prepared run (`config` names its file; its cache is replaced).
pub(crate) fn calibrate_on(
    p: &mut crate::prepare::Prepared,
    config: &Path,
    verbosity: Verbosity,
    blocks: bool,
) -> Result<Calibration> {
    use magcache_strategies::profile::{expert_name, Profile, ProfileMeta};
    let probes = BlockProbes::new();
    if blocks {
        let registries = p.pipeline.hook_registries();
        if registries.is_empty() {
            return Err(Error::msg(format!(
                "--blocks: model family `{}` offers no per-block hooks",
                p.cfg.model.family
            )));
        }
        for (expert, reg) in registries.into_iter().enumerate() {
            probes.attach(expert, reg)?;
        }
    }
    let (cal, results) = magcache_strategies::calibrate::Calibrator::new();
    let handle = CacheHandle::new(Box::new(cal));
    p.use_cache(Some(handle), "calibrate")?;
    let (dense, report) = generate(p, verbosity)?;
    let stats = probes.summary()?;
    let plan = p.pipeline.plan();
    let n = plan.experts().len();
    let sigmas = step_sigmas(&plan)?;
    let mut prof = Profile {
        meta: ProfileMeta {
            family: p.cfg.model.family.clone(),
            model: fingerprint(&p.cfg, &base_dir(config)),
            steps: plan.total_steps,
            shift: plan.shift,
            scheduler: plan.scheduler.clone(),
            boundary_ratio: plan.boundary_ratio,
            sigmas,
            guidance_scale: plan
                .scopes
                .iter()
                .any(|sp| sp.key.branch == magcache_core::Branch::Uncond)
                .then_some(p.cfg.sampling.guidance_scale)
                .flatten(),
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
    for st in &stats {
        let changes = prof
            .block_change
            .entry(expert_name(st.expert, n).to_string())
            .or_default()
            .entry(st.scope.branch.to_string())
            .or_default();
        if changes.len() <= st.block {
            changes.resize(st.block + 1, 0.0);
        }
        changes[st.block] = st.mean_change.unwrap_or(0.0);
    }
    Ok((prof, report, stats, dense))
}

/// The sigma of every step of `plan` (each scope's steps, in the generation's numbering).
fn step_sigmas(plan: &magcache_core::GenerationPlan) -> Result<Vec<f64>> {
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
    Ok(sigmas)
}

/// The per-block table `magcache calibrate --blocks` prints: one row per block, the mean residual
/// change of every scope and the block's share of the chain's time; then the blocks that change
/// least per scope.
pub fn blocks_text(stats: &[BlockStat]) -> String {
    use std::collections::BTreeMap;
    let mut scopes: Vec<(usize, magcache_core::ScopeKey)> = Vec::new();
    let mut rows: BTreeMap<usize, BTreeMap<(usize, magcache_core::ScopeKey), &BlockStat>> =
        BTreeMap::new();
    for st in stats {
        if !scopes.contains(&(st.expert, st.scope)) {
            scopes.push((st.expert, st.scope));
        }
        rows.entry(st.block)
            .or_default()
            .insert((st.expert, st.scope), st);
    }
    let mut out = String::from(
        "per-block residual change between consecutive calls (mean relative L1; lower: the block is easier to cache), and share of the chain's time\n",
    );
    out.push_str("| block |");
    for (e, s) in &scopes {
        out.push_str(&format!(" expert {e} {} |", s.branch));
    }
    out.push_str(" time |\n|---|");
    out.push_str(&"---|".repeat(scopes.len() + 1));
    out.push('\n');
    let total: f64 = stats.iter().map(|s| s.mean_seconds).sum::<f64>().max(1e-12);
    for (block, by_scope) in &rows {
        out.push_str(&format!("| {block} |"));
        let mut secs = 0.0;
        for k in &scopes {
            match by_scope.get(k) {
                Some(st) => {
                    secs += st.mean_seconds;
                    match st.mean_change {
                        Some(c) => out.push_str(&format!(" {c:.4} |")),
                        None => out.push_str(" - |"),
                    }
                }
                None => out.push_str(" - |"),
            }
        }
        out.push_str(&format!(" {:.1}% |\n", 100.0 * secs / total));
    }
    for k in &scopes {
        let mut v: Vec<(usize, f64)> = stats
            .iter()
            .filter(|s| (s.expert, s.scope) == *k)
            .filter_map(|s| s.mean_change.map(|c| (s.block, c)))
            .collect();
        v.sort_by(|a, b| a.1.total_cmp(&b.1));
        let least: Vec<String> = v.iter().take(3).map(|(b, _)| b.to_string()).collect();
        if !least.is_empty() {
            out.push_str(&format!(
                "expert {} {}: blocks changing least: {}\n",
                k.0,
                k.1.branch,
                least.join(", ")
            ));
        }
    }
    out
}

/// What identifies the model a profile was measured on: the preset and seed, or an FNV-1a
/// fingerprint of the weight files (safetensors and GGUF: sizes, first and last 64 KiB), with the
/// run file's `[model.overrides]` where it sets any.
pub fn fingerprint(cfg: &RunConfig, base: &Path) -> String {
    // Sizes set in the run file make another model of the same files or preset.
    let overrides = match &cfg.model.overrides {
        Some(t) if !t.is_empty() => format!(" overrides {{{}}}", inline(t)),
        _ => String::new(),
    };
    if let Some(p) = &cfg.model.preset {
        return format!("preset {p} seed {}{overrides}", cfg.model.seed);
    }
    let mut files: Vec<PathBuf> = Vec::new();
    for w in cfg
        .model
        .weights
        .as_ref()
        .map(|w| w.paths())
        .unwrap_or_default()
    {
        collect_weight_files(&base.join(w), 2, &mut files);
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
    match files.len() {
        0 => format!("family {}, no weight files{overrides}", cfg.model.family),
        n => format!("weights fnv64:{h:016x} ({n} files){overrides}"),
    }
}

/// `t` as one line of `key = value` pairs in key order.
fn inline(t: &toml::Table) -> String {
    let mut keys: Vec<&String> = t.keys().collect();
    keys.sort();
    keys.iter()
        .map(|k| format!("{k} = {}", t[*k]))
        .collect::<Vec<_>>()
        .join(", ")
}

fn collect_weight_files(p: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if p.is_file() {
        if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("safetensors" | "gguf")
        ) {
            out.push(p.to_path_buf());
        }
    } else if p.is_dir() && depth > 0 {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                collect_weight_files(&e.path(), depth - 1, out);
            }
        }
    }
}
