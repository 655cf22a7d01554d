//! `magcache plan`: the compute/reuse map predicted from the config alone.

use crate::prepare::{base_dir, family_of, link_strategies};
use crate::report::CallReport;
use crate::threshold::{threshold_checks, Compared};
use magcache_core::{BuildEnv, Result, RunConfig};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

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
    /// Where the strategy's settings come from (a fitted profile's provenance).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// The weights' dtype the run uses (`auto` resolved as the runner resolves it).
    pub dtype: String,
    /// The size guard's estimate of each stage's peak, in the order they run (empty when the
    /// family gives none).
    pub memory: Vec<StageMemory>,
    /// The memory the guard compares with (`None`: unlimited) and where that number came from.
    pub available_bytes: Option<u64>,
    pub available_source: String,
    /// Scopes predicted to compute more than 90% of their calls: their compared values against
    /// the threshold.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub threshold_checks: Vec<crate::threshold::ThresholdCheck>,
}

/// One stage's estimate: its total and its parts, each with the key that drives it.
#[derive(Clone, Debug, Serialize)]
pub struct StageMemory {
    pub stage: String,
    /// `None`: larger than any memory (the estimate overflowed).
    pub bytes: Option<u64>,
    pub parts: Vec<MemoryPart>,
}

/// One part of a stage's estimate.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryPart {
    pub what: String,
    pub key: String,
    pub bytes: Option<u64>,
}

/// Predicts every call of a run from the config alone (no model is built or run).
pub fn plan(config: &Path) -> Result<PlanReport> {
    link_strategies();
    let mut cfg = RunConfig::load(config)?;
    let file = config.display().to_string();
    let base = base_dir(config);
    let fam = family_of(&cfg, &file)?;
    let magcache_core::RunPlan {
        plan: gplan,
        info,
        warnings: resolved,
    } = (fam.plan)(&cfg, &file, &base)?;
    let strategy_cfg = cfg.strategy();
    let strategy = strategy_cfg.typetag_name().to_string();
    let env = BuildEnv {
        file: &file,
        base_dir: &base,
        model: &info,
    };
    let cache = strategy_cfg.build(&env)?;
    // What a run of the file would report at its start, then the cache's.
    let (mut warnings, mut notes) = (resolved, Vec::new());
    let mut predicted: HashMap<magcache_core::ScopeKey, Vec<magcache_core::CallDecision>> =
        HashMap::new();
    let mut from_data = false;
    if let Some(mut c) = cache {
        warnings.extend(c.begin_generation(&gplan)?);
        notes = c.notes();
        for sp in &gplan.scopes {
            match c.predict(sp.key) {
                Some(d) => {
                    predicted.insert(sp.key, d);
                }
                None => from_data = true,
            }
        }
    }
    let (calls, compared) = predicted_calls(&gplan, &predicted, from_data);
    let computed_calls = calls.iter().filter(|c| c.computed != Some(false)).count();
    // A data-free rule predicted to compute (nearly) every call says why.
    let st = strategy_cfg;
    let checks = match from_data {
        true => Vec::new(),
        false => threshold_checks(
            &compared,
            st.threshold(),
            st.metric_name(),
            st.accumulates(),
        ),
    };
    warnings.extend(checks.iter().map(|c| c.warning(&strategy)));
    // Memory per stage, in the dtype the runner would choose.
    let mut dtype = cfg.model.dtype.clone();
    if cfg.is_auto_dtype() {
        if let Some((d, note)) =
            crate::prepare::auto_dtype_by_estimate(&mut cfg, &file, &base, fam)?
        {
            cfg.model.dtype = d.clone();
            dtype = d;
            warnings.extend(note);
        } else {
            dtype = "f32 (auto: bf16 if the run is refused in f32)".into();
        }
    }
    let memory = stage_memory(fam, &cfg, &file, &base)?;
    let avail = magcache_core::runtime::guard::available_memory()?;
    Ok(PlanReport {
        dtype,
        memory,
        available_bytes: avail.bytes,
        available_source: avail.source,
        family: cfg.model.family.clone(),
        strategy,
        decides_from_data: from_data,
        total_calls: calls.len(),
        computed_calls,
        predicted_speedup: calls.len() as f64 / computed_calls.max(1) as f64,
        calls,
        warnings,
        notes,
        threshold_checks: checks,
    })
}

