//! The layers' AVX-512 f32 kernel (issue 45) against an f64 product on random shapes: odd sizes,
//! tails of rows (12), columns (32) and features, past a block of rows (768) and of features (256),
//! one thread and several; its epilogue (bias, GELU) against the passes it replaces; the unpacked
//! weight against the packed one. On a CPU without AVX-512F the kernel tests print a note and test
//! nothing more (the kernel never runs there: candle's gemm does).

use candle_core::{Device, Tensor};
use magcache_layers::nn::{self, bf16_gemm::Epilogue, f32_gemm, f32_gemm::PackedF32};
use proptest::prelude::*;
use std::mem::MaybeUninit;

mod common;

fn skip() -> bool {
    if !f32_gemm::cpu_has_avx512() {
        eprintln!("note: this CPU has no AVX-512F: the f32 kernel is not tested on it");
        return true;
    }
    false
}

/// The kernel's product of `x [m, k]` and `w [n, k]` on `threads` threads, with `epi`.
fn product(w: &PackedF32, x: &[f32], m: usize, threads: usize, epi: Epilogue<'_>) -> Vec<f32> {
    let n = w.n();
    // Garbage where the product must write: every value is checked.
    let mut c = vec![MaybeUninit::new(f32::NAN); m * n];
    w.product_then(x, m, &mut c, threads, epi).unwrap();
    c.iter().map(|v| unsafe { v.assume_init() }).collect()
}

fn check(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Result<(), TestCaseError> {
    let packed = PackedF32::pack(w, n, k);
    let one = product(&packed, x, m, 1, Epilogue::default());
    common::check_product(&one, x, w, None, (m, k, n), f64::from)?;
    // The same bits on several threads (columns or rows split between them): each value is
    // summed in one order whatever the split.
    for threads in [2, 3] {
        let more = product(&packed, x, m, threads, Epilogue::default());
        prop_assert!(
            one.iter()
                .zip(&more)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "[{m}, {k}] by [{k}, {n}]: other bits on {threads} threads"
        );
    }
    Ok(())
}

fn values(len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-2f32..2f32, len)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(45),
        ..ProptestConfig::default()
    })]

    #[test]
    fn small_shapes_match_f64((m, n, k, x, w) in (1usize..30, 1usize..140, 0usize..90).prop_flat_map(|(m, n, k)| {
        (Just(m), Just(n), Just(k), values(m * k), values(n * k))
    })) {
        if !skip() {
            check(&x, &w, m, n, k)?;
        }
    }
}

/// `len` values in [-2, 2) spread by a multiplicative hash seeded by `s`.
fn gen(len: usize, s: u32) -> Vec<f32> {
    (0..len)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ s) % 4001) as f32 / 1000.0 - 2.0)
        .collect()
}

/// Past one block of rows (768), several groups of panels (128 columns) and blocks of features
/// (256), with a tail in each; on two and three threads the panels are split between them.
#[test]
fn blocked_shapes_match_f64() {
    if skip() {
        return;
    }
    let (m, n, k) = (781, 291, 533);
    check(&gen(m * k, 7), &gen(n * k, 11), m, n, k).unwrap();
}

/// Rows enough (2 413: 202 tiles of 12) for two threads to split them, in 8 tasks of 26 tiles
/// (the last one 20, its last tile short), each packing its own rows.
#[test]
fn rows_split_between_threads_match_f64() {
    if skip() {
        return;
    }
    let (m, n, k) = (2413, 67, 300);
    check(&gen(m * k, 5), &gen(n * k, 13), m, n, k).unwrap();
}

