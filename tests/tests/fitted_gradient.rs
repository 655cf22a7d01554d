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
use magcache_tests::{link_all, max_abs_diff};

fn run(p: &mut Prepared, coefs: &Coefficients, differentiable: bool) -> Tensor {
    let shared = Shared {
        estimator: Estimator::Fitted,
        estimator_axis: EstimatorAxis::Sigma,
        ..Default::default()
    };
    let rule = ScheduleRule::fitted(vec![0, 2, 4], coefs.clone());
    let h = CacheHandle::new(Box::new(Schedule::with_rule(rule, shared)));
    p.use_cache(Some(h), "schedule").unwrap();
    let _d = differentiable.then(magcache_layers::nn::Differentiable::enter);
    let out = generate(p, Verbosity::Silent).unwrap().0;
    p.use_cache(None, "none").unwrap();
    out
}

#[test]
fn the_fit_gradient_is_the_runs_derivative() {
    link_all();
    let dir = tempfile::tempdir().unwrap();
    let weights = magcache_tests::fixture("trained/digits_wan");
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!("[model]\nfamily = \"wan2.1\"\nweights = {:?}\n\n[inputs]\nclasses = [3]\nlatent_shape = [1, 1, 1, 16, 16]\nseed = 5\n\n[sampling]\nsteps = 6\nshift = 3.0\nguidance_scale = 4.0\n", weights.display().to_string()),
    )
    .unwrap();
    let mut p = prepare_pipeline(&config).unwrap();
    let (dense, _) = generate(&mut p, Verbosity::Silent).unwrap();
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
