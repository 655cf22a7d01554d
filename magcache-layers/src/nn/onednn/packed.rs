//! Linear weights reordered once, at load, into the layout oneDNN's matmul reads (issue 45).
//!
//! Given a plain weight, oneDNN's brgemm matmul copies the panels of it each product needs into a
//! blocked layout of its own (on AMX: pairs of bf16 rows interleaved, blocks of 16 to 64 columns)
//! in the scratch memory, on every product: the whole weight (27 MB for the Wan2.1-1.3B FFN's)
//! read and written again per product. A weight reordered once into the layout the matmul
//! chooses for it (`format_tag_any`) is read as it is. The packed copy replaces the plain weight
//! (the same bytes, the blocks' padding aside: the size guard's count of the weights holds).
//!
//! bf16 weights are held plain (the checkpoint's `[n, k]` rows, as PyTorch hands them to oneDNN)
//! where the library's blocked layout measured slower: oneDNN 3.2's AMX product read its
//! `BA16a64b2a` copy 1.25x slower than the plain weight (docs/benchmarks.md, "fourth session"),
//! while 3.13's `BA16a32b2a` ran faster than plain ([`OneDnn::blocks_bf16`]).
//!
//! The layout is the one chosen for a product of [`M_REF`] rows. A product whose shape the
//! layout does not fit (oneDNN refuses the primitive: a one-row product, say, on some CPUs) runs
//! on a plain copy of the weight made for it, counted ([`OneDnn::unpacked_products`]) and said
//! in the run report's `products`.

use super::ffi::{memory_desc, status, ExecArg, Handle, ARG_DST, ARG_SRC};
use super::ffi::{DT_BF16, DT_F32, FORMAT_TAG_ANY, QUERY_WEIGHTS_MD, STREAM_IN_ORDER};
use super::{Epilogue, OneDnn, Wei, ENV};
use candle_core::{CpuStorage, DType, Storage, Tensor};
use magcache_core::{Error, Result};
use std::ffi::c_void;
use std::sync::atomic::Ordering;

/// The rows of the product a weight's layout is chosen for: a few hundred to thousands of tokens
/// times the batch in the transformers here (oneDNN's choice varies with the column count and
/// the ISA, and differs for one-row products).
const M_REF: usize = 1024;

/// The layout [`OneDnn::pack_ptr`] reorders an operand into.
enum Target {
    /// The one oneDNN's matmul chooses for products of this many rows.
    Blocked(usize),
    /// Plain `[n, k]` rows (a checkpoint's layout).
    Rows,
}

/// A linear layer's weight `[k x n]` (the transposed `[n, k]` of a checkpoint) in oneDNN's
/// layout for its matmul.
pub struct PackedWeight {
    dnnl: &'static OneDnn,
    k: usize,
    n: usize,
    bf16: bool,
    /// The layout's number ([`OneDnn::format`]).
    format: u32,
    /// The packed bytes from `at` (64-byte aligned), `bytes` long.
    buf: Vec<u8>,
    at: usize,
    bytes: usize,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dt = if self.bf16 { "bf16" } else { "f32" };
        write!(
            f,
            "PackedWeight [{} x {}] {dt}, oneDNN layout {}",
            self.k, self.n, self.format
        )
    }
}

impl OneDnn {
    /// The memory descriptor of packed layout `id` (kept until the library is dropped).
    pub(super) fn format(&self, id: u32) -> std::result::Result<Handle, String> {
        let formats = self.formats.lock().map_err(|e| e.to_string())?;
        formats
            .get((id as usize).wrapping_sub(1))
            .map(|f| f.0)
            .ok_or_else(|| format!("oneDNN: no packed layout {id}"))
    }

