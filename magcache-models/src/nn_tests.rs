//! Unit tests of [`super`] (`nn.rs`).
use super::*;

#[test]
fn fast_gelu_matches_the_tanh_formula() {
    let xs: Vec<f32> = (-4000..4000)
        .map(|i| i as f32 * 0.0025)
        .chain([-100.0, -20.0, 20.0, 100.0])
        .collect();
    let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
    let fast = gelu(&t).unwrap().to_vec1::<f32>().unwrap();
    for (x, f) in xs.iter().zip(&fast) {
        let x64 = *x as f64;
        let exact = 0.5
            * x64
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3))).tanh());
        assert!(
            (exact - *f as f64).abs() <= 2e-6 * (1.0 + exact.abs()),
            "x {x}: {f} vs {exact}"
        );
    }
}
