//! The shared engine through the strategies: the estimator axis, DBCache's front and back blocks,
//! the guards on every strategy, and `cfg_shared`, on toy chains.

mod common;

use common::{t, v, COND, UNCOND};
use magcache_core::{Branch, GenerationPlan, Indicator, ScopeKey, SingleProcess, Streams};
use magcache_strategies::magcache::predict;
use magcache_strategies::ratios::{RatioSource, RatioSpec};
use magcache_strategies::{FbCache, FbCacheConfig, MagCache, MagCacheConfig};
use proptest::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The estimator axis through a strategy: FBCache with `taylor1` on a chain whose tail residual
/// changes linearly in the step returns the forecast, `reuse` the stale residual.
#[test]
fn fbcache_taylor1_forecasts_the_tail_residual() {
    use magcache_core::candle_core::{DType, Device, Tensor};
    use magcache_core::{
        Branch, GenerationPlan, PerBlock, ScopeKey, StepsSpec, Streams, TimestepCache,
    };
    use magcache_strategies::{Estimator, FbCache, FbCacheConfig};
    let sigmas = [1.0, 0.8, 0.6, 0.4];
    let branches = [Branch::Cond];
    let plan = GenerationPlan::from_steps(&StepsSpec::new("toy", "euler", &sigmas, &branches));
    // Block 0 adds 1 at step 0 and 100 after (so steps 0 and 1 compute, 2 and 3 reuse); block 1
    // adds 1 + k: a tail residual linear in the step.
    let head = [1.0, 100.0, 100.0, 100.0];
    let run = |e: Estimator| -> Vec<(f32, bool)> {
        let mut c = FbCache::new(FbCacheConfig {
            threshold: 0.5,
            estimator: e,
            ..Default::default()
        });
        c.begin_generation(&plan).unwrap();
        (0..sigmas.len())
            .map(|k| {
                let chain = PerBlock::new(2, |i, x: Streams| {
                    let add = if i == 0 { head[k] } else { 1.0 + k as f64 };
                    Ok(Streams::hidden((x.hidden + add)?))
                });
                let x = Streams::hidden(Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap());
                let (y, d) = c
                    .run(ScopeKey::new(0, Branch::Cond), &chain, x, &SingleProcess)
                    .unwrap();
                (y.hidden.to_vec1::<f32>().unwrap()[0], d.computed)
            })
            .collect()
    };
    let computed = [true, true, false, false];
    let reuse = run(Estimator::Reuse);
    assert_eq!(reuse.iter().map(|r| r.1).collect::<Vec<_>>(), computed);
    assert_eq!(
        reuse.iter().map(|r| r.0).collect::<Vec<_>>(),
        [2.0, 102.0, 102.0, 102.0]
    );
    let t1 = run(Estimator::Taylor1);
    assert_eq!(t1.iter().map(|r| r.1).collect::<Vec<_>>(), computed);
    assert_eq!(
        t1.iter().map(|r| r.0).collect::<Vec<_>>(),
        [2.0, 102.0, 103.0, 104.0]
    );
}

/// Runs `steps` calls per branch of `cache` on 4-block chains where block 0 adds `head(scope, k)`
/// and block `i > 0` adds `i + k`; returns `(output, computed)` per call in call order, with the
/// number of times each block ran.
fn drive(
    cache: &mut dyn magcache_core::TimestepCache,
    steps: usize,
    branches: &[Branch],
    head: &dyn Fn(ScopeKey, usize) -> f64,
) -> (Vec<(f32, bool)>, Vec<usize>) {
    use magcache_core::{PerBlock, StepsSpec};
    let sigmas: Vec<f64> = (0..steps).map(|k| 1.0 - k as f64 / steps as f64).collect();
    let plan = GenerationPlan::from_steps(&StepsSpec::new("toy", "euler", &sigmas, branches));
    cache.begin_generation(&plan).unwrap();
    let runs: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
    let mut out = Vec::new();
    for k in 0..steps {
        for &b in branches {
            let scope = ScopeKey::new(0, b);
            let chain = PerBlock::new(4, |i, x: Streams| {
                runs[i].fetch_add(1, Ordering::SeqCst);
                let add = if i == 0 {
                    head(scope, k)
                } else {
                    (i + k) as f64
                };
                Ok(Streams::hidden((x.hidden + add)?))
            })
            .with_indicator(Indicator::TimestepEmbedding, &t(&[head(scope, k) as f32]));
            let (y, d) = cache
                .run(
                    scope,
                    &chain,
                    Streams::hidden(t(&[0.0, 0.0])),
                    &SingleProcess,
                )
                .unwrap();
            out.push((v(&y.hidden)[0], d.computed));
        }
    }
    (out, runs.iter().map(|r| r.load(Ordering::SeqCst)).collect())
}