    /// The number of the layout `md` describes (a copy is kept the first time it is seen).
    fn intern_format(&self, md: Handle) -> std::result::Result<u32, String> {
        let mut formats = self.formats.lock().map_err(|e| e.to_string())?;
        // SAFETY: both descriptors are valid: kept ones until drop, `md` for the caller's call.
        if let Some(i) = formats
            .iter()
            .position(|f| unsafe { (self.api.md_equal)(f.0, md) } != 0)
        {
            return Ok(i as u32 + 1);
        }
        let mut copy: Handle = std::ptr::null_mut();
        // SAFETY: an out-pointer for the copy, destroyed with the library (`OwnedMd`).
        status("memory descriptor", unsafe {
            (self.api.md_clone)(&mut copy, md)
        })?;
        formats.push(super::OwnedMd(copy));
        Ok(formats.len() as u32)
    }

    /// `wt [k, n]` (f32, or bf16 where [`Self::bf16_implemented`]; any strides: a linear layer's
    /// transposed view) held for oneDNN's products: reordered into the layout its matmul chooses
    /// for it, or, for bf16 where that layout measured slower ([`Self::blocks_bf16`]) or the input
    /// features are odd, copied plain as `[n, k]` rows. `None` when the chosen layout is the
    /// plain one given (nothing to gain) or the weight is not for it.
    pub fn pack(&'static self, wt: &Tensor) -> Result<Option<PackedWeight>> {
        let bf16 = wt.dtype() == DType::BF16;
        // An odd number of input features: oneDNN 3.2 (measured on AVX512-BF16) multiplies the
        // activations' padded rows by a blocked bf16 weight on its reference code only, by plain
        // rows on its bf16 gemm.
        let odd = wt.dims().first().is_some_and(|k| k % 2 == 1);
        let blocked = !bf16 || (self.blocks_bf16() && !odd);
        self.pack_as(wt, blocked)
    }

    /// [`Self::pack`] into the layout the matmul chooses (`blocked`), or plain `[n, k]` rows,
    /// whatever the library's version (the `bf16_gemm` example times both).
    pub fn pack_as(&'static self, wt: &Tensor, blocked: bool) -> Result<Option<PackedWeight>> {
        let (k, n) = wt.dims2()?;
        let bf16 = match wt.dtype() {
            DType::F32 => false,
            DType::BF16 if self.bf16 => true,
            _ => return Ok(None),
        };
        if k == 0 || n == 0 || !wt.device().is_cpu() {
            return Ok(None);
        }
        let (ws, wl) = wt.storage_and_layout();
        let strides = [wl.stride()[0], wl.stride()[1]];
        let ptr: *const c_void = match &*ws {
            Storage::Cpu(CpuStorage::F32(v)) if !bf16 => v[wl.start_offset()..].as_ptr().cast(),
            Storage::Cpu(CpuStorage::BF16(v)) if bf16 => v[wl.start_offset()..].as_ptr().cast(),
            _ => return Ok(None),
        };
        let threads = candle_core::utils::get_num_threads();
        let target = match blocked {
            true => Target::Blocked(M_REF),
            false => Target::Rows,
        };
        // SAFETY: `ptr` and `strides` are the tensor's, held for the call.
        unsafe { self.pack_ptr((ptr, strides), (k, n, bf16), target, threads) }
    }

    /// bf16 pairs `b` holding a `[k x n]` operand (element `(i, j)` at bf16 offset
    /// `i * strides[0] + j * strides[1]`) packed for products of `m` rows, reordered on `threads`
    /// OpenMP threads: the attention's keys and values, once per head. `None` as [`Self::pack`].
    pub fn pack_pairs(
        &'static self,
        (b, strides): (&[u32], [usize; 2]),
        (k, n): (usize, usize),
        m: usize,
        threads: usize,
    ) -> Result<Option<PackedWeight>> {
        if !self.bf16 || k == 0 || n == 0 || m == 0 {
            return Ok(None);
        }
        if !super::raw::within_pairs(b.len(), (k, n), strides) {
            return Err(Error::msg(format!(
                "{ENV}: packing a [{k} x {n}] operand: strides {strides:?} reach past its {} values",
                2 * b.len()
            )));
        }
        let (ptr, target) = (b.as_ptr().cast(), Target::Blocked(m));
        // SAFETY: the extent was checked above, and `b` is held for the call.
        unsafe { self.pack_ptr((ptr, strides), (k, n, true), target, threads) }
    }

