//! Every example runs: the tiny and trained models end to end, the real-size presets through `plan`
//! (no weights are built).

use std::path::PathBuf;

fn examples() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_example_runs_or_plans() {
    magcache_models::link();
    let mut families = std::collections::BTreeSet::new();
    let mut strategies = std::collections::BTreeSet::new();
    for ex in examples() {
        let name = ex.file_name().unwrap().to_string_lossy().to_string();
        if name.contains("released") {
            // Needs a released checkpoint (no model hub here): the file must parse and validate,
            // its weights (a hub id) are not in the cache.
            let text = std::fs::read_to_string(&ex).unwrap();
            let cfg = magcache_core::RunConfig::parse(&text, &name)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            cfg.validate(&name)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let fam = magcache_core::runtime::registry::family(&cfg.model.family).unwrap();
            fam.check_keys(&cfg, &name)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            continue;
        }
        let plan = magcache_cli::plan(&ex).unwrap_or_else(|e| panic!("{name}: plan: {e}"));
        families.insert(plan.family.clone());
        strategies.insert(plan.strategy.clone());
        if name.contains("preset") {
            assert!(plan.total_calls > 0, "{name}");
            continue;
        }
        let mut p = magcache_cli::prepare(&ex).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (out, rep) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let decoded = p
            .pipeline
            .finish(&out)
            .unwrap_or_else(|e| panic!("{name}: finish: {e}"));
        assert_eq!(
            decoded.is_some(),
            name.contains("prompted"),
            "{name}: decoded"
        );
        assert_eq!(rep.total_calls, plan.total_calls, "{name}");
        if !plan.decides_from_data {
            assert_eq!(
                rep.computed_calls, plan.computed_calls,
                "{name}: plan and run disagree"
            );
        }
        let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
    }
    for f in ["wan2.1", "wan2.2", "flux", "flux2", "z-image", "qwen-image"] {
        assert!(families.contains(f), "no example for family {f}");
    }
    for s in ["none", "magcache", "fbcache", "teacache"] {
        assert!(strategies.contains(s), "no example for strategy {s}");
    }
}

/// The shipped fast settings (docs/quality.md, "Fast settings") keep the calls their figures were
/// measured with: checked on the plan (their PSNR needs release-build runs of the 10-digit batch).
#[test]
fn fast_settings_compute_the_calls_their_figures_name() {
    magcache_models::link();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for (name, computed, total, list) in [
        ("digits_3x.toml", 12, 40, vec![0, 4, 9, 13, 16, 18]),
        ("digits_4x.toml", 10, 40, vec![0, 7, 13, 16, 18]),
        ("digits_5x.toml", 8, 40, vec![0, 8, 14, 17]),
        ("digits_4step_fast.toml", 3, 4, vec![0, 1, 2]),
    ] {
        let plan = magcache_cli::plan(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            (plan.computed_calls, plan.total_calls),
            (computed, total),
            "{name}"
        );
        let cond: Vec<usize> = plan
            .calls
            .iter()
            .filter(|c| c.branch == "cond" && c.computed == Some(true))
            .map(|c| c.step)
            .collect();
        assert_eq!(cond, list, "{name}");
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(
            text.contains("held out"),
            "{name}: the header gives the held-out figures"
        );
    }
}
