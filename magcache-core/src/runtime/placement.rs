//! Where a model runs and in which precision: `[model] device` and `dtype`.
//!
//! `device = "cpu" | "cuda" | "cuda:N" | "metal" | "metal:N"`; `dtype = "f32" | "bf16" | "f16"`: the
//! precision of the weights of the linear layers (almost all of a transformer's parameters) and of
//! their matrix products. Norms, softmax, modulation and the cache maths stay in f32.

use crate::error::{Error, Result};
use candle_core::{DType, Device};

/// A parsed device name: `Cpu`, or `Cuda(n)` / `Metal(n)` with an ordinal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Metal(usize),
}

/// Parses a device name; errors name `file` and `model.device`.
pub fn parse_device(s: &str, file: &str) -> Result<DeviceSpec> {
    let bad = || {
        Error::config(
            file,
            "model.device",
            format!("`{s}` is not a device: use \"cpu\", \"cuda\", \"cuda:N\" or \"metal\""),
        )
    };
    let (kind, ordinal) = match s.split_once(':') {
        Some((k, n)) => (k, n.parse::<usize>().map_err(|_| bad())?),
        None => (s, 0),
    };
    match kind {
        "cpu" if !s.contains(':') => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(ordinal)),
        "metal" => Ok(DeviceSpec::Metal(ordinal)),
        _ => Err(bad()),
    }
}

/// `dtype = "auto"`: the runner picks `f32` when the whole run fits in memory by the size guard's
/// estimate, otherwise `bf16` (and says so in one line).
pub const AUTO_DTYPE: &str = "auto";

/// Parses a dtype name; errors name `file` and `model.dtype`. `auto` reads as `f32`: the runner
/// resolves it before building (`magcache_cli::prepare`), and code that builds a model from a run
/// file without the runner gets the full precision.
pub fn parse_dtype(s: &str, file: &str) -> Result<DType> {
    match s {
        "f32" | AUTO_DTYPE => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => Err(Error::config(
            file,
            "model.dtype",
            format!("`{s}` is not supported: use \"auto\", \"f32\", \"bf16\" or \"f16\""),
        )),
    }
}

/// Where a transformer's block weights live during a run (`[model] offload`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Offload {
    /// Every weight is loaded once and held (the default).
    #[default]
    None,
    /// Each block's weights are read from the memory-mapped checkpoint when the block runs and
    /// dropped after it (the next block is read while one runs): only a few blocks are resident.
    Stream,
}

pub fn parse_offload(s: &str, file: &str) -> Result<Offload> {
    match s {
        "none" => Ok(Offload::None),
        "stream" => Ok(Offload::Stream),
        _ => Err(Error::config(
            file,
            "model.offload",
            format!("`{s}` is not supported: use \"none\" or \"stream\""),
        )),
    }
}

/// The device and the weights' dtype of a run.
#[derive(Clone, Debug)]
pub struct Placement {
    pub device: Device,
    pub dtype: DType,
    /// GGUF weights on the CPU: let candle repack quantized matrices into SIMD tiles on their first
    /// product, kept beside the file's blocks (`model.gguf_repack`, default on).
    pub gguf_repack: bool,
    /// f32 linear weights rounded to bf16 once at load, their products on the CPU's bf16 units (the
    /// layers' kernel, or oneDNN where it runs bf16) (`model.matmul_precision = "bf16"`, default
    /// off).
    pub matmul_bf16: bool,
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            device: Device::Cpu,
            dtype: DType::F32,
            gguf_repack: true,
            matmul_bf16: false,
        }
    }
}