    /// [`Self::pack`]'s work on a `[k x n]` operand at `ptr` with `strides` (elements): reordered
    /// into `target`'s layout. `None` when the blocked layout chosen is the plain one given.
    ///
    /// # Safety
    /// `ptr` must cover the extent the strides give, in the dtype, for the call.
    unsafe fn pack_ptr(
        &'static self,
        (ptr, strides): (*const c_void, [usize; 2]),
        (k, n, bf16): (usize, usize, bool),
        target: Target,
        threads: usize,
    ) -> Result<Option<PackedWeight>> {
        let dt = if bf16 { DT_BF16 } else { DT_F32 };
        let err = |e: String| Error::msg(format!("{ENV}: packing a [{k} x {n}] weight: {e}"));
        let md = |strides: [usize; 2]| memory_desc(&self.api, k, n, strides, dt).map_err(err);
        let plain = Md(md(strides)?, &self.api);
        let format = match target {
            Target::Blocked(m) => {
                let format = self.chosen_format((m, k, n), dt, threads).map_err(err)?;
                let chosen = self.format(format).map_err(err)?;
                // SAFETY: two valid descriptors.
                if unsafe { (self.api.md_equal)(chosen, plain.0) } != 0 {
                    return Ok(None);
                }
                format
            }
            // Element (i, j) at j * k + i.
            Target::Rows => self
                .intern_format(Md(md([1, k])?, &self.api).0)
                .map_err(err)?,
        };
        let packed_md = self.format(format).map_err(err)?;
        // SAFETY: a valid descriptor.
        let bytes = unsafe { (self.api.md_get_size)(packed_md) };
        let mut buf = vec![0u8; bytes + 64];
        let at = buf.as_ptr().align_offset(64);
        // SAFETY: `ptr` covers the extents of `plain` (the caller's promise), the buffer `bytes`
        // from `at`; both outlive the call.
        unsafe {
            self.reorder(
                (plain.0, ptr as *mut c_void),
                (packed_md, buf.as_mut_ptr().add(at).cast()),
                threads,
            )
        }
        .map_err(err)?;
        Ok(Some(PackedWeight {
            dnnl: self,
            k,
            n,
            bf16,
            format,
            buf,
            at,
            bytes,
        }))
    }

    /// The layout the matmul of an `m x k` by `k x n` product on `threads` OpenMP threads chooses
    /// for its weight (asked of oneDNN once per shape and count: the attention packs its keys and
    /// values at every call). oneDNN cuts the product's blocks for the thread count, so the
    /// layout is asked under the count the products will run on.
    fn chosen_format(
        &self,
        (m, k, n): (usize, usize, usize),
        dt: i32,
        threads: usize,
    ) -> std::result::Result<u32, String> {
        let chosen = (m, k, n, dt, threads);
        if let Some(&id) = self.chosen.lock().map_err(|e| e.to_string())?.get(&chosen) {
            return Ok(id);
        }
        let api = &self.api;
        super::primitive::set_threads(api, threads);
        let src = Md(memory_desc(api, m, k, [k, 1], dt)?, api);
        let dst = Md(memory_desc(api, m, n, [n, 1], DT_F32)?, api);
        let mut any: Handle = std::ptr::null_mut();
        let dims = dims2(k, n);
        // SAFETY: an out-pointer and 12 dimensions, 2 used.
        status("memory descriptor", unsafe {
            (api.md_create_with_tag)(&mut any, 2, dims.as_ptr(), dt, FORMAT_TAG_ANY)
        })?;
        let any = Md(any, api);
        let mut pd: Handle = std::ptr::null_mut();
        let null = std::ptr::null_mut();
        // SAFETY: valid descriptors; no bias, default attributes.
        status("matmul", unsafe {
            (api.matmul_pd_create)(&mut pd, self.engine, src.0, any.0, null, dst.0, null)
        })?;
        // SAFETY: the weights' descriptor is owned by `pd`, interned (copied) before `pd` goes.
        let id = unsafe { self.intern_format((api.pd_query_md)(pd, QUERY_WEIGHTS_MD, 0)) };
        // SAFETY: created above, destroyed once.
        unsafe { (api.pd_destroy)(pd) };
        let id = id?;
        let mut map = self.chosen.lock().map_err(|e| e.to_string())?;
        // Asked again after a start over (the layouts themselves stay interned: packed weights
        // name them).
        if map.len() >= 256 {
            map.clear();
        }
        map.insert(chosen, id);
        Ok(id)
    }

