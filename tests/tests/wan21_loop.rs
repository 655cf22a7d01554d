//! The runner reproduces every run of the reference `wan21_tiny_loop` (diffusers): per-call decisions
//! identical, final latents within 1e-3.

use magcache_tests::{
    assert_calls_match, fixture, load, load_json, loop_toml, magcache_table, max_abs_diff,
    run_toml, teacache_table,
};

fn check_run(name: &str) {
    let meta = load_json("reference/wan21_tiny_loop.json");
    let tensors = load("reference/wan21_tiny_loop.safetensors");
    let run = &meta["runs"][name];
    let cache = if name == "dense" {
        None
    } else if name.starts_with("magcache") {
        Some(magcache_table(&run["config"]))
    } else if name.starts_with("teacache") {
        Some(teacache_table(&run["config"]))
    } else if name.starts_with("fbcache") {
        Some(format!(
            "strategy = \"fbcache\"\nthreshold = {}\n",
            run["config"]["threshold"]
        ))
    } else {
        panic!("unknown run {name}")
    };
    let dir = tempfile::tempdir().unwrap();
    let text = loop_toml(
        "wan2.1",
        &format!("\"{}\"", fixture("reference/wan21_tiny").display()),
        &fixture("reference/wan21_tiny_loop.safetensors")
            .display()
            .to_string(),
        &meta,
        cache.as_deref(),
    );
    let (fin, report) = run_toml(dir.path(), &text);
    assert_calls_match(name, &report, &run["calls"], 1e-3);
    assert_eq!(
        report.computed_calls as u64,
        run["computed_calls"].as_u64().unwrap(),
        "{name}: computed calls"
    );
    let d = max_abs_diff(&fin, &tensors[&format!("{name}.final")]);
    assert!(d < 1e-3, "{name}: final differs by {d}");
}

#[test]
fn teacache_a() {
    check_run("teacache_a");
}
#[test]
fn teacache_b() {
    check_run("teacache_b");
}
#[test]
fn teacache_ret_steps() {
    check_run("teacache_ret");
}
#[test]
fn dense() {
    check_run("dense");
}
#[test]
fn magcache_a() {
    check_run("magcache_a");
}
#[test]
fn magcache_b() {
    check_run("magcache_b");
}
#[test]
fn magcache_c() {
    check_run("magcache_c");
}
#[test]
fn fbcache_a() {
    check_run("fbcache_a");
}
#[test]
fn fbcache_b() {
    check_run("fbcache_b");
}
