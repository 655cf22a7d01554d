//! Runs that explain their threshold (issue 44): a cached scope that computes (nearly) every call
//! warns with the compared values' percentiles against the threshold and the threshold that would
//! have given 2x; `--json` carries the same figures; `plan` too for a data-free rule (MagCache).

mod common;

use common::{magcache, s};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// `examples/NAME.toml` with `threshold = T` and absolute fixture paths.
fn digits(dir: &Path, name: &str, threshold: &str) -> PathBuf {
    let text = common::example_text(&format!("{name}.toml"))
        .lines()
        .map(|l| match l.starts_with("threshold = ") {
            true => format!("threshold = {threshold}"),
            false => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_threshold_below_every_value_warns_with_percentiles() {
    let d = tempfile::tempdir().unwrap();
    for name in ["digits_magcache", "digits_teacache", "digits_fbcache"] {
        let run = digits(d.path(), name, "0.00001");
        let o = magcache(&["run", "--quiet", "--config", s(&run)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{name}: {err}");
        for part in ["computed 20 of 20 calls", "p25", "p50", "p75", "max", "2x"] {
            assert!(err.contains(part), "{name}: {part}: {err}");
        }
        // --json: the same figures per scope, ordered, the 2x threshold above the smallest value.
        let o = magcache(&["run", "--json", "--config", s(&run)]);
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        for sc in r["scopes"].as_array().unwrap() {
            let c = &sc["threshold_check"];
            let f = |k: &str| c[k].as_f64().unwrap();
            assert!(f("min") <= f("p25") && f("p25") <= f("p50"), "{name}: {c}");
            assert!(f("p50") <= f("p75") && f("p75") <= f("max"), "{name}: {c}");
            assert!(f("threshold_for_2x") > f("min"), "{name}: {c}");
            assert_eq!(f("threshold"), 0.00001);
            assert_eq!(c["kind"], "computes_nearly_all", "{name}: {c}");
        }
        // At the suggested threshold the run skips calls (guards may keep it under 2x).
        let t = r["scopes"][0]["threshold_check"]["threshold_for_2x"]
            .as_f64()
            .unwrap();
        let run = digits(d.path(), name, &format!("{t}"));
        let o = magcache(&["run", "--json", "--config", s(&run)]);
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        let (computed, total) = (
            r["computed_calls"].as_u64().unwrap(),
            r["total_calls"].as_u64().unwrap(),
        );
        assert!(computed * 10 <= total * 8, "{name}: {computed}/{total}");
    }
    // A data-free rule: `plan` predicts it and says so.
    let run = digits(d.path(), "digits_magcache", "0.00001");
    let o = magcache(&["plan", "--config", s(&run)]);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("p50") && out.contains("2x"), "{out}");
    // A threshold that skips: no such warning.
    let run = digits(d.path(), "digits_teacache", "0.3");
    let o = magcache(&["run", "--quiet", "--config", s(&run)]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("p25"));
}

/// A threshold above every value compared decides no call: the run reuses all the guards and
/// limits allow and says so, with the 2x threshold; `--json` marks the check `decides_nothing`.
#[test]
fn a_threshold_above_every_value_says_it_decided_nothing() {
    let d = tempfile::tempdir().unwrap();
    for name in ["digits_magcache", "digits_teacache", "digits_fbcache"] {
        let run = digits(d.path(), name, "1e9");
        let o = magcache(&["run", "--json", "--config", s(&run)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{name}: {err}");
        assert!(
            err.contains("decided none of them") && err.contains("2x"),
            "{name}: {err}"
        );
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        for sc in r["scopes"].as_array().unwrap() {
            let c = &sc["threshold_check"];
            assert_eq!(c["kind"], "decides_nothing", "{name}: {c}");
            assert!(c["threshold_for_2x"].as_f64().unwrap() < 1e9, "{name}: {c}");
        }
        // The shipped threshold decides calls: no such warning.
        let run = digits(d.path(), name, "KEEP");
        let text = std::fs::read_to_string(&run).unwrap();
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/{name}.toml")),
        )
        .unwrap();
        let t = shipped
            .lines()
            .find_map(|l| l.strip_prefix("threshold = "))
            .unwrap();
        std::fs::write(
            &run,
            text.replace("threshold = KEEP", &format!("threshold = {t}")),
        )
        .unwrap();
        let o = magcache(&["run", "--quiet", "--config", s(&run)]);
        assert!(o.status.success());
        assert!(
            !String::from_utf8_lossy(&o.stderr).contains("decided none"),
            "{name}"
        );
    }
}
