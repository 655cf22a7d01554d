//! Linear layers' products on oneDNN, loaded at run time when the user names it (issue 45).
//!
//! oneDNN is the library PyTorch's CPU bf16 products run on: it picks its kernels from the CPU at
//! run time (AMX tiles with the `arch_prctl` permission request, AVX512-BF16, AVX-512, AVX2) and
//! its f32 `sgemm` is MKL's kind. It is not linked: `MAGCACHE_ONEDNN` names a `libdnnl.so.3`
//! (oneDNN 3.x's C API; `pip install onednn-cpu-gomp` ships one needing only libgomp), opened
//! with `dlopen` the first time a product asks. Unset (or `off`) it is never opened, so the
//! default build and binary need no system library; a name that does not open fails the run
//! with one line naming the variable ([`check`]), never a silent fallback.
//!
//! What runs on it: a linear layer's product `x W^T (+ b)` whose weight is a dense f32 CPU tensor
//! (on an AVX2 Zen 3, packed at load: 1.1-1.5x candle's gemm per product, 0.96-1.32x per call,
//! docs/benchmarks.md), and one whose weight is
//! bf16 where oneDNN has bf16 kernels and the CPU has AMX (the activations rounded to bf16 per
//! product, f32 accumulation and output). On CPUs with AVX512-BF16 and no AMX the layers' own
//! kernel ([`super::bf16_gemm`]) keeps bf16 (measured there) unless `MAGCACHE_ONEDNN_BF16=on`
//! ([`OneDnn::bf16_products`]). Where bf16 runs here (AMX, or the switch), the
//! attention's two products do too ([`OneDnn::bf16_into`], from `nn::attention`). The linear
//! layers' weights (f32, and bf16 where they run here) are reordered once at load into the layout oneDNN's
//! product reads ([`PackedWeight`], `packed`), the packed copy replacing the weight; [`OneDnn::product`]
//! also reads a plain weight in place, by its strides. Each calling thread keeps the scratch
//! memory of its largest product (`scratch`).
//!
//! oneDNN's threads are OpenMP's in the gomp build: each product is built and run under the
//! calling thread's count set to candle's ([`candle_core::utils::get_num_threads`]; one from a
//! task of the attention's), as oneDNN cuts a product's work for the count it is built under.

use candle_core::utils::get_num_threads;
use candle_core::{CpuStorage, DType, Storage, Tensor};
use magcache_core::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The environment variable naming the library.
pub const ENV: &str = "MAGCACHE_ONEDNN";
/// The variable that decides whether bf16 weights are packed in the blocked layout
/// ([`OneDnn::blocks_bf16`]): `on` or `off`; unset, by the library's version.
pub const PACK_BF16_ENV: &str = "MAGCACHE_ONEDNN_PACK_BF16";
/// The variable that decides where bf16 weights run their products on oneDNN
/// ([`OneDnn::bf16_products`]): `on`, wherever it implements a bf16 product; `off`, nowhere;
/// unset, on CPUs with AMX.
pub const BF16_ENV: &str = "MAGCACHE_ONEDNN_BF16";
/// `off` keeps a feed-forward's GELU out of its product ([`gelu_in_product`]); `on` or unset, in.
pub const GELU_ENV: &str = "MAGCACHE_ONEDNN_GELU";
/// `off` leaves the attention's keys and values plain ([`pack_kv`]); `on` or unset, packed.
pub const PACK_KV_ENV: &str = "MAGCACHE_ONEDNN_PACK_KV";
/// Queries per block of the attention on oneDNN ([`query_rows`]): a multiple of 16 from 16 to
/// 4 096; unset, sized by the keys (`nn::attention`).
pub const QUERY_ROWS_ENV: &str = "MAGCACHE_ONEDNN_QUERY_ROWS";
/// Keys per product of the attention on oneDNN ([`key_rows`]): a multiple of 32 from 32 to
/// 1 048 576, or `all`; unset, `nn::ONEDNN_KEY_ROWS`.
pub const KEY_ROWS_ENV: &str = "MAGCACHE_ONEDNN_KEY_ROWS";

use ffi::{isa_name, status, Api, Handle, ENGINE_CPU, ISA_AMX};
pub use hints::{amx_hint, f32_hint, f32_hint_for};
pub use packed::PackedWeight;
pub use primitive::BuiltProduct;
pub use primitive::Epilogue;
use primitive::{Key, Primitive};

