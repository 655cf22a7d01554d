//! Throughput of one linear layer's product on the CPU: candle's f32 matmul (gemm's kernels)
//! against the layers' f32 kernel (`nn::f32_gemm`, AVX-512F; also on the weight kept in f16), the bf16 kernel (`nn::bf16_gemm`, AVX512-BF16) and, when `MAGCACHE_ONEDNN` names a
//! `libdnnl.so.3`, oneDNN's f32 product (and its bf16 one where it has one), alternated, on
//! candle's threads.
//! `cargo run --release -p magcache-layers --example bf16_gemm -- [M K N] [ROUNDS]`
//! (default: 4680 x 1536 by 1536 x 8960, the Wan2.1-1.3B FFN at 4680 tokens, 3 rounds).
//! `BF16_GEMM_ONLY=NAME` times that one product alone each round (`oneDNN bf16 rows`, say: a
//! name as the rounds print it), none of the others between its runs. Large buffers start on
//! 64-byte lines (`magcache_layers::alloc::LineAlloc`, as PyTorch's tensors do);
//! `BF16_GEMM_ALIGN=off` leaves them where C's `malloc` puts them.

use candle_core::{Device, Tensor};
use magcache_layers::nn::bf16_gemm::{cpu_has_bf16, PackedBf16};
use magcache_layers::nn::{f32_gemm, onednn};
use std::time::Instant;

/// C's allocator, large blocks on 64-byte lines unless `BF16_GEMM_ALIGN=off`.
#[global_allocator]
static A: magcache_layers::alloc::LineAlloc = magcache_layers::alloc::LineAlloc;

