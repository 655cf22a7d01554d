//! The runner reproduces every run of `trained/digits_loop` (a trained Wan-architecture digit
//! generator, batch of 10, decisions per call for the whole batch).

use magcache_tests::{
    assert_calls_match, fixture, load, load_json, loop_toml, magcache_table, max_abs_diff, run_toml,
};

fn check_run(name: &str) {
    let meta = load_json("trained/digits_loop.json");
    let tensors = load("trained/digits_loop.safetensors");
    let run = &meta["runs"][name];
    let cache = if name == "dense" {
        None
    } else if name.starts_with("magcache") {
        Some(magcache_table(&run["config"]))
    } else {
        Some(format!(
            "strategy = \"fbcache\"\nthreshold = {}\n",
            run["config"]["threshold"]
        ))
    };
    let dir = tempfile::tempdir().unwrap();
    let text = loop_toml(
        "wan2.1",
        &format!("\"{}\"", fixture("trained/digits_wan").display()),
        &fixture("trained/digits_loop.safetensors")
            .display()
            .to_string(),
        &meta,
        cache.as_deref(),
    );
    let (fin, report) = run_toml(dir.path(), &text);
    assert_calls_match(name, &report, &run["calls"], 1e-3);
    let d = max_abs_diff(&fin, &tensors[&format!("{name}.final")]);
    assert!(d < 1e-3, "{name}: final differs by {d}");
}

#[test]
fn dense() {
    check_run("dense");
}
#[test]
fn magcache_slow() {
    check_run("magcache_slow");
}
#[test]
fn magcache_fast() {
    check_run("magcache_fast");
}
#[test]
fn fbcache_slow() {
    check_run("fbcache_slow");
}
#[test]
fn fbcache_fast() {
    check_run("fbcache_fast");
}
