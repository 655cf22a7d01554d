//! Strategies on toy block chains: head and tail on one block, residual added once, pass-through,
//! scope isolation, and the MagCache and FBCache invariants (property tests).

use magcache_core::candle_core::{Device, Tensor};
use magcache_core::maths::nearest_interp;
use magcache_core::{
    BlockMetadata, Branch, CacheHandle, Error, GenerationPlan, HookRegistry, ScopeKey, ScopePlan,
};
use magcache_strategies::magcache::{predict, retention_steps};
use magcache_strategies::ratios::{RatioSource, RatioSpec};
use magcache_strategies::{FbCache, FbCacheConfig, MagCache, MagCacheConfig};
use proptest::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

const META: BlockMetadata = BlockMetadata {
    kind: "toy",
    hidden_in: 0,
    encoder_in: None,
    hidden_out: 0,
    encoder_out: None,
    outputs: 1,
};
const COND: ScopeKey = ScopeKey::new(0, Branch::Cond);
const UNCOND: ScopeKey = ScopeKey::new(0, Branch::Uncond);

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}
fn v(t: &Tensor) -> Vec<f32> {
    t.to_vec1::<f32>().unwrap()
}

/// A chain of `n` toy blocks: block `i` maps `x -> x * 2 + (i + 1)`, counting its runs.
struct Toy {
    reg: HookRegistry,
    runs: Vec<AtomicUsize>,
}

impl Toy {
    fn new(n: usize, cache: &CacheHandle) -> Self {
        let mut reg = HookRegistry::new(vec![META; n]);
        cache.install(&mut reg).unwrap();
        Toy {
            reg,
            runs: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        }
    }
    fn call(&mut self, scope: ScopeKey, x: &Tensor) -> magcache_core::Result<Tensor> {
        self.reg.set_scope(Some(scope));
        let mut h = x.clone();
        for i in 0..self.runs.len() {
            let runs = &self.runs[i];
            let out = self.reg.run_block(i, &[h], &|inp: &[Tensor]| {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(vec![((&inp[0] * 2.0)? + (i as f64 + 1.0))?])
            })?;
            h = out[0].clone();
        }
        Ok(h)
    }
    fn dense(n: usize, x: &Tensor) -> Vec<f32> {
        let mut h = x.clone();
        for i in 0..n {
            h = ((&h * 2.0).unwrap() + (i as f64 + 1.0)).unwrap();
        }
        v(&h)
    }
    fn runs(&self) -> Vec<usize> {
        self.runs.iter().map(|r| r.load(Ordering::SeqCst)).collect()
    }
}

fn plan(steps: usize, branches: &[Branch]) -> GenerationPlan {
    GenerationPlan {
        scopes: branches
            .iter()
            .map(|&b| ScopePlan {
                key: ScopeKey::new(0, b),
                steps,
                sigmas: vec![0.5; steps],
                step_indices: (0..steps).collect(),
            })
            .collect(),
        total_steps: steps,
        family: "toy".into(),
        ..Default::default()
    }
}

/// A MagCache that reuses every call after the first (ratios exactly 1, big threshold).
fn always_reuse_magcache(k: usize) -> MagCache {
    let cfg = MagCacheConfig {
        threshold: 10.0,
        max_skip_steps: k,
        retention_ratio: 0.0,
        mag_ratios: None,
        ..Default::default()
    };
    MagCache::new(cfg, RatioSource::Config(RatioSpec::Curve(vec![1.0])))
}

#[test]
fn one_block_magcache_head_and_tail_on_the_same_block() {
    let cache = CacheHandle::new(Box::new(always_reuse_magcache(5)));
    let mut toy = Toy::new(1, &cache);
    assert_eq!(toy.reg.hook_names(0), ["cache.head", "cache.tail"]);
    cache
        .lock()
        .unwrap()
        .begin_generation(&plan(3, &[Branch::Cond]))
        .unwrap();
    let x1 = t(&[1.0, 2.0]);
    assert_eq!(v(&toy.call(COND, &x1).unwrap()), [3.0, 5.0]); // computed: 2x + 1
    let x2 = t(&[10.0, 20.0]);
    // Reused: x2 + (out1 - x1) = x2 + [2, 3]
    assert_eq!(v(&toy.call(COND, &x2).unwrap()), [12.0, 23.0]);
    assert_eq!(toy.runs(), [1]);
    assert!(!cache.lock().unwrap().last_decision(COND).unwrap().computed);
}