fn main() -> candle_core::Result<()> {
    let align = std::env::var("BF16_GEMM_ALIGN").as_deref() != Ok("off");
    magcache_layers::alloc::set(align).map_err(candle_core::Error::Msg)?;
    let huge = align && std::env::var("BF16_GEMM_HUGE").as_deref() != Ok("off");
    magcache_layers::alloc::set_huge(huge && cfg!(target_os = "linux"))
        .map_err(candle_core::Error::Msg)?;
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (m, k, n) = match args.as_slice() {
        [m, k, n, ..] => (*m, *k, *n),
        _ => (4680, 1536, 8960),
    };
    let rounds = args.get(3).copied().unwrap_or(3);
    let threads = candle_core::utils::get_num_threads();
    println!(
        "[{m} x {k}] by [{k} x {n}], {threads} threads, bf16 kernel: {}",
        cpu_has_bf16()
    );
    let x = Tensor::randn(0f32, 1f32, (m, k), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 1f32, (n, k), &Device::Cpu)?;
    let wt = w.t()?;
    let packed = cpu_has_bf16()
        .then(|| PackedBf16::from_tensor(&w.to_dtype(candle_core::DType::BF16)?))
        .transpose()?;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let packed_f32 = f32_gemm::cpu_has_avx512()
        .then(|| f32_gemm::PackedF32::from_tensor(&w))
        .transpose()?;
    // The same kernel on the weight kept in f16 (an f16 run's layers).
    let packed_f16 = f32_gemm::cpu_has_avx512()
        .then(|| f32_gemm::PackedF32::from_tensor(&w.to_dtype(candle_core::DType::F16)?))
        .transpose()?;
    let dnnl = onednn::check().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    println!(
        "oneDNN: {}",
        dnnl.as_deref().unwrap_or("off (MAGCACHE_ONEDNN unset)")
    );
    let wt16 = w.to_dtype(candle_core::DType::BF16)?.t()?;
    // The weights packed once in oneDNN's blocked layout, and bf16 held as plain `[n, k]` rows
    // (what bf16 linear layers hold on AMX: one or the other by the library's version).
    let err = |e: magcache_core::Error| candle_core::Error::Msg(e.to_string());
    let mut packed_dnnl = Vec::new();
    if let Some(d) = onednn::get() {
        for (name, wt, blocked) in [
            ("f32 packed", &wt, true),
            ("bf16 packed", &wt16, true),
            ("bf16 rows", &wt16, false),
        ] {
            if name.starts_with("f32") || d.bf16_implemented() {
                if let Some(p) = d.pack_as(wt, blocked).map_err(err)? {
                    packed_dnnl.push((name, p));
                }
            }
        }
    }
    let flop = 2.0 * (m * k * n) as f64;
    if let Ok(only) = std::env::var("BF16_GEMM_ONLY") {
        let Some((_, p)) = packed_dnnl
            .iter()
            .find(|(name, _)| format!("oneDNN {name}") == only)
        else {
            let names: Vec<String> = packed_dnnl
                .iter()
                .map(|(n, _)| format!("oneDNN {n}"))
                .collect();
            return Err(candle_core::Error::Msg(format!(
                "BF16_GEMM_ONLY={only:?}: not one of {names:?} here"
            )));
        };
        for r in 1..=rounds {
            let t = Instant::now();
            drop(p.linear(&x, None).map_err(err)?);
            let s = t.elapsed().as_secs_f64();
            println!(
                "round {r}: {only} alone {:.2} ms ({:.0} GFLOP/s)",
                s * 1e3,
                flop / s / 1e9
            );
        }
        return Ok(());
    }
    for r in 1..=rounds {
        let t = Instant::now();
        let y = x.matmul(&wt)?;
        let f32_s = t.elapsed().as_secs_f64();
        drop(y);
        let mut line = match &packed_f32 {
            Some(p) => {
                let t = Instant::now();
                drop(f32_gemm::linear(p, &x, None, false)?);
                let s = t.elapsed().as_secs_f64();
                let rate = flop / s / 1e9;
                format!(
                    "f32 kernel {:.0} ms ({rate:.0} GFLOP/s, {:.2}x f32)   ",
                    s * 1e3,
                    f32_s / s
                )
            }
            None => "f32 kernel: this CPU has no AVX-512F   ".to_string(),
        };
        if let Some(p) = &packed_f16 {
            let t = Instant::now();
            drop(f32_gemm::linear(p, &x, None, false)?);
            let s = t.elapsed().as_secs_f64();
            line += &format!(
                "f16 weights {:.0} ms ({:.0} GFLOP/s)   ",
                s * 1e3,
                flop / s / 1e9
            );
        }
        line += &match &packed {
            Some(p) => {
                let t = Instant::now();
                let y = p.matmul(&xs, m)?;
                let bf16_s = t.elapsed().as_secs_f64();
                drop(y);
                if std::env::var("REUSE").is_ok() {
                    let mut c = vec![0f32; m * n];
                    for _ in 0..3 {
                        let t = Instant::now();
                        p.product_into(&xs, m, &mut c, threads)?;
                        println!("reused output: {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
                    }
                }
                format!(
                    "bf16 kernel{} {:.0} ms ({:.0} GFLOP/s, {:.2}x f32)",
                    if p.on_amx() { " (AMX)" } else { "" },
                    bf16_s * 1e3,
                    flop / bf16_s / 1e9,
                    f32_s / bf16_s
                )
            }
            None => "bf16 kernel: this CPU has no AVX512-BF16".to_string(),
        };
        let mut dnnl_line = String::new();
        if let Some(d) = onednn::get() {
            for (name, wt) in [("f32", &wt), ("bf16", &wt16)] {
                if name == "bf16" && !d.bf16_implemented() {
                    continue;
                }
                let t = Instant::now();
                let y = d
                    .product(&x, wt, None)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let s = t.elapsed().as_secs_f64();
                drop(y);
                dnnl_line += &format!(
                    "   oneDNN {name} {:.0} ms ({:.0} GFLOP/s, {:.2}x f32)",
                    s * 1e3,
                    flop / s / 1e9,
                    f32_s / s
                );
            }
        }
        for (name, p) in &packed_dnnl {
            let t = Instant::now();
            let y = p.linear(&x, None).map_err(err)?;
            let s = t.elapsed().as_secs_f64();
            drop(y);
            dnnl_line += &format!(
                "   oneDNN {name} {:.0} ms ({:.0} GFLOP/s, {:.2}x f32)",
                s * 1e3,
                flop / s / 1e9,
                f32_s / s
            );
        }
        println!(
            "round {r}: f32 {:.0} ms ({:.0} GFLOP/s)   {line}{dnnl_line}",
            f32_s * 1e3,
            flop / f32_s / 1e9
        );
    }
    Ok(())
}
