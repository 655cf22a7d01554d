//! UniPC (diffusers `UniPCMultistepScheduler`, flow prediction) against the pipeline fixtures:
//! the schedule of both UniPC configs, a scheduler-only replay of the whole-pipeline `dense` run
//! (its stored guided predictions in, its `trajectory` and `corrected` out), the Euler alternative,
//! and the `wan_unipc_loop` runs over the tiny Wan2.1 transformer through the runner (decisions
//! identical, final latents within 1e-3).

use candle_core::{Device, IndexOp, Tensor};
use magcache_layers::scheduler::{flow_match_static, FlowSampler};
use magcache_layers::unipc::{UniPc, UniPcConfig};
use magcache_tests::{
    assert_calls_match, cache_table_for, fixture, link_all, load, load_json, loop_toml,
    max_abs_diff, weights_of,
};
use serde_json::Value;
use std::path::Path;

const LOOP: &str = "pipelines/wan_unipc_loop";
const PIPELINE: &str = "pipelines/wan_pipeline";

fn as_f64s(v: &Value) -> Vec<f64> {
    serde_json::from_value(v.clone()).expect("numbers")
}

/// Timesteps exact, sigmas within 1e-6 relative; returns the largest relative sigma error.
fn check_schedule(cfg: &UniPcConfig, steps: usize, timesteps: &Value, sigmas: &Value) -> f64 {
    let s = cfg.schedule(steps).unwrap();
    let want_t: Vec<i64> = serde_json::from_value(timesteps.clone()).unwrap();
    assert_eq!(s.timesteps, want_t, "timesteps");
    let want_s = as_f64s(sigmas);
    assert_eq!(s.sigmas.len(), want_s.len(), "number of sigmas");
    let mut worst = 0f64;
    for (i, (&a, &b)) in s.sigmas.iter().zip(&want_s).enumerate() {
        let rel = (a as f64 - b).abs() / b.abs().max(1e-12);
        let rel = if b == 0.0 { (a as f64).abs() } else { rel };
        assert!(rel <= 1e-6, "sigma {i}: {a} vs {b}");
        worst = worst.max(rel);
    }
    worst
}

#[test]
fn scheduler_config_json_reads_as_the_wan_config() {
    let c = UniPcConfig::load(&fixture("pipelines/wan_scheduler/scheduler_config.json")).unwrap();
    let meta = load_json(&format!("{PIPELINE}.json"));
    let flow_shift = meta["scheduler"]["config"]["flow_shift"].as_f64().unwrap();
    assert_eq!(c, UniPcConfig::wan(flow_shift));
    let from_meta =
        UniPcConfig::from_json(&meta["scheduler"]["config"], "wan_pipeline.json").unwrap();
    assert_eq!(c, from_meta);
    let lp = load_json(&format!("{LOOP}.json"));
    let from_loop = UniPcConfig::from_json(&lp["scheduler_config"], "wan_unipc_loop.json").unwrap();
    assert_eq!(
        from_loop,
        UniPcConfig::wan(lp["shift"].as_f64().unwrap()),
        "the loop uses the Wan config with its own shift"
    );
}

#[test]
fn timesteps_and_sigmas_match_diffusers() {
    let meta = load_json(&format!("{PIPELINE}.json"));
    let steps = meta["call"]["num_inference_steps"].as_u64().unwrap() as usize;
    let cfg = UniPcConfig::from_json(&meta["scheduler"]["config"], "wan_pipeline.json").unwrap();
    let e1 = check_schedule(
        &cfg,
        steps,
        &meta["scheduler"]["timesteps"],
        &meta["scheduler"]["sigmas"],
    );
    // The transformer received exactly these timesteps.
    let model_t: Vec<Vec<i64>> =
        serde_json::from_value(meta["runs"]["dense"]["model_timesteps"].clone()).unwrap();
    let ours = cfg.schedule(steps).unwrap().timesteps;
    for (k, t) in model_t.iter().enumerate() {
        assert!(t.iter().all(|&x| x == ours[k]), "model timestep {k}");
    }

    let lp = load_json(&format!("{LOOP}.json"));
    let steps = lp["steps"].as_u64().unwrap() as usize;
    let cfg = UniPcConfig::from_json(&lp["scheduler_config"], "wan_unipc_loop.json").unwrap();
    let e2 = check_schedule(&cfg, steps, &lp["timesteps"], &lp["sigmas"]);
    eprintln!("sigma max relative error: pipeline {e1:e}, loop {e2:e}");
}

