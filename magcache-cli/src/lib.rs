//! The runner behind the `magcache` binary: reads a run file, builds the family's pipeline and the
//! strategy, runs the generation and reports every transformer call. See `../shared/CONTRACT.md`
//! (copied to `docs/contract.md`) for the contract.

pub mod image;

use candle_core::Tensor;
use magcache_core::pipeline::{CallEvent, Observer};
use magcache_core::{registry, BuildEnv, CacheHandle, Error, Pipeline, Result, RunConfig};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Keeps every registration linked in.
pub fn link_all() {
    magcache_strategies::link();
    magcache_models::link();
}

/// A run file, its pipeline and its cache, ready to generate.
pub struct Prepared {
    pub cfg: RunConfig,
    pub file: String,
    pub pipeline: Box<dyn Pipeline>,
    pub cache: Option<CacheHandle>,
    pub strategy: String,
}

/// Loads and validates a run file and builds the pipeline, without a cache.
pub fn prepare_pipeline(config: &Path) -> Result<Prepared> {
    link_all();
    let cfg = RunConfig::load(config)?;
    let file = config.display().to_string();
    let base = base_dir(config);
    let fam = family_of(&cfg, &file)?;
    let pipeline = (fam.build)(&cfg, &file, &base)?;
    Ok(Prepared {
        cfg,
        file,
        pipeline,
        cache: None,
        strategy: "none".into(),
    })
}

/// Loads and validates a run file and builds the pipeline and the cache.
pub fn prepare(config: &Path) -> Result<Prepared> {
    let mut p = prepare_pipeline(config)?;
    let base = base_dir(config);
    let info = p.pipeline.model_info();
    let env = BuildEnv {
        file: &p.file,
        base_dir: &base,
        model: &info,
    };
    let strategy_cfg = p.cfg.strategy();
    p.strategy = strategy_cfg.typetag_name().to_string();
    p.cache = strategy_cfg.build(&env)?.map(CacheHandle::new);
    p.pipeline.set_cache(p.cache.clone())?;
    Ok(p)
}

fn base_dir(config: &Path) -> PathBuf {
    config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn family_of(cfg: &RunConfig, file: &str) -> Result<&'static registry::ModelFamily> {
    registry::family(&cfg.model.family).ok_or_else(|| {
        let known: Vec<&str> = registry::families().iter().map(|f| f.name).collect();
        Error::config(
            file,
            "model.family",
            format!(
                "unknown family `{}` (known: {})",
                cfg.model.family,
                known.join(", ")
            ),
        )
    })
}

/// One call in the report.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CallReport {
    pub step: usize,
    pub branch: String,
    /// Same as `branch` (the reference fixtures' name for it).
    pub context: String,
    pub expert: usize,
    pub timestep: f64,
    /// `null` when no cache ran (dense).
    pub computed: Option<bool>,
    pub metric: Option<f64>,
}

/// Per scope summary.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ScopeSummary {
    pub expert: usize,
    pub branch: String,
    pub calls: usize,
    pub computed: usize,
    pub reused: usize,
    pub longest_reuse_run: usize,
    /// Bytes the cache holds for this scope at the end of the run.
    pub cache_bytes: usize,
}

/// The JSON report of `magcache run`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub family: String,
    pub model: String,
    pub strategy: String,
    pub steps: usize,
    pub calls: Vec<CallReport>,
    pub computed_calls: usize,
    pub total_calls: usize,
    pub wall_seconds: f64,
    pub cache_bytes: usize,
    /// Peak resident memory of the process so far (Linux `VmHWM`), if known.
    pub peak_rss_bytes: Option<u64>,
    pub scopes: Vec<ScopeSummary>,
    pub warnings: Vec<String>,
}

impl Report {
    pub fn from_calls(
        p: &Prepared,
        calls: Vec<CallReport>,
        wall: f64,
        scope_bytes: &[(magcache_core::ScopeKey, usize)],
        warnings: Vec<String>,
    ) -> Report {
        let computed_calls = calls.iter().filter(|c| c.computed != Some(false)).count();
        let mut scopes: BTreeMap<(usize, String), ScopeSummary> = BTreeMap::new();
        let mut runs: HashMap<(usize, String), usize> = HashMap::new();
        for c in &calls {
            let key = (c.expert, c.branch.clone());
            let s = scopes.entry(key.clone()).or_insert_with(|| ScopeSummary {
                expert: c.expert,
                branch: c.branch.clone(),
                calls: 0,
                computed: 0,
                reused: 0,
                longest_reuse_run: 0,
                cache_bytes: 0,
            });
            s.calls += 1;
            let run = runs.entry(key).or_insert(0);
            if c.computed == Some(false) {
                s.reused += 1;
                *run += 1;
                s.longest_reuse_run = s.longest_reuse_run.max(*run);
            } else {
                s.computed += 1;
                *run = 0;
            }
        }
        for (k, b) in scope_bytes {
            if let Some(sc) = scopes.get_mut(&(k.expert, k.branch.to_string())) {
                sc.cache_bytes = *b;
            }
        }
        let cache_bytes = scope_bytes.iter().map(|(_, b)| b).sum();
        Report {
            family: p.cfg.model.family.clone(),
            model: p.pipeline.describe(),
            strategy: p.strategy.clone(),
            steps: p.cfg.sampling.steps,
            total_calls: calls.len(),
            computed_calls,
            calls,
            wall_seconds: wall,
            cache_bytes,
            peak_rss_bytes: peak_rss_bytes(),
            scopes: scopes.into_values().collect(),
            warnings,
        }
    }
}

