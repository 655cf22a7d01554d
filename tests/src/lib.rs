//! Helpers for the cross-crate integration tests: fixture paths, tensor comparison, reference loops.

pub mod prompted;

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// Keeps the strategies' and models' registrations linked into every test binary.
pub fn link_all() {
    magcache_strategies::link();
    magcache_models::link();
}

/// A prompted run's decode stage: every output `run --out` writes beside `final`, by name
/// (`decoded` first).
pub fn decoded_outputs(
    pipeline: &mut dyn magcache_core::Pipeline,
    fin: &Tensor,
) -> Vec<(String, Tensor)> {
    pipeline
        .finish(fin)
        .unwrap()
        .expect("a prompted run decodes")
        .named()
        .into_iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect()
}

/// `tests/fixtures/...` of this repository.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// Copies the files of folder `from` (symlinks followed) into `to`, created.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A FLUX-style call from a forward fixture's tensors (`hidden_states`, `encoder_hidden_states`,
/// `timestep`, `img_ids`, `txt_ids`, and `guidance` when `guided`).
pub fn packed_call(
    f: &HashMap<String, Tensor>,
    guided: bool,
) -> magcache_layers::dit::PackedCall<'_> {
    magcache_layers::dit::PackedCall {
        x: &f["hidden_states"],
        ctx: &f["encoder_hidden_states"],
        t: &f["timestep"],
        img_ids: &f["img_ids"],
        txt_ids: &f["txt_ids"],
        guidance: guided.then(|| &f["guidance"]),
    }
}

pub fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).expect("fixture")
}

pub fn load_json(rel: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).expect("fixture json"))
        .expect("json")
}

/// Largest absolute value.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute difference; panics on shape mismatch.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    max_abs(&(a - b).unwrap())
}

/// A run file for one reference-loop run: the `[cache]` table from the run's config in the fixture
/// json (`None` = dense).
pub fn loop_toml(
    family: &str,
    weights: &str,
    inputs: &str,
    meta: &serde_json::Value,
    cache: Option<&str>,
) -> String {
    let mut s = format!(
        "[model]\nfamily = \"{family}\"\nweights = {weights}\n\n[inputs]\nfile = \"{inputs}\"\n\n[sampling]\nsteps = {}\n",
        meta["steps"]
    );
    if let Some(sh) = meta.get("shift") {
        s.push_str(&format!("shift = {sh}\n"));
    }
    if let Some(g) = meta.get("guidance_scale").or_else(|| meta.get("guidance")) {
        s.push_str(&format!("guidance_scale = {g}\n"));
    }
    if let Some(b) = meta.get("boundary_ratio") {
        s.push_str(&format!("boundary_ratio = {b}\n"));
    }
    if let Some(c) = cache {
        s.push_str("\n[cache]\n");
        s.push_str(c);
    }
    s
}

/// `[cache]` body of a MagCache run config from the fixture json.
pub fn magcache_table(c: &serde_json::Value) -> String {
    format!(
        "strategy = \"magcache\"\nthreshold = {}\nmax_skip_steps = {}\nretention_ratio = {}\nmag_ratios = {}\n",
        c["threshold"], c["max_skip_steps"], c["retention_ratio"], c["mag_ratios"]
    )
}

/// `[cache]` body of a TeaCache run config from the fixture json.
pub fn teacache_table(c: &serde_json::Value) -> String {
    format!(
        "strategy = \"teacache\"\nthreshold = {}\ncoefficients = {}\nret_steps = {}\n",
        c["threshold"], c["coefficients"], c["ret_steps"]
    )
}

/// `[cache]` body of a SeaCache run config from the fixture json (diffusers' `SeaCacheConfig` field
/// names; only the built-in indicator, `raw_vision_callback = null`, is supported).
pub fn seacache_table(c: &serde_json::Value) -> String {
    assert!(
        c.get("raw_vision_callback").is_none_or(|v| v.is_null()),
        "SeaCache run with a custom raw_vision_callback"
    );
    let mut s = String::from("strategy = \"seacache\"\n");
    for k in [
        "threshold",
        "residual_order",
        "retention_steps",
        "cache_end_steps",
        "max_consecutive_cached",
        "power_exp",
    ] {
        if let Some(v) = c.get(k) {
            s.push_str(&format!("{k} = {v}\n"));
        }
    }
    s
}