#[test]
fn reused_call_adds_the_residual_exactly_once() {
    let cache = CacheHandle::new(Box::new(always_reuse_magcache(5)));
    let mut toy = Toy::new(3, &cache);
    assert_eq!(toy.reg.hook_names(0), ["cache.head"]);
    assert_eq!(toy.reg.hook_names(1), ["cache.pass"]);
    assert_eq!(toy.reg.hook_names(2), ["cache.pass", "cache.tail"]);
    cache
        .lock()
        .unwrap()
        .begin_generation(&plan(2, &[Branch::Cond]))
        .unwrap();
    let x1 = t(&[1.0, -1.0]);
    let out1 = toy.call(COND, &x1).unwrap();
    assert_eq!(v(&out1), Toy::dense(3, &x1));
    let residual = (&out1 - &x1).unwrap();
    let x2 = t(&[0.5, 4.0]);
    let out2 = toy.call(COND, &x2).unwrap();
    assert_eq!(v(&out2), v(&(&x2 + &residual).unwrap()));
    assert_eq!(toy.runs(), [1, 1, 1], "no block runs on a reused call");
}

#[test]
fn fbcache_one_block_is_exact_whatever_it_decides() {
    // On one block the first block is the whole model: reuse adds a zero residual.
    let cache = CacheHandle::new(Box::new(FbCache::new(FbCacheConfig { threshold: 1e9 })));
    let mut toy = Toy::new(1, &cache);
    cache
        .lock()
        .unwrap()
        .begin_generation(&plan(4, &[Branch::Cond]))
        .unwrap();
    for (i, x) in [[1.0f32, 2.0], [1.5, 2.5], [-3.0, 0.0], [7.0, 7.0]]
        .iter()
        .enumerate()
    {
        let x = t(x);
        assert_eq!(
            v(&toy.call(COND, &x).unwrap()),
            Toy::dense(1, &x),
            "call {i}"
        );
        let d = cache.lock().unwrap().last_decision(COND).unwrap();
        assert_eq!(d.computed, i == 0, "call {i}");
    }
}

#[test]
fn fbcache_reuse_runs_only_the_first_block() {
    let cache = CacheHandle::new(Box::new(FbCache::new(FbCacheConfig { threshold: 0.5 })));
    let mut toy = Toy::new(3, &cache);
    cache
        .lock()
        .unwrap()
        .begin_generation(&plan(3, &[Branch::Cond]))
        .unwrap();
    let x1 = t(&[1.0, 2.0]);
    let out1 = toy.call(COND, &x1).unwrap();
    // Same input again: the first-block residual did not change -> reuse.
    let out2 = toy.call(COND, &x1).unwrap();
    assert_eq!(v(&out2), v(&out1));
    assert_eq!(toy.runs(), [2, 1, 1]);
    let d = cache.lock().unwrap().last_decision(COND).unwrap();
    assert_eq!((d.computed, d.metric), (false, Some(0.0)));
    // A very different input: recompute.
    let x3 = t(&[100.0, -50.0]);
    assert_eq!(v(&toy.call(COND, &x3).unwrap()), Toy::dense(3, &x3));
    assert!(cache.lock().unwrap().last_decision(COND).unwrap().computed);
}

#[test]
fn scopes_are_isolated_and_counted_separately() {
    let cache = CacheHandle::new(Box::new(always_reuse_magcache(5)));
    let mut toy = Toy::new(2, &cache);
    cache
        .lock()
        .unwrap()
        .begin_generation(&plan(2, &[Branch::Cond, Branch::Uncond]))
        .unwrap();
    let x = t(&[1.0, 1.0]);
    toy.call(COND, &x).unwrap();
    // The uncond scope has no residual yet: it must compute although cond has one.
    toy.call(UNCOND, &x).unwrap();
    assert!(
        cache
            .lock()
            .unwrap()
            .last_decision(UNCOND)
            .unwrap()
            .computed
    );
    toy.call(COND, &x).unwrap();
    assert!(!cache.lock().unwrap().last_decision(COND).unwrap().computed);
    // Each scope was told 2 steps: a third call is an error, not a silent wrap-around.
    let err = toy.call(COND, &x).unwrap_err();
    assert!(matches!(err, Error::ScopeOverrun { .. }), "{err}");
    // An unplanned scope is an error.
    let err = toy.call(ScopeKey::new(1, Branch::Cond), &x).unwrap_err();
    assert!(matches!(err, Error::ScopeNotPlanned(_)), "{err}");
    // A new generation starts clean.
    cache
        .lock()
        .unwrap()
        .begin_generation(&plan(2, &[Branch::Cond]))
        .unwrap();
    toy.call(COND, &x).unwrap();
    assert!(cache.lock().unwrap().last_decision(COND).unwrap().computed);
    assert!(cache.lock().unwrap().last_decision(UNCOND).is_none());
}