/// Max |a - b| over the step-k slices of two stacked tensors.
fn step_diff(a: &Tensor, stacked: &Tensor, k: usize) -> f32 {
    max_abs_diff(a, &stacked.i(k).unwrap())
}

#[test]
fn dense_pipeline_replay_from_noise_pred() {
    // Scheduler only: feed the stored guided predictions, get the stored trajectory and the
    // corrected samples (independent of the transformer).
    let meta = load_json(&format!("{PIPELINE}.json"));
    let t = load(&format!("{PIPELINE}.safetensors"));
    let cfg = UniPcConfig::from_json(&meta["scheduler"]["config"], "wan_pipeline.json").unwrap();
    let noise = &t["dense.noise_pred"];
    let traj = &t["dense.trajectory"];
    let corrected = &t["dense.corrected"];
    let steps = noise.dim(0).unwrap();
    assert_eq!(
        steps as u64,
        meta["call"]["num_inference_steps"].as_u64().unwrap()
    );
    let mut u = UniPc::new(&cfg, steps).unwrap();
    let mut x = t["latents_init"].clone();
    let (mut worst_traj, mut worst_corr) = (0f32, 0f32);
    for k in 0..steps {
        x = u.step(&noise.i(k).unwrap(), &x).unwrap();
        let dc = step_diff(u.last_sample().unwrap(), corrected, k);
        let dt = step_diff(&x, traj, k);
        eprintln!(
            "step {k}: order {} corrected {dc:e} trajectory {dt:e}",
            u.last_order()
        );
        worst_corr = worst_corr.max(dc);
        worst_traj = worst_traj.max(dt);
    }
    eprintln!("dense replay: trajectory max {worst_traj:e}, corrected max {worst_corr:e}");
    assert!(worst_corr < 1e-5, "corrected differs by {worst_corr}");
    assert!(worst_traj < 1e-5, "trajectory differs by {worst_traj}");
    let dfin = max_abs_diff(&x, &t["dense.final"]);
    assert!(dfin < 1e-5, "final differs by {dfin}");
}

#[test]
fn dense_euler_alternative_replay() {
    let meta = load_json(&format!("{PIPELINE}.json"));
    let t = load(&format!("{PIPELINE}.safetensors"));
    let alt = &meta["scheduler_alternative"];
    let run = alt["run"].as_str().unwrap();
    let shift = alt["config"]["shift"].as_f64().unwrap();
    let noise = &t[&format!("{run}.noise_pred")];
    let traj = &t[&format!("{run}.trajectory")];
    let steps = noise.dim(0).unwrap();
    let sampler = FlowSampler::Euler { shift };
    let s = sampler.schedule(steps).unwrap();
    assert_eq!(s, flow_match_static(steps, shift));
    for (a, b) in s.sigmas.iter().zip(as_f64s(&alt["sigmas"])) {
        assert!(
            (*a as f64 - b).abs() <= 1e-6 * b.abs().max(1e-6),
            "{a} vs {b}"
        );
    }
    for (a, b) in s.timesteps.iter().zip(as_f64s(&alt["timesteps"])) {
        assert!((*a as f64 - b).abs() <= 1e-3, "{a} vs {b}");
    }
    let mut st = sampler.stepper(&s).unwrap();
    let mut x = t["latents_init"].clone();
    let mut worst = 0f32;
    for k in 0..steps {
        x = st.step(k, &noise.i(k).unwrap(), &x).unwrap();
        worst = worst.max(step_diff(&x, traj, k));
    }
    eprintln!("dense_euler replay: trajectory max {worst:e}");
    assert!(worst < 1e-5, "trajectory differs by {worst}");
}

// ------------------------------------------------------------------ the loop through the runner

/// How a loop run names its scheduler.
enum Via {
    /// `scheduler = "unipc"` (built-in Wan config with the run's shift)
    Key,
    /// `scheduler_config = FILE` (the fixture's config written out)
    ConfigFile,
    /// weights in `PIPELINE/transformer` beside `PIPELINE/scheduler/scheduler_config.json`, no key
    PipelineFolder,
}

fn write_scheduler_config(path: &Path, cfg: &Value) {
    let mut obj = cfg.as_object().unwrap().clone();
    obj.insert(
        "_class_name".into(),
        Value::String("UniPCMultistepScheduler".into()),
    );
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(&obj).unwrap()).unwrap();
}

