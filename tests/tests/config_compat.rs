//! Keys a config written for the reference may carry: accepted, and warned about when they cannot
//! apply, never silently used.

use magcache_tests::{fixture, load_json, loop_toml, magcache_table, run_toml, weights_of};

#[test]
fn magcache_num_inference_steps_is_checked_not_used() {
    let meta = load_json("reference/wan21_tiny_loop.json");
    let run = &meta["runs"]["magcache_a"];
    let inputs = fixture("reference/wan21_tiny_loop.safetensors")
        .display()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let base = magcache_table(&run["config"]);
    let (_, rep) = run_toml(
        dir.path(),
        &loop_toml(
            "wan2.1",
            &weights_of("reference/wan21_tiny"),
            &inputs,
            &meta,
            Some(&format!("{base}num_inference_steps = 12\n")),
        ),
    );
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    let want: Vec<Option<bool>> = run["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["computed"].as_bool())
        .collect();
    assert_eq!(
        rep.calls.iter().map(|c| c.computed).collect::<Vec<_>>(),
        want
    );
    let (_, rep) = run_toml(
        dir.path(),
        &loop_toml(
            "wan2.1",
            &weights_of("reference/wan21_tiny"),
            &inputs,
            &meta,
            Some(&format!("{base}num_inference_steps = 50\n")),
        ),
    );
    assert!(
        rep.warnings
            .iter()
            .any(|w| w.contains("num_inference_steps = 50")),
        "{:?}",
        rep.warnings
    );
    assert_eq!(
        rep.calls.iter().map(|c| c.computed).collect::<Vec<_>>(),
        want,
        "the value is never used"
    );
}

#[test]
fn flux_static_shift_is_warned_about_and_ignored() {
    let mut meta = load_json("reference/flux_tiny_loop.json");
    meta["shift"] = 3.0.into();
    let inputs = fixture("reference/flux_tiny_loop.safetensors")
        .display()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let (fin, rep) = run_toml(
        dir.path(),
        &loop_toml(
            "flux",
            &weights_of("reference/flux_tiny"),
            &inputs,
            &meta,
            None,
        ),
    );
    assert!(
        rep.warnings.iter().any(|w| w.contains("sampling.shift")),
        "{:?}",
        rep.warnings
    );
    let reference = magcache_tests::load("reference/flux_tiny_loop.safetensors");
    assert!(magcache_tests::max_abs_diff(&fin, &reference["dense.final"]) < 1e-3);
}