/// Runs a run file through the runner library; returns final latents and the report.
pub fn run_toml(dir: &std::path::Path, toml_text: &str) -> (Tensor, magcache_cli::Report) {
    link_all();
    let path = dir.join("run.toml");
    std::fs::write(&path, toml_text).unwrap();
    let mut p =
        magcache_cli::prepare(&path).unwrap_or_else(|e| panic!("prepare: {e}\n{toml_text}"));
    magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap()
}

/// Asserts that the report's calls reproduce the reference calls: same order, step, branch, expert,
/// identical `computed`, and metrics within `metric_tol` (relative) where the reference has one.
///
/// One exception: diffusers' MagCache resets its accumulators when a scope's last step ends, and the
/// fixture generator reads the state after the call, so the reference logs `0.0` for the last call of
/// every MagCache scope. We report the accumulated error the decision used; that one metric is not
/// compared (the decision is).
pub fn assert_calls_match(
    name: &str,
    report: &magcache_cli::Report,
    reference: &serde_json::Value,
    metric_tol: f64,
) {
    let refc = reference.as_array().expect("calls array");
    assert_eq!(report.calls.len(), refc.len(), "{name}: number of calls");
    let last_of_scope = |i: usize| {
        let key = |c: &serde_json::Value| {
            (
                c["expert"].as_u64(),
                c["context"].as_str().map(String::from),
            )
        };
        !refc[i + 1..].iter().any(|c| key(c) == key(&refc[i]))
    };
    for (i, (a, b)) in report.calls.iter().zip(refc).enumerate() {
        if name.contains("magcache") && last_of_scope(i) {
            assert_eq!(
                a.computed,
                b["computed"].as_bool(),
                "{name} call {i}: computed"
            );
            continue;
        }
        assert_eq!(
            a.step as u64,
            b["step"].as_u64().unwrap(),
            "{name} call {i}: step"
        );
        assert_eq!(
            a.branch,
            b["context"].as_str().unwrap(),
            "{name} call {i}: branch"
        );
        assert_eq!(
            a.expert as u64,
            b["expert"].as_u64().unwrap(),
            "{name} call {i}: expert"
        );
        assert_eq!(
            a.computed,
            b["computed"].as_bool(),
            "{name} call {i}: computed (metric {:?} vs {})",
            a.metric,
            b["metric"]
        );
        if let Some(m) = b["metric"].as_f64() {
            let got = a
                .metric
                .unwrap_or_else(|| panic!("{name} call {i}: metric missing"));
            assert!(
                (got - m).abs() <= metric_tol * m.abs().max(1e-3),
                "{name} call {i}: metric {got} vs {m}"
            );
        } else {
            assert!(
                a.metric.is_none(),
                "{name} call {i}: unexpected metric {:?}",
                a.metric
            );
        }
    }
}

/// `[cache]` body of a reference run from its name and its config in the fixture json (`None` for
/// dense). MagCache runs of dual experts (`high`/`low` configs) give one curve per expert.
pub fn cache_table_for(name: &str, c: &serde_json::Value) -> Option<String> {
    if name == "dense" {
        None
    } else if name.starts_with("magcache") && c.get("high").is_some() {
        let h = &c["high"];
        Some(format!(
            "strategy = \"magcache\"\nthreshold = {}\nmax_skip_steps = {}\nretention_ratio = {}\n[cache.mag_ratios]\nhigh_noise = {}\nlow_noise = {}\n",
            h["threshold"], h["max_skip_steps"], h["retention_ratio"], h["mag_ratios"], c["low"]["mag_ratios"]
        ))
    } else if name.starts_with("magcache") {
        Some(magcache_table(c))
    } else if name.starts_with("teacache") {
        Some(teacache_table(c))
    } else if name.starts_with("seacache") {
        Some(seacache_table(c))
    } else if name.starts_with("fbcache") {
        Some(format!(
            "strategy = \"fbcache\"\nthreshold = {}\n",
            c["threshold"]
        ))
    } else {
        panic!("unknown reference run {name}")
    }
}

