//! The fitted estimator's fit differentiates whole cached runs: on the trained digits model (one
//! digit, 6 steps, CFG), the gradient of the final latent's error with respect to every
//! coefficient, from candle's autograd through the Wan blocks in `Differentiable` mode, the
//! sampler and the guidance, matches the run's own derivative by central differences along it;
//! and the differentiable forms compute the same run as the fused ones.

use candle_core::Tensor;
use magcache_cli::{generate, prepare_pipeline, Prepared, Verbosity};
use magcache_core::CacheHandle;
use magcache_strategies::engine::Shared;
use magcache_strategies::fitted::Coefficients;
use magcache_strategies::residual::{Estimator, EstimatorAxis};
use magcache_strategies::schedule::{Schedule, ScheduleRule};
use magcache_tests::{link_all, max_abs, max_abs_diff};

fn try_run(
    p: &mut Prepared,
    coefs: &Coefficients,
    differentiable: bool,
) -> magcache_core::Result<Tensor> {
    let shared = Shared {
        estimator: Estimator::Fitted,
        estimator_axis: EstimatorAxis::Sigma,
        ..Default::default()
    };
    let rule = ScheduleRule::fitted(vec![0, 2, 4], coefs.clone());
    let h = CacheHandle::new(Box::new(Schedule::with_rule(rule, shared)));
    p.use_cache(Some(h), "schedule")?;
    let _d = differentiable.then(magcache_layers::nn::Differentiable::enter);
    let out = generate(p, Verbosity::Silent)?.0;
    p.use_cache(None, "none")?;
    Ok(out)
}

fn run(p: &mut Prepared, coefs: &Coefficients, differentiable: bool) -> Tensor {
    try_run(p, coefs, differentiable).unwrap()
}

/// The digits model on `classes` (one sample each), 6 steps with CFG: its folder, pipeline and
/// dense run.
fn digits(classes: &[usize], seed: u64) -> (tempfile::TempDir, Prepared, Tensor) {
    link_all();
    let dir = tempfile::tempdir().unwrap();
    let weights = magcache_tests::fixture("trained/digits_wan");
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!("[model]\nfamily = \"wan2.1\"\nweights = {:?}\n\n[inputs]\nclasses = {classes:?}\nlatent_shape = [{}, 1, 1, 16, 16]\nseed = {seed}\n\n[sampling]\nsteps = 6\nshift = 3.0\nguidance_scale = 4.0\n", weights.display().to_string(), classes.len()),
    )
    .unwrap();
    let mut p = prepare_pipeline(&config).unwrap();
    let (dense, _) = generate(&mut p, Verbosity::Silent).unwrap();
    (dir, p, dense)
}

#[test]
fn the_fit_gradient_is_the_runs_derivative() {
    let (_dir, mut p, dense) = digits(&[3], 5);
    let coefs = Coefficients::trainable();
    let out = run(&mut p, &coefs, true);
    let fused = run(&mut p, &coefs.frozen().unwrap(), false);
    let d = max_abs_diff(&out, &fused);
    assert!(d < 1e-4, "differentiable and fused runs differ by {d}");
    let loss = |o: &Tensor| -> Tensor { (o - &dense).unwrap().sqr().unwrap().sum_all().unwrap() };
    let grads = loss(&out).backward().unwrap();
    let vars = coefs.vars().unwrap();
    // Calls 1, 3 and 5 reuse: 1 from call 0 (one coefficient row), 3 and 5 from two calls.
    assert_eq!(vars.len(), 1 + 2 + 2);
    let g: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| {
            grads
                .get(v.as_tensor())
                .expect("every coefficient gets a gradient")
                .clone()
        })
        .collect();
    let norm = g
        .iter()
        .map(|t| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        })
        .sum::<f64>()
        .sqrt();
    assert!(norm > 0.0 && norm.is_finite(), "gradient norm {norm}");
    let base: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    let mut at = |h: f64| -> f64 {
        for (((_, v), b), gi) in vars.iter().zip(&base).zip(&g) {
            v.set(&(b + (gi * (h / norm)).unwrap()).unwrap()).unwrap();
        }
        let o = run(&mut p, &coefs.frozen().unwrap(), false);
        loss(&o).to_scalar::<f32>().unwrap() as f64
    };
    let h = 1e-2;
    let derivative = (at(h) - at(-h)) / (2.0 * h);
    let ratio = derivative / norm;
    assert!(
        (ratio - 1.0).abs() < 0.05,
        "directional derivative {derivative} against the gradient's norm {norm}"
    );
}

/// The fit's checkpointed backward (`magcache_core::checkpoint`: the blocks recorded without a
/// graph, each computed call's blocks recomputed once in the sweep) gives autograd's gradient on
/// the digits model, through the Wan blocks, the sampler, the guidance and both CFG branches.
#[test]
fn the_checkpointed_gradient_is_autograds() {
    use magcache_core::checkpoint::{self, Checkpoint};
    let (_dir, mut p, dense) = digits(&[3, 8], 9);
    let coefs = Coefficients::trainable();
    let loss = |o: &Tensor| -> Tensor { (o - &dense).unwrap().sqr().unwrap().sum_all().unwrap() };
    // Move the coefficients off the order-1 forecast first, so every one of them matters.
    let _ = run(&mut p, &coefs, true);
    for (i, (_, v)) in coefs.vars().unwrap().iter().enumerate() {
        let t = v.as_tensor();
        v.set(&(t * (1.0 + 0.05 * (i as f64 + 1.0))).unwrap())
            .unwrap();
    }
    let exact_loss = loss(&run(&mut p, &coefs, true));
    let exact = exact_loss.backward().unwrap();
    let rec = Checkpoint::record().unwrap();
    let out = run(&mut p, &coefs, true);
    let tape = rec.finish().unwrap();
    let l = loss(&out);
    let (a, b) = (
        exact_loss.to_scalar::<f32>().unwrap(),
        l.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() <= 1e-4 * a.abs(), "losses {a} and {b}");
    // Calls 0, 2, 4 compute for both branches: 6 chain invocations.
    assert_eq!(tape.len(), 6);
    let got = checkpoint::backward(&l, tape, || try_run(&mut p, &coefs, true).map(drop)).unwrap();
    for (name, v) in coefs.vars().unwrap() {
        let e = exact.get(v.as_tensor()).unwrap();
        let g = got.get(v.as_tensor()).unwrap();
        let (d, scale) = (max_abs_diff(e, g), max_abs(e));
        assert!(scale > 0.0, "{name:?}: zero gradient");
        assert!(
            d <= 1e-3 * scale,
            "{name:?}: checkpointed gradient off by {d} (scale {scale})"
        );
    }
}
