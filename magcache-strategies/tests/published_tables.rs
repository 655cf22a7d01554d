//! Calibration tables a model crate publishes are checked as a run file's are, and a strategy
//! config built in code (not read from a run file) is validated by `build` itself: a NaN, a zero or
//! an empty table is an error naming it, never a silently dense or always-reusing run.

use magcache_core::runtime::config::{BuildEnv, StrategyConfig};
use magcache_core::ModelInfo;
use magcache_strategies::fbcache::FbCacheConfig;
use magcache_strategies::magcache::MagCacheConfig;
use magcache_strategies::teacache::TeaCacheConfig;
use std::collections::BTreeMap;

fn model(published: &str) -> ModelInfo {
    let table: toml::Table = published.parse().unwrap();
    ModelInfo {
        family: "toy".into(),
        variant: Some("toy-1".into()),
        published: table.into_iter().collect::<BTreeMap<_, _>>(),
        ..Default::default()
    }
}

fn build_error(cfg: &dyn StrategyConfig, model: &ModelInfo) -> String {
    let env = BuildEnv {
        file: "run.toml",
        base_dir: std::path::Path::new("."),
        model,
    };
    match cfg.build(&env) {
        Ok(_) => panic!("built"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn published_magcache_curves_are_checked() {
    for (ratios, bad) in [
        ("[1.0, nan, 0.9]", "entry 1"),
        ("[1.0, 0.0, 0.9]", "entry 1"),
        ("[]", "empty"),
    ] {
        let m = model(&format!(
            "[magcache]\nname = \"toy-curve\"\nratios = {ratios}\n"
        ));
        let e = build_error(&MagCacheConfig::default(), &m);
        assert!(e.contains("toy-curve") && e.contains(bad), "{ratios}: {e}");
    }
    // A dual-expert curve shorter than its high-noise steps leaves the low-noise expert none.
    let m = model("[magcache]\nname = \"toy-curve\"\nratios = [1.0, 0.9]\nhigh_steps = 2\n");
    let e = build_error(&MagCacheConfig::default(), &m);
    assert!(e.contains("expert 1") && e.contains("empty"), "{e}");
}

#[test]
fn published_teacache_coefficients_are_checked() {
    for (c, bad) in [("[0.0, 0.0]", "all zero"), ("[]", "non-empty")] {
        let m = model(&format!("[teacache]\ncoefficients = {c}\n"));
        let e = build_error(&TeaCacheConfig::default(), &m);
        assert!(
            e.contains("toy") && e.contains("coefficients") && e.contains(bad),
            "{e}"
        );
    }
    // The run file's own coefficients too.
    let cfg = TeaCacheConfig {
        coefficients: Some(vec![0.0]),
        ..Default::default()
    };
    let e = build_error(&cfg, &model(""));
    assert!(
        e.contains("cache.coefficients") && e.contains("all zero"),
        "{e}"
    );
}

#[test]
fn configs_built_in_code_are_validated_by_build() {
    let m = model("[magcache]\nname = \"c\"\nratios = [1.0, 0.9, 0.8]\n");
    let cfg = MagCacheConfig {
        threshold: f64::NAN,
        ..Default::default()
    };
    assert!(build_error(&cfg, &m).contains("threshold"));
    let cfg = MagCacheConfig {
        max_skip_steps: 0,
        ..Default::default()
    };
    assert!(build_error(&cfg, &m).contains("max_skip_steps"));
    let cfg = FbCacheConfig {
        threshold: -1.0,
        ..Default::default()
    };
    assert!(build_error(&cfg, &m).contains("threshold"));
}

/// A forecast in sigma through two calls at one sigma has no slope: such a schedule is refused
/// naming the calls, rather than searched to a misleading "raise `budget`".
#[test]
fn forecasts_in_sigma_need_distinct_sigmas() {
    use magcache_strategies::profile::ForecastErrors;
    use magcache_strategies::search::ErrorModel;
    use magcache_strategies::{Estimator, EstimatorAxis};
    let errors = ForecastErrors {
        gram: vec![[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
        ..Default::default()
    };
    let sigmas = [1.0, 0.5, 0.5, 0.0];
    let e = ErrorModel::new(
        &errors,
        Estimator::Taylor1,
        EstimatorAxis::Sigma,
        &sigmas,
        3,
    )
    .err()
    .unwrap();
    assert!(e.contains("calls 1 and 2 share sigma 0.5"), "{e}");
    assert!(ErrorModel::new(&errors, Estimator::Reuse, EstimatorAxis::Sigma, &sigmas, 3).is_ok());
    assert!(ErrorModel::new(&errors, Estimator::Taylor1, EstimatorAxis::Step, &sigmas, 3).is_ok());
}
