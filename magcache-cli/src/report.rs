//! The report of a run: every call, the per-scope summary, and its human summary.

use crate::prepare::Prepared;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

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
    /// A scope that computed more than 90% of its calls: its compared values against the
    /// threshold (see `crate::threshold`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_check: Option<crate::threshold::ThresholdCheck>,
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
    /// Peak resident memory of the denoising loop (its own: the high-water mark is reset when it
    /// begins, see `magcache_core::runtime::progress`), if known.
    pub peak_rss_bytes: Option<u64>,
    /// The whole run's wall time, from the start of the command to the end of its last stage (set by
    /// the runner; the denoising loop alone when not).
    pub run_wall_seconds: f64,
    /// The whole run's true peak resident memory: the largest of every stage's (loading included).
    pub run_peak_rss_bytes: Option<u64>,
    /// Whether `peak_rss_bytes` is the denoising loop's own (the high-water mark could be reset).
    pub denoise_own_peak: bool,
    pub scopes: Vec<ScopeSummary>,
    pub warnings: Vec<String>,
    /// Where the strategy's settings come from (a fitted profile's provenance): information, not
    /// warnings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Where the linear layers' products ran when not on candle's own kernels: oneDNN, named by
    /// `MAGCACHE_ONEDNN` (its version, the CPU ISA it chose, what runs on it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub products: Option<String>,
    /// The products oneDNN built for the run, counted by the implementation it chose for each
    /// (`brg:avx512_core_amx`, `gemm:jit:bf16`, `ref:any`, ...): a shape on a slow path shows.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub onednn_implementations: std::collections::BTreeMap<String, usize>,
    /// CPU runs: the denoising loop's wall time in the linear layers and in the attention
    /// (`magcache_layers::nn::timing`); the rest of `wall_seconds` is the element-wise work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_time: Option<magcache_layers::nn::timing::CpuTime>,
    /// Prompted runs: wall time and peak memory of each stage (encode text, denoise, decode).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<magcache_core::runtime::progress::StageTime>,
}

impl Report {
    pub fn from_calls(
        p: &Prepared,
        calls: Vec<CallReport>,
        denoise: &magcache_core::runtime::progress::StageTime,
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
                threshold_check: None,
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
            wall_seconds: denoise.wall_seconds,
            cache_bytes,
            peak_rss_bytes: denoise.peak_rss_bytes,
            run_wall_seconds: denoise.wall_seconds,
            run_peak_rss_bytes: magcache_core::runtime::progress::run_peak_rss_bytes(),
            denoise_own_peak: denoise.own_peak,
            scopes: scopes.into_values().collect(),
            warnings,
            notes: Vec::new(),
            products: magcache_layers::nn::onednn::get().map(|d| d.describe()),
            onednn_implementations: onednn_implementations(),
            cpu_time: None,
            stages: Vec::new(),
        }
    }
}

pub use magcache_core::runtime::progress::peak_rss_bytes;

/// The run's warnings again at the end of a summary on stdout, for a summary kept apart from
/// stderr (a file, a pipe, another terminal); nothing when both streams reach the same place
/// (the terminal, or `> log 2>&1`), where they were just printed.
pub fn warnings_tail(warnings: &[String]) -> String {
    if same_place() {
        return String::new();
    }
    warnings.iter().map(|w| format!("warning: {w}\n")).collect()
}

/// Whether stdout and stderr reach the same place: both terminals, or one file or pipe.
fn same_place() -> bool {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
        return true;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let id = |fd: u8| {
            std::fs::metadata(format!("/dev/fd/{fd}"))
                .ok()
                .map(|m| (m.dev(), m.ino()))
        };
        if let (Some(a), Some(b)) = (id(1), id(2)) {
            return a == b;
        }
    }
    false
}

/// [`Report::onednn_implementations`]: empty where oneDNN is not open.
fn onednn_implementations() -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for p in magcache_layers::nn::onednn::get()
        .map(|d| d.built())
        .unwrap_or_default()
    {
        *counts.entry(p.implementation).or_insert(0) += 1;
    }
    counts
}

/// Human summary of a report (stdout of `magcache run`).
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!("model:    {}\n", r.model));
    s.push_str(&format!("strategy: {}   steps: {}\n", r.strategy, r.steps));
    if let Some(p) = &r.products {
        s.push_str(&format!("products: {p}\n"));
    }
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
        "transformer calls computed: {}/{} ({:.2}x fewer)   cache holds {} bytes   denoise: peak RSS {}   wall {:.3} s\n",
        r.computed_calls,
        r.total_calls,
        r.total_calls as f64 / r.computed_calls.max(1) as f64,
        r.cache_bytes,
        mb(r.peak_rss_bytes),
        r.wall_seconds
    ));
    if let Some(t) = &r.cpu_time {
        s.push_str(&format!(
            "denoise on the CPU: linear layers {:.3} s, attention {:.3} s, the rest {:.3} s\n",
            t.linear_seconds,
            t.attention_seconds,
            (r.wall_seconds - t.linear_seconds - t.attention_seconds).max(0.0)
        ));
    }
    if !r.stages.is_empty() {
        let parts: Vec<String> = r
            .stages
            .iter()
            .map(|st| {
                format!(
                    "{} {:.1} s, peak {}{}",
                    st.name,
                    st.wall_seconds,
                    mb(st.peak_rss_bytes),
                    if st.own_peak { "" } else { " (process so far)" }
                )
            })
            .collect();
        s.push_str(&format!("stages: {}\n", parts.join(" | ")));
    }
    s.push_str(&format!(
        "run: peak RSS {}   wall {:.3} s\n",
        mb(r.run_peak_rss_bytes),
        r.run_wall_seconds
    ));
    s
}

fn mb(b: Option<u64>) -> String {
    b.map(|b| format!("{:.1} MB", b as f64 / 1e6))
        .unwrap_or_else(|| "n/a".into())
}

impl Report {
    /// Adds the pipeline's stages around the denoising loop (this report's wall time): stages named
    /// `decode` after it, the others (encoding the text) before; then the run's wall time (from
    /// `start`, the command's start) and true peak.
    pub fn set_stages(
        &mut self,
        pipeline: Vec<magcache_core::runtime::progress::StageTime>,
        start: std::time::Instant,
    ) {
        self.run_wall_seconds = start.elapsed().as_secs_f64();
        self.run_peak_rss_bytes = magcache_core::runtime::progress::run_peak_rss_bytes();
        if pipeline.is_empty() {
            return;
        }
        let (after, before): (Vec<_>, Vec<_>) = pipeline
            .into_iter()
            .partition(|s| s.name.starts_with("decode"));
        self.stages = before;
        self.stages
            .push(magcache_core::runtime::progress::StageTime {
                name: "denoise".into(),
                wall_seconds: self.wall_seconds,
                peak_rss_bytes: self.peak_rss_bytes,
                own_peak: self.denoise_own_peak,
            });
        self.stages.extend(after);
    }
}