/// Peak resident set size of this process (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What the runner shows while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verbosity {
    Quiet,
    Normal,
    /// One JSON object per transformer call on stderr (machine-readable progress).
    Json,
}

struct Collector {
    json: bool,
    calls: Vec<CallReport>,
    warnings: Vec<String>,
    bar: Option<indicatif::ProgressBar>,
    last: String,
}

impl Observer for Collector {
    fn warning(&mut self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(format!("warning: {msg}")),
            None => eprintln!("warning: {msg}"),
        }
        self.warnings.push(msg.to_string());
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
    fn step(&mut self, done: usize, _total: usize) {
        if let Some(b) = &self.bar {
            b.set_position(done as u64);
            b.set_message(self.last.clone());
        }
    }
}

/// Runs the generation of a prepared run; returns the final latents and the report.
pub fn generate(p: &mut Prepared, verbosity: Verbosity) -> Result<(Tensor, Report)> {
    let bar = if verbosity == Verbosity::Normal {
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
        calls: Vec::new(),
        warnings: Vec::new(),
        bar,
        last: String::new(),
    };
    let t0 = Instant::now();
    let out = p.pipeline.generate(&mut col);
    let wall = t0.elapsed().as_secs_f64();
    if let Some(b) = &col.bar {
        b.finish_and_clear();
    }
    let out = out?;
    let bytes = match &p.cache {
        Some(c) => c.lock()?.cached_bytes_by_scope(),
        None => Vec::new(),
    };
    let report = Report::from_calls(p, col.calls, wall, &bytes, col.warnings);
    Ok((out, report))
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a failed
/// run never leaves a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_via_temp(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| e.to_string())
    })
}

/// Writes the final latents as safetensors (`final`), through a temporary file.
pub fn write_latents(path: &Path, t: &Tensor) -> Result<()> {
    let map: HashMap<String, Tensor> = HashMap::from([("final".to_string(), t.contiguous()?)]);
    write_via_temp(path, |tmp| {
        candle_core::safetensors::save(&map, tmp).map_err(|e| e.to_string())
    })
}

/// Runs `write` on a temporary name beside `path` and renames it into place; on any failure the
/// temporary file is removed and the error names `path`.
fn write_via_temp(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), String>,
) -> Result<()> {
    let shown = path.display().to_string();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(Error::io(&shown, "the output folder does not exist"));
    }
    let name = path
        .file_name()
        .ok_or_else(|| Error::io(&shown, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(&shown, e)
    })
}

/// Human summary of a report (stdout of `magcache run`).
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!("model:    {}\n", r.model));
    s.push_str(&format!("strategy: {}   steps: {}\n", r.strategy, r.steps));
    s.push_str("scope                 calls  computed  reused  longest reuse  cache bytes\n");
    for sc in &r.scopes {
        s.push_str(&format!(
            "expert {} {:<8}  {:>9}  {:>8}  {:>6}  {:>13}  {:>11}\n",
            sc.expert,
            sc.branch,
            sc.calls,
            sc.computed,
            sc.reused,
            sc.longest_reuse_run,
            sc.cache_bytes
        ));
    }
    let map: String = r
        .calls
        .iter()
        .map(|c| match c.computed {
            Some(false) => '.',
            _ => '#',
        })
        .collect();
    s.push_str(&format!("calls (# computed, . reused): {map}\n"));
    s.push_str(&format!(
        "transformer calls computed: {}/{} ({:.2}x fewer)   cache holds {} bytes   peak RSS {}   wall {:.3} s\n",
        r.computed_calls,
        r.total_calls,
        r.total_calls as f64 / r.computed_calls.max(1) as f64,
        r.cache_bytes,
        r.peak_rss_bytes.map(|b| format!("{:.1} MB", b as f64 / 1e6)).unwrap_or_else(|| "n/a".into()),
        r.wall_seconds
    ));
    s
}

/// Text of `magcache list`.
pub fn list() -> String {
    link_all();
    let mut s = String::from("model families:\n");
    for f in registry::families() {
        s.push_str(&format!("  {:<10} {}\n", f.name, f.description));
        if !f.presets.is_empty() {
            s.push_str(&format!("             presets: {}\n", f.presets.join(", ")));
        }
        if !f.published.is_empty() {
            s.push_str(&format!(
                "             published: {}\n",
                f.published.join(", ")
            ));
        }
        let kinds: Vec<String> = f
            .blocks
            .iter()
            .map(|b| {
                format!(
                    "{} (hidden in {} out {}, encoder in {} out {})",
                    b.kind,
                    b.hidden_in,
                    b.hidden_out,
                    b.encoder_in.map(|i| i.to_string()).unwrap_or("-".into()),
                    b.encoder_out.map(|i| i.to_string()).unwrap_or("-".into())
                )
            })
            .collect();
        s.push_str(&format!("             blocks: {}\n", kinds.join("; ")));
    }
    s.push_str("strategies:\n");
    for st in registry::strategies() {
        s.push_str(&format!("  {:<10} {}\n", st.name, st.description));
    }
    s
}

