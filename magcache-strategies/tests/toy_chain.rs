//! Strategies on toy block chains: head and tail on one block, residual added once, pass-through,
//! scope isolation, and the MagCache and FBCache invariants (property tests).

mod common;

use common::{t, v, COND, UNCOND};
use magcache_core::candle_core::Tensor;
use magcache_core::maths::nearest_interp;
use magcache_core::{
    BlockChain, BlockMetadata, Branch, CacheHandle, CallCx, CallDecision, Error, GenerationPlan,
    HookRegistry, Indicator, ScopeKey, ScopePlan, Streams,
};
use magcache_strategies::magcache::{predict, retention_steps};
use magcache_strategies::ratios::{RatioSource, RatioSpec};
use magcache_strategies::{FbCache, FbCacheConfig, MagCache, MagCacheConfig};
use proptest::prelude::*;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

const META: BlockMetadata = BlockMetadata {
    kind: "toy",
    joint: false,
};

/// A chain of `n` toy blocks: block `i` maps `x -> x * 2 + (i + 1)`, counting its runs.
struct Toy {
    reg: HookRegistry,
    runs: Vec<AtomicUsize>,
    cache: CacheHandle,
    last: HashMap<ScopeKey, CallDecision>,
}

/// One call's chain over the toy's blocks.
struct ToyChain<'a> {
    toy: &'a Toy,
    scope: ScopeKey,
    indicator: Tensor,
}

impl BlockChain for ToyChain<'_> {
    fn num_blocks(&self) -> usize {
        self.toy.runs.len()
    }
    fn run(&self, blocks: Range<usize>, x: Streams) -> magcache_core::Result<Streams> {
        let mut h = x.hidden;
        for i in blocks {
            let runs = &self.toy.runs[i];
            let out =
                self.toy
                    .reg
                    .run_block(self.scope, i, Streams::hidden(h), &|s: Streams| {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok(Streams::hidden(((&s.hidden * 2.0)? + (i as f64 + 1.0))?))
                    })?;
            h = out.hidden;
        }
        Ok(Streams::hidden(h))
    }
    fn indicator(&self, kind: Indicator) -> magcache_core::Result<Option<Tensor>> {
        Ok((kind == Indicator::TimestepEmbedding).then(|| self.indicator.clone()))
    }
}

impl Toy {
    fn new(n: usize, cache: &CacheHandle) -> Self {
        Toy {
            reg: HookRegistry::new(vec![META; n]),
            runs: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            cache: cache.clone(),
            last: HashMap::new(),
        }
    }
    fn call(&mut self, scope: ScopeKey, x: &Tensor) -> magcache_core::Result<Tensor> {
        self.call_with(scope, x, x)
    }
    /// A call whose timestep-embedding indicator is `ind`.
    fn call_with(
        &mut self,
        scope: ScopeKey,
        x: &Tensor,
        ind: &Tensor,
    ) -> magcache_core::Result<Tensor> {
        let cx = CallCx::new(scope, Some(&self.cache));
        let chain = ToyChain {
            toy: self,
            scope,
            indicator: ind.clone(),
        };
        let out = cx.run_chain(&chain, Streams::hidden(x.clone()))?;
        if let Some(d) = cx.decision() {
            self.last.insert(scope, d);
        }
        Ok(out.hidden)
    }
    fn last(&self, scope: ScopeKey) -> CallDecision {
        self.last[&scope]
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
    assert!(toy.reg.is_empty(), "a cache installs no per-block hooks");
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
    assert!(!toy.last(COND).computed);
}

#[test]
fn reused_call_adds_the_residual_exactly_once() {
    let cache = CacheHandle::new(Box::new(always_reuse_magcache(5)));
    let mut toy = Toy::new(3, &cache);
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
    let cache = CacheHandle::new(Box::new(FbCache::new(FbCacheConfig {
        threshold: 1e9,
        ..Default::default()
    })));
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
        let d = toy.last(COND);
        assert_eq!(d.computed, i == 0, "call {i}");
    }
}

