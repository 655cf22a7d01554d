//! Spectrum against a reference written from the paper's formulas (arXiv 2603.01623, and its
//! reference code's schedule and blend), on a recorded trajectory: the inputs of every call are
//! fixed in advance, the model is one block whose output depends on the call, and the reference
//! decides and forecasts from plain vectors (the ridge coefficients solved per feature by Gaussian
//! elimination, not the engine's weights).

// The reference is written with indices, as the formulas are.
#![allow(clippy::needless_range_loop)]

mod common;

use common::{t, v, COND};
use magcache_core::{Branch, GenerationPlan, PerBlock, StepsSpec, Streams, TimestepCache};
use magcache_strategies::spectrum::SpectrumRule;
use magcache_strategies::{EstimatorAxis, SharedKeys, Spectrum, SpectrumConfig};

const D: usize = 5;

fn sigmas(n: usize) -> Vec<f64> {
    // A shifted schedule (shift 3), as the digits model runs.
    (0..n)
        .map(|k| {
            let s = 1.0 - k as f64 / n as f64;
            3.0 * s / (1.0 + 2.0 * s)
        })
        .collect()
}

fn inputs(n: usize) -> Vec<Vec<f64>> {
    (0..n)
        .map(|s| {
            let p = s as f64 / n as f64;
            (0..D)
                .map(|j| ((j * 5 + 1) as f64).sin() * (1.0 - p) + (j as f64 * 0.7).cos() * p)
                .collect()
        })
        .collect()
}

/// The model's output at call `s`: smooth in time, not a polynomial.
fn model(s: usize, x: &[f64]) -> Vec<f64> {
    let p = s as f64 / 12.0;
    x.iter()
        .enumerate()
        .map(|(j, xi)| xi + (p * (1.0 + j as f64 * 0.3)).sin() + 0.2 * (p * p) * j as f64)
        .collect()
}

fn cheb(tau: f64, m: usize) -> Vec<f64> {
    let mut t = vec![1.0, tau];
    for i in 2..=m {
        t.push(2.0 * tau * t[i - 1] - t[i - 2]);
    }
    t.truncate(m + 1);
    t
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap();
        a.swap(c, p);
        b.swap(c, p);
        for r in c + 1..n {
            let f = a[r][c] / a[c][c];
            for k in c..n {
                a[r][k] -= f * a[c][k];
            }
            b[r] -= f * b[c];
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        x[r] = (b[r] - (r + 1..n).map(|k| a[r][k] * x[k]).sum::<f64>()) / a[r][r];
    }
    x
}

/// The paper's predictor: ridge coefficients `C = (X^T X + lam I)^-1 X^T H`, then `x*^T C`,
/// blended with the reference code's local forecast `h_i + k (h_i - h_(i-1))`,
/// `k = (t* - t_i) / (t_i - t_(i-1))`.
fn forecast(c: &SpectrumConfig, pts: &[(f64, Vec<f64>)], t_star: f64) -> Vec<f64> {
    let tau = |t: f64| match c.estimator_axis {
        EstimatorAxis::Step => t * 2.0 / c.tau_num_steps as f64 - 1.0,
        EstimatorAxis::Sigma => 1.0 - 2.0 * t,
    };
    let pts = &pts[pts.len().saturating_sub(c.history_size)..];
    let p = c.m + 1;
    let x: Vec<Vec<f64>> = pts.iter().map(|(t, _)| cheb(tau(*t), c.m)).collect();
    let mut xtx = vec![vec![0.0; p]; p];
    for i in 0..p {
        for j in 0..p {
            xtx[i][j] =
                x.iter().map(|r| r[i] * r[j]).sum::<f64>() + if i == j { c.lam } else { 0.0 };
        }
    }
    let star = cheb(tau(t_star), c.m);
    let h_cheb: Vec<f64> = (0..D)
        .map(|f| {
            let xth: Vec<f64> = (0..p)
                .map(|i| x.iter().zip(pts).map(|(r, (_, h))| r[i] * h[f]).sum())
                .collect();
            let coef = solve(xtx.clone(), xth);
            star.iter().zip(&coef).map(|(a, b)| a * b).sum()
        })
        .collect();
    let (ti, hi) = &pts[pts.len() - 1];
    let (tp, hp) = &pts[pts.len() - 2];
    let k = (t_star - ti) / (ti - tp);
    (0..D)
        .map(|f| {
            let taylor = hi[f] + k * (hi[f] - hp[f]);
            c.w * h_cheb[f] + (1.0 - c.w) * taylor
        })
        .collect()
}