/// The bias and the GELU on each output tile give the bits of the passes they replace (the
/// product, then `broadcast_add`, then `nn::gelu`), through `f32_gemm::linear` and through a
/// linear layer's feed-forward where the layers hold f32 weights for the kernel.
#[test]
fn the_epilogue_gives_the_bits_of_the_passes_it_replaces() {
    use magcache_layers::random::randn;
    if skip() {
        return;
    }
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    for (m, n, k) in [
        (1, 1, 1),
        (13, 37, 29),
        (781, 67, 300),
        (7, 50, 9),
        (5, 33, 0),
    ] {
        let x = randn(1, &[m, k]).unwrap();
        let w = (randn(2, &[n, k]).unwrap() * 0.5).unwrap();
        let b = randn(3, &[n]).unwrap();
        let packed = PackedF32::from_tensor(&w).unwrap();
        let plain = f32_gemm::linear(&packed, &x, None, false).unwrap();
        let biased = plain.broadcast_add(&b).unwrap();
        for (bias, gelu, want) in [
            (Some(&b), false, biased.clone()),
            (Some(&b), true, nn::gelu(&biased).unwrap()),
            (None, true, nn::gelu(&plain).unwrap()),
        ] {
            let got = f32_gemm::linear(&packed, &x, bias, gelu).unwrap();
            let what = format!("[{m}, {k}] by [{k}, {n}], bias {}", bias.is_some());
            assert!(bits(&got) == bits(&want), "{what}, gelu {gelu}: other bits");
        }
        if k > 0 && f32_gemm::available() {
            let w2 = (randn(4, &[k, n]).unwrap() * 0.5).unwrap();
            let l1 = nn::Linear::new(w.clone(), Some(b.clone())).unwrap();
            let l2 = nn::Linear::new(w2, None).unwrap();
            let fused = l1.forward_gelu_then(&l2, &x).unwrap();
            let passes = l2.forward(&nn::gelu(&l1.forward(&x).unwrap()).unwrap());
            assert!(
                bits(&fused) == bits(&passes.unwrap()),
                "[{m}, {k}] feed-forward"
            );
        }
    }
}

/// The packed weight unpacks to the values it was packed from (a differentiable run's product).
#[test]
fn the_packed_weight_unpacks_to_its_values() {
    for (n, k) in [(1, 1), (33, 7), (64, 0), (70, 300)] {
        let w = gen(n * k, 5);
        let t = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
        let back = PackedF32::from_tensor(&t).unwrap().unpack().unwrap();
        assert_eq!(back.dims(), &[n, k]);
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), w);
    }
}

/// An f16 weight packed in f16 (half the bytes) gives the bits of the same values packed in f32
/// (each block widened, then the same kernel), on one thread and on two (rows split between them at
/// 2 413 rows), past blocks of features, with a tail of columns; and it unpacks to its f16 values.
#[test]
fn f16_panels_give_the_bits_of_their_f32_values() {
    use half::f16;
    if skip() {
        return;
    }
    for (m, n, k) in [(5, 33, 7), (781, 291, 533), (2413, 67, 300)] {
        let w16: Vec<f16> = gen(n * k, 3).iter().map(|&v| f16::from_f32(v)).collect();
        let wide: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
        let t = Tensor::from_vec(w16.clone(), (n, k), &Device::Cpu).unwrap();
        let half = PackedF32::from_tensor(&t).unwrap();
        let full = PackedF32::pack(&wide, n, k);
        assert!(half.is_f16() && !full.is_f16());
        assert_eq!(half.bytes() * 2, full.bytes());
        let x = gen(m * k, 9);
        for threads in [1, 2] {
            let a = product(&half, &x, m, threads, Epilogue::default());
            let b = product(&full, &x, m, threads, Epilogue::default());
            let same = a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "[{m}, {k}] by [{k}, {n}] on {threads} threads");
        }
        let back = half.unpack().unwrap();
        assert_eq!(back.dtype(), candle_core::DType::F16);
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f16>().unwrap(), w16);
    }
}

/// Where the kernel runs: AVX-512F, and Intel's unless the switch says otherwise.
#[test]
fn the_kernel_runs_on_intels_avx512_unless_switched() {
    assert!(f32_gemm::choice(None, true, true));
    assert!(!f32_gemm::choice(None, true, false));
    assert!(f32_gemm::choice(Some(true), true, false));
    assert!(!f32_gemm::choice(Some(false), true, true));
    assert!(!f32_gemm::choice(Some(true), false, true));
    assert!(f32_gemm::intel(
        "processor\t: 0\nvendor_id\t: GenuineIntel\n"
    ));
    assert!(!f32_gemm::intel(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\n"
    ));
}
