//! Linear products on oneDNN (`MAGCACHE_ONEDNN`, issue 45) against an f64 product on random shapes:
//! odd sizes, strided activations, with and without a bias, through [`Linear::forward`] and
//! alone. The library comes from `MAGCACHE_TEST_ONEDNN` (or `MAGCACHE_ONEDNN`; `.ci/run` installs
//! `onednn-cpu-gomp` and sets it); without one the tests print a note and test nothing more. bf16
//! products run where oneDNN implements them on this CPU (AVX-512 and later), else a note.

use candle_core::{DType, Device, Tensor};
use magcache_layers::nn::{self, onednn, Linear};
use proptest::prelude::*;

mod common;

use common::library;

/// `got [m, n]` against the f64 product (see [`common::check_product`]).
fn check(
    got: &Tensor,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    mkn: (usize, usize, usize),
    round: fn(f32) -> f64,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.dims(), &[mkn.0, mkn.2]);
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    common::check_product(&got, x, w, bias, mkn, round)
}

fn values(len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-2f32..2f32, len)
}

fn shape() -> impl Strategy<Value = (usize, usize, usize)> {
    (1usize..70, 1usize..70, 1usize..70)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(45),
        ..ProptestConfig::default()
    })]

    /// f32 linear layers through `Linear::forward`: oneDNN runs them (its count grows), within f32
    /// accumulation error of f64; activations given transposed (strided) to the product itself.
    #[test]
    fn f32_linear_layers_match_f64(
        (m, k, n) in shape(),
        seed in 0u64..1000,
        with_bias in any::<bool>(),
        strided in any::<bool>(),
    ) {
        let Some(d) = library() else { return Ok(()) };
        let dev = Device::Cpu;
        let rnd = |len: usize, salt: u64| -> Vec<f32> {
            (0..len)
                .map(|i| {
                    let h = (i as u64 ^ seed.wrapping_mul(0x9e37_79b9) ^ salt).wrapping_mul(0x2545_f491_4f6c_dd1d);
                    ((h >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
                })
                .collect()
        };
        let (xv, wv, bv) = (rnd(m * k, 1), rnd(n * k, 2), rnd(n, 3));
        let x = if strided {
            // The same values as a transposed view: strides (1, m).
            let xt: Vec<f32> = (0..k * m).map(|i| xv[(i % m) * k + i / m]).collect();
            Tensor::from_vec(xt, (k, m), &dev).unwrap().t().unwrap()
        } else {
            Tensor::from_vec(xv.clone(), (m, k), &dev).unwrap()
        };
        let w = Tensor::from_vec(wv.clone(), (n, k), &dev).unwrap();
        let b = with_bias.then(|| Tensor::from_vec(bv.clone(), n, &dev).unwrap());
        let before = d.products();
        let got = if strided {
            // `Linear::forward` makes its input contiguous: oneDNN itself reads the strides.
            d.product(&x, &w.t().unwrap(), b.as_ref()).unwrap().unwrap()
        } else {
            Linear::new(w, b).unwrap().forward(&x).unwrap()
        };
        prop_assert!(d.products() > before, "the product did not run on oneDNN");
        check(&got, &xv, &wv, with_bias.then_some(&bv[..]), (m, k, n), f64::from)?;
    }

    /// bf16 weights where oneDNN has a bf16 product on this CPU: the activations rounded to bf16
    /// (as the weights), f32 accumulation.
    #[test]
    fn bf16_products_match_f64(
        (m, k, n) in shape(),
        x in values(70 * 70),
        w in values(70 * 70),
    ) {
        let Some(d) = library() else { return Ok(()) };
        if !d.bf16_implemented() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let (x, w) = (&x[..m * k], &w[..n * k]);
        let xt = Tensor::from_slice(x, (m, k), &dev).unwrap();
        let wt = Tensor::from_slice(w, (n, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let got = d.product(&xt, &wt.t().unwrap(), None).unwrap().unwrap();
        check(&got, x, w, None, (m, k, n), common::rounded)?;
    }

    /// Weights packed once in the layout oneDNN's matmul chooses, or copied as plain `[n, k]`
    /// rows (what bf16 linear layers on AMX hold, one or the other by the library's version):
    /// they unpack to exactly the values packed, and their products (with and without a bias,
    /// any row count: packed for 1 024 rows), and the products on a plain copy made for one
    /// product (a shape the layout does not fit, or one oneDNN runs only on its reference code),
    /// match the f64 product as the plain weight's do.
    #[test]
    fn packed_weights_match_f64(
        (m, k, n) in shape(),
        x in values(70 * 70),
        w in values(70 * 70),
        b in values(70),
        bf16 in any::<bool>(),
        with_bias in any::<bool>(),
        blocked in any::<bool>(),
    ) {
        let Some(d) = library() else { return Ok(()) };
        if bf16 && !d.bf16_implemented() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let (x, w, b) = (&x[..m * k], &w[..n * k], &b[..n]);
        let xt = Tensor::from_slice(x, (m, k), &dev).unwrap();
        let dt = if bf16 { DType::BF16 } else { DType::F32 };
        let wt = Tensor::from_slice(w, (n, k), &dev).unwrap().to_dtype(dt).unwrap();
        let bias = with_bias.then(|| Tensor::from_slice(b, n, &dev).unwrap());
        let Some(packed) = d.pack_as(&wt.t().unwrap(), blocked).unwrap() else {
            // The layout chosen is the plain one given: nothing packed.
            prop_assert!(blocked, "plain rows are always held");
            return Ok(());
        };
        prop_assert_eq!(packed.n(), n);
        let back = packed.unpack().unwrap();
        let want = wt.t().unwrap().contiguous().unwrap().to_dtype(DType::F32).unwrap();
        let diff = common::largest_abs(&(back.to_dtype(DType::F32).unwrap() - want).unwrap());
        prop_assert!(diff == 0.0, "unpacked differs by {}", diff);
        let before = d.products();
        let got = packed.linear(&xt, bias.as_ref()).unwrap();
        prop_assert!(d.products() > before, "the product did not run on oneDNN");
        let round = if bf16 { common::rounded } else { f64::from };
        check(&got, x, w, with_bias.then_some(b), (m, k, n), round)?;
        // A packed weight's product never runs on oneDNN's reference code (odd features on a
        // blocked bf16 weight did, 100x slower than on the plain weight).
        let slow: Vec<_> = d.built().into_iter().filter(|p| p.packed && p.implementation.starts_with("ref")).collect();
        prop_assert!(slow.is_empty(), "{:?}", slow);
        // What a shape the layout does not fit runs: the same product on a plain copy.
        let unpacked = d.unpacked_products();
        let got = packed.linear_unpacked(&xt, bias.as_ref()).unwrap();
        prop_assert_eq!(d.unpacked_products(), unpacked + 1);
        check(&got, x, w, with_bias.then_some(b), (m, k, n), round)?;
    }

    /// A feed-forward with the tanh GELU run on the first product's accumulators (a oneDNN
    /// post-op), its hidden activations f32 or, for bf16 weights, bf16: the hidden layer within
    /// f32 accumulation error of the f64 GELU of the f64 product, and the output within that of
    /// the f64 product of those activations (bf16: as rounded, a rounding flipped by the last
    /// bit allowed). f32 through `Linear::forward_gelu_then` (and bf16 where the layers hold
    /// bf16 weights on oneDNN: AMX); bf16 on the packed weights (blocked, or plain rows)
    /// themselves wherever oneDNN has a bf16 product.
    #[test]
    fn feed_forwards_with_the_gelu_in_the_product_match_f64(
        (m, k, n) in shape(),
        hidden in 1usize..70,
        x in values(70 * 70),
        w1 in values(70 * 70),
        w2 in values(70 * 70),
        b in values(140),
        bf16 in any::<bool>(),
        blocked in any::<bool>(),
    ) {
        let Some(d) = library() else { return Ok(()) };
        if bf16 && !d.bf16_implemented() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let (x, w1, w2) = (&x[..m * k], &w1[..hidden * k], &w2[..n * hidden]);
        let (b1, b2) = (&b[..hidden], &b[70..70 + n]);
        let dt = if bf16 { DType::BF16 } else { DType::F32 };
        let t = |v: &[f32], shape: (usize, usize)| Tensor::from_slice(v, shape, &dev).unwrap();
        let (wt1, wt2) = (t(w1, (hidden, k)).to_dtype(dt).unwrap(), t(w2, (n, hidden)).to_dtype(dt).unwrap());
        let (bias1, bias2) = (Tensor::from_slice(b1, hidden, &dev).unwrap(), Tensor::from_slice(b2, n, &dev).unwrap());
        let pack = |wt: &Tensor| d.pack_as(&wt.t().unwrap(), blocked).unwrap();
        let (Some(p1), Some(p2)) = (pack(&wt1), pack(&wt2)) else {
            return Ok(());
        };
        let epi = onednn::Epilogue { gelu: true, bf16_out: bf16 };
        let Some(h) = p1.linear_then(&t(x, (m, k)), Some(&bias1), epi).unwrap() else {
            // oneDNN refused the post-op for this shape: the layers run the GELU on their own.
            return Ok(());
        };
        prop_assert_eq!(h.dtype(), dt);
        let hv = h.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let round = if bf16 { common::rounded } else { f64::from };
        for r in 0..m {
            for c in 0..hidden {
                let (mut acc, mut scale) = (f64::from(b1[c]), f64::from(b1[c]).abs());
                for j in 0..k {
                    let p = round(x[r * k + j]) * round(w1[c * k + j]);
                    acc += p;
                    scale += p.abs();
                }
                let want = gelu_tanh(acc);
                let got = f64::from(hv[r * hidden + c]);
                let tol = 1e-5 * scale + 1e-6 + if bf16 { want.abs() / 256.0 } else { 0.0 };
                prop_assert!((got - want).abs() <= tol, "hidden ({}, {}): {} against {}", r, c, got, want);
            }
        }
        let y = p2.linear(&h, Some(&bias2)).unwrap();
        check(&y, &hv, w2, Some(b2), (m, hidden, n), round)?;
        if !bf16 || d.bf16_products() {
            // The same through the layers (their weights packed for oneDNN where it runs them).
            let (l1, l2) = (Linear::new(wt1, Some(bias1)).unwrap(), Linear::new(wt2, Some(bias2)).unwrap());
            let before = d.products();
            let got = l1.forward_gelu_then(&l2, &t(x, (m, k)).reshape((1, m, k)).unwrap()).unwrap();
            prop_assert!(d.products() >= before + 2, "the feed-forward did not run on oneDNN");
            prop_assert_eq!(got.dims(), &[1, m, n]);
            check(&got.squeeze(0).unwrap(), &hv, w2, Some(b2), (m, hidden, n), round)?;
        }
    }
}

/// GELU with the tanh approximation, in f64.
fn gelu_tanh(x: f64) -> f64 {
    let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
    0.5 * x * (1.0 + u.tanh())
}

#[test]
fn the_library_says_what_it_runs() {
    let Some(d) = library() else { return };
    let text = d.describe();
    assert!(text.starts_with("oneDNN 3."), "{text}");
    let f32_impl = d.implementation(64, 96, 80, false).unwrap();
    assert!(!f32_impl.is_empty());
    eprintln!("{text}; f32 product: {f32_impl}");
    if d.bf16_implemented() {
        eprintln!(
            "bf16 product: {}",
            d.implementation(64, 96, 80, true).unwrap()
        );
    } else {
        eprintln!("note: oneDNN has no bf16 product on this CPU: bf16 products are not tested");
    }
}

#[test]
fn a_library_that_is_not_onednn_is_one_line_naming_the_variable() {
    // Opened outside the process-wide choice: libc is a library without oneDNN's functions.
    let e = onednn::open_for_check("libc.so.6").err().unwrap();
    assert!(e.contains("MAGCACHE_ONEDNN=libc.so.6"), "{e}");
    assert!(e.contains("dnnl_"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    let e = onednn::open_for_check("/nonexistent/libdnnl.so.3")
        .err()
        .unwrap();
    assert!(
        e.contains("MAGCACHE_ONEDNN=/nonexistent/libdnnl.so.3: cannot open"),
        "{e}"
    );
}

#[test]
fn the_amx_hint_reads_the_cpu_flags() {
    let amx = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n";
    let zen = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\nbugs\t\t: amx_bf16\n";
    assert!(onednn::cpuinfo_has_flag(amx, "amx_bf16"));
    assert!(!onednn::cpuinfo_has_flag(zen, "amx_bf16"));
    assert!(!onednn::cpuinfo_has_flag("", "amx_bf16"));
    // No hint once a library is named, nor on this CPU unless it has AMX.
    let here = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if library().is_some() || !onednn::cpuinfo_has_flag(&here, "amx_bf16") {
        assert!(onednn::amx_hint().is_none());
    }
    // Nor where the layers' own products run on the tiles.
    if magcache_layers::nn::bf16_gemm::amx::usable() {
        assert!(onednn::amx_hint().is_none());
    }
}

/// The attention's two products on oneDNN in bf16 (the path of bf16 runs on CPUs with AMX)
/// against the f32 attention: within bf16's rounding of q, k, v and the probabilities (queries
/// past one task's block, odd key counts and head widths, two batches, keys and values packed
/// per head).
#[test]
fn bf16_attention_on_onednn_is_the_f32_attention_within_bf16_rounding() {
    let Some(d) = library() else { return };
    if !d.bf16_implemented() {
        eprintln!("note: oneDNN has no bf16 product on this CPU: its attention is not tested");
        return;
    }
    // The last two: more than two blocks of queries per head, so keys and values are packed in
    // oneDNN's layout (blocks of 512 queries over 197 keys; of 64 over 9 000, the last one short).
    for (b, h, s, l, hd) in [
        (2, 3, 600, 197, 24),
        (1, 2, 33, 513, 23),
        (1, 1, 1, 1, 2),
        (1, 2, 1100, 197, 24),
        (1, 1, 300, 9000, 8),
    ] {
        // Seeded (`random::randn`; candle's CPU `randn` cannot be): the bound is on the largest
        // output, which averages over thousands of keys at 9 000, and an unseeded draw crossed
        // it once in CI (0.021 of it; this draw 0.011).
        let seed = (b * 7 + h * 13 + s * 17 + l * 19 + hd * 23) as u64;
        let randn = |shape: &[usize], seed| magcache_layers::random::randn(seed, shape).unwrap();
        let q = randn(&[b, h, s, hd], seed);
        let k = randn(&[b, h, l, hd], seed + 1);
        let v = randn(&[b, h, l, hd], seed + 2);
        let before = d.products();
        let got = magcache_layers::nn::attention_onednn(&q, &k, &v, d).unwrap();
        assert!(d.products() > before, "oneDNN did not run");
        let f32_out = magcache_layers::nn::attention(&q, &k, &v).unwrap();
        let diff = common::largest_abs(&(f32_out - &got).unwrap());
        let scale = common::largest_abs(&got);
        assert!(
            diff < 0.02 * scale,
            "{b}x{h}x{s}x{l}x{hd}: bf16 attention on oneDNN differs by {diff} (outputs up to {scale})"
        );
        if l > 1 {
            assert!(diff > 0.0, "{b}x{h}x{s}x{l}x{hd}: not rounded to bf16");
        }
    }
}

/// The attention on oneDNN a block of keys at a time (the softmax carried across the blocks),
/// against the f32 attention as above: blocks of 32 keys (many, with 197 keys a last short one
/// and odd), of sizes that split the keys unevenly, and all keys at once (odd counts: the values'
/// padded row); each split runs two products per
/// task and block of keys (counted: at least that many), with and without the keys and values packed.
#[test]
fn onednn_attention_by_blocks_of_keys_is_the_f32_attention_within_bf16_rounding() {
    let Some(d) = library() else { return };
    if !d.bf16_implemented() {
        eprintln!("note: oneDNN has no bf16 product on this CPU: its attention is not tested");
        return;
    }
    let randn = |shape: &[usize], seed| magcache_layers::random::randn(seed, shape).unwrap();
    for (b, h, s, l, hd, qb) in [
        (1, 2, 70, 197, 24, 32),
        (2, 1, 40, 33, 8, 16),
        (1, 1, 200, 1000, 16, 48),
        (1, 2, 50, 301, 16, 32),
    ] {
        let seed = (b * 7 + h * 13 + s * 17 + l * 19 + hd * 23) as u64;
        let q = randn(&[b, h, s, hd], seed);
        let k = randn(&[b, h, l, hd], seed + 1);
        let v = (randn(&[b, h, l, hd], seed + 2) + 0.5).unwrap();
        let f32_out = magcache_layers::nn::attention(&q, &k, &v).unwrap();
        let scale = common::largest_abs(&f32_out);
        for key_rows in [32, 48, 100, 512, usize::MAX] {
            let blocks = nn::OneDnnBlocks {
                query_rows: Some(qb),
                key_rows: Some(key_rows),
            };
            let before = d.products();
            let got = nn::attention_onednn_blocks(&q, &k, &v, d, blocks).unwrap();
            // At most `key_rows` a block (rounded down to a multiple of 32), the blocks of near
            // one size, each a multiple of 32 but the last.
            let most = (key_rows / 32 * 32).max(32);
            let kb = match key_rows >= l {
                true => l,
                false => l.div_ceil(l.div_ceil(most)).next_multiple_of(32).min(l),
            };
            assert!(kb <= key_rows.max(32) && (kb == l || kb % 32 == 0));
            let per_task = 2 * l.div_ceil(kb);
            let tasks = b * h * s.div_ceil(qb);
            // At least (the other tests run products on the same library at once).
            let ran = d.products() - before;
            assert!(
                ran >= (tasks * per_task) as u64,
                "{b}x{h}x{s}x{l}x{hd}, {key_rows} keys a block: {ran} products run"
            );
            let diff = common::largest_abs(&(&f32_out - &got).unwrap());
            assert!(
                diff < 0.02 * scale,
                "{b}x{h}x{s}x{l}x{hd}, {key_rows} keys a block: differs by {diff} (outputs up to {scale})"
            );
        }
    }
}

#[test]
fn the_f32_hint_is_for_the_cpus_measured_and_names_the_variable() {
    let info = |vendor: &str, family: u32| {
        format!("processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 1\nflags\t\t: fpu avx2\n")
    };
    let zen3 = info("AuthenticAMD", 25);
    let h = onednn::f32_hint_for(&zen3, Some(false)).unwrap_or_default();
    assert!(
        h.contains("MAGCACHE_ONEDNN=") && h.contains("AVX2") && h.contains("Zen 3"),
        "{h}"
    );
    let h = onednn::f32_hint_for(&info("GenuineIntel", 6), Some(true)).unwrap_or_default();
    assert!(h.contains("MAGCACHE_ONEDNN=") && h.contains("Intel"), "{h}");
    let h = onednn::f32_hint_for(&info("AuthenticAMD", 26), Some(true)).unwrap_or_default();
    assert!(h.contains("MAGCACHE_ONEDNN=") && h.contains("Zen 5"), "{h}");
    // Zen 4 (family 25 with AVX-512) measured level; a CPU without AVX2 was never measured.
    assert_eq!(
        onednn::f32_hint_for(&info("AuthenticAMD", 25), Some(true)),
        None
    );
    assert_eq!(onednn::f32_hint_for(&zen3, None), None);
    assert_eq!(onednn::f32_hint_for("", Some(true)), None);
    // With a library named (this binary's, where one is) there is no hint.
    if library().is_some() {
        assert_eq!(onednn::f32_hint(), None);
    }
}

/// oneDNN fixes a primitive's OpenMP thread count when it builds it (the count on the building
/// thread), and keeps it for every execution: each product must be built under the threads it
/// runs on, whatever count the calling thread had before (a task of a thread pool asks for one;
/// a thread OpenMP never saw has the machine's count). Here a fresh thread is set to 3 first,
/// then runs products asking for 1 and for candle's count. Each product's built count is
/// OpenMP's on the building thread right after the build (what oneDNN read there): this checks
/// that the count is set before the build, not oneDNN's use of it.
#[test]
fn each_product_is_built_for_the_threads_it_runs_on() {
    let Some(d) = library() else { return };
    let spec = std::env::var("MAGCACHE_TEST_ONEDNN")
        .or_else(|_| std::env::var(onednn::ENV))
        .unwrap();
    std::thread::spawn(move || {
        // SAFETY: the library the tests opened, opened again for OpenMP's setter (a dependency
        // of the gomp and iomp builds; absent from others, which run no OpenMP).
        let lib = unsafe { libloading::Library::new(&spec) }.unwrap();
        let set: Option<libloading::Symbol<unsafe extern "C" fn(i32)>> =
            unsafe { lib.get(b"omp_set_num_threads\0") }.ok();
        let Some(set) = set else {
            eprintln!("note: this oneDNN runs no OpenMP: its thread counts are not tested");
            return;
        };
        // SAFETY: OpenMP's setter, a positive count.
        unsafe { set(3) };
        // Shapes no other test uses, so that these products are built here.
        let (m, k, n) = (5, 7, 11);
        let x = Tensor::ones((m, k), DType::F32, &Device::Cpu).unwrap();
        let wt = Tensor::ones((k, n), DType::F32, &Device::Cpu).unwrap();
        d.product(&x, &wt, None).unwrap().unwrap();
        if d.bf16_implemented() {
            let a = vec![0x3f80_3f80u32; m * 4];
            let b = vec![0x3f80_3f80u32; 4 * n];
            let mut out = vec![0f32; m * n];
            d.bf16_into((&a, 8), (&b, [n, 1]), (m, 8, n), &mut out, 1)
                .unwrap();
            assert!(out.iter().all(|&o| o == 8.0), "{out:?}");
        }
    })
    .join()
    .unwrap();
    let built = d.built();
    assert!(!built.is_empty());
    for b in built {
        if let Some(got) = b.built_threads {
            let what = &b.what;
            assert_eq!(
                got, b.threads,
                "{what}: asked for {} threads, built for {got}",
                b.threads
            );
        }
    }
}