#[test]
fn cache_without_begin_generation_is_an_error() {
    let cache = CacheHandle::new(Box::new(always_reuse_magcache(5)));
    let mut toy = Toy::new(1, &cache);
    assert!(matches!(
        toy.call(COND, &t(&[1.0])).unwrap_err(),
        Error::ScopeNotPlanned(_)
    ));
}

proptest! {
    #[test]
    fn magcache_respects_retention_and_k(
        curve in prop::collection::vec(0.8f64..1.2, 1..40),
        steps in 1usize..40,
        threshold in 0.0f64..1.0,
        k in 0usize..6,
        retention in 0.0f64..1.0,
    ) {
        let cfg = MagCacheConfig { threshold, max_skip_steps: k, retention_ratio: retention, mag_ratios: None, ..Default::default() };
        let ratios = nearest_interp(&curve, steps).unwrap();
        let d = predict(&cfg, &ratios, steps);
        let keep = retention_steps(retention, steps);
        prop_assert!(d[0].0, "the first call always computes");
        let mut run = 0;
        for (i, &(computed, _)) in d.iter().enumerate() {
            if i < keep { prop_assert!(computed, "reuse at step {} before retention {}", i, keep); }
            if computed { run = 0 } else { run += 1 }
            prop_assert!(run <= k, "{} reuses in a row with K = {}", run, k);
        }
    }

    #[test]
    fn magcache_run_agrees_with_prediction(
        curve in prop::collection::vec(0.9f64..1.1, 2..20),
        steps in 1usize..16,
        threshold in 0.0f64..0.5,
        k in 1usize..4,
    ) {
        let cfg = MagCacheConfig { threshold, max_skip_steps: k, retention_ratio: 0.1, mag_ratios: Some(RatioSpec::Curve(curve.clone())), ..Default::default() };
        let predicted = predict(&cfg, &nearest_interp(&curve, steps).unwrap(), steps);
        let cache = CacheHandle::new(Box::new(MagCache::new(cfg, RatioSource::Config(RatioSpec::Curve(curve)))));
        let mut toy = Toy::new(2, &cache);
        cache.lock().unwrap().begin_generation(&plan(steps, &[Branch::Cond])).unwrap();
        for (i, p) in predicted.iter().enumerate() {
            toy.call(COND, &t(&[i as f32, 1.0])).unwrap();
            let d = cache.lock().unwrap().last_decision(COND).unwrap();
            prop_assert_eq!(d.computed, p.0, "call {}", i);
            prop_assert_eq!(d.metric, Some(p.1));
        }
    }

    #[test]
    fn resampling_keeps_both_ends(curve in prop::collection::vec(-5.0f64..5.0, 1..60), target in 2usize..100) {
        let r = nearest_interp(&curve, target).unwrap();
        prop_assert_eq!(r.len(), target);
        prop_assert_eq!(r[0], curve[0]);
        prop_assert_eq!(r[target - 1], curve[curve.len() - 1]);
        for x in &r { prop_assert!(curve.contains(x)); }
    }

    #[test]
    fn fbcache_always_computes_the_first_call(threshold in 0.0f64..1e6, x in prop::collection::vec(-10.0f32..10.0, 1..8)) {
        let cache = CacheHandle::new(Box::new(FbCache::new(FbCacheConfig { threshold })));
        let mut toy = Toy::new(3, &cache);
        cache.lock().unwrap().begin_generation(&plan(2, &[Branch::Cond])).unwrap();
        let out = toy.call(COND, &t(&x)).unwrap();
        let d = cache.lock().unwrap().last_decision(COND).unwrap();
        prop_assert!(d.computed);
        prop_assert_eq!(d.metric, None);
        prop_assert_eq!(v(&out), Toy::dense(3, &t(&x)));
    }
}
