//! Unit tests of [`super`] (`nn.rs`).
use super::*;
use candle_core::{Device, Module};

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

/// The CPU row convolution against candle's conv2d: stride 1 with and without padding, 1x1 and
/// 3x3, bands of one row (a tiny budget) and whole images, several threads' shares of the matrix;
/// and an input without channels gives zeros instead of a panic.
#[test]
fn row_convolution_matches_candles() {
    let dev = Device::Cpu;
    for (c, o, h, w, k, pad) in [
        (3, 5, 7, 9, 3, 1),
        (4, 2, 6, 5, 3, 0),
        (6, 3, 4, 4, 1, 0),
        (2, 2, 3, 8, 3, 2),
    ] {
        let x = Tensor::randn(0f32, 1f32, (2, c, h, w), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1f32, (o, c, k, k), &dev).unwrap();
        let want = x.conv2d(&wt, pad, 1, 1, 1).unwrap();
        for budget in [1, IM2COL_BUDGET] {
            let got = conv2d_bounded(&x, &wt, pad, 1, budget).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                d.to_scalar::<f32>().unwrap() < 1e-4,
                "{c} {o} {h} {w} {k} {pad}"
            );
        }
    }
    let x = Tensor::zeros((1, 0, 4, 4), DType::F32, &dev).unwrap();
    let wt = Tensor::zeros((3, 0, 3, 3), DType::F32, &dev).unwrap();
    let y = conv2d_bounded(&x, &wt, 1, 1, IM2COL_BUDGET).unwrap();
    assert_eq!(y.dims(), [1, 3, 4, 4]);
}

/// The compact quantized product is as close to the exact product of the dequantized weights as
/// candle's `QMatMul` (which repacks these sizes into SIMD tiles on x86; both round the activations
/// to 8 bits, in their own blocks).
#[test]
fn compact_quantized_product_is_as_exact_as_qmatmul() {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    let dev = Device::Cpu;
    let (m, k, n) = (33, 512, 64);
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
    for ty in [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        let q = std::sync::Arc::new(QTensor::quantize(&w, ty).unwrap());
        let exact = x.matmul(&q.dequantize(&dev).unwrap().t().unwrap()).unwrap();
        let qmm = QMatMul::from_arc(q.clone()).unwrap().forward(&x).unwrap();
        let got = x.apply_op1_no_bwd(&CompactQMatMul(q)).unwrap();
        assert_eq!(got.dims(), &[m, n]);
        let scale = exact
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let (d, d_qmm) = (max_abs_diff(&exact, &got), max_abs_diff(&exact, &qmm));
        eprintln!("{ty:?}: compact {d}, QMatMul {d_qmm}, of {scale}");
        assert!(
            d <= 0.02 * scale && d <= 2.0 * d_qmm.max(1e-4 * scale),
            "{ty:?}: {d} from the exact product (QMatMul: {d_qmm}) of {scale}"
        );
    }
}

/// The differentiable rotary embedding is candle's fused `rope_i` for shared `[S, D/2]` and per-item
/// `[B, S, D/2]` tables (longer than the sequence too), and it carries a gradient.
#[test]
fn rope_composite_is_the_fused_kernel_and_differentiable() {
    let dev = Device::Cpu;
    let (b, h, s, d) = (2, 3, 5, 8);
    let x = candle_core::Var::randn(0f32, 1.0, (b, h, s, d), &dev).unwrap();
    for table in [vec![s + 2, d / 2], vec![b, s, d / 2]] {
        let angles = Tensor::randn(0f32, 2.0, table.as_slice(), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let fused = candle_nn::rotary_emb::rope_i(
            x.as_tensor(),
            &cos.narrow(table.len() - 2, 0, s)
                .unwrap()
                .contiguous()
                .unwrap(),
            &sin.narrow(table.len() - 2, 0, s)
                .unwrap()
                .contiguous()
                .unwrap(),
        )
        .unwrap();
        let ours = rope_i_composite(x.as_tensor(), &cos, &sin).unwrap();
        let diff = max_diff(&fused, &ours);
        assert!(diff < 1e-5, "{table:?}: {diff}");
        // A rotation keeps the norm, so d(sum y^2)/dx = 2x.
        let g = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap();
        let gd = max_diff(gx, &(x.as_tensor() * 2.0).unwrap());
        assert!(gd < 1e-4, "{table:?}: gradient off by {gd}");
    }
}

/// The largest absolute difference of two tensors.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all());
    d.and_then(|d| d.to_scalar::<f32>()).unwrap()
}

#[test]
fn cpu_time_counts_linear_layers_and_attention() {
    let dev = Device::Cpu;
    let lin = Linear::new(
        Tensor::randn(0f32, 1.0, (64, 48), &dev).unwrap(),
        Some(Tensor::zeros(64, DType::F32, &dev).unwrap()),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 40, 48), &dev).unwrap();
    let before = timing::cpu_time();
    lin.forward(&x).unwrap();
    let mid = timing::cpu_time();
    assert!(
        mid.linear_seconds > before.linear_seconds,
        "{before:?} {mid:?}"
    );
    let q = Tensor::randn(0f32, 1.0, (1, 2, 40, 16), &dev).unwrap();
    attention(&q, &q, &q).unwrap();
    let after = timing::cpu_time();
    assert!(
        after.attention_seconds > mid.attention_seconds,
        "{mid:?} {after:?}"
    );
    let d = after.since(&before);
    assert!(d.linear_seconds > 0.0 && d.attention_seconds > 0.0, "{d:?}");
}
