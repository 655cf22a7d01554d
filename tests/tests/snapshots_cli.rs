//! Snapshots of what users read: the registry listing and a MagCache plan of the reference loop.
//! A registration that goes missing (the linker dropping a crate) or a changed plan shows up here.

use magcache_tests::{fixture, link_all, load_json, loop_toml, magcache_table};

#[test]
fn list_names_every_family_preset_and_strategy() {
    link_all();
    insta::assert_snapshot!(magcache_cli::list());
}

#[test]
fn plan_of_the_reference_magcache_run() {
    link_all();
    let meta = load_json("reference/wan21_tiny_loop.json");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    let t = loop_toml(
        "wan2.1",
        &format!("\"{}\"", fixture("reference/wan21_tiny").display()),
        &fixture("reference/wan21_tiny_loop.safetensors")
            .display()
            .to_string(),
        &meta,
        Some(&magcache_table(&meta["runs"]["magcache_b"]["config"])),
    );
    std::fs::write(&cfg, t).unwrap();
    // The memory table names the available memory: a fixed limit keeps the text machine-independent.
    std::env::set_var(magcache_core::runtime::guard::MEMORY_LIMIT_ENV, "8G");
    insta::assert_snapshot!(magcache_cli::plan_text(&magcache_cli::plan(&cfg).unwrap()));
}