    /// Reorders the memory `from` into `to` (descriptor and data each), on `threads` OpenMP
    /// threads.
    ///
    /// # Safety
    /// Each pointer must hold its descriptor's extent and stay valid for the call.
    unsafe fn reorder(
        &self,
        from: (Handle, *mut c_void),
        to: (Handle, *mut c_void),
        threads: usize,
    ) -> std::result::Result<(), String> {
        let api = &self.api;
        super::primitive::set_threads(api, threads);
        let (mut pd, mut prim, mut stream) = (
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        let (e, null) = (self.engine, std::ptr::null_mut());
        let mut mems = [
            ExecArg {
                arg: ARG_SRC,
                memory: null,
            },
            ExecArg {
                arg: ARG_DST,
                memory: null,
            },
        ];
        let r = status(
            "reorder",
            (api.reorder_pd_create)(&mut pd, from.0, e, to.0, e, null),
        )
        .and_then(|_| status("reorder", (api.primitive_create)(&mut prim, pd)))
        .and_then(|_| {
            status(
                "memory",
                (api.memory_create)(&mut mems[0].memory, from.0, e, from.1),
            )
        })
        .and_then(|_| {
            status(
                "memory",
                (api.memory_create)(&mut mems[1].memory, to.0, e, to.1),
            )
        })
        .and_then(|_| {
            status(
                "stream",
                (api.stream_create)(&mut stream, e, STREAM_IN_ORDER),
            )
        })
        .and_then(|_| {
            status(
                "reorder",
                (api.primitive_execute)(prim, stream, 2, mems.as_ptr()),
            )
        })
        .and_then(|_| status("reorder", (api.stream_wait)(stream)));
        for m in mems.iter().filter(|m| !m.memory.is_null()) {
            (api.memory_destroy)(m.memory);
        }
        if !stream.is_null() {
            (api.stream_destroy)(stream);
        }
        if !prim.is_null() {
            (api.primitive_destroy)(prim);
        }
        if !pd.is_null() {
            (api.pd_destroy)(pd);
        }
        r
    }

    /// Products that found their weight's packed layout refused for their shape and ran on a
    /// plain copy made for them.
    pub fn unpacked_products(&self) -> u64 {
        self.unpacked.load(Ordering::Relaxed)
    }
}

impl PackedWeight {
    /// The output features (`n`).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Whether it holds bf16 values (else f32).
    pub fn is_bf16(&self) -> bool {
        self.bf16
    }

    /// The packed operand as the products take it.
    fn wei(&self) -> Wei {
        Wei {
            ptr: self.buf[self.at..].as_ptr().cast(),
            strides: [0, 0],
            format: self.format,
        }
    }

    /// `x [m, k]` (f32, any strides; or bf16, contiguous, for a bf16 weight) by this weight, plus
    /// `bias [n]` (f32): `[m, n]` f32, the bias added in the product.
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let d = self.dnnl;
        let wei = self.wei();
        let key = (self.k, self.n, self.bf16);
        if let Some(y) = d.product_on(x, key, wei, bias, Epilogue::default())? {
            return Ok(y);
        }
        // Refused for this shape (or not for oneDNN): a plain copy for this product.
        self.linear_unpacked(x, bias)
    }

