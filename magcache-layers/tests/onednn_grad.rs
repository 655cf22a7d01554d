//! A packed f32 linear layer in a differentiable run (the fitted estimator's fit) runs no product
//! on oneDNN. A test binary of its own: it reads oneDNN's process-wide product counter, which the
//! other oneDNN tests, run on parallel threads of one binary, would move under it.

use candle_core::{Device, Tensor};
use magcache_layers::nn::Linear;

mod common;

use common::library;

/// An f32 linear layer packed for oneDNN (what `Linear::new` holds with `MAGCACHE_ONEDNN` named)
/// in a differentiable run (the fitted estimator's fit): its plain values are unpacked for candle's
/// product, so the input's gradient is `grad . W`, as for a weight never packed.
#[test]
fn packed_f32_linear_layers_take_gradients() {
    let Some(d) = library() else { return };
    let dev = Device::Cpu;
    let (m, k, n) = (5, 7, 3);
    let w = Tensor::randn(0f32, 1f32, (n, k), &dev).unwrap();
    if d.pack(&w.t().unwrap()).unwrap().is_none() {
        eprintln!("note: oneDNN keeps this f32 weight plain: nothing packed to differentiate");
        return;
    }
    let b = Tensor::randn(0f32, 1f32, n, &dev).unwrap();
    let layer = Linear::new(w.clone(), Some(b.clone())).unwrap();
    let x =
        candle_core::Var::from_tensor(&Tensor::randn(0f32, 1f32, (m, k), &dev).unwrap()).unwrap();
    // `x W^T + b` on candle's plain product: the layer's output and, doubled, the loss's gradient.
    let plain = x
        .as_tensor()
        .matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    let before = d.products();
    let grad = {
        let _d = magcache_layers::nn::Differentiable::enter();
        let y = layer.forward(x.as_tensor()).unwrap();
        assert!(common::largest_abs(&(&y - &plain).unwrap()) < 1e-5);
        y.sqr().unwrap().sum_all().unwrap().backward().unwrap()
    };
    assert_eq!(
        d.products(),
        before,
        "a differentiable product ran on oneDNN"
    );
    let g = grad.get(x.as_tensor()).unwrap();
    let want = (plain * 2.0).unwrap().matmul(&w).unwrap();
    let diff = common::largest_abs(&(g - want).unwrap());
    assert!(diff < 1e-4, "the input's gradient differs by {diff}");
}
