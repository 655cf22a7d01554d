//! Calibration reproduces diffusers' MagCache calibration; profiles load back, warn about another
//! schedule and resample by sigma; `plan` predicts `run` call for call.

use magcache_tests::{fixture, link_all, load_json, loop_toml, magcache_table, run_toml};
use std::path::Path;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn wan21_toml(cache: Option<&str>) -> String {
    let meta = load_json("reference/wan21_tiny_loop.json");
    loop_toml(
        "wan2.1",
        &format!("\"{}\"", fixture("reference/wan21_tiny").display()),
        &fixture("reference/wan21_tiny_loop.safetensors")
            .display()
            .to_string(),
        &meta,
        cache,
    )
}

fn wan22_toml(cache: Option<&str>) -> String {
    let meta = load_json("reference/wan22_tiny_loop.json");
    loop_toml(
        "wan2.2",
        &format!("\"{}\"", fixture("reference/wan22_tiny").display()),
        &fixture("reference/wan22_tiny_loop.safetensors")
            .display()
            .to_string(),
        &meta,
        cache,
    )
}

fn assert_close(name: &str, got: &[f64], want: &serde_json::Value) {
    let want: Vec<f64> = serde_json::from_value(want.clone()).unwrap();
    assert_eq!(got.len(), want.len(), "{name}");
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 1e-4, "{name}[{i}]: {a} vs {b}");
    }
}

#[test]
fn calibration_matches_reference_wan21() {
    link_all();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "run.toml", &wan21_toml(None));
    let (prof, _) = magcache_cli::calibrate(&cfg, magcache_cli::Verbosity::Quiet).unwrap();
    let reference = &load_json("reference/wan21_tiny_loop.json")["calibration"];
    assert_close("cond", &prof.ratios["main"]["cond"], &reference["cond"]);
    assert_close(
        "uncond",
        &prof.ratios["main"]["uncond"],
        &reference["uncond"],
    );
    assert_eq!(prof.meta.steps, 12);
    assert_eq!(prof.meta.shift, Some(5.0));
    assert_eq!(prof.meta.sigmas.len(), 12);
    assert_eq!(prof.mag_stds["main"]["cond"].len(), 12);
    assert!(prof.cos_dists["main"]["cond"][1..]
        .iter()
        .all(|c| (0.0..=2.0).contains(c)));
    assert!(prof.meta.model.starts_with("weights fnv64:"));
}

/// `calibrate --blocks`: two hooks on every block of both experts observe every call without
/// changing the calibration, and every block of every scope gets its residual change and time.
#[test]
fn block_probes_observe_every_block_of_both_experts() {
    link_all();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "run.toml", &wan22_toml(None));
    let (plain, _) = magcache_cli::calibrate(&cfg, magcache_cli::Verbosity::Quiet).unwrap();
    let (prof, _, stats) =
        magcache_cli::calibrate_with(&cfg, magcache_cli::Verbosity::Quiet, true).unwrap();
    assert_eq!(
        prof.ratios, plain.ratios,
        "probes must not change what runs"
    );
    assert!(plain.block_change.is_empty());
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("reference/wan22_tiny/transformer/config.json")).unwrap(),
    )
    .unwrap();
    let layers = config["num_layers"].as_u64().unwrap() as usize;
    // Two experts x two branches x every block.
    assert_eq!(stats.len(), 2 * 2 * layers, "{stats:?}");
    for st in &stats {
        let c = st.mean_change.expect("every scope runs more than one call");
        assert!(c.is_finite() && c > 0.0, "{st:?}");
        assert!(st.mean_seconds > 0.0, "{st:?}");
    }
    for expert in ["high_noise", "low_noise"] {
        for branch in ["cond", "uncond"] {
            let v = &prof.block_change[expert][branch];
            assert_eq!(v.len(), layers, "{expert} {branch}");
        }
    }
    let text = magcache_cli::blocks_text(&stats);
    assert!(
        text.contains("expert 1 uncond: blocks changing least"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("| ")).count(),
        1 + layers
    );
}