mod ffi;
mod hints;
mod packed;
mod primitive;
mod raw;
mod scratch;
mod vars;
use crate::env::env_switch;
use vars::rows_var;

/// The opened library: its functions, a CPU engine, and the products built so far.
pub struct OneDnn {
    api: Api,
    engine: Handle,
    version: String,
    /// Whether bf16 weights are packed in the matmul's blocked layout ([`Self::blocks_bf16`]).
    blocks_bf16: bool,
    isa: u32,
    /// Whether a bf16 product is implemented on this CPU (probed at load).
    bf16: bool,
    /// `MAGCACHE_ONEDNN_BF16`: `Some(on)` where set, `None` (by the CPU's AMX) where not.
    bf16_switch: Option<bool>,
    /// `MAGCACHE_ONEDNN_GELU` ([`gelu_in_product`]) and `MAGCACHE_ONEDNN_PACK_KV` ([`pack_kv`]).
    gelu: bool,
    pack_kv: bool,
    /// `MAGCACHE_ONEDNN_QUERY_ROWS` ([`query_rows`]) and `MAGCACHE_ONEDNN_KEY_ROWS`
    /// ([`key_rows`]).
    query_rows: Option<usize>,
    key_rows: Option<usize>,
    primitives: Mutex<HashMap<Key, Arc<Primitive>>>,
    /// Products of packed weights whose layout oneDNN refused for their shape.
    refused: Mutex<HashSet<Key>>,
    /// The packed weights' layouts ([`PackedWeight`]), numbered from 1.
    formats: Mutex<Vec<OwnedMd>>,
    /// The layout chosen for each product shape, dtype and thread count.
    chosen: Mutex<HashMap<Chosen, u32>>,
    products: AtomicU64,
    bf16_linear: AtomicU64,
    unpacked: AtomicU64,
    // Never unloaded: the function pointers above point into it.
    _lib: libloading::Library,
}

impl Drop for OneDnn {
    fn drop(&mut self) {
        // The primitives first (they hold the engine), then the engine; the library after both.
        if let Ok(mut map) = self.primitives.lock() {
            map.clear();
        }
        if let Ok(mut formats) = self.formats.lock() {
            // SAFETY: copies made by `intern_format`, destroyed once here.
            formats.drain(..).for_each(|f| unsafe {
                (self.api.md_destroy)(f.0);
            });
        }
        // SAFETY: created at open, destroyed once here.
        unsafe { (self.api.engine_destroy)(self.engine) };
    }
}

// SAFETY: oneDNN's CPU engine and primitive objects may be used from any thread and a primitive
// executed concurrently when each execution brings its own scratch memory (user scratchpad mode,
// set on every primitive here); the map is behind a mutex.
unsafe impl Send for OneDnn {}
unsafe impl Sync for OneDnn {}

/// A memory descriptor the library's owner destroys ([`OneDnn`]'s drop).
struct OwnedMd(Handle);

/// A weight operand: a pointer, and its strides (`format` 0) or packed layout's number.
#[derive(Clone, Copy)]
struct Wei {
    ptr: *const c_void,
    strides: [usize; 2],
    format: u32,
}

/// A product's output of `len` values (f32, or bf16 where its epilogue says), allocated and not
/// yet written.
enum Out {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

impl Out {
    fn new(len: usize, bf16: bool) -> Out {
        match bf16 {
            false => Out::F32(Vec::with_capacity(len)),
            true => Out::Bf16(Vec::with_capacity(len)),
        }
    }

    /// Where the product writes.
    fn ptr(&mut self) -> *mut c_void {
        match self {
            Out::F32(v) => v.as_mut_ptr().cast(),
            Out::Bf16(v) => v.as_mut_ptr().cast(),
        }
    }

