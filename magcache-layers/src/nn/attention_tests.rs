//! Unit tests of the fused CPU attention and its softmax (`nn/attention.rs`).

use super::*;

#[test]
fn fused_cpu_attention_equals_the_matmul_path() {
    let dev = Device::Cpu;
    // Query counts across and off the task block, keys fewer and more than the queries.
    for (b, h, s, l, d) in [(2, 3, 300, 200, 16), (1, 2, 128, 129, 8), (1, 1, 1, 3, 4)] {
        let q = Tensor::randn(0f32, 2.0, (b, h, s, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 2.0, (b, h, l, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap();
        let fused = cpu_attention(&q, &k, &v).unwrap();
        let reference = attention_in_chunks(&q, &k, &v, s).unwrap();
        let diff = max_abs_diff(&fused, &reference);
        assert!(diff < 1e-5, "{b}x{h}x{s}x{l}x{d}: {diff}");
    }
    // A non-contiguous q (heads transposed in, as the models pass them) is accepted.
    let q = Tensor::randn(0f32, 1.0, (1, 5, 2, 8), &dev)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, 2, 7, 8), &dev).unwrap();
    let a = cpu_attention(&q, &k, &k).unwrap();
    let r = attention_in_chunks(&q, &k, &k, 5).unwrap();
    let diff = max_abs_diff(&a, &r);
    assert!(diff < 1e-5, "{diff}");
}

/// The exponentials of score rows of many lengths (the lanes' and the 32-value steps' tails)
/// and their sums, normalised, against the f64 softmax. A CPU with AVX-512F runs the rows'
/// whole 16-value steps on `softmax_pairs::exps_row_f32` and the rest on the plain loops; one
/// without, the plain loops alone: each host tests the paths it takes.
#[test]
fn exp_rows_give_the_softmax_of_f64() {
    for l in [1, 15, 16, 17, 31, 32, 33, 47, 200, 4801] {
        let rows = 3;
        let sc: Vec<f32> = (0..rows * l)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.05 - 25.0)
            .collect();
        let mut out = sc.clone();
        let sums = exp_rows(&mut out, l);
        assert_eq!(sums.len(), rows);
        for ((row, got), sum_of) in sc.chunks(l).zip(out.chunks(l)).zip(sums) {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            for (&x, &y) in row.iter().zip(got) {
                let p = (x as f64 - max).exp() / sum;
                let y = y as f64 * (1.0 / sum_of) as f64;
                assert!((p - y).abs() <= 2e-6 * p + 1e-12, "l {l}: {y} vs {p}");
            }
        }
    }
}

#[test]
fn chunked_attention_equals_one_shot() {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (1, 2, 37, 8), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, 2, 29, 8), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (1, 2, 29, 8), &dev).unwrap();
    let full = attention(&q, &k, &v).unwrap();
    let chunked = attention_in_chunks(&q, &k, &v, 5).unwrap();
    let d = max_abs_diff(&full, &chunked);
    assert!(d < 1e-6, "{d}");
}

/// The in-place bf16 exponentials: each row's pairs (at `u32` offset `r * lp`, zero past `l`)
/// hold `exp(x - m)` within bf16's rounding and the returned sums are the f64 ones' within f32
/// accumulation, for row widths around the 32-value step and odd ones (a padded last pair), where
/// `m` is the row's maximum (no running one) or a running maximum above it (kept). On a CPU with
/// AVX512-BF16 the whole 32-value steps run on `exps_row_bf16`, elsewhere on the plain loop.
#[test]
fn exps_to_pairs_match_f64() {
    for l in [1usize, 2, 15, 16, 17, 31, 32, 33, 47, 64, 200, 4801] {
        for running in [f32::NEG_INFINITY, -20.0, 30.0] {
            let (rows, lp) = (3, l.div_ceil(2));
            let sc: Vec<f32> = (0..rows * l)
                .map(|i| ((i * 7919) % 1013) as f32 * 0.05 - 25.0)
                .collect();
            let mut buf = sc.clone();
            let mut max = vec![running; rows];
            let sums = exps_to_pairs(&mut buf, rows, l, lp, &mut max);
            assert_eq!(sums.len(), rows);
            for (r, row) in sc.chunks(l).enumerate() {
                let row_max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                let m = row_max.max(running as f64);
                assert_eq!(max[r] as f64, m, "l {l} row {r}: the running maximum");
                let sum: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
                let got = sums[r] as f64;
                assert!(
                    (got / sum - 1.0).abs() < 1e-5,
                    "l {l} row {r}: sum {got} vs {sum}"
                );
                for j in 0..2 * lp {
                    let pair = buf[r * lp + j / 2].to_bits();
                    let bits = if j % 2 == 0 {
                        pair & 0xffff
                    } else {
                        pair >> 16
                    };
                    let got = f32::from_bits(bits << 16) as f64;
                    let want = row.get(j).map_or(0.0, |&x| (x as f64 - m).exp());
                    assert!(
                        (got - want).abs() <= want * (1.0 / 256.0) + 1e-37,
                        "l {l} row {r} key {j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// The f32 attention on the layers' f32 kernel (blocks of keys, scores transposed) against the
/// f64 softmax, at shapes across its blocks: queries off and past a task (96), keys off a tile
/// (12) and past a block (384), head widths off a panel (32), batch and heads. Skipped with a
/// note on a CPU without AVX-512F.
#[test]
fn f32_kernel_attention_matches_f64() {
    if !super::super::f32_gemm::cpu_has_avx512() {
        println!("note: no AVX-512F on this CPU; the f32 kernel's attention is not tested here");
        return;
    }
    for (b, h, s, l, d) in [
        (1, 2, 97, 385, 128),
        (2, 1, 30, 13, 40),
        (1, 1, 1, 1, 4),
        (1, 3, 200, 800, 64),
        (1, 1, 96, 12, 33),
    ] {
        // Seeded: the same draws on every run.
        let draw = |seed: u64, rows: usize, scale: f64| {
            let t = crate::random::randn(seed, &[b, h, rows, d]).unwrap();
            (t * scale).unwrap()
        };
        let (q, k, v) = (draw(1, s, 1.5), draw(2, l, 1.5), draw(3, l, 1.0));
        let got = fused(&q, &k, &v, CpuAttention::F32Kernel).unwrap();
        let want = f64_attention(&q, &k, &v);
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0f64, f64::max);
        assert!(worst < 2e-5, "{b}x{h}x{s}x{l}x{d}: {worst}");
    }
}

/// `softmax(q k^T / sqrt(d)) v` in f64, flattened `[B, H, S, D]`.
fn f64_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Vec<f64> {
    let (b, h, s, d) = q.dims4().unwrap();
    let l = k.dim(2).unwrap();
    let flat = |t: &Tensor| -> Vec<f64> {
        let t = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        t.into_iter().map(f64::from).collect()
    };
    let (q, k, v) = (flat(q), flat(k), flat(v));
    let mut out = vec![0f64; b * h * s * d];
    let scale = 1.0 / (d as f64).sqrt();
    for bh in 0..b * h {
        for i in 0..s {
            let qi = &q[(bh * s + i) * d..][..d];
            let scores: Vec<f64> = (0..l)
                .map(|j| {
                    let kj = &k[(bh * l + j) * d..][..d];
                    qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            let o = &mut out[(bh * s + i) * d..][..d];
            for (j, e) in exps.iter().enumerate() {
                let vj = &v[(bh * l + j) * d..][..d];
                for (o, x) in o.iter_mut().zip(vj) {
                    *o += e / sum * x;
                }
            }
        }
    }
    out
}
