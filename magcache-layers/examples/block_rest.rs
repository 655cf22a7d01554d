//! Time of each element-wise step of one Wan2.1 block on the CPU (everything but the linear
//! layers' products and the attention: the "rest" of `magcache run --json`'s `cpu_time`), in f32
//! at the block's shapes, median of ROUNDS, on candle's threads.
//! `cargo run --release -p magcache-layers --example block_rest -- [TOKENS WIDTH HEADS FFN] [ROUNDS]`
//! (default: 720 tokens of the Wan2.1-1.3B, 1536 wide, 12 heads, FFN 8960, 7 rounds).

use candle_core::{DType, Device, Tensor};
use magcache_layers::nn::{self, LayerNorm, RmsNorm};
use std::time::Instant;

fn main() -> magcache_core::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (s, d, heads, ffn) = match args.as_slice() {
        [s, d, h, f, ..] => (*s, *d, *h, *f),
        _ => (720, 1536, 12, 8960),
    };
    let rounds = args.get(4).copied().unwrap_or(7);
    let dev = Device::Cpu;
    let hd = d / heads;
    println!(
        "{s} tokens x {d} ({heads} heads), FFN {ffn}, {} threads, median of {rounds}",
        candle_core::utils::get_num_threads()
    );
    let h = Tensor::randn(0f32, 1.0, (1, s, d), &dev)?;
    let a = Tensor::randn(0f32, 1.0, (1, s, d), &dev)?;
    let f = Tensor::randn(0f32, 1.0, (1, s, ffn), &dev)?;
    let m = Tensor::randn(0f32, 0.1, (1, 1, d), &dev)?;
    let ln = LayerNorm::new(d, 1e-6, None, &dev)?;
    let ln_affine = LayerNorm::new(
        d,
        1e-6,
        Some((
            Tensor::randn(0f32, 1.0, d, &dev)?,
            Tensor::randn(0f32, 1.0, d, &dev)?,
        )),
        &dev,
    )?;
    let rms = RmsNorm::new(Tensor::randn(0f32, 1.0, d, &dev)?, 1e-6);
    let cos = Tensor::randn(0f32, 1.0, (s, hd / 2), &dev)?;
    let sin = Tensor::randn(0f32, 1.0, (s, hd / 2), &dev)?;
    let q4 = nn::split_heads(&h, heads)?;
    type Step<'a> = (
        &'a str,
        usize,
        Box<dyn Fn() -> magcache_core::Result<Tensor> + 'a>,
    );
    // (name, how many times per block, the step)
    let steps: Vec<Step> = vec![
        ("layer norm (no affine)", 2, Box::new(|| ln.forward(&h))),
        ("layer norm (affine)", 1, Box::new(|| ln_affine.forward(&h))),
        ("modulate", 2, Box::new(|| nn::modulate(&h, &m, &m))),
        (
            "h + a * gate",
            2,
            Box::new(|| Ok((&h + a.broadcast_mul(&m)?)?)),
        ),
        ("h + a", 1, Box::new(|| Ok((&h + &a)?))),
        ("rms norm (q, k)", 3, Box::new(|| rms.forward(&h))),
        (
            "split heads (q, k, v)",
            4,
            Box::new(|| nn::split_heads(&h, heads)),
        ),
        ("rope (q, k)", 2, Box::new(|| nn::rope_i(&q4, &cos, &sin))),
        ("merge heads", 2, Box::new(|| nn::merge_heads(&q4))),
        ("gelu (FFN)", 1, Box::new(|| nn::gelu(&f))),
    ];
    let mut total = 0.0;
    for (name, per_block, step) in &steps {
        let mut t: Vec<f64> = (0..rounds)
            .map(|_| {
                let t0 = Instant::now();
                let y = step()?;
                let e = t0.elapsed().as_secs_f64();
                debug_assert_eq!(y.dtype(), DType::F32);
                Ok(e)
            })
            .collect::<magcache_core::Result<_>>()?;
        t.sort_by(f64::total_cmp);
        let med = t[t.len() / 2];
        total += med * *per_block as f64;
        println!("{name:<24} {:>8.2} ms  x{per_block} per block", med * 1e3);
    }
    println!("per block: {:.1} ms", total * 1e3);
    Ok(())
}