/// The reference: per call, whether it computes and the output.
fn reference(c: &SpectrumConfig, n: usize) -> Vec<(bool, Vec<f64>)> {
    let (xs, sig) = (inputs(n), sigmas(n));
    let time = |s: usize| match c.estimator_axis {
        EstimatorAxis::Step => s as f64,
        EstimatorAxis::Sigma => sig[s],
    };
    let (mut ws, mut cached) = (c.window_size, 0usize);
    let mut pts: Vec<(f64, Vec<f64>)> = Vec::new();
    let mut out = Vec::new();
    for s in 0..n {
        let mut actual = true;
        if s >= c.warmup_steps {
            let window = (ws.floor() as usize).max(1);
            actual = (cached + 1).is_multiple_of(window);
            if actual {
                ws = ((ws + c.flex_window) * 1000.0).round() / 1000.0;
            }
        }
        cached = if actual { 0 } else { cached + 1 };
        if actual {
            let y = model(s, &xs[s]);
            pts.push((time(s), y.iter().zip(&xs[s]).map(|(a, b)| a - b).collect()));
            out.push((true, y));
        } else {
            let r = forecast(c, &pts, time(s));
            out.push((false, xs[s].iter().zip(&r).map(|(a, b)| a + b).collect()));
        }
    }
    out
}

/// The strategy on the engine over the same recorded inputs.
fn engine(c: &SpectrumConfig, n: usize) -> Vec<(bool, Vec<f64>)> {
    let xs = inputs(n);
    let plan =
        GenerationPlan::from_steps(&StepsSpec::new("toy", "euler", &sigmas(n), &[Branch::Cond]));
    let mut cache = Spectrum::with_rule(SpectrumRule { cfg: c.clone() }, c.shared());
    cache.begin_generation(&plan).unwrap();
    let predicted: Vec<bool> = cache
        .predict(COND)
        .expect("decisions are data-free")
        .iter()
        .map(|d| d.computed)
        .collect();
    let got: Vec<(bool, Vec<f64>)> = (0..n)
        .map(|s| {
            let chain = PerBlock::new(1, |_, x: Streams| {
                let xv: Vec<f64> = v(&x.hidden).iter().map(|a| *a as f64).collect();
                let y: Vec<f32> = model(s, &xv).iter().map(|a| *a as f32).collect();
                Ok(Streams::hidden(t(&y)))
            });
            let x: Vec<f32> = xs[s].iter().map(|a| *a as f32).collect();
            let (y, d) = cache
                .run(
                    COND,
                    &chain,
                    Streams::hidden(t(&x)),
                    &magcache_core::SingleProcess,
                )
                .unwrap();
            (d.computed, v(&y.hidden).iter().map(|a| *a as f64).collect())
        })
        .collect();
    let computed: Vec<bool> = got.iter().map(|g| g.0).collect();
    assert_eq!(predicted, computed, "plan's prediction and the run");
    got
}

#[test]
fn schedule_and_forecasts_match_the_papers_predictor() {
    let base = SpectrumConfig::default();
    let cases = [
        (base.clone(), 50),
        (
            SpectrumConfig {
                flex_window: 3.0,
                ..base.clone()
            },
            50,
        ),
        (
            SpectrumConfig {
                w: 0.5,
                m: 3,
                lam: 1.0,
                warmup_steps: 3,
                tau_num_steps: 20,
                ..base.clone()
            },
            20,
        ),
        (
            SpectrumConfig {
                estimator_axis: EstimatorAxis::Sigma,
                w: 0.7,
                history_size: 4,
                flex_window: 1.5,
                ..base.clone()
            },
            24,
        ),
    ];
    let mut reused = 0;
    for (c, n) in &cases {
        let want = reference(c, *n);
        let got = engine(c, *n);
        let dec = |x: &[(bool, Vec<f64>)]| x.iter().map(|y| y.0).collect::<Vec<_>>();
        assert_eq!(dec(&got), dec(&want), "{c:?}");
        for (s, (g, w)) in got.iter().zip(&want).enumerate() {
            let err =
                g.1.iter()
                    .zip(&w.1)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
            assert!(err < 2e-4, "call {s} of {c:?}: {:?} vs {:?}", g.1, w.1);
        }
        reused += got.iter().filter(|g| !g.0).count();
    }
    assert!(reused > 40, "{reused}");
    // The reference code's counts: 14 and 10 computed calls of 50.
    let count = |c: &SpectrumConfig| reference(c, 50).iter().filter(|r| r.0).count();
    assert_eq!(count(&cases[0].0), 14);
    assert_eq!(count(&cases[1].0), 10);
}

#[test]
fn a_window_of_one_computes_every_call_and_spectrum_is_listed() {
    let c = SpectrumConfig {
        window_size: 1.0,
        flex_window: 0.0,
        ..Default::default()
    };
    assert!(engine(&c, 12).iter().all(|g| g.0));
    magcache_strategies::link();
    let names: Vec<&str> = magcache_core::runtime::registry::strategies()
        .iter()
        .map(|r| r.name)
        .collect();
    assert!(names.contains(&"spectrum"), "{names:?}");
}

/// Spectrum compares no metric with a threshold: reports must not read its window as one (the
/// threshold hint and the plot's line were `flex_window`).
#[test]
fn spectrum_reports_no_threshold() {
    use magcache_core::StrategyConfig;
    assert_eq!(SpectrumConfig::default().threshold(), None);
}