    /// The written values as an `[m, n]` CPU tensor.
    ///
    /// # Safety
    /// All `m * n` values (the capacity) were written.
    unsafe fn into_tensor(self, (m, n): (usize, usize)) -> Result<Tensor> {
        let dev = &candle_core::Device::Cpu;
        // SAFETY (both arms): the caller's guarantee.
        Ok(match self {
            Out::F32(mut v) => {
                unsafe { v.set_len(m * n) };
                Tensor::from_vec(v, (m, n), dev)?
            }
            Out::Bf16(mut v) => {
                unsafe { v.set_len(m * n) };
                Tensor::from_vec(v, (m, n), dev)?
            }
        })
    }
}

/// What [`state`] found.
pub enum State {
    /// `MAGCACHE_ONEDNN` unset or `off`.
    Off,
    Loaded(Box<OneDnn>),
    /// The named library did not open (the message names the variable and the file).
    Failed(String),
}

static STATE: OnceLock<State> = OnceLock::new();

/// A product a packed layout is chosen for: `m, k, n`, oneDNN's dtype, the OpenMP threads.
type Chosen = (usize, usize, usize, i32, usize);

/// `OMP_WAIT_POLICY` as set (what OpenMP's idle threads do between products), for
/// [`OneDnn::describe`].
fn wait_policy() -> Option<String> {
    std::env::var("OMP_WAIT_POLICY")
        .ok()
        .filter(|w| !w.is_empty())
}

/// The library `MAGCACHE_ONEDNN` names, opened the first time this is asked.
pub fn state() -> &'static State {
    STATE.get_or_init(|| open(std::env::var(ENV).ok().as_deref()))
}

/// Opens `spec` (a path or a library name; `None` or `off`: none) unless a library was chosen
/// already, and returns what is in use: the tests' way to choose one without the environment.
pub fn init(spec: Option<&str>) -> &'static State {
    STATE.get_or_init(|| open(spec))
}

/// The opened library, if any.
pub fn get() -> Option<&'static OneDnn> {
    match state() {
        State::Loaded(d) => Some(d),
        _ => None,
    }
}

/// Whether a feed-forward's GELU runs on its first product's accumulators (a post-op:
/// `nn::Linear::forward_gelu_then`): yes unless `MAGCACHE_ONEDNN_GELU=off`, which keeps the
/// separate pass over the hidden activations the post-op replaces (the benchmarks' baseline).
pub fn gelu_in_product() -> bool {
    get().is_none_or(|d| d.gelu)
}

/// Whether the attention on oneDNN packs a head's keys and values in the matmul's layout where
/// the head has more than two blocks of queries (`nn::attention`): yes unless
/// `MAGCACHE_ONEDNN_PACK_KV=off`, which leaves them plain (the benchmarks' baseline: on AMX the
/// packing was never timed against plain operands).
pub fn pack_kv() -> bool {
    get().is_none_or(|d| d.pack_kv)
}

/// The attention on oneDNN's queries per block where `MAGCACHE_ONEDNN_QUERY_ROWS` sets them (an
/// A/B switch for the benchmarks: the default sizes a block's scores to one core's L2); `None`
/// where unset or oneDNN is off.
pub fn query_rows() -> Option<usize> {
    get().and_then(|d| d.query_rows)
}

/// The attention on oneDNN's keys per product where `MAGCACHE_ONEDNN_KEY_ROWS` sets them
/// (`all`: every key in one product); `None` where unset or oneDNN is off.
pub fn key_rows() -> Option<usize> {
    get().and_then(|d| d.key_rows)
}

/// Whether bf16 weights run their products on the opened library ([`OneDnn::bf16_products`]).
pub fn bf16_products() -> bool {
    get().is_some_and(|d| d.bf16_products())
}

/// For the runner, before anything loads: `Ok(Some(description))` when products run on oneDNN,
/// `Ok(None)` when it is off, one line naming `MAGCACHE_ONEDNN` when the named library failed.
pub fn check() -> Result<Option<String>> {
    match state() {
        State::Off => Ok(None),
        State::Loaded(d) => Ok(Some(d.describe())),
        State::Failed(e) => Err(Error::msg(e.clone())),
    }
}

/// Opens `spec` as `MAGCACHE_ONEDNN` would, without choosing it for the process: its description,
/// or the one-line error a run would stop with (the library is closed again).
pub fn open_for_check(spec: &str) -> std::result::Result<String, String> {
    match open(Some(spec)) {
        State::Loaded(d) => Ok(d.describe()),
        State::Failed(e) => Err(e),
        State::Off => Ok("off".into()),
    }
}