#[test]
fn calibration_matches_reference_per_expert_wan22() {
    link_all();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "run.toml", &wan22_toml(None));
    let (prof, _) = magcache_cli::calibrate(&cfg, magcache_cli::Verbosity::Quiet).unwrap();
    let reference = &load_json("reference/wan22_tiny_loop.json")["calibration"];
    for (mine, theirs) in [("high_noise", "high"), ("low_noise", "low")] {
        for b in ["cond", "uncond"] {
            assert_close(
                &format!("{mine}.{b}"),
                &prof.ratios[mine][b],
                &reference[theirs][b],
            );
        }
    }
    assert_eq!(prof.meta.boundary_ratio, Some(0.875));
    assert_eq!(prof.sigmas["high_noise"].len(), 8);
    assert_eq!(prof.sigmas["low_noise"].len(), 4);
}

#[test]
fn a_profile_reproduces_the_run_with_the_same_curve() {
    // magcache_a used the calibrated cond curve for both branches; a profile gives each branch its own
    // curve, so compare with a run given the same per-branch curves through the profile: the profile
    // run must equal a run whose ratios are the profile's cond curve when cond == uncond is forced.
    link_all();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "run.toml", &wan21_toml(None));
    let (mut prof, _) = magcache_cli::calibrate(&cfg, magcache_cli::Verbosity::Quiet).unwrap();
    let cond = prof.ratios["main"]["cond"].clone();
    prof.ratios
        .get_mut("main")
        .unwrap()
        .insert("uncond".into(), cond.clone());
    let ppath = write(dir.path(), "profile.toml", &prof.to_toml().unwrap());
    let meta = load_json("reference/wan21_tiny_loop.json");
    let run = &meta["runs"]["magcache_a"];
    let c = &run["config"];
    let with_profile = format!(
        "strategy = \"magcache\"\nthreshold = {}\nmax_skip_steps = {}\nretention_ratio = {}\nprofile = \"{}\"\n",
        c["threshold"],
        c["max_skip_steps"],
        c["retention_ratio"],
        ppath.display()
    );
    let (_, rep) = run_toml(dir.path(), &wan21_toml(Some(&with_profile)));
    let got: Vec<Option<bool>> = rep.calls.iter().map(|c| c.computed).collect();
    let want: Vec<Option<bool>> = run["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["computed"].as_bool())
        .collect();
    assert_eq!(got, want);
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);

    // Another shift: warned about; with resample = "sigma": mapped by noise level, no shift warning.
    let other_shift = wan21_toml(Some(&with_profile)).replace("shift = 5.0", "shift = 3.0");
    let (_, rep) = run_toml(dir.path(), &other_shift);
    assert!(
        rep.warnings
            .iter()
            .any(|w| w.contains("shift 5") && w.contains("shift 3")),
        "{:?}",
        rep.warnings
    );
    let by_sigma = other_shift.replace("profile = ", "resample = \"sigma\"\nprofile = ");
    let (_, rep) = run_toml(dir.path(), &by_sigma);
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
}

#[test]
fn resample_sigma_picks_the_nearest_noise_level() {
    use magcache_core::maths::sigma_interp;
    let curve = [1.0, 2.0, 3.0, 4.0];
    let at = [1.0, 0.8, 0.5, 0.1];
    assert_eq!(
        sigma_interp(&curve, &at, &[0.95, 0.52, 0.32, 0.0]).unwrap(),
        vec![1.0, 3.0, 3.0, 4.0]
    );
}

#[test]
fn resample_sigma_without_profile_is_an_error() {
    link_all();
    let dir = tempfile::tempdir().unwrap();
    let t = wan21_toml(Some(
        "strategy = \"magcache\"\nmag_ratios = [1.0, 0.99]\nresample = \"sigma\"\n",
    ));
    let cfg = write(dir.path(), "run.toml", &t);
    let err = magcache_cli::prepare(&cfg)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("cache.resample"), "{err}");
}

fn plan_agrees_with_run(toml: &str) {
    link_all();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "run.toml", toml);
    let plan = magcache_cli::plan(&cfg).unwrap();
    assert!(!plan.decides_from_data);
    let (_, rep) = run_toml(dir.path(), toml);
    assert_eq!(plan.calls.len(), rep.calls.len());
    for (i, (p, r)) in plan.calls.iter().zip(&rep.calls).enumerate() {
        assert_eq!(
            (p.step, &p.branch, p.expert, p.computed),
            (r.step, &r.branch, r.expert, r.computed),
            "call {i}"
        );
        assert_eq!(p.metric, r.metric, "call {i}");
    }
    assert_eq!(plan.computed_calls, rep.computed_calls);
}