fn check_loop_run(name: &str, via: Via) {
    link_all();
    let meta = load_json(&format!("{LOOP}.json"));
    let tensors = load(&format!("{LOOP}.safetensors"));
    let run = &meta["runs"][name];
    let dir = tempfile::tempdir().unwrap();
    let inputs = fixture(&format!("{LOOP}.safetensors"))
        .display()
        .to_string();
    let mut weights = weights_of("reference/wan21_tiny");
    let mut extra = String::new();
    match via {
        Via::Key => extra.push_str("scheduler = \"unipc\"\n"),
        Via::ConfigFile => {
            let p = dir.path().join("sched.json");
            write_scheduler_config(&p, &meta["scheduler_config"]);
            extra.push_str("scheduler_config = \"sched.json\"\n");
        }
        Via::PipelineFolder => {
            let tr = dir.path().join("pipe").join("transformer");
            std::fs::create_dir_all(&tr).unwrap();
            for e in std::fs::read_dir(fixture("reference/wan21_tiny")).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), tr.join(e.file_name())).unwrap();
            }
            write_scheduler_config(
                &dir.path().join("pipe/scheduler/scheduler_config.json"),
                &meta["scheduler_config"],
            );
            weights = "\"pipe/transformer\"".into();
        }
    }
    let cache = cache_table_for(name, &run["config"]);
    let text = loop_toml("wan2.1", &weights, &inputs, &meta, cache.as_deref())
        .replace("[sampling]\n", &format!("[sampling]\n{extra}"));
    let path = dir.path().join("run.toml");
    std::fs::write(&path, &text).unwrap();
    let mut p = magcache_cli::prepare(&path).unwrap_or_else(|e| panic!("prepare: {e}\n{text}"));
    let plan = p.pipeline.plan();
    assert_eq!(plan.scheduler, "unipc", "{name}: plan scheduler");
    assert_eq!(plan.shift, meta["shift"].as_f64(), "{name}: plan shift");
    let sig = as_f64s(&meta["sigmas"]);
    for s in &plan.scopes {
        for (a, &i) in s.sigmas.iter().zip(&s.step_indices) {
            assert!((a - sig[i]).abs() <= 1e-6, "{name}: plan sigma {i}");
        }
    }
    let (fin, report) =
        magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).expect("generate");
    let want_t = as_f64s(&meta["timesteps"]);
    for c in &report.calls {
        assert_eq!(
            c.timestep, want_t[c.step],
            "{name}: timestep of step {}",
            c.step
        );
    }
    assert_calls_match(name, &report, &run["calls"], 1e-3);
    assert_eq!(
        report.computed_calls as u64,
        run["computed_calls"].as_u64().unwrap(),
        "{name}: computed calls"
    );
    let d = max_abs_diff(&fin, &tensors[&format!("{name}.final")]);
    eprintln!(
        "{name}: final max abs error {d:e}, {} of {} calls computed",
        report.computed_calls, report.total_calls
    );
    assert!(d < 1e-3, "{name}: final differs by {d}");
}

#[test]
fn loop_dense() {
    check_loop_run("dense", Via::Key);
}

#[test]
fn loop_magcache_a() {
    check_loop_run("magcache_a", Via::ConfigFile);
}

#[test]
fn loop_magcache_b() {
    check_loop_run("magcache_b", Via::PipelineFolder);
}

// ------------------------------------------------------------------ choices and errors