pub use magcache_core::runtime::placement::cpuinfo_has_flag;

/// The library a `MAGCACHE_ONEDNN` value names: `None` for none (unset, empty or `off`).
pub fn named(spec: Option<&str>) -> Option<&str> {
    spec.map(str::trim)
        .filter(|s| !s.is_empty() && !s.eq_ignore_ascii_case("off"))
}

fn open(spec: Option<&str>) -> State {
    let Some(spec) = named(spec) else {
        return State::Off;
    };
    match OneDnn::open(spec) {
        Ok(d) => State::Loaded(Box::new(d)),
        Err(e) => State::Failed(format!("{ENV}={spec}: {e}")),
    }
}

impl OneDnn {
    fn open(spec: &str) -> std::result::Result<Self, String> {
        let (lib, api, version_fn, isa_fn) = Api::load(spec)?;
        // SAFETY: `dnnl_version` returns a pointer to a static struct.
        let (version, minor) = unsafe {
            let v = &*version_fn();
            if v.major != 3 {
                return Err(format!(
                    "oneDNN {}.{}.{}: the 3.x C API is needed",
                    v.major, v.minor, v.patch
                ));
            }
            (format!("{}.{}.{}", v.major, v.minor, v.patch), v.minor)
        };
        let blocks_bf16 =
            env_switch(PACK_BF16_ENV, "by the library's version")?.unwrap_or(minor >= 13);
        let bf16_switch = env_switch(BF16_ENV, "on CPUs with AMX")?;
        let gelu = env_switch(GELU_ENV, "on")?.unwrap_or(true);
        let pack_kv = env_switch(PACK_KV_ENV, "on")?.unwrap_or(true);
        let query_rows = rows_var(QUERY_ROWS_ENV, (16, 4096), false)?;
        let key_rows = rows_var(KEY_ROWS_ENV, (32, 1 << 20), true)?;
        // SAFETY: no arguments; returns an enum value.
        let isa = unsafe { isa_fn() };
        let mut engine: Handle = std::ptr::null_mut();
        // SAFETY: an out-pointer for the engine handle.
        status("engine", unsafe {
            (api.engine_create)(&mut engine, ENGINE_CPU, 0)
        })?;
        let mut d = OneDnn {
            api,
            engine,
            version,
            blocks_bf16,
            isa,
            bf16: false,
            bf16_switch,
            gelu,
            pack_kv,
            query_rows,
            key_rows,
            primitives: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashSet::new()),
            formats: Mutex::new(Vec::new()),
            chosen: Mutex::new(HashMap::new()),
            products: AtomicU64::new(0),
            bf16_linear: AtomicU64::new(0),
            unpacked: AtomicU64::new(0),
            _lib: lib,
        };
        // The f32 product must build; a bf16 one may not (no bf16 kernel on CPUs before AVX-512).
        d.primitive(Key::plain(1, 2, 1, false, 1))?;
        d.bf16 = d.primitive(Key::plain(1, 2, 1, true, 1)).is_ok();
        d.primitives.lock().map_err(|e| e.to_string())?.clear();
        Ok(d)
    }

    /// `oneDNN 3.2.0 (CPU ISA avx2): f32 linear layers on it, bf16 weights widened to f32 on it`
    /// and the like.
    pub fn describe(&self) -> String {
        let on = match self.bf16_switch {
            Some(true) => BF16_ENV.to_string() + "=on",
            _ => "AMX".into(),
        };
        let bf16 = if self.bf16_products() {
            let layout = match self.blocks_bf16 {
                true => "packed once in its layout",
                false => "held as plain rows",
            };
            format!("bf16 weights on it ({on}, {layout})")
        } else if super::bf16_gemm::available() {
            "bf16 weights on the layers' AVX512-BF16 kernel".into()
        } else {
            "bf16 weights widened to f32 on it".into()
        };
        let threads = match (self.api.omp_set_num_threads.is_some(), wait_policy()) {
            (true, Some(w)) => format!("OpenMP threads as candle's, OMP_WAIT_POLICY={w}"),
            (true, None) => "OpenMP threads as candle's".into(),
            (false, _) => "the library's own threads".into(),
        };
        let unpacked = match self.unpacked_products() {
            0 => String::new(),
            u => format!(
                "; {u} products unpacked their weight (a shape its packed layout does not fit)"
            ),
        };
        format!(
            "oneDNN {} (CPU ISA {}): f32 linear layers on it, {bf16}; {threads}{unpacked}",
            self.version,
            isa_name(self.isa)
        )
    }

    /// Whether bf16 linear weights are packed at load in the blocked layout oneDNN's matmul
    /// chooses (else held as plain `[n, k]` rows, read as PyTorch's are): from oneDNN 3.13 on,
    /// whose blocked copy ran faster than the plain weight on AMX, not on 3.2, whose
    /// `BA16a64b2a` ran 1.25x slower (docs/benchmarks.md). `MAGCACHE_ONEDNN_PACK_BF16=on` or
    /// `off` decides instead.
    pub fn blocks_bf16(&self) -> bool {
        self.blocks_bf16
    }

    /// Whether a bf16 product builds on this CPU (AVX-512 CPUs: AVX512-BF16 or emulated; AMX).
    pub fn bf16_implemented(&self) -> bool {
        self.bf16
    }

    /// Whether bf16 weights run their products here: on CPUs with AMX (elsewhere the layers' own
    /// AVX512-BF16 kernel, measured 2x f32 on a Zen 5 and level with oneDNN 3.2's product there, or
    /// widening to f32). `MAGCACHE_ONEDNN_BF16=on` runs them here wherever a bf16 product is
    /// implemented (the A/B switch against the layers' kernel, and the tests' way to run the AMX
    /// path's wiring on a CPU without AMX); `off` nowhere.
    pub fn bf16_products(&self) -> bool {
        self.bf16 && self.bf16_switch.unwrap_or(self.isa & ISA_AMX == ISA_AMX)
    }

    /// The name oneDNN gives the implementation of an `m x k` by `k x n` product (f32 or bf16,
    /// contiguous operands, the weight transposed as a linear layer's): `gemm:jit:f32`,
    /// `brg_matmul:avx512_core_amx` and the like.
    pub fn implementation(&self, m: usize, k: usize, n: usize, bf16: bool) -> Result<String> {
        let p = self
            .primitive(Key::plain(m, k, n, bf16, get_num_threads()))
            .map_err(Error::msg)?;
        Ok(p.impl_info.clone())
    }

    /// A linear layer's product: `x [m, k]` (f32, any strides) by `wt [k, n]` (the transposed
    /// view of a `[n, k]` weight, f32, or bf16 where [`Self::bf16_products`]), plus `bias [n]`
    /// (f32): `[m, n]` f32. `None` when the operands are not for it (another device or dtype, an
    /// empty dimension).
    pub fn linear(&self, x: &Tensor, wt: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
        if wt.dtype() == DType::BF16 && !self.bf16_products() {
            return Ok(None);
        }
        self.product(x, wt, bias)
    }

    /// Products run so far (the tests' proof that oneDNN ran).
    pub fn products(&self) -> u64 {
        self.products.load(Ordering::Relaxed)
    }

    /// The linear layers' bf16 products among [`Self::products`] (not the attention's).
    pub fn bf16_linear_products(&self) -> u64 {
        self.bf16_linear.load(Ordering::Relaxed)
    }

    /// Counts a product run (`bf16_linear`: a linear layer's in bf16).
    fn counted(&self, bf16_linear: bool) {
        self.products.fetch_add(1, Ordering::Relaxed);
        if bf16_linear {
            self.bf16_linear.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// [`Self::linear`] whatever the CPU's ISA: bf16 weights wherever oneDNN implements a bf16
    /// product ([`Self::bf16_implemented`]), for the tests.
    pub fn product(
        &self,
        x: &Tensor,
        wt: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let (k, n) = wt.dims2()?;
        let bf16 = match wt.dtype() {
            DType::F32 => false,
            DType::BF16 if self.bf16 => true,
            _ => return Ok(None),
        };
        if !wt.device().is_cpu() {
            return Ok(None);
        }
        let (ws, wl) = wt.storage_and_layout();
        let ptr: *const c_void = match &*ws {
            Storage::Cpu(CpuStorage::F32(v)) if !bf16 => v[wl.start_offset()..].as_ptr().cast(),
            Storage::Cpu(CpuStorage::BF16(v)) if bf16 => v[wl.start_offset()..].as_ptr().cast(),
            _ => return Ok(None),
        };
        let strides = [wl.stride()[0], wl.stride()[1]];
        let wei = Wei {
            ptr,
            strides,
            format: 0,
        };
        self.product_on(x, (k, n, bf16), wei, bias, Epilogue::default())
    }

    /// `x [m, k]` (f32, any strides; or bf16, contiguous, for a bf16 weight) by the weight `wei`
    /// (`[k x n]`, bf16 or f32), plus `bias`, then `epi`: `[m, n]` f32 (bf16 where `epi` says).
    /// `None` when the operands are not for it, or when `wei` is packed in a layout oneDNN refuses
    /// for this shape and epilogue (remembered: it is not asked again).
    fn product_on(
        &self,
        x: &Tensor,
        (k, n, bf16): (usize, usize, bool),
        wei: Wei,
        bias: Option<&Tensor>,
        epi: Epilogue,
    ) -> Result<Option<Tensor>> {
        let (m, k2) = x.dims2()?;
        let x_bf16 = x.dtype() == DType::BF16 && bf16 && x.is_contiguous();
        if k != k2
            || m == 0
            || k == 0
            || n == 0
            || (x.dtype() != DType::F32 && !x_bf16)
            || (epi.bf16_out && !bf16)
            || !x.device().is_cpu()
            || bias.is_some_and(|b| b.dtype() != DType::F32 || b.dims() != [n])
        {
            return Ok(None);
        }
        let bias = bias.map(|b| b.contiguous()).transpose()?;
        let bias_guard = bias.as_ref().map(|b| b.storage_and_layout());
        let bias_ptr = match &bias_guard {
            Some((s, l)) => match &**s {
                Storage::Cpu(CpuStorage::F32(v)) => v[l.start_offset()..].as_ptr(),
                _ => return Ok(None),
            },
            None => std::ptr::null(),
        };
        let mut out = Out::new(m * n, epi.bf16_out);
        let dst_ptr = out.ptr();
        let run = |src: *const c_void, src_strides: [usize; 2]| {
            let key = Key {
                m,
                k,
                n,
                bf16,
                bias: !bias_ptr.is_null(),
                src_strides,
                wei_strides: wei.strides,
                wei_format: wei.format,
                epilogue: epi,
                threads: get_num_threads(),
            };
            if (wei.format != 0 || epi != Epilogue::default()) && !self.fits(key) {
                return Ok(false);
            }
            // SAFETY: the pointers come from tensors (or a packed weight) whose layouts give the
            // strides and extents used (the destination's capacity is m * n), held for the call.
            unsafe { self.execute(key, (src, wei.ptr), bias_ptr, dst_ptr) }.map(|_| true)
        };
        let outcome = if x_bf16 {
            let (xs, xl) = x.storage_and_layout();
            let Storage::Cpu(CpuStorage::BF16(xv)) = &*xs else {
                return Ok(None);
            };
            run(xv[xl.start_offset()..].as_ptr() as *const c_void, [k, 1])
        } else if bf16 {
            // The activations rounded to bf16 (RNE), rows padded to an even count of features.
            let xc = x.contiguous()?;
            let (cs, cl) = xc.storage_and_layout();
            let (Storage::Cpu(CpuStorage::F32(cv)), Some((a, b))) = (&*cs, cl.contiguous_offsets())
            else {
                return Ok(None);
            };
            let kp = k.div_ceil(2);
            let threads = candle_core::utils::get_num_threads();
            let pairs = super::bf16_gemm::pairs(&cv[a..b], m, k, kp, threads);
            run(pairs.as_ptr() as *const c_void, [2 * kp, 1])
        } else {
            let (xs, xl) = x.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(xv)) = &*xs else {
                return Ok(None);
            };
            run(
                xv[xl.start_offset()..].as_ptr() as *const c_void,
                [xl.stride()[0], xl.stride()[1]],
            )
        };
        if !outcome.map_err(|e| Error::msg(format!("{ENV}: {e}")))? {
            return Ok(None);
        }
        self.counted(bf16);
        // SAFETY: the product wrote all m * n values.
        Ok(Some(unsafe { out.into_tensor((m, n)) }?))
    }
}
