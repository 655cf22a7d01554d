//! The CPU's bf16 kernel (issue 45) against an f64 product of the same bf16-rounded operands, on
//! random shapes: odd sizes, tails of rows, columns and input features, several cache blocks and
//! threads. On a CPU without AVX512-BF16 the kernel tests print a note and test nothing more (the
//! kernel never runs there: bf16 weights are widened to f32 instead).

use magcache_layers::nn::bf16_gemm::{amx, bf16_bits, cpu_has_bf16, PackedBf16};
use proptest::prelude::*;

mod common;

fn skip() -> bool {
    if !cpu_has_bf16() {
        eprintln!("note: this CPU has no AVX512-BF16: the bf16 kernel is not tested on it");
        return true;
    }
    false
}

/// Checks the kernel's `[m, n]` product of `x [m, k]` and `w [n, k]` (f32 values, rounded to bf16
/// as the kernel rounds them) against f64, within f32 accumulation error.
/// Where AMX runs the products ([`amx::usable`]), both it and the AVX512-BF16 kernel are checked.
fn check(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Result<(), TestCaseError> {
    let bits: Vec<u16> = w.iter().map(|&v| bf16_bits(v)).collect();
    let mut packs = vec![PackedBf16::pack(&bits, n, k)];
    if packs[0].on_amx() {
        packs.push(PackedBf16::pack_for_dot_products(&bits, n, k));
    }
    for packed in packs {
        let got = packed
            .matmul(x, m)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        common::check_product(&got, x, w, None, (m, k, n), common::rounded)?;
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
    fn small_shapes_match_f64((m, n, k, x, w) in (1usize..20, 1usize..70, 1usize..90).prop_flat_map(|(m, n, k)| {
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

/// Shapes past one cache block of rows (384) and of input pairs (768), odd everywhere.
#[test]
fn blocked_shapes_match_f64() {
    if skip() {
        return;
    }
    let (m, n, k) = (397, 67, 1601);
    check(&gen(m * k, 7), &gen(n * k, 11), m, n, k).unwrap();
}

/// On AMX: past one block of rows rounded at a time (1 024), one group of panels (16: 512
/// columns) and several blocks of input pairs (256), with tails in each (and on the AVX512-BF16
/// kernel the same shape).
#[test]
fn amx_blocked_shapes_match_f64() {
    if skip() {
        return;
    }
    let (m, n, k) = (1_061, 545, 1_101);
    check(&gen(m * k, 13), &gen(n * k, 17), m, n, k).unwrap();
}

/// Where the CPU has AMX (and `MAGCACHE_AMX` is not `off`), the products run on its tiles: Linux
/// granted them and the weights are packed for them. Elsewhere a note says what is not tested.
#[test]
fn amx_runs_where_the_cpu_has_it() {
    let off = std::env::var(amx::ENV).is_ok_and(|v| v.eq_ignore_ascii_case("off"));
    if !amx::cpu_has_amx() || off {
        eprintln!("note: no AMX here (or MAGCACHE_AMX=off): the AMX products are not tested");
        assert!(!amx::usable() || amx::cpu_has_amx());
        return;
    }
    assert!(
        amx::usable(),
        "this CPU has AMX but its tiles were not granted"
    );
    assert!(PackedBf16::pack(&[0x3f80; 6], 2, 3).on_amx());
    assert!(!PackedBf16::pack_for_dot_products(&[0x3f80; 6], 2, 3).on_amx());
}

/// Activations handed over already rounded (pairs, as the attention's probabilities) give the
/// bits of the same activations rounded by the kernel, past one block of rows and with an odd
/// input count (the last pair's high half zero).
#[test]
fn pairs_product_gives_the_bits_of_the_product() {
    if skip() {
        return;
    }
    let (m, n, k) = (397, 45, 301);
    let (x, w) = (gen(m * k, 3), gen(n * k, 5));
    let bits: Vec<u16> = w.iter().map(|&v| bf16_bits(v)).collect();
    let packed = PackedBf16::pack(&bits, n, k);
    let kp = k.div_ceil(2);
    let mut pairs = vec![0u32; m * kp];
    for (row, out) in x.chunks(k).zip(pairs.chunks_mut(kp)) {
        for (j, o) in out.iter_mut().enumerate() {
            let hi = row.get(2 * j + 1).map_or(0, |&v| bf16_bits(v) as u32);
            *o = bf16_bits(row[2 * j]) as u32 | (hi << 16);
        }
    }
    let want = packed.matmul(&x, m).unwrap();
    let mut got = vec![f32::NAN; m * n];
    packed.pairs_product_into(&pairs, m, &mut got, 2).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(&want));
    assert!(packed
        .pairs_product_into(&pairs[1..], m, &mut got, 1)
        .is_err());
}

/// The rounding is IEEE round-to-nearest-even, as `half`'s (and PyTorch's) conversion.
#[test]
fn bf16_rounding_is_round_to_nearest_even() {
    let mut s = 0x1234_5678u32;
    for _ in 0..100_000 {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        let v = f32::from_bits(s);
        if v.is_nan() {
            continue;
        }
        assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits(), "{v:e}");
    }
    for v in [
        0.0f32,
        -0.0,
        1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
    ] {
        assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits(), "{v:e}");
    }
}

/// The fused attention on the bf16 kernel against the f32 one: within bf16's rounding of q, k, v
/// and the probabilities (queries and keys past one task's block of 128, odd sizes).
#[test]
fn bf16_attention_is_the_f32_attention_within_bf16_rounding() {
    if skip() {
        return;
    }
    if !magcache_layers::nn::bf16_gemm::available() {
        eprintln!("note: the bf16 kernel is off here (MAGCACHE_CPU_BF16=off, or a CPU with AMX): the bf16 attention is not tested");
        return;
    }
    // Seeded: the same draw every run (candle's CPU `randn` cannot be seeded).
    let randn = |shape: &[usize], seed| magcache_layers::random::randn(seed, shape).unwrap();
    let q = randn(&[2, 3, 131, 24], 1);
    let k = randn(&[2, 3, 197, 24], 2);
    let v = randn(&[2, 3, 197, 24], 3);
    let f32_out = magcache_layers::nn::attention(&q, &k, &v).unwrap();
    let bf16_out = magcache_layers::nn::attention_as(&q, &k, &v, true).unwrap();
    let d = common::largest_abs(&(f32_out - &bf16_out).unwrap());
    let scale = common::largest_abs(&bf16_out);
    assert!(
        d < 0.02 * scale,
        "bf16 attention differs by {d} (outputs up to {scale})"
    );
    assert!(d > 0.0, "the bf16 path did not run");
}

/// The same past one block of keys on AMX (512: three blocks, the last of 76 keys, the softmax
/// carried from block to block) and one task's queries (64), with a head width of 72 (pairs
/// padded to 48, outputs to 96 columns).
#[test]
fn bf16_attention_over_blocks_of_keys_is_the_f32_attention() {
    if skip() || !magcache_layers::nn::bf16_gemm::available() {
        eprintln!("note: no bf16 kernel here: the blocked bf16 attention is not tested");
        return;
    }
    let randn = |shape: &[usize], seed| magcache_layers::random::randn(seed, shape).unwrap();
    let q = randn(&[1, 2, 150, 72], 4);
    let k = randn(&[1, 2, 1_100, 72], 5);
    let v = randn(&[1, 2, 1_100, 72], 6);
    // Scores spread enough that the running maximum moves between blocks.
    let q = (q * 0.3).unwrap();
    let f32_out = magcache_layers::nn::attention(&q, &k, &v).unwrap();
    let bf16_out = magcache_layers::nn::attention_as(&q, &k, &v, true).unwrap();
    let d = common::largest_abs(&(f32_out - &bf16_out).unwrap());
    let scale = common::largest_abs(&bf16_out);
    assert!(
        d < 0.02 * scale,
        "bf16 attention differs by {d} (outputs up to {scale})"
    );
    assert!(d > 0.0, "the bf16 path did not run");
}

/// The kernel's choice: on by AVX512-BF16 alone, off on CPUs with AMX (it measured slower than
/// f32 on an AMX Xeon) unless `MAGCACHE_CPU_BF16=on`, and off whenever `MAGCACHE_CPU_BF16=off`.
#[test]
fn the_kernel_is_off_on_amx_unless_asked_for() {
    use magcache_layers::nn::bf16_gemm::kernel_on;
    assert!(kernel_on("", true, false));
    assert!(!kernel_on("", true, true));
    assert!(kernel_on("on", true, true));
    assert!(kernel_on("ON", true, false));
    assert!(!kernel_on("on", false, true));
    assert!(!kernel_on("off", true, false));
    assert!(!kernel_on("", false, false));
}

/// The bias and the GELU in the kernel's epilogue ([`bf16_gemm::linear`]) give the same bits as
/// the passes they replace (the product, then candle's broadcast add, then `nn::gelu`), on shapes
/// with row, column and input-feature tails, one and several blocks of input pairs (768) and of
/// rows (384); and `Linear::forward_gelu_then` on a bf16 weight takes that path.
#[test]
fn the_epilogue_gives_the_bits_of_the_passes_it_replaces() {
    use candle_core::{DType, Device, Tensor};
    use magcache_layers::{nn, nn::bf16_gemm, random::randn};
    if skip() {
        return;
    }
    let dev = Device::Cpu;
    let half = |t: Tensor| (t * 0.5).unwrap();
    for (m, n, k) in [
        (1, 1, 1),
        (13, 37, 29),
        (397, 67, 1601),
        (40, 96, 1536),
        (7, 50, 9),
        (5, 33, 0),
    ] {
        let x = randn(1, &[m, k]).unwrap();
        let w = half(randn(2, &[n, k]).unwrap());
        let b = randn(3, &[n]).unwrap();
        let packed = PackedBf16::from_tensor(&w).unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let plain = Tensor::from_vec(packed.matmul(&xv, m).unwrap(), (m, n), &dev).unwrap();
        let biased = plain.broadcast_add(&b).unwrap();
        for (bias, gelu, want) in [
            (None, false, plain.clone()),
            (Some(&b), false, biased.clone()),
            (Some(&b), true, nn::gelu(&biased).unwrap()),
            (None, true, nn::gelu(&plain).unwrap()),
        ] {
            let got = bf16_gemm::linear(&packed, &x, bias, gelu).unwrap();
            let what = format!(
                "[{m}, {k}] by [{k}, {n}], bias {}, gelu {gelu}",
                bias.is_some()
            );
            assert!(bits(&got) == bits(&want), "{what}: not the same bits");
        }
        // A bf16 linear layer's feed-forward: the epilogue's path (where the layers hold bf16
        // weights for the kernel: not on AMX by default), the same bits as the passes.
        if k > 0 && bf16_gemm::available() {
            let w2 = half(randn(4, &[k, n]).unwrap());
            let l1 = nn::Linear::new(w.to_dtype(DType::BF16).unwrap(), Some(b.clone())).unwrap();
            let l2 = nn::Linear::new(w2.to_dtype(DType::BF16).unwrap(), None).unwrap();
            let fused = l1.forward_gelu_then(&l2, &x).unwrap();
            let hidden = nn::gelu(&l1.forward(&x).unwrap()).unwrap();
            let passes = l2.forward(&hidden).unwrap();
            assert!(
                bits(&fused) == bits(&passes),
                "[{m}, {k}] feed-forward: not the same bits"
            );
        }
    }
}

/// The bits of an f32 tensor's values.
fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}
