//! Two simulated ranks of a sequence-parallel run (threads sharing a barrier-based
//! `DecisionSync`), each holding its own shard of the tokens: their local metrics differ, their
//! decisions must not. FBCache and TeaCache (the strategies that decide from data) are tested; each
//! is also run unsynchronised to show that the shards alone would disagree.

use magcache_core::candle_core::{Device, Tensor};
use magcache_core::sync::ThreadGroup;
use magcache_core::{
    BlockChain, Branch, CacheHandle, CallCx, CallDecision, DecisionSync, GenerationPlan, Indicator,
    ScopeKey, ScopePlan, SingleProcess, Streams, TimestepCache,
};
use magcache_strategies::{FbCache, FbCacheConfig, TeaCache, TeaCacheConfig};
use std::ops::Range;
use std::sync::Arc;

const COND: ScopeKey = ScopeKey::new(0, Branch::Cond);
const STEPS: usize = 8;

/// Block `i` maps `x -> x * 2 + (i + 1)`; block 0's residual is `x + 1`.
struct Chain {
    blocks: usize,
    indicator: Tensor,
}

impl BlockChain for Chain {
    fn num_blocks(&self) -> usize {
        self.blocks
    }
    fn run(&self, blocks: Range<usize>, x: Streams) -> magcache_core::Result<Streams> {
        let mut h = x.hidden;
        for i in blocks {
            h = ((&h * 2.0)? + (i as f64 + 1.0))?;
        }
        Ok(Streams::hidden(h))
    }
    fn indicator(&self, kind: Indicator) -> magcache_core::Result<Option<Tensor>> {
        Ok((kind == Indicator::TimestepEmbedding).then(|| self.indicator.clone()))
    }
}

fn plan() -> GenerationPlan {
    GenerationPlan {
        scopes: vec![ScopePlan {
            key: COND,
            steps: STEPS,
            sigmas: vec![0.5; STEPS],
            step_indices: (0..STEPS).collect(),
        }],
        total_steps: STEPS,
        family: "toy".into(),
        ..Default::default()
    }
}

/// Rank `rank`'s shard at `step`: 4 tokens whose block-0 residual (and indicator) is
/// `1 + rate * step`, the rate differing per rank (rank 0 changes slowly, rank 1 fast).
fn shard(rank: usize, step: usize) -> (Tensor, Tensor) {
    let rate = [0.02, 0.4][rank];
    let r1 = 1.0 + rate * step as f32;
    let x = Tensor::new(&[r1 - 1.0; 4], &Device::Cpu).unwrap();
    let ind = Tensor::new(&[r1; 4], &Device::Cpu).unwrap();
    (x, ind)
}

/// Runs every step of one rank through `CallCx` (the model's path) and returns the decisions.
fn run_rank(
    cache: Box<dyn TimestepCache>,
    sync: Arc<dyn DecisionSync>,
    rank: usize,
) -> Vec<CallDecision> {
    let handle = CacheHandle::with_sync(cache, sync);
    handle.lock().unwrap().begin_generation(&plan()).unwrap();
    (0..STEPS)
        .map(|step| {
            let (x, indicator) = shard(rank, step);
            let chain = Chain {
                blocks: 3,
                indicator,
            };
            let cx = CallCx::new(COND, Some(&handle));
            cx.run_chain(&chain, Streams::hidden(x)).unwrap();
            cx.decision().unwrap()
        })
        .collect()
}

/// Both ranks in threads, synchronised through one `ThreadGroup`.
fn two_ranks(make: fn() -> Box<dyn TimestepCache>) -> Vec<Vec<CallDecision>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|g| {
                s.spawn(move || {
                    let rank = g.rank();
                    run_rank(make(), Arc::new(g), rank)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn computed(d: &[CallDecision]) -> Vec<bool> {
    d.iter().map(|d| d.computed).collect()
}

fn fbcache() -> Box<dyn TimestepCache> {
    Box::new(FbCache::new(FbCacheConfig {
        threshold: 0.1,
        ..Default::default()
    }))
}

fn teacache() -> Box<dyn TimestepCache> {
    Box::new(TeaCache::new(TeaCacheConfig {
        threshold: 0.3,
        coefficients: Some(vec![1.0, 0.0]),
        ..Default::default()
    }))
}

fn check(make: fn() -> Box<dyn TimestepCache>) {
    // Alone, the shards disagree.
    let alone: Vec<_> = (0..2)
        .map(|r| run_rank(make(), Arc::new(SingleProcess), r))
        .collect();
    assert_ne!(
        computed(&alone[0]),
        computed(&alone[1]),
        "the shards must disagree for the test to mean anything"
    );
    // Synchronised, they decide alike, with bit-identical metrics.
    let synced = two_ranks(make);
    assert_eq!(synced[0], synced[1]);
    // Both reuse somewhere and compute somewhere past the first step.
    let c = computed(&synced[0]);
    assert!(
        c[0] && c[1..].contains(&true) && c.contains(&false),
        "{c:?}"
    );
}

#[test]
fn fbcache_ranks_with_different_local_metrics_decide_alike() {
    check(fbcache);
    // The synchronised metric is the relative L1 of the whole sequence (equal shards: the mean of the
    // shards' numerators over the mean of their denominators). Step 1 by hand: previous residual 1
    // on both ranks, now 1.02 and 1.4: ((0.02 + 0.4) / 2) / ((1 + 1) / 2) = 0.21 > 0.1: both compute
    // (rank 0 alone would reuse).
    let synced = two_ranks(fbcache);
    let d = synced[0][1];
    assert!(d.computed);
    assert!((d.metric.unwrap() - 0.21).abs() < 1e-6, "{d:?}");
}

#[test]
fn teacache_ranks_with_different_local_metrics_decide_alike() {
    check(teacache);
}