/// Runs the configured generation without skipping and measures the MagCache statistics of every
/// scope; returns the profile `[cache] profile = ...` accepts.
pub fn calibrate(
    config: &Path,
    verbosity: Verbosity,
) -> Result<(magcache_core::profile::Profile, Report)> {
    use magcache_core::profile::{expert_name, Profile, ProfileMeta};
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
            .insert(b, c.cos_dists);
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
    for f in &files {
        if let Ok(data) = std::fs::read(f) {
            feed(&(data.len() as u64).to_le_bytes());
            feed(&data[..data.len().min(65536)]);
            feed(&data[data.len().saturating_sub(65536)..]);
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

/// The predicted compute/reuse map of a run (`magcache plan`).
#[derive(Clone, Debug, Serialize)]
pub struct PlanReport {
    pub family: String,
    pub strategy: String,
    /// True when the strategy decides from the data (TeaCache, FBCache): no calls are predicted.
    pub decides_from_data: bool,
    pub calls: Vec<CallReport>,
    pub computed_calls: usize,
    pub total_calls: usize,
    pub predicted_speedup: f64,
    pub warnings: Vec<String>,
}

/// Predicts every call of a run from the config alone (no model is built or run).
pub fn plan(config: &Path) -> Result<PlanReport> {
    link_all();
    let cfg = RunConfig::load(config)?;
    let file = config.display().to_string();
    let base = base_dir(config);
    let fam = family_of(&cfg, &file)?;
    let (gplan, info) = (fam.plan)(&cfg, &file, &base)?;
    let strategy_cfg = cfg.strategy();
    let strategy = strategy_cfg.typetag_name().to_string();
    let env = BuildEnv {
        file: &file,
        base_dir: &base,
        model: &info,
    };
    let cache = strategy_cfg.build(&env)?;
    let mut warnings = Vec::new();
    let mut predicted: HashMap<magcache_core::ScopeKey, Vec<magcache_core::CallDecision>> =
        HashMap::new();
    let mut from_data = false;
    if let Some(mut c) = cache {
        warnings = c.begin_generation(&gplan)?;
        for sp in &gplan.scopes {
            match c.predict(sp.key) {
                Some(d) => {
                    predicted.insert(sp.key, d);
                }
                None => from_data = true,
            }
        }
    }
    let sigma_of = |key: magcache_core::ScopeKey, i: usize| {
        gplan
            .scope(key)
            .and_then(|s| s.sigmas.get(i).copied())
            .unwrap_or(0.0)
    };
    let calls: Vec<CallReport> = gplan
        .calls()
        .into_iter()
        .map(|(step, key, i)| {
            let d = if from_data {
                None
            } else {
                predicted.get(&key).and_then(|v| v.get(i)).copied()
            };
            CallReport {
                step,
                branch: key.branch.to_string(),
                context: key.branch.to_string(),
                expert: key.expert,
                timestep: sigma_of(key, i) * 1000.0,
                computed: d.map(|d| d.computed),
                metric: d.and_then(|d| d.metric),
            }
        })
        .collect();
    let computed_calls = calls.iter().filter(|c| c.computed != Some(false)).count();
    Ok(PlanReport {
        family: cfg.model.family.clone(),
        strategy,
        decides_from_data: from_data,
        total_calls: calls.len(),
        computed_calls,
        predicted_speedup: calls.len() as f64 / computed_calls.max(1) as f64,
        calls,
        warnings,
    })
}

/// Human text of a plan.
pub fn plan_text(r: &PlanReport) -> String {
    let mut s = String::new();
    if r.decides_from_data {
        s.push_str(&format!(
            "{} decides from the data of each call (the model's activations), so its decisions cannot be known before the run: use `magcache run` to see them.\n",
            r.strategy
        ));
        s.push_str(&format!(
            "transformer calls: {} (an upper bound on the computed ones)\n",
            r.total_calls
        ));
        return s;
    }
    let mut scopes: BTreeMap<(usize, String), String> = BTreeMap::new();
    for c in &r.calls {
        scopes
            .entry((c.expert, c.branch.clone()))
            .or_default()
            .push(if c.computed == Some(false) { '.' } else { '#' });
    }
    s.push_str(&format!(
        "{} plan for {} (# computed, . reused; one mark per call of the scope)\n",
        r.strategy, r.family
    ));
    for ((e, b), m) in &scopes {
        s.push_str(&format!("expert {e} {b:<8} {m}\n"));
    }
    s.push_str(&format!(
        "predicted transformer calls: {}/{} computed   predicted speedup {:.2}x (transformer calls)\n",
        r.computed_calls, r.total_calls, r.predicted_speedup
    ));
    s
}

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