#[test]
fn fbcache_reuse_runs_only_the_first_block() {
    let cache = CacheHandle::new(Box::new(FbCache::new(FbCacheConfig {
        threshold: 0.5,
        ..Default::default()
    })));
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
    let d = toy.last(COND);
    assert_eq!((d.computed, d.metric), (false, Some(0.0)));
    // A very different input: recompute.
    let x3 = t(&[100.0, -50.0]);
    assert_eq!(v(&toy.call(COND, &x3).unwrap()), Toy::dense(3, &x3));
    assert!(toy.last(COND).computed);
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
    assert!(toy.last(UNCOND).computed);
    toy.call(COND, &x).unwrap();
    assert!(!toy.last(COND).computed);
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
    assert!(toy.last(COND).computed);
    // The old generation's uncond scope is gone.
    let err = toy.call(UNCOND, &x).unwrap_err();
    assert!(matches!(err, Error::ScopeNotPlanned(_)), "{err}");
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

/// Counts the calls of the block it wraps.
struct Counter(
    &'static str,
    std::sync::Arc<AtomicUsize>,
    magcache_core::HookOrder,
);

impl magcache_core::BlockHook for Counter {
    fn name(&self) -> &str {
        self.0
    }
    fn order(&self) -> magcache_core::HookOrder {
        self.2
    }
    fn forward(
        &self,
        _cx: &magcache_core::HookCx<'_>,
        streams: Streams,
        next: magcache_core::hooks::Next<'_>,
    ) -> magcache_core::Result<Streams> {
        self.1.fetch_add(1, Ordering::SeqCst);
        next(streams)
    }
}

#[test]
fn user_hooks_run_on_computed_blocks_beside_a_cache() {
    use magcache_core::HookOrder;
    let cache = CacheHandle::new(Box::new(FbCache::new(FbCacheConfig {
        threshold: 0.5,
        ..Default::default()
    })));
    let mut toy = Toy::new(1, &cache);
    // Head and tail hooks on the one block chain; the cache wraps the chain around them.
    let (outer, inner) = (
        std::sync::Arc::new(AtomicUsize::new(0)),
        std::sync::Arc::new(AtomicUsize::new(0)),
    );
    toy.reg
        .register(
            0,
            std::sync::Arc::new(Counter("outer", outer.clone(), HookOrder::Outer)),
        )
        .unwrap();
    toy.reg
        .register(
            0,
            std::sync::Arc::new(Counter("inner", inner.clone(), HookOrder::Inner)),
        )
        .unwrap();
    cache
        .lock()
        .unwrap()
        .begin_generation(&plan(2, &[Branch::Cond]))
        .unwrap();
    let x = t(&[1.0, 2.0]);
    assert_eq!(v(&toy.call(COND, &x).unwrap()), Toy::dense(1, &x));
    assert_eq!(v(&toy.call(COND, &x).unwrap()), Toy::dense(1, &x));
    // FBCache always runs the first block: both hooks saw both calls, the block ran twice.
    assert_eq!(outer.load(Ordering::SeqCst), 2);
    assert_eq!(inner.load(Ordering::SeqCst), 2);
    assert_eq!(toy.runs(), [2]);
    assert!(!toy.last(COND).computed);
}

#[test]
fn teacache_decides_from_the_indicator_the_chain_gives() {
    use magcache_strategies::{TeaCache, TeaCacheConfig};
    let cfg = TeaCacheConfig {
        threshold: 0.5,
        coefficients: Some(vec![1.0, 0.0]),
        ..Default::default()
    };
    let cache = CacheHandle::new(Box::new(TeaCache::new(cfg)));
    let mut toy = Toy::new(2, &cache);
    cache
        .lock()
        .unwrap()
        .begin_generation(&plan(4, &[Branch::Cond]))
        .unwrap();
    let x = t(&[1.0, 2.0]);
    let ind = t(&[1.0, 1.0]);
    toy.call_with(COND, &x, &ind).unwrap();
    assert!(toy.last(COND).computed, "first step is forced");
    // Indicator moved by 10 %: reuse, the metric is the accumulated distance.
    toy.call_with(COND, &x, &t(&[1.1, 1.1])).unwrap();
    let d = toy.last(COND);
    assert!(!d.computed);
    assert!((d.metric.unwrap() - 0.1).abs() < 1e-6, "{d:?}");
    // A jump past the threshold computes.
    toy.call_with(COND, &x, &t(&[3.0, 3.0])).unwrap();
    assert!(toy.last(COND).computed);
    assert_eq!(toy.runs(), [2, 2]);
    // A chain without the indicator TeaCache asks for is an error naming it.
    let cfg = TeaCacheConfig {
        indicator: Some(Indicator::ModulatedInput),
        ..Default::default()
    };
    let cache = CacheHandle::new(Box::new(TeaCache::new(cfg)));
    let mut toy = Toy::new(2, &cache);
    cache
        .lock()
        .unwrap()
        .begin_generation(&plan(4, &[Branch::Cond]))
        .unwrap();
    let err = toy.call(COND, &x).unwrap_err().to_string();
    assert!(err.contains("modulated_input"), "{err}");
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
            let d = toy.last(COND);
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
        let cache = CacheHandle::new(Box::new(FbCache::new(FbCacheConfig { threshold, ..Default::default() })));
        let mut toy = Toy::new(3, &cache);
        cache.lock().unwrap().begin_generation(&plan(2, &[Branch::Cond])).unwrap();
        let out = toy.call(COND, &t(&x)).unwrap();
        let d = toy.last(COND);
        prop_assert!(d.computed);
        prop_assert_eq!(d.metric, None);
        prop_assert_eq!(v(&out), Toy::dense(3, &t(&x)));
    }
}
