//! Time of the fused CPU attention at a transformer's shapes: f32 (gemm, and the layers' f32
//! kernel alternated with it where that runs), bf16 on the layers' kernel
//! where the CPU has AVX512-BF16, and bf16 on oneDNN where
//! `MAGCACHE_ONEDNN` names a `libdnnl.so.3` with a bf16 product (AMX's path), median of ROUNDS, on
//! candle's threads.
//! `cargo run --release -p magcache-layers --example attention_cpu -- [TOKENS HEADS HEAD_DIM] [ROUNDS]`
//! (default: 4 680 tokens of the Wan2.1-1.3B, 12 heads of 128, 5 rounds).
//! `ATTENTION_CPU_ONLY=onednn` times oneDNN's alone; `ATTENTION_CPU_BLOCKS="Q:K ..."` times oneDNN's
//! at each of those blocks (queries per task, keys per product; `-` the default, keys `all`),
//! alternated.

use candle_core::{Device, Tensor};
use magcache_layers::nn::{self, onednn};
use std::time::Instant;

fn main() -> magcache_core::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (s, h, d) = match args.as_slice() {
        [s, h, d, ..] => (*s, *h, *d),
        _ => (4680, 12, 128),
    };
    let rounds = args.get(3).copied().unwrap_or(5).max(1);
    let dev = Device::Cpu;
    let threads = candle_core::utils::get_num_threads();
    let dnnl = onednn::check()?;
    println!(
        "attention [1, {h}, {s}, {d}], {threads} threads, median of {rounds}; oneDNN: {}",
        dnnl.as_deref().unwrap_or("off (MAGCACHE_ONEDNN unset)")
    );
    let q = Tensor::randn(0f32, 1.0, (1, h, s, d), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (1, h, s, d), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (1, h, s, d), &dev)?;
    let median = |f: &dyn Fn() -> magcache_core::Result<Tensor>| -> magcache_core::Result<f64> {
        let mut t = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let start = Instant::now();
            drop(f()?);
            t.push(start.elapsed().as_secs_f64());
        }
        t.sort_by(f64::total_cmp);
        Ok(t[rounds / 2])
    };
    // `ATTENTION_CPU_ONLY=onednn`: the oneDNN line alone (a sitting's A/B of its settings).
    let only_onednn = std::env::var("ATTENTION_CPU_ONLY").as_deref() == Ok("onednn");
    let f32_s = match only_onednn {
        true => f64::NAN,
        false if nn::f32_gemm::available() => {
            // The f32 kernel's attention and gemm's, alternated in each round.
            let (mut ours, mut gemm) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                let start = Instant::now();
                drop(nn::attention(&q, &k, &v)?);
                ours.push(start.elapsed().as_secs_f64());
                let start = Instant::now();
                drop(nn::attention_on_gemm(&q, &k, &v)?);
                gemm.push(start.elapsed().as_secs_f64());
            }
            let ms = |t: &[f64]| -> String {
                let v: Vec<String> = t.iter().map(|x| format!("{:.1}", x * 1e3)).collect();
                v.join(", ")
            };
            println!("f32 on the f32 kernel: {} ms", ms(&ours));
            println!("f32 (gemm): {} ms", ms(&gemm));
            ours.sort_by(f64::total_cmp);
            ours[rounds / 2]
        }
        false => median(&|| nn::attention(&q, &k, &v))?,
    };
    if !only_onednn {
        println!("f32: median {:.1} ms", f32_s * 1e3);
    }
    // `attention_as` takes oneDNN instead where it runs bf16 products (AMX, MAGCACHE_ONEDNN_BF16=on).
    if nn::bf16_gemm::available() && !onednn::bf16_products() && !only_onednn {
        let k_s = median(&|| nn::attention_as(&q, &k, &v, true))?;
        println!(
            "bf16 on the layers' kernel: {:.1} ms ({:.2}x f32)",
            k_s * 1e3,
            f32_s / k_s
        );
    }
    let Some(d) = onednn::get().filter(|d| d.bf16_implemented()) else {
        return Ok(());
    };
    // `ATTENTION_CPU_BLOCKS="Q:K ..."`: oneDNN's line at each of these blocks instead, the
    // blocks alternated in each round (one process: the host's drift is shared).
    if let Ok(list) = std::env::var("ATTENTION_CPU_BLOCKS") {
        let blocks = list
            .split_whitespace()
            .map(|b| parse_blocks(b).map(|x| (b, x)))
            .collect::<Result<Vec<_>, String>>()
            .map_err(magcache_core::Error::msg)?;
        let mut times = vec![Vec::with_capacity(rounds); blocks.len()];
        for _ in 0..rounds {
            for ((_, b), t) in blocks.iter().zip(&mut times) {
                let start = Instant::now();
                drop(nn::attention_onednn_blocks(&q, &k, &v, d, *b)?);
                t.push(start.elapsed().as_secs_f64());
            }
        }
        for ((name, _), mut t) in blocks.into_iter().zip(times) {
            t.sort_by(f64::total_cmp);
            let ms: Vec<String> = t.iter().map(|x| format!("{:.1}", x * 1e3)).collect();
            println!(
                "bf16 on oneDNN, blocks {name} (queries:keys): median {:.1} ms ({} ms)",
                t[rounds / 2] * 1e3,
                ms.join(", ")
            );
        }
        return Ok(());
    }
    {
        let bf16_s = median(&|| nn::attention_onednn(&q, &k, &v, d))?;
        let ratio = match only_onednn {
            true => String::new(),
            false => format!(" ({:.2}x f32)", f32_s / bf16_s),
        };
        println!("bf16 on oneDNN: {:.1} ms{ratio}", bf16_s * 1e3);
    }
    Ok(())
}

/// `Q:K` (queries per task, keys per product; `-` for the default, K also `all`).
fn parse_blocks(b: &str) -> Result<nn::OneDnnBlocks, String> {
    let bad = || format!("ATTENTION_CPU_BLOCKS: {b:?} is not Q:K (numbers, `-`, or K `all`)");
    let (qs, ks) = b.split_once(':').ok_or_else(bad)?;
    let num = |x: &str| -> Result<Option<usize>, String> {
        match x {
            "-" => Ok(None),
            "all" => Ok(Some(usize::MAX)),
            n => n.parse().map(Some).map_err(|_| bad()),
        }
    };
    Ok(nn::OneDnnBlocks {
        query_rows: num(qs)?,
        key_rows: num(ks)?,
    })
}