fn prepare_err(text: &str, files: &[(&str, &str)]) -> String {
    link_all();
    let dir = tempfile::tempdir().unwrap();
    for (n, body) in files {
        std::fs::write(dir.path().join(n), body).unwrap();
    }
    let path = dir.path().join("run.toml");
    std::fs::write(&path, text).unwrap();
    match magcache_cli::prepare(&path) {
        Ok(_) => panic!("expected an error for\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn base_run(extra: &str) -> String {
    let meta = load_json(&format!("{LOOP}.json"));
    let inputs = fixture(&format!("{LOOP}.safetensors"))
        .display()
        .to_string();
    loop_toml(
        "wan2.1",
        &weights_of("reference/wan21_tiny"),
        &inputs,
        &meta,
        None,
    )
    .replace("[sampling]\n", &format!("[sampling]\n{extra}"))
}

#[test]
fn default_stays_euler_and_euler_can_be_named() {
    link_all();
    for extra in ["", "scheduler = \"euler\"\n"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, base_run(extra)).unwrap();
        let p = magcache_cli::prepare(&path).unwrap();
        assert_eq!(p.pipeline.plan().scheduler, "flow-euler", "{extra:?}");
    }
}

#[test]
fn plan_without_running_names_unipc() {
    link_all();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    let text = base_run("scheduler = \"unipc\"\n");
    std::fs::write(&path, &text).unwrap();
    let cfg = magcache_core::RunConfig::load(&path).unwrap();
    let fam = magcache_core::runtime::registry::family("wan2.1").unwrap();
    let plan = (fam.plan)(&cfg, "run.toml", dir.path()).unwrap().plan;
    assert_eq!(plan.scheduler, "unipc");
    let meta = load_json(&format!("{LOOP}.json"));
    assert_eq!(plan.total_steps as u64, meta["steps"].as_u64().unwrap());
}

#[test]
fn unknown_scheduler_and_unsupported_configs_are_one_line_errors() {
    let err = prepare_err(&base_run("scheduler = \"dpm\"\n"), &[]);
    assert!(
        err.contains("sampling.scheduler") && err.contains("dpm"),
        "{err}"
    );
    let meta = load_json(&format!("{LOOP}.json"));
    for (key, value) in [
        ("solver_type", Value::String("bh3".into())),
        ("predict_x0", Value::Bool(false)),
        ("prediction_type", Value::String("epsilon".into())),
    ] {
        let mut c = meta["scheduler_config"].as_object().unwrap().clone();
        c.insert(key.into(), value);
        let body = serde_json::to_string(&c).unwrap();
        let err = prepare_err(
            &base_run("scheduler_config = \"bad_scheduler.json\"\n"),
            &[("bad_scheduler.json", &body)],
        );
        assert!(
            err.contains("bad_scheduler.json") && err.contains(key),
            "{key}: {err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }
    let err = prepare_err(
        &base_run("scheduler = \"euler\"\nscheduler_config = \"s.json\"\n"),
        &[("s.json", "{}")],
    );
    assert!(err.contains("sampling.scheduler_config"), "{err}");
}

#[test]
fn flux_rejects_unipc() {
    let text = format!(
        "[model]\nfamily = \"flux\"\nweights = {}\n\n[sampling]\nsteps = 2\nscheduler = \"unipc\"\n",
        weights_of("reference/flux_tiny")
    );
    let err = prepare_err(&text, &[]);
    assert!(err.contains("sampling.scheduler"), "{err}");
}

#[test]
fn stepper_rejects_mismatched_shapes() {
    let mut u = UniPc::new(&UniPcConfig::wan(3.0), 2).unwrap();
    let a = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(u.step(&a, &b).is_err());
}

#[test]
fn published_unipc_curve_warns_about_the_sampler_under_euler_only() {
    // The published Wan2.1-1.3B MagCache curve was calibrated under UniPC at shift 5.
    link_all();
    let warnings = |scheduler: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        let text = format!(
            "[model]\nfamily = \"wan2.1\"\npreset = \"wan2.1-t2v-1.3b\"\n\n[sampling]\nsteps = 10\nshift = 5.0\n{scheduler}\n[cache]\nstrategy = \"magcache\"\n"
        );
        std::fs::write(&path, text).unwrap();
        magcache_cli::plan(&path).unwrap().warnings
    };
    let sampler_warning = |w: &[String]| w.iter().any(|m| m.contains("sampler"));
    assert!(!sampler_warning(&warnings("scheduler = \"unipc\"")));
    assert!(sampler_warning(&warnings("")));
    assert!(sampler_warning(&warnings("scheduler = \"euler\"")));
}

#[test]
fn plan_agrees_with_run_under_unipc() {
    link_all();
    let meta = load_json(&format!("{LOOP}.json"));
    let inputs = fixture(&format!("{LOOP}.safetensors"))
        .display()
        .to_string();
    let cache = cache_table_for("magcache_b", &meta["runs"]["magcache_b"]["config"]);
    let text = loop_toml(
        "wan2.1",
        &weights_of("reference/wan21_tiny"),
        &inputs,
        &meta,
        cache.as_deref(),
    )
    .replace("[sampling]\n", "[sampling]\nscheduler = \"unipc\"\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(&path, &text).unwrap();
    let plan = magcache_cli::plan(&path).unwrap();
    let (_, rep) = magcache_tests::run_toml(dir.path(), &text);
    assert_eq!(plan.calls.len(), rep.calls.len());
    for (i, (p, r)) in plan.calls.iter().zip(&rep.calls).enumerate() {
        assert_eq!(
            (p.step, &p.branch, p.computed),
            (r.step, &r.branch, r.computed),
            "call {i}"
        );
    }
    assert_eq!(plan.computed_calls, rep.computed_calls);
}
