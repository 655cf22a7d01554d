//! oneDNN's matmul primitives, built once per shape and layout and kept, and their executions
//! (each with this thread's scratch memory).

use super::ffi::ELTWISE_GELU_TANH;
use super::ffi::{memory_desc, status, Api, ExecArg, Handle, QUERY_IMPL_INFO_STR};
use super::ffi::{ARG_BIAS, ARG_DST, ARG_SCRATCHPAD, ARG_SRC, ARG_WEIGHTS, DT_BF16, DT_F32};
use super::ffi::{QUERY_SCRATCHPAD_MD, SCRATCHPAD_MODE_USER, STREAM_IN_ORDER};
use super::{scratch, OneDnn};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Arc;

/// One matmul primitive for a shape and layout.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Key {
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) n: usize,
    /// bf16 operands (else f32).
    pub(super) bf16: bool,
    pub(super) bias: bool,
    pub(super) src_strides: [usize; 2],
    /// The weight's strides when `wei_format` is 0.
    pub(super) wei_strides: [usize; 2],
    /// 0: a plain weight (`wei_strides`); else the packed layout of that number
    /// ([`OneDnn::format`]).
    pub(super) wei_format: u32,
    /// What the product does to its accumulators before writing them.
    pub(super) epilogue: Epilogue,
    /// The OpenMP threads it runs on. oneDNN fixes a primitive's thread count when it builds it
    /// (OpenMP's count on the building thread then), not when it runs: a product built for two
    /// threads runs on two from a task of a thread pool that asked for one.
    pub(super) threads: usize,
}

impl Key {
    /// The product in words, for errors: `matmul [m x k] by [k x n] in bf16, GELU after`.
    pub(super) fn describe(&self) -> String {
        let e = self.epilogue;
        format!(
            "matmul [{} x {}] by [{} x {}] in {}{}{}",
            self.m,
            self.k,
            self.k,
            self.n,
            if self.bf16 { "bf16" } else { "f32" },
            if e.gelu { ", GELU after" } else { "" },
            if e.bf16_out { ", bf16 out" } else { "" },
        )
    }
}

/// What a product does to its accumulators before writing them: the tanh GELU (a post-op, run on
/// the accumulators in registers), and the output's dtype (bf16, rounded to nearest even, or f32).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Epilogue {
    /// `gelu_tanh` applied to each output (after the bias).
    pub gelu: bool,
    /// The output written as bf16 (else f32).
    pub bf16_out: bool,
}

/// A product oneDNN built and keeps ([`OneDnn::built`]): what it is, and how it runs.
#[derive(Clone, Debug)]
pub struct BuiltProduct {
    /// `matmul [m x k] by [k x n] in bf16` and the like.
    pub what: String,
    /// Its weight packed (in a layout of oneDNN's, or copied as plain rows), else the caller's.
    pub packed: bool,
    /// The OpenMP threads it was asked to run on.
    pub threads: usize,
    /// OpenMP's thread count when oneDNN built it, which its parallel regions keep (`None` where
    /// the library exposes no OpenMP): the same as `threads` unless a build escaped its count.
    pub built_threads: Option<usize>,
    /// oneDNN's name for the implementation it chose (`brg:avx512_core_amx`, `ref:any`, ...).
    pub implementation: String,
}

pub(super) struct Primitive {
    api: *const Api,
    pd: Handle,
    prim: Handle,
    src: Handle,
    wei: Handle,
    bias: Handle,
    dst: Handle,
    /// The scratchpad's descriptor, owned by `pd`, and its size (0: none).
    scratch: Handle,
    scratch_bytes: usize,
    pub(super) impl_info: String,
    /// OpenMP's thread count on the thread that built it, as oneDNN read it (`None` where the
    /// library exposes no OpenMP).
    pub(super) built_threads: Option<usize>,
}

// SAFETY: see `OneDnn`; `api` points into the `OneDnn` that owns the map holding this (the
// primitives are dropped before it).
unsafe impl Send for Primitive {}
unsafe impl Sync for Primitive {}