/// `model.matmul_precision`: `f32` (false) or `bf16` (true: f32 weights on a CPU with AVX512-F and
/// AVX512-BF16; with bf16 weights their products are bf16 already, false); errors name the key.
pub fn matmul_bf16(value: &str, p: &Placement, file: &str) -> Result<bool> {
    let key = "model.matmul_precision";
    match value {
        "f32" => Ok(false),
        "bf16" => {
            if !p.device.is_cpu() || p.dtype == DType::F16 {
                return Err(Error::config(
                    file,
                    key,
                    "\"bf16\" is for f32 weights on the CPU",
                ));
            }
            if p.dtype == DType::BF16 {
                // bf16 weights: their products run on the bf16 kernel already.
                return Ok(false);
            }
            if !cpu_has_bf16() {
                return Err(Error::config(
                    file,
                    key,
                    "\"bf16\" needs a CPU with AVX512-BF16, which this one lacks (use \"f32\")",
                ));
            }
            Ok(true)
        }
        other => Err(Error::config(
            file,
            key,
            format!("`{other}` is not a precision (\"f32\" or \"bf16\")"),
        )),
    }
}

/// Whether this CPU has AVX512-F and AVX512-BF16 (the instructions of the layers' bf16 kernel).
pub fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AMX's bf16 tiles (`amx_bf16` in Linux's `/proc/cpuinfo`; std's detection
/// of it is not stable yet). False where that file is not readable.
pub fn cpu_has_amx() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| cpuinfo_has_flag(&c, "amx_bf16"))
    })
}

/// Whether the first `flags` line of a `/proc/cpuinfo` text lists `flag`.
pub fn cpuinfo_has_flag(cpuinfo: &str, flag: &str) -> bool {
    cpuinfo_field(cpuinfo, "flags").is_some_and(|v| v.split_whitespace().any(|f| f == flag))
}

/// The value of the first `name : value` line of a `/proc/cpuinfo` text (`vendor_id`, `cpu
/// family`, `flags`), trimmed.
pub fn cpuinfo_field<'a>(cpuinfo: &'a str, name: &str) -> Option<&'a str> {
    cpuinfo.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        (key.trim() == name).then(|| value.trim())
    })
}

impl Placement {
    /// Opens the device. On a machine (or a build) without it: one line naming `model.device`.
    pub fn open(device: &str, dtype: &str, file: &str) -> Result<Placement> {
        let dtype = parse_dtype(dtype, file)?;
        let unavailable = |e: candle_core::Error| {
            let first = e.to_string();
            let first = first.lines().next().unwrap_or_default().to_string();
            Error::config(
                file,
                "model.device",
                format!("`{device}` is not available here: {first}"),
            )
        };
        let device = match parse_device(device, file)? {
            DeviceSpec::Cpu => Device::Cpu,
            DeviceSpec::Cuda(n) => Device::new_cuda(n).map_err(unavailable)?,
            DeviceSpec::Metal(n) => Device::new_metal(n).map_err(unavailable)?,
        };
        Ok(Placement {
            device,
            dtype,
            gguf_repack: true,
            matmul_bf16: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_bad_ones_name_the_key() {
        assert_eq!(parse_device("cpu", "f").unwrap(), DeviceSpec::Cpu);
        assert_eq!(parse_device("cuda", "f").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(parse_device("cuda:3", "f").unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(parse_device("metal", "f").unwrap(), DeviceSpec::Metal(0));
        for bad in ["gpu", "cpu:1", "cuda:x", "", "cuda:"] {
            let e = parse_device(bad, "run.toml").unwrap_err().to_string();
            assert!(e.starts_with("run.toml: model.device:"), "{e}");
        }
        assert_eq!(parse_dtype("bf16", "f").unwrap(), DType::BF16);
        assert_eq!(parse_offload("stream", "f").unwrap(), Offload::Stream);
        let e = parse_offload("disk", "run.toml").unwrap_err().to_string();
        assert!(e.starts_with("run.toml: model.offload:"), "{e}");
        let e = parse_dtype("f64", "run.toml").unwrap_err().to_string();
        assert!(e.starts_with("run.toml: model.dtype:"), "{e}");
    }

    #[test]
    fn a_device_this_build_lacks_is_one_line_naming_the_key() {
        // CI builds without the `cuda` feature (and has no GPU): opening CUDA must fail cleanly.
        if let Err(e) = Placement::open("cuda:7", "f32", "run.toml") {
            let e = e.to_string();
            assert!(
                e.starts_with("run.toml: model.device: `cuda:7` is not available"),
                "{e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