proptest! {
    /// DBCache with `Fn = 1, Bn = 0` is FBCache, call for call.
    #[test]
    fn dbcache_fn1_bn0_is_fbcache(heads in prop::collection::vec(0.5f64..2.0, 8),
                                  threshold in 0.0f64..0.6, order in 0usize..3) {
        use magcache_strategies::{DbCacheConfig, Estimator};
        let e = Estimator::from_order(order).unwrap();
        let head = |_: ScopeKey, k: usize| heads[k];
        let mut fb = FbCache::new(FbCacheConfig { threshold, estimator: e, ..Default::default() });
        let db_cfg = DbCacheConfig { front_blocks: 1, back_blocks: 0, threshold, estimator: e, ..Default::default() };
        let mut db = FbCache::named("dbcache", db_cfg);
        let a = drive(&mut fb, 8, &[Branch::Cond, Branch::Uncond], &head);
        let b = drive(&mut db, 8, &[Branch::Cond, Branch::Uncond], &head);
        prop_assert_eq!(a, b);
    }
}

#[test]
fn dbcache_runs_front_and_back_blocks_on_every_call() {
    use magcache_strategies::DbCacheConfig;
    let cfg = DbCacheConfig {
        front_blocks: 1,
        back_blocks: 1,
        threshold: 10.0,
        ..Default::default()
    };
    let mut db = FbCache::named("dbcache", cfg);
    let (out, runs) = drive(&mut db, 3, &[Branch::Cond], &|_, _| 1.0);
    // Call 0 computes; calls 1 and 2 reuse the middle (blocks 1, 2) but run blocks 0 and 3.
    assert_eq!(
        out.iter().map(|o| o.1).collect::<Vec<_>>(),
        [true, false, false]
    );
    assert_eq!(runs, [3, 1, 1, 3]);
    // Reused call k: 1 (front) + cached middle (1 + 2 at k = 0) + back (3 + k).
    assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), [7.0, 8.0, 9.0]);
    // A chain too short for the split is an error naming the keys.
    let cfg = DbCacheConfig {
        front_blocks: 4,
        back_blocks: 1,
        ..Default::default()
    };
    let mut db = FbCache::named("dbcache", cfg);
    let sigmas = [1.0];
    let plan = GenerationPlan::from_steps(&magcache_core::StepsSpec::new(
        "toy",
        "euler",
        &sigmas,
        &[Branch::Cond],
    ));
    use magcache_core::TimestepCache;
    db.begin_generation(&plan).unwrap();
    let chain = magcache_core::PerBlock::new(4, |_, x: Streams| Ok(x));
    let err = db
        .run(COND, &chain, Streams::hidden(t(&[0.0])), &SingleProcess)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cache.front_blocks (4) + cache.back_blocks (1)"),
        "{err}"
    );
    // Front and back covering the whole chain leave nothing to cache: refused too, not a reuse
    // that skips nothing.
    let mut db = FbCache::named(
        "dbcache",
        DbCacheConfig {
            front_blocks: 3,
            back_blocks: 1,
            ..Default::default()
        },
    );
    db.begin_generation(&plan).unwrap();
    let err = db
        .run(COND, &chain, Streams::hidden(t(&[0.0])), &SingleProcess)
        .unwrap_err()
        .to_string();
    assert!(err.contains("leave none of the model's 4 blocks"), "{err}");
}

#[test]
fn guards_force_warmup_last_steps_and_cap_on_every_strategy() {
    use magcache_strategies::{TeaCache, TeaCacheConfig};
    // Every strategy here would reuse every call after the first.
    let expect = [false, false, true, false, true, false, false];
    let fb = FbCacheConfig {
        threshold: 10.0,
        warmup_steps: 2,
        last_steps: 2,
        max_consecutive: Some(1),
        ..Default::default()
    };
    let (out, _) = drive(&mut FbCache::new(fb), 7, &[Branch::Cond], &|_, _| 1.0);
    let reused: Vec<bool> = out.iter().map(|o| !o.1).collect();
    assert_eq!(reused, expect, "fbcache");
    let tea = TeaCacheConfig {
        threshold: 10.0,
        coefficients: Some(vec![1.0, 0.0]),
        warmup_steps: 2,
        last_steps: 2,
        max_consecutive: Some(1),
        ..Default::default()
    };
    let (out, _) = drive(&mut TeaCache::new(tea), 7, &[Branch::Cond], &|_, _| 1.0);
    let reused: Vec<bool> = out.iter().map(|o| !o.1).collect();
    assert_eq!(reused, expect, "teacache");
    let mag = MagCacheConfig {
        threshold: 10.0,
        max_skip_steps: 100,
        retention_ratio: 0.0,
        warmup_steps: 2,
        last_steps: 2,
        max_consecutive: Some(1),
        ..Default::default()
    };
    let pred: Vec<bool> = predict(&mag, &[1.0; 7], 7).iter().map(|p| !p.0).collect();
    assert_eq!(pred, expect, "magcache prediction");
    let mut m = MagCache::new(mag, RatioSource::Config(RatioSpec::Curve(vec![1.0])));
    let (out, _) = drive(&mut m, 7, &[Branch::Cond], &|_, _| 1.0);
    let reused: Vec<bool> = out.iter().map(|o| !o.1).collect();
    assert_eq!(reused, expect, "magcache");
}

