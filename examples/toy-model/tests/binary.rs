//! The toy crate's own runner binary (`src/bin/toy-magcache.rs`: `toy_model::link();
//! magcache_cli::main()`) runs its family through the whole command line: `list`, `plan`, `run`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn toy_toml() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("toy.toml")
}

fn toy_magcache(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_toy-magcache"))
        .args(args)
        .output()
        .expect("toy-magcache starts")
}

fn ok(args: &[&str]) -> String {
    let o = toy_magcache(args);
    assert!(
        o.status.success(),
        "toy-magcache {args:?}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn list_names_the_toy_family_and_the_strategies() {
    let out = ok(&["list"]);
    let toy = out
        .lines()
        .find(|l| l.trim_start().starts_with("toy "))
        .unwrap_or_else(|| panic!("no toy family in:\n{out}"));
    assert!(toy.contains("examples/toy-model"), "{toy}");
    // Exactly its own family: the runner library links none (the `magcache` binary links Wan,
    // FLUX.1 and FLUX.2 itself).
    let families: Vec<&str> = out
        .split("strategies:\n")
        .next()
        .unwrap_or("")
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(families, ["toy"], "{out}");
    assert!(out.contains("blocks: toy.block"), "{out}");
    let strategies = out.split("strategies:\n").nth(1).expect("strategies");
    for s in ["magcache", "fbcache", "teacache"] {
        assert!(
            strategies.lines().any(|l| l.trim_start().starts_with(s)),
            "{s} not listed:\n{out}"
        );
    }
}

/// The marks of `expert 0 <branch>` in the plan text.
fn marks<'a>(plan: &'a str, branch: &str) -> &'a str {
    plan.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("expert 0 ")?;
            let (b, m) = rest.split_once(' ')?;
            (b == branch).then(|| m.trim())
        })
        .unwrap_or_else(|| panic!("no scope expert 0 {branch} in:\n{plan}"))
}

#[test]
fn plan_and_run_agree_on_the_toy() {
    let config = toy_toml();
    let config = config.to_str().unwrap();
    let plan = ok(&["plan", "--config", config]);
    assert!(plan.starts_with("magcache plan for toy"), "{plan}");
    let (cond, uncond) = (marks(&plan, "cond"), marks(&plan, "uncond"));
    for m in [cond, uncond] {
        assert_eq!(m.len(), 12, "one mark per step: {plan}");
        assert!(m.chars().all(|c| c == '#' || c == '.'), "{plan}");
        assert!(m.starts_with('#'), "the first step computes: {plan}");
    }
    let planned = (cond.to_string() + uncond).matches('#').count();
    assert!(planned < 24, "the plan reuses some calls: {plan}");

    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let out = ok(&[
        "run",
        "--config",
        config,
        "--quiet",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(out.is_empty(), "--quiet prints nothing: {out}");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).expect("the report is written")).unwrap();
    assert_eq!(r["family"], "toy");
    assert_eq!(r["strategy"], "magcache");
    let calls = r["calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 24, "12 steps x cond and uncond");
    assert_eq!(r["total_calls"], 24);
    for branch in ["cond", "uncond"] {
        let n = calls.iter().filter(|c| c["branch"] == branch).count();
        assert_eq!(n, 12, "{branch}");
    }
    let computed = calls.iter().filter(|c| c["computed"] == true).count();
    assert_eq!(r["computed_calls"], computed);
    assert_eq!(
        computed, planned,
        "MagCache's plan predicts the run's decisions"
    );
}

#[test]
fn errors_are_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[model]\nfamily = \"toy\"\n[model.overrides]\nlayers = 0\n[sampling]\nsteps = 4\n",
    )
    .unwrap();
    let o = toy_magcache(&["run", "--config", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("model.overrides.layers"),
        "{err}"
    );
}

#[test]
fn calibrate_blocks_needs_hooks_the_toy_does_not_offer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.toml");
    let toml = toy_toml();
    let args = ["calibrate", "--config", toml.to_str().unwrap()];
    let o = toy_magcache(&[&args[..], &["--out", out.to_str().unwrap(), "--blocks"]].concat());
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--blocks") && err.contains("`toy`"), "{err}");
    assert!(!out.exists(), "no profile is written");
    // Without --blocks the toy calibrates.
    let p = ok(&[&args[..], &["--out", out.to_str().unwrap(), "--quiet"]].concat());
    assert!(p.is_empty() && out.exists());
}
