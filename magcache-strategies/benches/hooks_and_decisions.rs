//! Hook dispatch and decision costs (criterion): `cargo bench -p magcache-strategies`.
//!
//! - `dispatch/*`: one transformer call through a 30-block chain whose blocks are identities, run
//!   directly vs through a cache (MagCache computing every call): the framework's own overhead per
//!   call, to compare with a real block's milliseconds.
//! - `decision/*`: one call of each strategy on a Wan2.1-1.3B-sized hidden state (`[1, 720, 1536]`):
//!   MagCache (curve arithmetic), TeaCache (relative L1 of a `[1, 1, 1536]` time embedding), FBCache
//!   (relative L1 of the first block's residual).

use criterion::{criterion_group, criterion_main, Criterion};
use magcache_core::candle_core::{Device, Tensor};
use magcache_core::{
    BlockChain, BlockMetadata, Branch, CacheHandle, CallCx, GenerationPlan, HookRegistry,
    Indicator, ScopeKey, ScopePlan, Streams,
};
use magcache_strategies::ratios::{RatioSource, RatioSpec};
use magcache_strategies::{
    FbCache, FbCacheConfig, MagCache, MagCacheConfig, TeaCache, TeaCacheConfig,
};
use std::ops::Range;

const META: BlockMetadata = BlockMetadata {
    kind: "bench",
    joint: false,
};
const COND: ScopeKey = ScopeKey::new(0, Branch::Cond);
/// A generation of `steps` calls of one scope.
fn plan(steps: usize) -> GenerationPlan {
    GenerationPlan {
        scopes: vec![ScopePlan {
            key: COND,
            steps,
            sigmas: vec![0.5; steps],
            step_indices: (0..steps).collect(),
        }],
        total_steps: steps,
        ..Default::default()
    }
}

/// Times `iters` calls of `f` after beginning a generation long enough for them (plus `warm` calls
/// made before the clock starts).
fn timed(
    cache: &CacheHandle,
    iters: u64,
    warm: usize,
    mut before: impl FnMut(),
    mut f: impl FnMut(),
) -> std::time::Duration {
    cache
        .lock()
        .unwrap()
        .begin_generation(&plan(iters as usize + warm))
        .unwrap();
    for _ in 0..warm {
        before();
    }
    let t = std::time::Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed()
}

/// A chain of blocks run through a (hook-free) registry; block 0 scales by `first`, the others are
/// identities; the indicator is `temb`.
struct Chain<'a> {
    reg: &'a HookRegistry,
    first: f64,
    temb: Tensor,
}

impl BlockChain for Chain<'_> {
    fn num_blocks(&self) -> usize {
        self.reg.num_blocks()
    }
    fn run(&self, blocks: Range<usize>, x: Streams) -> magcache_core::Result<Streams> {
        let mut h = x.hidden;
        for i in blocks {
            let f = if i == 0 { self.first } else { 1.0 };
            h = self
                .reg
                .run_block(COND, i, Streams::hidden(h), &|s: Streams| {
                    Ok(Streams::hidden((&s.hidden * f)?))
                })?
                .hidden;
        }
        Ok(Streams::hidden(h))
    }
    fn indicator(&self, kind: Indicator) -> magcache_core::Result<Option<Tensor>> {
        Ok((kind == Indicator::TimestepEmbedding).then(|| self.temb.clone()))
    }
}

fn call(cache: Option<&CacheHandle>, chain: &Chain<'_>, x: &Tensor) -> Tensor {
    CallCx::new(COND, cache)
        .run_chain(chain, Streams::hidden(x.clone()))
        .unwrap()
        .hidden
}

fn never_reusing_magcache() -> MagCache {
    let cfg = MagCacheConfig {
        threshold: 0.0,
        max_skip_steps: 0,
        retention_ratio: 0.0,
        ..Default::default()
    };
    MagCache::new(cfg, RatioSource::Config(RatioSpec::Curve(vec![0.5])))
}

fn dispatch(c: &mut Criterion) {
    let x = Tensor::zeros(
        (1, 16, 64),
        magcache_core::candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let reg = HookRegistry::new(vec![META; 30]);
    let chain = Chain {
        reg: &reg,
        first: 1.0,
        temb: x.clone(),
    };
    c.bench_function("dispatch/30 blocks, no cache", |b| {
        b.iter(|| call(None, &chain, &x))
    });
    let cache = CacheHandle::new(Box::new(never_reusing_magcache()));
    c.bench_function("dispatch/30 blocks, cache (computing)", |b| {
        b.iter_custom(|n| timed(&cache, n, 0, || (), || drop(call(Some(&cache), &chain, &x))))
    });
}

fn decisions(c: &mut Criterion) {
    let dev = Device::Cpu;
    let h = Tensor::randn(0f32, 1.0, (1, 720, 1536), &dev).unwrap();
    let h2 = (&h * 1.01).unwrap();
    let temb = Tensor::randn(0f32, 1.0, (1, 1, 1536), &dev).unwrap();
    let temb2 = (&temb * 1.01).unwrap();
    let one = HookRegistry::new(vec![META]);
    let two = HookRegistry::new(vec![META; 2]);

    // MagCache: one decision (reusing, big threshold): curve arithmetic and the residual add.
    let cfg = MagCacheConfig {
        threshold: 1e9,
        max_skip_steps: usize::MAX,
        retention_ratio: 0.0,
        ..Default::default()
    };
    let cache = CacheHandle::new(Box::new(MagCache::new(
        cfg,
        RatioSource::Config(RatioSpec::Curve(vec![1.0])),
    )));
    let chain = Chain {
        reg: &one,
        first: 1.0,
        temb: temb.clone(),
    };
    c.bench_function("decision/magcache (reuse, add residual)", |b| {
        b.iter_custom(|n| {
            timed(
                &cache,
                n,
                1,
                || drop(call(Some(&cache), &chain, &h)),
                || drop(call(Some(&cache), &chain, &h2)),
            )
        })
    });

    // TeaCache: relative L1 of the indicator and the polynomial. Alternate two indicators so every
    // timed call measures a real distance.
    let cfg = TeaCacheConfig {
        threshold: 1e9,
        coefficients: Some(vec![1.0, 0.0]),
        ..Default::default()
    };
    let cache = CacheHandle::new(Box::new(TeaCache::new(cfg)));
    let chains = [
        Chain {
            reg: &one,
            first: 1.0,
            temb: temb.clone(),
        },
        Chain {
            reg: &one,
            first: 1.0,
            temb: temb2.clone(),
        },
    ];
    let mut flip = 0;
    c.bench_function("decision/teacache (rel L1 of temb, reuse)", |b| {
        b.iter_custom(|n| {
            timed(
                &cache,
                n,
                1,
                || drop(call(Some(&cache), &chains[0], &h)),
                || {
                    flip = 1 - flip;
                    drop(call(Some(&cache), &chains[flip], &h2))
                },
            )
        })
    });

    // FBCache: the first block (a scale) and the relative L1 of its residual.
    let cache = CacheHandle::new(Box::new(FbCache::new(FbCacheConfig {
        threshold: 1e9,
        ..Default::default()
    })));
    let chain = Chain {
        reg: &two,
        first: 1.5,
        temb,
    };
    c.bench_function(
        "decision/fbcache (rel L1 of a [1,720,1536] residual)",
        |b| {
            b.iter_custom(|n| {
                timed(
                    &cache,
                    n,
                    1,
                    || drop(call(Some(&cache), &chain, &h)),
                    || drop(call(Some(&cache), &chain, &h2)),
                )
            })
        },
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = dispatch, decisions
}
criterion_main!(benches);