/// Every call of `gplan` with its predicted decision (none when the strategy decides from data),
/// and each as the threshold check reads it.
fn predicted_calls(
    gplan: &magcache_core::GenerationPlan,
    predicted: &HashMap<magcache_core::ScopeKey, Vec<magcache_core::CallDecision>>,
    from_data: bool,
) -> (Vec<CallReport>, Vec<Compared>) {
    let sigma_of = |key: magcache_core::ScopeKey, i: usize| {
        gplan
            .scope(key)
            .and_then(|s| s.sigmas.get(i).copied())
            .unwrap_or(0.0)
    };
    gplan
        .calls()
        .into_iter()
        .map(|(step, key, i)| {
            let d = if from_data {
                None
            } else {
                predicted.get(&key).and_then(|v| v.get(i)).copied()
            };
            let call = CallReport {
                step,
                branch: key.branch.to_string(),
                context: key.branch.to_string(),
                expert: key.expert,
                timestep: sigma_of(key, i) * 1000.0,
                computed: d.map(|d| d.computed),
                metric: d.and_then(|d| d.metric),
            };
            let c = Compared {
                expert: key.expert,
                branch: call.branch.clone(),
                computed: call.computed != Some(false),
                value: d.and_then(|d| d.compared),
            };
            (call, c)
        })
        .unzip()
}

/// The size guard's estimate of each stage, part by part (none when the family gives none).
fn stage_memory(
    fam: &magcache_core::runtime::registry::ModelFamily,
    cfg: &RunConfig,
    file: &str,
    base: &Path,
) -> Result<Vec<StageMemory>> {
    let Some(est) = fam.estimate else {
        return Ok(Vec::new());
    };
    Ok(est(cfg, file, base)?
        .into_iter()
        .map(|(stage, fp)| StageMemory {
            stage,
            bytes: fp.total(),
            parts: fp
                .parts
                .iter()
                .map(|p| MemoryPart {
                    what: p.what.clone(),
                    key: p.knob.clone(),
                    bytes: p.bytes,
                })
                .collect(),
        })
        .collect())
}

/// Human text of a plan.
pub fn plan_text(r: &PlanReport) -> String {
    let mut s = calls_text(r);
    s.push_str(&memory_text(r));
    s
}

/// The memory table of a plan: each stage's estimated peak and its largest parts.
fn memory_text(r: &PlanReport) -> String {
    if r.memory.is_empty() {
        return String::new();
    }
    let gb = magcache_core::runtime::guard::gb;
    let mut s = format!(
        "memory (the size guard's estimate of each stage's peak; dtype {}; available {}, {}):\n",
        r.dtype,
        gb(r.available_bytes),
        r.available_source
    );
    for st in &r.memory {
        let mut parts: Vec<&MemoryPart> = st.parts.iter().collect();
        parts.sort_by_key(|p| std::cmp::Reverse(p.bytes.unwrap_or(u64::MAX)));
        let shown: Vec<String> = parts
            .iter()
            .take(4)
            .map(|p| format!("{} {}", p.what, gb(p.bytes)))
            .collect();
        let fits = match (st.bytes, r.available_bytes) {
            (_, None) => "",
            (Some(b), Some(a)) if b <= a => "",
            _ => "  DOES NOT FIT",
        };
        s.push_str(&format!(
            "  {:<20} {:>9}{fits}  ({})\n",
            st.stage,
            gb(st.bytes),
            shown.join(", ")
        ));
    }
    s
}

fn calls_text(r: &PlanReport) -> String {
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
    if r.strategy == "schedule" {
        // A searched schedule reports each reused call's predicted forecast error.
        let errs: Vec<f64> = r
            .calls
            .iter()
            .filter(|c| c.computed == Some(false))
            .filter_map(|c| c.metric)
            .collect();
        if !errs.is_empty() {
            let max = errs.iter().copied().fold(0.0, f64::max);
            s.push_str(&format!(
                "predicted forecast error of the reused calls (dense calibration run): mean {:.4}, max {:.4}\n",
                errs.iter().sum::<f64>() / errs.len() as f64,
                max
            ));
        }
    }
    s
}