#[test]
fn cfg_shared_uncond_takes_the_cond_decision() {
    use magcache_strategies::{TeaCache, TeaCacheConfig};
    // The cond branch's head is steady (it reuses), the uncond branch's jumps at every step (alone it
    // would compute every call).
    let head = |s: ScopeKey, k: usize| match s.branch {
        Branch::Cond => 1.0,
        Branch::Uncond | Branch::Batched => (1 + k * k) as f64,
    };
    let both = [Branch::Cond, Branch::Uncond];
    for shared in [false, true] {
        let fb = FbCacheConfig {
            threshold: 0.1,
            cfg_shared: shared,
            ..Default::default()
        };
        let (out, _) = drive(&mut FbCache::new(fb), 5, &both, &head);
        let tea = TeaCacheConfig {
            threshold: 0.1,
            coefficients: Some(vec![1.0, 0.0]),
            cfg_shared: shared,
            ..Default::default()
        };
        let (out_t, _) = drive(&mut TeaCache::new(tea), 5, &both, &head);
        for (name, out) in [("fbcache", out), ("teacache", out_t)] {
            let cond: Vec<bool> = out.iter().step_by(2).map(|o| o.1).collect();
            let uncond: Vec<bool> = out.iter().skip(1).step_by(2).map(|o| o.1).collect();
            assert!(cond.iter().skip(1).any(|c| !c), "{name}: cond reuses");
            if shared {
                assert_eq!(uncond, cond, "{name}");
            } else {
                assert!(
                    uncond.iter().all(|c| *c) || name == "teacache",
                    "{name}: {uncond:?}"
                );
                assert_ne!(uncond, cond, "{name}");
            }
        }
    }
    // MagCache: the prediction replays the plan, cfg_shared included, and the run agrees.
    let mag = MagCacheConfig {
        threshold: 0.3,
        retention_ratio: 0.0,
        cfg_shared: true,
        ..Default::default()
    };
    // Interleaved cond / uncond curves: the uncond one alone would compute every call.
    let published = magcache_strategies::ratios::MagPublished {
        name: "toy".into(),
        ratios: vec![1.0, 1.0, 0.9, 0.5, 0.8, 0.5, 1.0, 0.5, 0.95, 0.5, 0.9, 0.5],
        schedule: None,
        interleaved: true,
        high_steps: None,
    };
    let src = RatioSource::Registered(published.curves());
    let mut m = MagCache::new(mag, src);
    let (out, _) = drive(&mut m, 6, &both, &head);
    use magcache_core::TimestepCache;
    let pc: Vec<bool> = m
        .predict(COND)
        .unwrap()
        .iter()
        .map(|d| d.computed)
        .collect();
    let pu: Vec<bool> = m
        .predict(UNCOND)
        .unwrap()
        .iter()
        .map(|d| d.computed)
        .collect();
    assert_eq!(pc, pu);
    assert!(pc.iter().any(|c| !c));
    let run: Vec<bool> = out.iter().map(|o| o.1).collect();
    let pred: Vec<bool> = pc.iter().zip(&pu).flat_map(|(a, b)| [*a, *b]).collect();
    assert_eq!(run, pred);
}

