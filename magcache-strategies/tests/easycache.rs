//! EasyCache against a reference written from the paper's formulas (arXiv 2507.02860), on a
//! recorded trajectory: the inputs of every call are fixed in advance, the model is one block whose
//! output depends on the call, and the reference decides from plain vectors.

mod common;

use common::{t, v, COND};
use magcache_core::{Branch, GenerationPlan, PerBlock, StepsSpec, Streams, TimestepCache};
use magcache_strategies::{EasyCache, EasyCacheConfig};

const N: usize = 24;
const D: usize = 6;

/// The recorded inputs `x_t`: a latent drifting from noise towards an image, faster at the start.
fn inputs() -> Vec<Vec<f32>> {
    (0..N)
        .map(|s| {
            let p = s as f32 / N as f32;
            (0..D)
                .map(|j| {
                    let noise = ((j * 7 + 3) as f32).sin();
                    let image = (j as f32 * 0.5).cos();
                    noise * (1.0 - p).powi(2) + image * (1.0 - (1.0 - p).powi(2))
                })
                .collect()
        })
        .collect()
}

/// The model: `v = x * a_s + b_s` at call `s`, with a transformation rate that varies.
fn model(s: usize, x: &[f32]) -> Vec<f32> {
    let a = 1.5 + 0.3 * (s as f32 * 0.7).sin();
    x.iter()
        .enumerate()
        .map(|(j, xi)| xi * a + 0.2 * ((s + j) as f32 * 0.3).cos())
        .collect()
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

fn mean_abs(a: &[f32]) -> f64 {
    a.iter().map(|x| (*x as f64).abs()).sum::<f64>() / a.len() as f64
}

/// The paper's controller on plain vectors: per call, whether it computes, and `E_t` (None before
/// the transformation rate is known). `warmup`: the first calls computed whatever `E` says.
fn reference(xs: &[Vec<f32>], tau: f64, warmup: usize) -> Vec<(bool, Option<f64>)> {
    let mut computed: Vec<(usize, Vec<f32>)> = Vec::new(); // (call, v)
    let mut acc = 0.0;
    let mut out = Vec::new();
    for s in 0..xs.len() {
        let e = match computed.as_slice() {
            [.., (h, vh), (i, vi)] if s > 0 => {
                let k = mean_abs_diff(vi, vh) / mean_abs_diff(&xs[*i], &xs[*h]);
                let eps = k * mean_abs_diff(&xs[s], &xs[s - 1]) / mean_abs(vi);
                Some(acc + eps)
            }
            _ => None,
        };
        let reuse = s >= warmup && e.is_some_and(|e| e < tau);
        if reuse {
            acc = e.unwrap_or(acc);
        } else {
            acc = 0.0;
            computed.push((s, model(s, &xs[s])));
        }
        out.push((!reuse, e));
    }
    out
}

/// The strategy on the engine over the same recorded inputs: per call, computed, metric, output.
fn run(tau: f64, warmup: usize) -> Vec<(bool, Option<f64>, Vec<f32>)> {
    let xs = inputs();
    let sigmas: Vec<f64> = (0..N).map(|s| 1.0 - s as f64 / N as f64).collect();
    let plan =
        GenerationPlan::from_steps(&StepsSpec::new("toy", "euler", &sigmas, &[Branch::Cond]));
    let mut cache = EasyCache::with_rule(
        magcache_strategies::easycache::EasyCacheRule { threshold: tau },
        magcache_strategies::SharedKeys::shared(&EasyCacheConfig {
            threshold: tau,
            warmup_steps: warmup,
            ..Default::default()
        }),
    );
    cache.begin_generation(&plan).unwrap();
    (0..N)
        .map(|s| {
            let chain = PerBlock::new(1, |_, x: Streams| {
                Ok(Streams::hidden(t(&model(s, &v(&x.hidden)))))
            });
            let (y, d) = cache
                .run(
                    COND,
                    &chain,
                    Streams::hidden(t(&xs[s])),
                    &magcache_core::SingleProcess,
                )
                .unwrap();
            (d.computed, d.metric, v(&y.hidden))
        })
        .collect()
}

#[test]
fn decisions_match_the_papers_controller() {
    let xs = inputs();
    let mut reused_somewhere = 0;
    let mut recomputed_after_reuse = 0;
    for &tau in &[0.02, 0.05, 0.1, 0.2, 0.4, 0.8] {
        for warmup in [0, 4] {
            let want = reference(&xs, tau, warmup);
            // Skip a threshold the f32 engine and the f64 reference could round across.
            if want
                .iter()
                .any(|(_, e)| e.is_some_and(|e| (e - tau).abs() < 1e-4 * tau))
            {
                continue;
            }
            let got = run(tau, warmup);
            let got_dec: Vec<bool> = got.iter().map(|g| g.0).collect();
            let want_dec: Vec<bool> = want.iter().map(|w| w.0).collect();
            assert_eq!(got_dec, want_dec, "threshold {tau}, warm-up {warmup}");
            for (s, (g, w)) in got.iter().zip(&want).enumerate() {
                if s >= warmup {
                    match (g.1, w.1) {
                        (Some(a), Some(b)) => {
                            assert!((a - b).abs() <= 1e-4 * (1.0 + b), "call {s}: {a} vs {b}")
                        }
                        (None, None) => {}
                        other => panic!("call {s}: metric {other:?}"),
                    }
                }
            }
            reused_somewhere += got_dec.iter().filter(|c| !**c).count();
            recomputed_after_reuse += got_dec.windows(2).filter(|w| !w[0] && w[1]).count();
            // A reused call returns its input plus the last computed transformation vector.
            let mut delta: Option<Vec<f32>> = None;
            for (s, (computed, _, y)) in got.iter().enumerate() {
                if *computed {
                    delta = Some(y.iter().zip(&xs[s]).map(|(a, b)| a - b).collect());
                } else if let Some(d) = &delta {
                    let want: Vec<f32> = xs[s].iter().zip(d).map(|(a, b)| a + b).collect();
                    assert!(mean_abs_diff(y, &want) < 1e-6, "call {s}");
                }
            }
        }
    }
    // The sweep exercises both sides of the rule.
    assert!(reused_somewhere > 10, "{reused_somewhere}");
    assert!(recomputed_after_reuse > 3, "{recomputed_after_reuse}");
}

#[test]
fn the_first_two_calls_compute_and_easycache_is_listed() {
    // Whatever the threshold, `k` needs two computed calls.
    let got = run(1e9, 0);
    assert!(got[0].0 && got[1].0 && !got[2].0);
    assert!(got[2..].iter().all(|g| !g.0));
    magcache_strategies::link();
    let names: Vec<&str> = magcache_core::runtime::registry::strategies()
        .iter()
        .map(|r| r.name)
        .collect();
    assert!(names.contains(&"easycache"), "{names:?}");
}