    /// [`Self::linear`], then `epi` on the accumulators (the tanh GELU, a bf16 output for a bf16
    /// weight). `None` when oneDNN refuses that product for this shape (the caller runs the plain
    /// product and its own GELU instead).
    pub fn linear_then(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        epi: Epilogue,
    ) -> Result<Option<Tensor>> {
        let key = (self.k, self.n, self.bf16);
        self.dnnl.product_on(x, key, self.wei(), bias, epi)
    }

    /// [`Self::linear`] on a plain copy of the weight made for this product (what a shape the
    /// packed layout does not fit runs; counted in [`OneDnn::unpacked_products`]).
    pub fn linear_unpacked(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let d = self.dnnl;
        let plain = self.unpack()?;
        let y = d.product(x, &plain, bias)?.ok_or_else(|| {
            Error::msg(format!(
                "{ENV}: a {:?} {:?} input is not for a [{} x {}] packed weight's product",
                x.dims(),
                x.dtype(),
                self.k,
                self.n
            ))
        })?;
        d.unpacked.fetch_add(1, Ordering::Relaxed);
        Ok(y)
    }

    /// `out [m x n] = a [m x k] . self` for a bf16 packed operand ([`OneDnn::pack_pairs`]): `a`
    /// bf16 pairs whose rows are `a_row` bf16 apart, f32 accumulation and output, on `threads`
    /// OpenMP threads. `Ok(false)`, nothing written, when oneDNN refuses the layout for `m` rows
    /// (the caller multiplies by its plain operand instead).
    pub fn bf16_into(
        &self,
        (a, a_row): (&[u32], usize),
        m: usize,
        out: &mut [f32],
        threads: usize,
    ) -> Result<bool> {
        let wei = self.wei();
        if !self.bf16 {
            return Err(Error::msg(format!(
                "{ENV}: an f32 packed operand in a bf16 product"
            )));
        }
        self.dnnl
            .bf16_on((a, a_row), wei, (m, self.k, self.n), out, threads)
    }

    /// The weight back in its plain `[k, n]` row-major layout (exactly the values packed).
    pub fn unpack(&self) -> Result<Tensor> {
        let d = self.dnnl;
        let dt = if self.bf16 { DT_BF16 } else { DT_F32 };
        let (k, n) = (self.k, self.n);
        let err = |e: String| Error::msg(format!("{ENV}: unpacking a [{k} x {n}] weight: {e}"));
        let plain = Md(memory_desc(&d.api, k, n, [n, 1], dt).map_err(err)?, &d.api);
        let from = d.format(self.format).map_err(err)?;
        let src = self.buf[self.at..self.at + self.bytes].as_ptr() as *mut c_void;
        let dev = &candle_core::Device::Cpu;
        let threads = candle_core::utils::get_num_threads();
        // SAFETY (both arms): the packed bytes hold `from`'s extent, the vector k * n values.
        if self.bf16 {
            let mut v = vec![half::bf16::ZERO; k * n];
            unsafe { d.reorder((from, src), (plain.0, v.as_mut_ptr().cast()), threads) }
                .map_err(err)?;
            Ok(Tensor::from_vec(v, (k, n), dev)?)
        } else {
            let mut v = vec![0f32; k * n];
            unsafe { d.reorder((from, src), (plain.0, v.as_mut_ptr().cast()), threads) }
                .map_err(err)?;
            Ok(Tensor::from_vec(v, (k, n), dev)?)
        }
    }
}

/// A memory descriptor destroyed when it goes out of scope.
struct Md<'a>(Handle, &'a super::ffi::Api);

impl Drop for Md<'_> {
    fn drop(&mut self) {
        // SAFETY: created by this library, destroyed once.
        unsafe { (self.1.md_destroy)(self.0) };
    }
}

fn dims2(a: usize, b: usize) -> super::ffi::Dims {
    let mut d: super::ffi::Dims = [0; 12];
    (d[0], d[1]) = (a as i64, b as i64);
    d
}
