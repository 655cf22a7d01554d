//! What candle's quantized matmul keeps beside a held GGUF checkpoint: the weights it repacks
//! into SIMD tiles on their first product, counted by the size guard.

use super::{ggml_type, read_header};
use candle_core::quantized::GgmlDType;
use magcache_core::Result;
use std::path::Path;

/// What candle's quantized matmul adds to a held GGUF checkpoint on this CPU: the weights it
/// repacks into SIMD tiles on their first product and keeps beside the originals (candle 0.11's
/// `repacked_qs` cache: on x86-64, `[n, k]` matrices with `n % 16 == 0` and `k % 256 == 0` in Q4_K,
/// in Q6_K, and in Q8_0 on CPUs with AVX-512 VNNI or AVX-VNNI; on aarch64 with dot-product
/// instructions, Q4_0, Q4_K, Q5_K, Q6_K and Q8_0), in bytes, from the file's header. This is why a
/// held Q8_0 run holds about twice its file on an AVX-512 VNNI CPU (measured: Wan2.1-1.3B, 1.45 GB
/// read, 1.36 GB more during the first call; docs/benchmarks.md). A streamed block's copy goes
/// with the block.
pub fn gguf_repacked_bytes(path: &Path) -> Result<u64> {
    let shown = path.display().to_string();
    let f = magcache_core::error::open_regular(path)?;
    let h = read_header(&mut std::io::BufReader::new(f), &shown)?;
    let cpu = RepackCpu::detect();
    Ok(h.tensors
        .iter()
        .filter_map(|(_, ne, ty, _)| match ne.as_slice() {
            // GGUF's `ne`: the input (k) first, the output (n) second.
            &[k, n] => ggml_type(*ty).map(|t| repacked_bytes(cpu, t, n, k)),
            _ => None,
        })
        .sum())
}

/// The SIMD levels candle's repacking keys on (`repack_x86::level`, `amx_available`;
/// `repack::PackedKind::select` on aarch64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepackCpu {
    /// x86-64 with AVX2 + FMA, with or without VNNI (AVX-512 VNNI or AVX-VNNI) and AMX.
    X86 { vnni: bool, amx: bool },
    /// aarch64 with the dot-product or i8mm instructions.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    Arm,
    /// Nothing is repacked.
    None,
}

impl RepackCpu {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
                return RepackCpu::None;
            }
            let avx512vnni =
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni");
            let vnni = avx512vnni || is_x86_feature_detected!("avxvnni");
            // AMX tiles (CPUID leaf 7: AMX-TILE and AMX-INT8), used only beside AVX-512 VNNI.
            let info = core::arch::x86_64::__cpuid_count(7, 0);
            let amx = avx512vnni && info.edx & (1 << 24) != 0 && info.edx & (1 << 25) != 0;
            RepackCpu::X86 { vnni, amx }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("dotprod")
                || std::arch::is_aarch64_feature_detected!("i8mm")
            {
                return RepackCpu::Arm;
            }
            RepackCpu::None
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        RepackCpu::None
    }
}

/// Bytes candle's repack cache adds for one `[n, k]` matrix of type `t` on `cpu` (the tile layouts of
/// candle 0.11's `repack_x86.rs`: a Q8_0 tile of 16 rows x 32 values is 16 f16 scales and 512
/// bytes, a Q4_K tile of 16 rows x 256 values 1 024 bytes of f32 scales and mins and 2 048 of
/// nibbles (its AMX form 4 096 of bytes), a Q6_K tile 1 024 + 4 096; on aarch64, interleaved
/// blocks of the original size).
pub fn repacked_bytes(cpu: RepackCpu, t: GgmlDType, n: usize, k: usize) -> u64 {
    let (n, k) = (n as u64, k as u64);
    match cpu {
        RepackCpu::X86 { vnni, amx } => {
            if k == 0 || n % 16 != 0 || k % 256 != 0 {
                return 0;
            }
            let tiles = |vals: u64| (n / 16) * (k / vals);
            match t {
                GgmlDType::Q8_0 if vnni => tiles(32) * (16 * 2 + 32 * 16),
                GgmlDType::Q4K => {
                    tiles(256) * (1024 + 2048) + if amx { tiles(256) * (1024 + 4096) } else { 0 }
                }
                GgmlDType::Q6K => tiles(256) * (1024 + 4096),
                _ => 0,
            }
        }
        RepackCpu::Arm => match t {
            GgmlDType::Q4_0
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
            | GgmlDType::Q8_0 => (n * k / t.block_size() as u64) * t.type_size() as u64,
            _ => 0,
        },
        RepackCpu::None => 0,
    }
}