/// Runs reference run `name` of the loop fixture `loop_rel` (`.json` + `.safetensors` under
/// `tests/fixtures/`) through the runner with `weights` (a TOML value) and asserts identical decisions
/// (metrics within 1e-3 relative) and final latents within 1e-3. Returns the report.
pub fn check_reference_run(
    family: &str,
    weights: &str,
    loop_rel: &str,
    name: &str,
) -> magcache_cli::Report {
    let meta = load_json(&format!("{loop_rel}.json"));
    let tensors = load(&format!("{loop_rel}.safetensors"));
    let run = &meta["runs"][name];
    let cache = cache_table_for(name, &run["config"]);
    let dir = tempfile::tempdir().unwrap();
    let inputs = fixture(&format!("{loop_rel}.safetensors"))
        .display()
        .to_string();
    let (fin, report) = run_toml(
        dir.path(),
        &loop_toml(family, weights, &inputs, &meta, cache.as_deref()),
    );
    assert_calls_match(name, &report, &run["calls"], 1e-3);
    assert_eq!(
        report.computed_calls as u64,
        run["computed_calls"].as_u64().unwrap(),
        "{name}: computed calls"
    );
    let d = max_abs_diff(&fin, &tensors[&format!("{name}.final")]);
    assert!(d < 1e-3, "{name}: final differs by {d}");
    report
}

/// A fixture folder as a TOML string value.
pub fn weights_of(rel: &str) -> String {
    format!("\"{}\"", fixture(rel).display())
}

/// A fixture family's inputs (`fam["inputs"]`: run-file name -> tensor name in the loop fixture
/// `loop_rel.safetensors`) written to `dir` under the names a run's inputs file uses; returns its
/// path.
pub fn family_inputs_file(
    dir: &std::path::Path,
    loop_rel: &str,
    fam: &serde_json::Value,
) -> String {
    let all = load(&format!("{loop_rel}.safetensors"));
    let mine: HashMap<String, Tensor> = fam["inputs"]
        .as_object()
        .expect("inputs table")
        .iter()
        .map(|(k, v)| (k.clone(), all[v.as_str().expect("tensor name")].clone()))
        .collect();
    let path = dir.join("inputs.safetensors");
    candle_core::safetensors::save(&mine, &path).expect("inputs file");
    path.display().to_string()
}

/// The run family of a fixture family key (`wan21` -> `wan2.1`).
pub fn family_name(f: &str) -> &'static str {
    match f {
        "wan21" => "wan2.1",
        "wan22" => "wan2.2",
        "flux" => "flux",
        other => panic!("unknown fixture family {other}"),
    }
}

/// A global allocator that counts live heap bytes and their peak, for memory tests. A test binary
/// installs it with `#[global_allocator] static A: CountingAlloc = CountingAlloc;` and measures
/// with [`heap_peak_of`]; the counter is process-wide, so such a binary holds one test.
pub struct CountingAlloc;

static HEAP_CURRENT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static HEAP_PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        use std::sync::atomic::Ordering;
        let p = unsafe { std::alloc::System.alloc(l) };
        if !p.is_null() {
            let now = HEAP_CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            HEAP_PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(p, l) };
        HEAP_CURRENT.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// Peak heap bytes (counted by [`CountingAlloc`]) above what was allocated before `f` ran, and
/// `f`'s result.
pub fn heap_peak_of<T>(f: impl FnOnce() -> T) -> (usize, T) {
    use std::sync::atomic::Ordering;
    let base = HEAP_CURRENT.load(Ordering::Relaxed);
    HEAP_PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (HEAP_PEAK.load(Ordering::Relaxed) - base, out)
}