/// The estimator axis through the engine: a schedule computing calls 0, 1 and 3 on an uneven
/// (shifted) schedule, the chain adding `2 - 3 sigma` (a residual linear in sigma, not in the
/// index): `taylor1` in sigma forecasts calls 2, 4 and 5 exactly, in step index it does not; `foca`
/// in sigma is exact too (both its forecasts are), and a plan without sigmas is refused.
#[test]
fn sigma_axis_forecasts_in_the_samplers_time() {
    use magcache_core::{PerBlock, StepsSpec, TimestepCache};
    use magcache_strategies::{Estimator, EstimatorAxis, Schedule, ScheduleConfig};
    let sigmas = [1.0, 0.95, 0.86, 0.7, 0.45, 0.1];
    let plan =
        GenerationPlan::from_steps(&StepsSpec::new("toy", "euler", &sigmas, &[Branch::Cond]));
    let run = |e: Estimator, axis: EstimatorAxis| -> Vec<f32> {
        let cfg = ScheduleConfig {
            compute_steps: Some(vec![0, 1, 3]),
            estimator: e,
            estimator_axis: axis,
            ..Default::default()
        };
        let mut c: Box<dyn TimestepCache> = Box::new(Schedule::with_rule(
            magcache_strategies::schedule::ScheduleRule::fixed(vec![0, 1, 3]),
            magcache_strategies::SharedKeys::shared(&cfg),
        ));
        c.begin_generation(&plan).unwrap();
        (0..sigmas.len())
            .map(|k| {
                let add = 2.0 - 3.0 * sigmas[k];
                let chain = PerBlock::new(1, move |_, x: Streams| {
                    Ok(Streams::hidden((x.hidden + add)?))
                });
                let (y, _) = c
                    .run(COND, &chain, Streams::hidden(t(&[1.0])), &SingleProcess)
                    .unwrap();
                v(&y.hidden)[0]
            })
            .collect()
    };
    let exact: Vec<f32> = sigmas.iter().map(|s| (3.0 - 3.0 * s) as f32).collect();
    let close = |a: &[f32]| a.iter().zip(&exact).all(|(x, y)| (x - y).abs() < 1e-5);
    assert!(close(&run(Estimator::Taylor1, EstimatorAxis::Sigma)));
    assert!(close(&run(Estimator::Foca, EstimatorAxis::Sigma)));
    assert!(!close(&run(Estimator::Taylor1, EstimatorAxis::Step)));
    // A plan whose scope has no sigmas cannot forecast in sigma.
    let mut bare = plan.clone();
    bare.scopes[0].sigmas.clear();
    let cfg = ScheduleConfig {
        compute_steps: Some(vec![0, 1, 3]),
        estimator_axis: EstimatorAxis::Sigma,
        ..Default::default()
    };
    let mut c = Schedule::with_rule(
        magcache_strategies::schedule::ScheduleRule::fixed(vec![0, 1, 3]),
        magcache_strategies::SharedKeys::shared(&cfg),
    );
    let e = c.begin_generation(&bare).unwrap_err().to_string();
    assert!(e.contains("cache.estimator_axis"), "{e}");
}

/// The few-step warning of a data-free rule quotes what `magcache plan` predicts: the computed
/// calls and the share of the noise range the reused ones span (the distilled digits model's
/// 4-step sigmas, its last call reused: 0.89 % of the range).
#[test]
fn few_step_warning_quotes_the_plan() {
    use magcache_core::{StepsSpec, TimestepCache};
    use magcache_strategies::{Schedule, ScheduleConfig};
    let sigmas = [1.0, 0.858, 0.602, 0.0089];
    let plan =
        GenerationPlan::from_steps(&StepsSpec::new("toy", "euler", &sigmas, &[Branch::Cond]));
    let cfg = ScheduleConfig {
        compute_steps: Some(vec![0, 1, 2]),
        ..Default::default()
    };
    let mut c = Schedule::with_rule(
        magcache_strategies::schedule::ScheduleRule::fixed(vec![0, 1, 2]),
        magcache_strategies::SharedKeys::shared(&cfg),
    );
    let w = c.begin_generation(&plan).unwrap();
    assert!(w.iter().any(|w| w.contains("only 4 steps")), "{w:?}");
    let quoted = w
        .iter()
        .find(|w| w.contains("`magcache plan` predicts"))
        .unwrap_or_else(|| panic!("{w:?}"));
    assert!(
        quoted.contains("`###.`")
            && quoted.contains("3 of 4 calls computed (1.33x)")
            && quoted.contains("0.9 % of the noise range"),
        "{quoted}"
    );
    // A rule deciding from the data has nothing to quote.
    let mut fb = FbCache::new(FbCacheConfig::default());
    let w = fb.begin_generation(&plan).unwrap();
    assert!(w.iter().any(|w| w.contains("only 4 steps")), "{w:?}");
    assert!(
        !w.iter().any(|w| w.contains("`magcache plan` predicts")),
        "{w:?}"
    );
}
