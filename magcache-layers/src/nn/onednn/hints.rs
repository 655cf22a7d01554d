//! The notes that point a run at oneDNN where it measured faster (`MAGCACHE_ONEDNN` unset): a bf16
//! run on a CPU with AMX, a long f32 run on the x86 CPUs measured.

use super::{state, State, ENV};

/// A hint for a bf16 run on a CPU with AMX (its `amx_bf16` flag in `/proc/cpuinfo`) whose tiles
/// the layers' own products do not use (`MAGCACHE_AMX=off`, or Linux refused them) while no
/// oneDNN is named: the products would run on AMX's tiles through it. `None` elsewhere.
pub fn amx_hint() -> Option<String> {
    if !matches!(state(), State::Off) || crate::nn::bf16_gemm::amx::usable() {
        return None;
    }
    magcache_core::runtime::placement::cpu_has_amx().then(|| {
        format!(
            "this CPU has AMX: {}; {ENV}=/path/libdnnl.so.3 (pip install --prefix DIR onednn-cpu-gomp) runs bf16 products and attention on its tiles (docs/config.md)",
            if crate::nn::bf16_gemm::available() {
                "bf16 weights run on the AVX512-BF16 kernel here (MAGCACHE_CPU_BF16=on), measured slower than f32 on such a CPU"
            } else {
                "bf16 weights are widened to f32 here (the AVX512-BF16 kernel is slower than f32 on it)"
            }
        )
    })
}

/// A hint for a long f32 run while no oneDNN is named, on the x86 CPUs where oneDNN's f32
/// products (weights packed at load) measured faster than the default kernels
/// (docs/benchmarks.md; [`f32_hint_for`]). `None` elsewhere.
pub fn f32_hint() -> Option<String> {
    // Where the layers' f32 kernel runs, oneDNN's f32 calls measured level with it: no hint.
    if !matches!(state(), State::Off) || crate::nn::f32_gemm::available() {
        return None;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    f32_hint_for(&cpuinfo, cpu_class())
}

/// The x86 vector units that decide [`f32_hint_for`]: `Some(true)` with AVX-512F, `Some(false)`
/// with AVX2 and FMA but no AVX-512F, `None` otherwise (older or other CPUs).
fn cpu_class() -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") {
            Some(true)
        } else if has!("avx2") && has!("fma") {
            Some(false)
        } else {
            None
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// [`f32_hint`] for a `/proc/cpuinfo` text and the vector units (`cpu_class`; `Some(true)`:
/// AVX-512F): AVX2 without AVX-512 (an AMD Zen 3: oneDNN 1.1-1.5x per product, 1.3x per 720-token
/// Wan call, level with or ahead of PyTorch's where candle's gemm was 0.86-0.90x), an Intel CPU
/// with AVX-512 (measured on Xeons with AMX: oneDNN's f32 calls 1.17x PyTorch's, gemm's
/// 0.70-0.88x; older AVX-512 Xeons were not measured) and an AMD Zen 5 (family 26: 1.14-1.22x per
/// call). On a Zen 4 the two measured level: no hint.
pub fn f32_hint_for(cpuinfo: &str, avx512: Option<bool>) -> Option<String> {
    let field = |name| magcache_core::runtime::placement::cpuinfo_field(cpuinfo, name);
    let measured = match (avx512?, field("vendor_id"), field("cpu family")) {
        (false, _, _) => "this CPU has AVX2 and no AVX-512: oneDNN's f32 products ran 1.1-1.5x faster than the default kernels on an AMD Zen 3 (1.3x per call)",
        (true, Some("GenuineIntel"), _) => "on an Intel Xeon with AMX (Emerald Rapids) oneDNN's f32 calls ran 1.17x PyTorch's f32, the default kernels 0.70-0.88x",
        (true, Some("AuthenticAMD"), Some("26")) => "on an AMD Zen 5 oneDNN's f32 calls ran 1.14-1.22x faster than the default kernels",
        _ => return None,
    };
    Some(format!(
        "{measured} (docs/benchmarks.md): {ENV}=/path/libdnnl.so.3 (pip install --prefix DIR onednn-cpu-gomp) runs the linear layers on it"
    ))
}
