//! Hook dispatch and decision costs (criterion): `cargo bench -p magcache-strategies`.
//!
//! - `dispatch/*`: one transformer call through a 30-block chain whose blocks are identities, with no
//!   hooks vs with a cache installed (MagCache computing every call): the registry's and hooks' own
//!   overhead per call, to compare with a real block's milliseconds.
//! - `decision/*`: one call of each strategy on a Wan2.1-1.3B-sized hidden state (`[1, 720, 1536]`):
//!   MagCache (curve arithmetic), TeaCache (relative L1 of a `[1, 1, 1536]` time embedding), FBCache
//!   (relative L1 of the first block's residual).

use criterion::{criterion_group, criterion_main, Criterion};
use magcache_core::candle_core::{Device, Tensor};
use magcache_core::hooks::indicator;
use magcache_core::{
    BlockMetadata, Branch, CacheHandle, GenerationPlan, HookRegistry, ScopeKey, ScopePlan,
};
use magcache_strategies::ratios::{RatioSource, RatioSpec};
use magcache_strategies::{
    FbCache, FbCacheConfig, MagCache, MagCacheConfig, TeaCache, TeaCacheConfig,
};

const META: BlockMetadata = BlockMetadata {
    kind: "bench",
    hidden_in: 0,
    encoder_in: None,
    hidden_out: 0,
    encoder_out: None,
    outputs: 1,
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

fn call(reg: &HookRegistry, x: &Tensor, blocks: usize) -> Tensor {
    let mut h = x.clone();
    for i in 0..blocks {
        h = reg
            .run_block(i, &[h], &|inp: &[Tensor]| Ok(inp.to_vec()))
            .unwrap()
            .remove(0);
    }
    h
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
    let mut bare = HookRegistry::new(vec![META; 30]);
    bare.set_scope(Some(COND));
    c.bench_function("dispatch/30 blocks, no hooks", |b| {
        b.iter(|| call(&bare, &x, 30))
    });
    let mut hooked = HookRegistry::new(vec![META; 30]);
    let cache = CacheHandle::new(Box::new(never_reusing_magcache()));
    cache.install(&mut hooked).unwrap();
    hooked.set_scope(Some(COND));
    c.bench_function("dispatch/30 blocks, cache hooks (computing)", |b| {
        b.iter_custom(|n| timed(&cache, n, 0, || (), || drop(call(&hooked, &x, 30))))
    });
}

fn decisions(c: &mut Criterion) {
    let dev = Device::Cpu;
    let h = Tensor::randn(0f32, 1.0, (1, 720, 1536), &dev).unwrap();
    let h2 = (&h * 1.01).unwrap();
    let temb = Tensor::randn(0f32, 1.0, (1, 1, 1536), &dev).unwrap();
    let temb2 = (&temb * 1.01).unwrap();

    // MagCache: one head decision (reusing, big threshold).
    let mut reg = HookRegistry::new(vec![META]);
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
    cache.install(&mut reg).unwrap();
    reg.set_scope(Some(COND));
    c.bench_function("decision/magcache (reuse, add residual)", |b| {
        b.iter_custom(|n| {
            timed(
                &cache,
                n,
                1,
                || drop(call(&reg, &h, 1)),
                || drop(call(&reg, &h2, 1)),
            )
        })
    });

    // TeaCache: relative L1 of the indicator and the polynomial.
    let mut reg = HookRegistry::new(vec![META]);
    let cfg = TeaCacheConfig {
        threshold: 1e9,
        coefficients: Some(vec![1.0, 0.0]),
        ret_steps: false,
    };
    let cache = CacheHandle::new(Box::new(TeaCache::new(cfg)));
    cache.install(&mut reg).unwrap();
    reg.set_scope(Some(COND));
    // Alternate two indicators so every timed call measures a real distance.
    let tea = std::cell::RefCell::new(reg);
    let mut flip = false;
    c.bench_function("decision/teacache (rel L1 of temb, reuse)", |b| {
        b.iter_custom(|n| {
            timed(
                &cache,
                n,
                1,
                || {
                    tea.borrow_mut()
                        .set_indicator(indicator::TEACACHE, temb.clone());
                    drop(call(&tea.borrow(), &h, 1))
                },
                || {
                    flip = !flip;
                    tea.borrow_mut().set_indicator(
                        indicator::TEACACHE,
                        if flip { temb2.clone() } else { temb.clone() },
                    );
                    drop(call(&tea.borrow(), &h2, 1))
                },
            )
        })
    });

    // FBCache: relative L1 of the first-block residual (the first block itself is an identity here).
    let mut reg = HookRegistry::new(vec![META; 2]);
    let cache = CacheHandle::new(Box::new(FbCache::new(FbCacheConfig { threshold: 1e9 })));
    cache.install(&mut reg).unwrap();
    reg.set_scope(Some(COND));
    let first = |inp: &[Tensor]| Ok(vec![(&inp[0] * 1.5)?]);
    c.bench_function(
        "decision/fbcache (rel L1 of a [1,720,1536] residual)",
        |b| {
            b.iter_custom(|n| {
                timed(
                    &cache,
                    n,
                    1,
                    || {
                        reg.run_block(0, std::slice::from_ref(&h), &first).unwrap();
                        reg.run_block(1, std::slice::from_ref(&h), &|inp: &[Tensor]| {
                            Ok(inp.to_vec())
                        })
                        .unwrap();
                    },
                    || drop(reg.run_block(0, std::slice::from_ref(&h2), &first).unwrap()),
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