impl Drop for Primitive {
    fn drop(&mut self) {
        // SAFETY: the handles were created by this library and are destroyed once, here.
        unsafe {
            let api = &*self.api;
            if !self.prim.is_null() {
                (api.primitive_destroy)(self.prim);
            }
            if !self.pd.is_null() {
                (api.pd_destroy)(self.pd);
            }
            for md in [self.src, self.wei, self.bias, self.dst] {
                if !md.is_null() {
                    (api.md_destroy)(md);
                }
            }
        }
    }
}

impl OneDnn {
    /// Each product built so far (kept for its shape, layout and threads).
    pub fn built(&self) -> Vec<BuiltProduct> {
        self.primitives
            .lock()
            .map(|map| {
                map.iter()
                    .map(|(k, p)| BuiltProduct {
                        what: k.describe(),
                        packed: k.wei_format != 0,
                        threads: k.threads,
                        built_threads: p.built_threads,
                        implementation: p.impl_info.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether the primitive of `key` (a packed weight's, or one with an epilogue) builds on an
    /// optimised implementation; a refusal is remembered. oneDNN's reference code (`ref:any`)
    /// counts as a refusal: it ran a bf16 product of 33 features on a blocked weight 100x slower
    /// than the plain weight's product, which is what a refusal runs instead. Only an accepted
    /// primitive is kept (another thread never sees a refused one).
    pub(super) fn fits(&self, key: Key) -> bool {
        if self.refused.lock().is_ok_and(|r| r.contains(&key)) {
            return false;
        }
        if self.primitives.lock().is_ok_and(|m| m.contains_key(&key)) {
            return true;
        }
        match self.build(key) {
            Ok(p) if !p.impl_info.starts_with("ref") => {
                if let Ok(mut map) = self.primitives.lock() {
                    keep(&mut map, key, Arc::new(p));
                }
                true
            }
            _ => {
                if let Ok(mut r) = self.refused.lock() {
                    // A run has a few shapes; a server may see many: start over past a bound.
                    if r.len() >= 256 {
                        r.clear();
                    }
                    r.insert(key);
                }
                false
            }
        }
    }

    /// The primitive of `key`: the one kept, or built now and kept.
    pub(super) fn primitive(&self, key: Key) -> std::result::Result<Arc<Primitive>, String> {
        let mut map = self.primitives.lock().map_err(|e| e.to_string())?;
        if let Some(p) = map.get(&key) {
            return Ok(p.clone());
        }
        let p = Arc::new(self.build(key)?);
        keep(&mut map, key, p.clone());
        Ok(p)
    }

    /// Builds the primitive of `key` (not kept), under the key's OpenMP thread count.
    fn build(&self, key: Key) -> std::result::Result<Primitive, String> {
        let api = &self.api;
        // oneDNN sizes the primitive's parallel regions for OpenMP's thread count now, on this
        // thread: the key's.
        set_threads(api, key.threads);
        let dt = if key.bf16 { DT_BF16 } else { DT_F32 };
        let md = |rows, cols, strides, dt| memory_desc(api, rows, cols, strides, dt);
        let mut p = Primitive {
            api,
            pd: std::ptr::null_mut(),
            prim: std::ptr::null_mut(),
            src: std::ptr::null_mut(),
            wei: std::ptr::null_mut(),
            bias: std::ptr::null_mut(),
            dst: std::ptr::null_mut(),
            scratch: std::ptr::null_mut(),
            scratch_bytes: 0,
            impl_info: String::new(),
            built_threads: None,
        };
        p.src = md(key.m, key.k, key.src_strides, dt)?;
        p.wei = self.weight_md(key, dt)?;
        if key.bias {
            p.bias = md(1, key.n, [key.n, 1], DT_F32)?;
        }
        let out_dt = [DT_F32, DT_BF16][usize::from(key.epilogue.bf16_out)];
        p.dst = md(key.m, key.n, [key.n, 1], out_dt)?;
        let what = key.describe();
        // Scratch memory is the caller's, per execution: a primitive built on one thread may run
        // on another, and on two at once (oneDNN's own scratchpad is per thread or per primitive).
        let mut attr: Handle = std::ptr::null_mut();
        // SAFETY: an out-pointer for the attribute, set before use and destroyed after (the
        // descriptor keeps a copy); the memory descriptors were created above.
        let created = unsafe {
            status("attribute", (api.attr_create)(&mut attr)).and_then(|_| {
                let r = status(
                    "scratchpad mode",
                    (api.attr_set_scratchpad_mode)(attr, SCRATCHPAD_MODE_USER),
                )
                .and_then(|_| match key.epilogue.gelu {
                    true => gelu_post_op(api, attr),
                    false => Ok(()),
                })
                .and_then(|_| {
                    status(
                        &what,
                        (api.matmul_pd_create)(
                            &mut p.pd,
                            self.engine,
                            p.src,
                            p.wei,
                            p.bias,
                            p.dst,
                            attr,
                        ),
                    )
                });
                (api.attr_destroy)(attr);
                r
            })
        };
        created?;
        // SAFETY: the descriptor's own scratchpad descriptor (null or zero bytes when none).
        unsafe {
            p.scratch = (api.pd_query_md)(p.pd, QUERY_SCRATCHPAD_MD, 0);
            if !p.scratch.is_null() {
                p.scratch_bytes = (api.md_get_size)(p.scratch);
            }
        }
        // SAFETY: the descriptor built above.
        p.impl_info = unsafe { impl_info(api, p.pd) };
        // SAFETY: the descriptor built above.
        status(&what, unsafe { (api.primitive_create)(&mut p.prim, p.pd) })?;
        // SAFETY: OpenMP's query, no arguments.
        p.built_threads = api
            .omp_get_max_threads
            .map(|get| unsafe { get() }.max(0) as usize);
        Ok(p)
    }

    /// The weight's memory descriptor for `key`: plain with its strides, or a copy of its packed
    /// layout's (the primitive's own, destroyed with it).
    fn weight_md(&self, key: Key, dt: c_int) -> std::result::Result<Handle, String> {
        if key.wei_format == 0 {
            return memory_desc(&self.api, key.k, key.n, key.wei_strides, dt);
        }
        let mut copy: Handle = std::ptr::null_mut();
        let packed = self.format(key.wei_format)?;
        // SAFETY: a kept descriptor, copied.
        status("memory descriptor", unsafe {
            (self.api.md_clone)(&mut copy, packed)
        })?;
        Ok(copy)
    }

    /// Runs one product: `src [m x k]` (f32 or bf16 bits) by the weight `[k x n]` (its
    /// strides), plus the bias, into `dst [m x n]` (f32, or bf16 bits where the key's epilogue
    /// says), on the key's OpenMP threads.
    ///
    /// # Safety
    /// The pointers must cover the extents their strides give, in the key's dtype, and stay
    /// valid for the call.
    pub(super) unsafe fn execute(
        &self,
        key: Key,
        (src, wei): (*const c_void, *const c_void),
        bias: *const f32,
        dst: *mut c_void,
    ) -> std::result::Result<(), String> {
        let p = self.primitive(key)?;
        scratch::with(p.scratch_bytes, |scratch_ptr| {
            // SAFETY: the caller's pointers, and this thread's scratch for the call.
            unsafe { self.execute_with(&p, (src, wei), (bias, dst), scratch_ptr, key.threads) }
        })
    }

    /// [`Self::execute`] on the primitive `p`, with its scratch memory at `scratch_ptr`.
    ///
    /// # Safety
    /// As [`Self::execute`]; `scratch_ptr` holds `p.scratch_bytes` (or is null when 0).
    unsafe fn execute_with(
        &self,
        p: &Primitive,
        (src, wei): (*const c_void, *const c_void),
        (bias, dst): (*const f32, *mut c_void),
        scratch_ptr: *mut c_void,
        threads: usize,
    ) -> std::result::Result<(), String> {
        let api = &self.api;
        set_threads(api, threads);
        let mut mems: Vec<ExecArg> = Vec::with_capacity(5);
        let mut result = Ok(());
        for (arg, md, ptr) in [
            (ARG_SRC, p.src, src as *mut c_void),
            (ARG_WEIGHTS, p.wei, wei as *mut c_void),
            (ARG_BIAS, p.bias, bias as *mut c_void),
            (ARG_DST, p.dst, dst),
            (ARG_SCRATCHPAD, p.scratch, scratch_ptr),
        ] {
            if md.is_null() || ptr.is_null() {
                continue;
            }
            let mut mem: Handle = std::ptr::null_mut();
            result = status(
                "memory",
                (api.memory_create)(&mut mem, md, self.engine, ptr),
            );
            if result.is_err() {
                break;
            }
            mems.push(ExecArg { arg, memory: mem });
        }
        if result.is_ok() {
            let mut stream: Handle = std::ptr::null_mut();
            result = status(
                "stream",
                (api.stream_create)(&mut stream, self.engine, STREAM_IN_ORDER),
            );
            if result.is_ok() {
                result = status(
                    "matmul",
                    (api.primitive_execute)(p.prim, stream, mems.len() as c_int, mems.as_ptr()),
                )
                .and_then(|_| status("matmul", (api.stream_wait)(stream)));
                (api.stream_destroy)(stream);
            }
        }
        for m in mems {
            (api.memory_destroy)(m.memory);
        }
        result
    }
}

/// Keeps `p` as `key`'s primitive (a run has a few shapes; a server may see many: the map starts
/// over past a bound).
fn keep(map: &mut std::collections::HashMap<Key, Arc<Primitive>>, key: Key, p: Arc<Primitive>) {
    if map.len() >= 256 && !map.contains_key(&key) {
        map.clear();
    }
    map.entry(key).or_insert(p);
}

/// The name of the implementation oneDNN chose for the descriptor `pd` (empty if it gives none).
///
/// # Safety
/// `pd` is a live primitive descriptor of `api`'s library.
unsafe fn impl_info(api: &Api, pd: Handle) -> String {
    let mut info: *const c_char = std::ptr::null();
    // SAFETY: the implementation's name, a C string owned by the descriptor.
    unsafe {
        let asked = (api.pd_query)(
            pd,
            QUERY_IMPL_INFO_STR,
            0,
            &mut info as *mut _ as *mut c_void,
        );
        match asked == 0 && !info.is_null() {
            true => CStr::from_ptr(info).to_string_lossy().into_owned(),
            false => String::new(),
        }
    }
}

/// Sets OpenMP's thread count for this thread's next parallel regions (oneDNN's, where it runs
/// on OpenMP) to `threads` (at least 1).
pub(super) fn set_threads(api: &Api, threads: usize) {
    if let Some(set) = api.omp_set_num_threads {
        // SAFETY: OpenMP's setter, any positive count.
        unsafe { set(threads.max(1) as c_int) };
    }
}

/// Sets the attribute `attr`'s post-ops to one tanh GELU.
///
/// # Safety
/// `attr` is a live attribute of `api`'s library.
unsafe fn gelu_post_op(api: &Api, attr: Handle) -> std::result::Result<(), String> {
    let mut ops: Handle = std::ptr::null_mut();
    // SAFETY: an out-pointer for the post-ops, destroyed below (the attribute keeps a copy).
    unsafe {
        status("post-ops", (api.post_ops_create)(&mut ops))?;
        let r = status(
            "GELU post-op",
            (api.post_ops_append_eltwise)(ops, ELTWISE_GELU_TANH, 0.0, 0.0),
        )
        .and_then(|_| status("post-ops", (api.attr_set_post_ops)(attr, ops)));
        (api.post_ops_destroy)(ops);
        r
    }
}