#[test]
fn plan_agrees_with_run_wan21() {
    let meta = load_json("reference/wan21_tiny_loop.json");
    for run in ["magcache_a", "magcache_b", "magcache_c"] {
        plan_agrees_with_run(&wan21_toml(Some(&magcache_table(
            &meta["runs"][run]["config"],
        ))));
    }
}

#[test]
fn plan_agrees_with_run_wan22_per_expert() {
    let meta = load_json("reference/wan22_tiny_loop.json");
    let c = &meta["runs"]["magcache_per_expert"]["config"];
    let t = format!(
        "strategy = \"magcache\"\nthreshold = 0.3\nmax_skip_steps = 2\nretention_ratio = 0.2\n[cache.mag_ratios]\nhigh_noise = {}\nlow_noise = {}\n",
        c["high"]["mag_ratios"], c["low"]["mag_ratios"]
    );
    plan_agrees_with_run(&wan22_toml(Some(&t)));
}

#[test]
fn plan_agrees_with_run_flux_registered_curve() {
    let mut meta = load_json("reference/flux_tiny_loop.json");
    meta.as_object_mut().unwrap().remove("shift");
    let t = loop_toml(
        "flux",
        &format!("\"{}\"", fixture("reference/flux_tiny").display()),
        &fixture("reference/flux_tiny_loop.safetensors").display().to_string(),
        &meta,
        Some("strategy = \"magcache\"\nthreshold = 0.24\nmax_skip_steps = 5\nretention_ratio = 0.1\n"),
    );
    plan_agrees_with_run(&t);
}

#[test]
fn plan_says_data_driven_strategies_decide_at_run_time() {
    link_all();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "run.toml",
        &wan21_toml(Some("strategy = \"fbcache\"\nthreshold = 0.1\n")),
    );
    let plan = magcache_cli::plan(&cfg).unwrap();
    assert!(plan.decides_from_data);
    assert!(plan.calls.iter().all(|c| c.computed.is_none()));
    assert!(magcache_cli::plan_text(&plan).contains("decides from the data"));
}

/// A profile names what it was measured on: two GGUF files of one model are told apart (not "0
/// files"), and sizes the run file overrides are part of it, for presets too.
#[test]
fn the_profiles_model_names_gguf_files_and_overrides() {
    let cfg = |model: &str| {
        let text = format!("[model]\nfamily = \"wan2.1\"\n{model}\n[sampling]\nsteps = 2\n");
        magcache_core::runtime::config::RunConfig::parse(&text, "run.toml").unwrap()
    };
    // Two of the GGUF fixtures' files, whatever their quant types.
    let meta = load_json("gguf/gguf_loop.json");
    let mut files: Vec<&str> = meta["runs"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|r| r["file"].as_str())
        .filter(|f| f.starts_with("wan21"))
        .collect();
    files.sort();
    files.dedup();
    assert!(files.len() >= 2, "{files:?}");
    let weights = |f: &str| {
        format!(
            "weights = {:?}",
            fixture(&format!("gguf/{f}")).display().to_string()
        )
    };
    let base = std::path::Path::new("/");
    let q8 = magcache_cli::fingerprint(&cfg(&weights(files[0])), base);
    let q4 = magcache_cli::fingerprint(&cfg(&weights(files[1])), base);
    assert!(
        q8.starts_with("weights fnv64:") && q8.contains("(1 files)"),
        "{q8}"
    );
    assert_ne!(q8, q4);
    let preset = "preset = \"wan2.1-t2v-1.3b\"";
    let full = magcache_cli::fingerprint(&cfg(preset), base);
    let shrunk = cfg(&format!("{preset}\n[model.overrides]\nnum_layers = 1"));
    let shrunk = magcache_cli::fingerprint(&shrunk, base);
    assert_eq!(full, "preset wan2.1-t2v-1.3b seed 0");
    assert_eq!(
        shrunk,
        "preset wan2.1-t2v-1.3b seed 0 overrides {num_layers = 1}"
    );
}
