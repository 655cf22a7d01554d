//! The toy model, registered from outside the library, runs every strategy through the same path as
//! the runner: run file -> family -> pipeline, `[cache]` -> strategy.

use magcache_core::candle_core::Tensor;
use magcache_core::runtime::registry;
use magcache_core::{BuildEnv, CacheHandle, CallEvent, Observer, Pipeline, RunConfig};
use magcache_strategies::calibrate::{curves, Calibrator};
use magcache_strategies::{MagCache, MagCacheConfig, RatioSource};
use std::path::Path;

#[derive(Default)]
struct Calls(Vec<CallEvent>);
impl Observer for Calls {
    fn call(&mut self, ev: &CallEvent) {
        self.0.push(ev.clone());
    }
}

fn pipeline(cache: &str) -> (Box<dyn Pipeline>, Option<CacheHandle>) {
    magcache_strategies::link();
    toy_model::link();
    let text = format!(
        "[model]\nfamily = \"toy\"\nseed = 7\n[model.overrides]\nlayers = 4\ndim = 32\n[inputs]\nlatent_shape = [2, 16, 4]\n[sampling]\nsteps = 12\nguidance_scale = 3.0\n{cache}"
    );
    let cfg = RunConfig::parse(&text, "toy.toml").unwrap();
    cfg.validate("toy.toml").unwrap();
    let fam = registry::family("toy").expect("the toy family registers itself");
    fam.check_keys(&cfg, "toy.toml").unwrap();
    let mut p = (fam.build)(&cfg, "toy.toml", Path::new(".")).unwrap();
    let info = p.model_info();
    let env = BuildEnv {
        file: "toy.toml",
        base_dir: Path::new("."),
        model: &info,
    };
    let cache = cfg.strategy().build(&env).unwrap().map(CacheHandle::new);
    p.set_cache(cache.clone()).unwrap();
    (p, cache)
}

fn run(cache: &str) -> (Tensor, Vec<CallEvent>) {
    let (mut p, _) = pipeline(cache);
    let mut calls = Calls::default();
    let out = p.generate(&mut calls).unwrap();
    (out, calls.0)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn computed(calls: &[CallEvent]) -> usize {
    calls
        .iter()
        .filter(|c| c.decision.is_none_or(|d| d.computed))
        .count()
}

/// `[cache]` tables of every registered strategy: one that computes every call, one that skips.
fn tables(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "none" => ("", ""),
        "magcache" => (
            "threshold = 0.0\nmag_ratios = [0.9]",
            "threshold = 0.5\nmax_skip_steps = 2\nmag_ratios = [1.0, 0.98]",
        ),
        "fbcache" => ("threshold = 0.0", "threshold = 0.15"),
        "dbcache" => (
            "front_blocks = 1\nback_blocks = 1\nthreshold = 0.0",
            "front_blocks = 1\nback_blocks = 1\nthreshold = 0.15",
        ),
        "teacache" => (
            "threshold = 0.0\ncoefficients = [1.0, 0.0]\nindicator = \"timestep_embedding\"",
            "threshold = 0.5\ncoefficients = [1.0, 0.0]\nindicator = \"timestep_embedding\"",
        ),
        "seacache" => ("threshold = 0.0", "threshold = 0.5"),
        "easycache" => ("threshold = 0.0", "threshold = 0.5"),
        "spectrum" => ("window_size = 1.0\nflex_window = 0.0", "w = 0.5"),
        "schedule" => (
            "compute_steps = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]",
            "compute_steps = [0, 2, 4, 6, 8, 11]\nestimator = \"taylor1\"",
        ),
        _ => return None,
    })
}

#[test]
fn every_strategy_runs_on_the_toy_and_never_skipping_is_dense() {
    magcache_strategies::link();
    let (dense, calls) = run("");
    assert_eq!(calls.len(), 24, "12 steps x cond and uncond");
    assert!(calls.iter().all(|c| c.decision.is_none()));
    for reg in registry::strategies() {
        let name = reg.name;
        let (all, some) =
            tables(name).unwrap_or_else(|| panic!("strategy `{name}` is not run on the toy"));
        if name == "none" {
            continue;
        }
        let (out, calls) = run(&format!("[cache]\nstrategy = \"{name}\"\n{all}\n"));
        assert_eq!(
            computed(&calls),
            24,
            "{name}: never skipping computes every call"
        );
        assert!(calls.iter().all(|c| c.decision.is_some()), "{name}");
        assert!(max_diff(&out, &dense) < 1e-5, "{name}");
        let (out, calls) = run(&format!("[cache]\nstrategy = \"{name}\"\n{some}\n"));
        let n = computed(&calls);
        assert!((4..24).contains(&n), "{name}: {n} computed");
        let d = max_diff(&out, &dense);
        assert!(d > 0.0 && d.is_finite(), "{name}: {d}");
    }
}

#[test]
fn teacache_without_an_indicator_is_a_config_error() {
    magcache_strategies::link();
    toy_model::link();
    let (p, _) = pipeline("");
    let info = p.model_info();
    let cfg = RunConfig::parse(
        "[model]\nfamily = \"toy\"\n[sampling]\nsteps = 4\n[cache]\nstrategy = \"teacache\"\ncoefficients = [1.0, 0.0]\n",
        "toy.toml",
    )
    .unwrap();
    let env = BuildEnv {
        file: "toy.toml",
        base_dir: Path::new("."),
        model: &info,
    };
    let err = cfg
        .strategy()
        .build(&env)
        .err()
        .expect("no indicator")
        .to_string();
    assert!(err.starts_with("toy.toml: cache.indicator:"), "{err}");
}

#[test]
fn calibrated_curves_drive_magcache() {
    let (mut p, _) = pipeline("");
    let (cal, results) = Calibrator::new();
    p.set_cache(Some(CacheHandle::new(Box::new(cal)))).unwrap();
    let dense = p.generate(&mut Calls::default()).unwrap();
    let plan = p.plan();
    let rc = curves(&results.lock().unwrap(), &plan, "toy calibration");
    assert_eq!(rc.experts.len(), 1);
    assert_eq!(rc.experts[0].len(), 2, "cond and uncond curves");
    let cfg = MagCacheConfig {
        threshold: 0.3,
        max_skip_steps: 3,
        ..Default::default()
    };
    let mag = MagCache::new(cfg, RatioSource::Registered(rc));
    p.set_cache(Some(CacheHandle::new(Box::new(mag)))).unwrap();
    let mut calls = Calls::default();
    let out = p.generate(&mut calls).unwrap();
    let n = computed(&calls.0);
    assert!(n < 24, "calibrated MagCache reused nothing");
    assert!(max_diff(&out, &dense) < 0.5);
}