/// The reference run `name` of the loop fixture `rel` (of `family`, weights in the fixture folder
/// `weights`) with `model_extra` added to `[model]`: its final latents and report.
pub fn loop_run(
    rel: &str,
    family: &str,
    weights: &str,
    name: &str,
    model_extra: &str,
) -> (candle_core::Tensor, magcache_cli::Report) {
    let meta = load_json(&format!("{rel}.json"));
    let cache = cache_table_for(name, &meta["runs"][name]["config"]);
    let inputs = fixture(&format!("{rel}.safetensors")).display().to_string();
    let text = loop_toml(
        family,
        &weights_of(weights),
        &inputs,
        &meta,
        cache.as_deref(),
    )
    .replacen("[model]\n", &format!("[model]\n{model_extra}"), 1);
    let dir = tempfile::tempdir().unwrap();
    run_toml(dir.path(), &text)
}

/// bf16 tolerance of the tiny loops: final latents within this of the f32 run, as a fraction of the
/// f32 final's largest magnitude. bf16 keeps 8 bits of mantissa (0.4% per rounding). On a CPU with
/// AVX512-BF16 the products run in bf16 (activations rounded too: `nn::bf16_gemm`) and the loops
/// land within 0.4%; on other CPUs only the weights are rounded (widened to f32 for each product),
/// within 0.2%; with candle's bf16 products (the GPU path) they landed within 0.7%.
pub const BF16_FINAL_REL: f32 = 0.01;
/// A bf16 decision may differ from the f32 one only where the f32 metric was within this fraction
/// of the threshold.
pub const BF16_DECISION_MARGIN: f64 = 0.05;

/// Every reference loop (Wan2.1, FLUX.1, Wan2.2) run in f32 and with `model_extra` (`dtype =
/// "bf16"`, `matmul_precision = "bf16"`): the same number of calls; a decision may differ only where
/// the f32 metric was within [`BF16_DECISION_MARGIN`] of the threshold (the runs part there); the
/// bf16 final differs from the f32 one (bf16 ran) and, where no decision differed, by less than
/// [`BF16_FINAL_REL`] of its largest magnitude.
pub fn check_bf16_loops(model_extra: &str) {
    for (rel, family, weights) in [
        (
            "reference/wan21_tiny_loop",
            "wan2.1",
            "reference/wan21_tiny",
        ),
        ("reference/flux_tiny_loop", "flux", "reference/flux_tiny"),
        (
            "reference/wan22_tiny_loop",
            "wan2.2",
            "reference/wan22_tiny",
        ),
    ] {
        let meta = load_json(&format!("{rel}.json"));
        let names: Vec<String> = meta["runs"].as_object().unwrap().keys().cloned().collect();
        for name in names {
            let config = &meta["runs"][&name]["config"];
            // One threshold, or one per Wan2.2 expert (`high`, `low`).
            let threshold = |expert: usize| {
                config["threshold"]
                    .as_f64()
                    .or_else(|| config[["high", "low"][expert]]["threshold"].as_f64())
                    .unwrap()
            };
            let (f32_final, r32) = loop_run(rel, family, weights, &name, "");
            let (bf16_final, r16) = loop_run(rel, family, weights, &name, model_extra);
            assert_eq!(r32.calls.len(), r16.calls.len(), "{rel} {name}");
            let mut diverged = None;
            for (i, (a, b)) in r32.calls.iter().zip(&r16.calls).enumerate() {
                if a.computed != b.computed {
                    // Past the first difference the two runs follow different trajectories.
                    let (t, m) = (threshold(a.expert), a.metric.unwrap());
                    let margin = (m - t).abs() / t;
                    eprintln!("{rel} {name}: call {i} differs in bf16, f32 metric {m} vs threshold {t} (margin {margin:.3})");
                    assert!(
                        margin < BF16_DECISION_MARGIN,
                        "{rel} {name}: call {i} decided differently in bf16 with the f32 metric {m} {margin:.3} away from the threshold {t}"
                    );
                    diverged = Some(i);
                    break;
                }
            }
            let scale = max_abs(&f32_final);
            let d = max_abs_diff(&f32_final, &bf16_final);
            eprintln!("{rel} {name}: bf16 final differs by {d} (f32 final max |x| {scale}), diverged at {diverged:?}");
            assert!(d > 0.0, "{rel} {name}: bf16 ran as f32");
            if diverged.is_none() {
                assert!(
                    d < BF16_FINAL_REL * scale,
                    "{rel} {name}: bf16 final {d} from f32 (max |x| {scale})"
                );
            }
        }
    }
}
