//! oneDNN 3.x's C API, as much of it as [`super`] uses: constants of `dnnl_types.h`, the
//! functions resolved from the opened library, and its status codes as messages.

use std::ffi::{c_char, c_int, c_void};

pub(super) type Handle = *mut c_void;
/// `dnnl_dims_t`: `DNNL_MAX_NDIMS` (12) dimensions.
pub(super) type Dims = [i64; 12];

#[repr(C)]
pub(super) struct ExecArg {
    pub(super) arg: c_int,
    pub(super) memory: Handle,
}

#[repr(C)]
pub(super) struct Version {
    pub(super) major: c_int,
    pub(super) minor: c_int,
    pub(super) patch: c_int,
    hash: *const c_char,
    cpu_runtime: u32,
    gpu_runtime: u32,
}

// oneDNN 3.x C API constants (dnnl_types.h).
pub(super) const ENGINE_CPU: c_int = 1;
pub(super) const STREAM_IN_ORDER: u32 = 1;
pub(super) const DT_BF16: c_int = 2;
pub(super) const DT_F32: c_int = 3;
pub(super) const ARG_SRC: c_int = 1;
pub(super) const ARG_DST: c_int = 17;
pub(super) const ARG_WEIGHTS: c_int = 33;
pub(super) const ARG_BIAS: c_int = 41;
pub(super) const QUERY_IMPL_INFO_STR: c_int = 8;
pub(super) const QUERY_SCRATCHPAD_MD: c_int = 136;
pub(super) const QUERY_WEIGHTS_MD: c_int = 131;
/// `dnnl_format_tag_any`: the primitive chooses the layout.
pub(super) const FORMAT_TAG_ANY: c_int = 1;
pub(super) const ARG_SCRATCHPAD: c_int = 80;
/// `dnnl_scratchpad_mode_user`: the caller passes each execution's scratch memory.
pub(super) const SCRATCHPAD_MODE_USER: c_int = 1;
/// `dnnl_eltwise_gelu_tanh`: GELU with the tanh approximation (`alg_kind`, an ABI constant of 3.x).
pub(super) const ELTWISE_GELU_TANH: c_int = 0x2b;
/// `dnnl_cpu_isa_avx512_core_amx` (`avx10_1_512_amx`): the bits an AMX CPU's ISA has.
pub(super) const ISA_AMX: u32 = 0xfef;

/// The C functions used, resolved once.
pub(super) struct Api {
    pub(super) engine_create: unsafe extern "C" fn(*mut Handle, c_int, usize) -> c_int,
    pub(super) engine_destroy: unsafe extern "C" fn(Handle) -> c_int,
    pub(super) attr_create: unsafe extern "C" fn(*mut Handle) -> c_int,
    pub(super) attr_destroy: unsafe extern "C" fn(Handle) -> c_int,
    pub(super) attr_set_scratchpad_mode: unsafe extern "C" fn(Handle, c_int) -> c_int,
    pub(super) attr_set_post_ops: unsafe extern "C" fn(Handle, Handle) -> c_int,
    pub(super) post_ops_create: unsafe extern "C" fn(*mut Handle) -> c_int,
    pub(super) post_ops_destroy: unsafe extern "C" fn(Handle) -> c_int,
    pub(super) post_ops_append_eltwise: unsafe extern "C" fn(Handle, c_int, f32, f32) -> c_int,
    pub(super) pd_query_md: unsafe extern "C" fn(Handle, c_int, c_int) -> Handle,
    pub(super) md_get_size: unsafe extern "C" fn(Handle) -> usize,
    pub(super) stream_create: unsafe extern "C" fn(*mut Handle, Handle, u32) -> c_int,
    pub(super) stream_wait: unsafe extern "C" fn(Handle) -> c_int,
    pub(super) stream_destroy: unsafe extern "C" fn(Handle) -> c_int,
    pub(super) md_create:
        unsafe extern "C" fn(*mut Handle, c_int, *const i64, c_int, *const i64) -> c_int,
    pub(super) md_destroy: unsafe extern "C" fn(Handle) -> c_int,
    pub(super) md_create_with_tag:
        unsafe extern "C" fn(*mut Handle, c_int, *const i64, c_int, c_int) -> c_int,
    pub(super) md_clone: unsafe extern "C" fn(*mut Handle, Handle) -> c_int,
    pub(super) md_equal: unsafe extern "C" fn(Handle, Handle) -> c_int,
    pub(super) reorder_pd_create:
        unsafe extern "C" fn(*mut Handle, Handle, Handle, Handle, Handle, Handle) -> c_int,
    pub(super) matmul_pd_create:
        unsafe extern "C" fn(*mut Handle, Handle, Handle, Handle, Handle, Handle, Handle) -> c_int,
    pub(super) pd_query: unsafe extern "C" fn(Handle, c_int, c_int, *mut c_void) -> c_int,
    pub(super) pd_destroy: unsafe extern "C" fn(Handle) -> c_int,
    pub(super) primitive_create: unsafe extern "C" fn(*mut Handle, Handle) -> c_int,
    pub(super) primitive_destroy: unsafe extern "C" fn(Handle) -> c_int,
    pub(super) primitive_execute:
        unsafe extern "C" fn(Handle, Handle, c_int, *const ExecArg) -> c_int,
    pub(super) memory_create:
        unsafe extern "C" fn(*mut Handle, Handle, Handle, *mut c_void) -> c_int,
    pub(super) memory_destroy: unsafe extern "C" fn(Handle) -> c_int,
    /// OpenMP's, where the library runs on it (the gomp and iomp builds).
    pub(super) omp_set_num_threads: Option<unsafe extern "C" fn(c_int)>,
    /// OpenMP's thread count for this thread's next parallel region: what oneDNN reads when it
    /// builds a primitive (and keeps for its executions).
    pub(super) omp_get_max_threads: Option<unsafe extern "C" fn() -> c_int>,
}

/// The C function `dnnl_version`'s type.
pub(super) type VersionFn = unsafe extern "C" fn() -> *const Version;
/// The C function `dnnl_get_effective_cpu_isa`'s type.
pub(super) type IsaFn = unsafe extern "C" fn() -> u32;

impl Api {
    /// Opens `spec` and resolves the functions: an error names the first one missing.
    pub(super) fn load(spec: &str) -> Result<(libloading::Library, Api, VersionFn, IsaFn), String> {
        // SAFETY: loading a library runs its initialisers; the user named it as oneDNN.
        let lib = unsafe { libloading::Library::new(spec) }
            .map_err(|e| format!("cannot open it as a library ({e})"))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol's type is oneDNN 3.x's C signature for that name.
                *unsafe { lib.get($name) }.map_err(|e| {
                    format!(
                        "not oneDNN 3.x: no `{}` ({e})",
                        String::from_utf8_lossy(&$name[..$name.len() - 1])
                    )
                })?
            };
        }
        let version_fn: VersionFn = sym!(b"dnnl_version\0");
        let isa_fn: IsaFn = sym!(b"dnnl_get_effective_cpu_isa\0");
        let api = Api {
            engine_create: sym!(b"dnnl_engine_create\0"),
            engine_destroy: sym!(b"dnnl_engine_destroy\0"),
            attr_create: sym!(b"dnnl_primitive_attr_create\0"),
            attr_destroy: sym!(b"dnnl_primitive_attr_destroy\0"),
            attr_set_scratchpad_mode: sym!(b"dnnl_primitive_attr_set_scratchpad_mode\0"),
            attr_set_post_ops: sym!(b"dnnl_primitive_attr_set_post_ops\0"),
            post_ops_create: sym!(b"dnnl_post_ops_create\0"),
            post_ops_destroy: sym!(b"dnnl_post_ops_destroy\0"),
            post_ops_append_eltwise: sym!(b"dnnl_post_ops_append_eltwise\0"),
            pd_query_md: sym!(b"dnnl_primitive_desc_query_md\0"),
            md_get_size: sym!(b"dnnl_memory_desc_get_size\0"),
            stream_create: sym!(b"dnnl_stream_create\0"),
            stream_wait: sym!(b"dnnl_stream_wait\0"),
            stream_destroy: sym!(b"dnnl_stream_destroy\0"),
            md_create: sym!(b"dnnl_memory_desc_create_with_strides\0"),
            md_destroy: sym!(b"dnnl_memory_desc_destroy\0"),
            md_create_with_tag: sym!(b"dnnl_memory_desc_create_with_tag\0"),
            md_clone: sym!(b"dnnl_memory_desc_clone\0"),
            md_equal: sym!(b"dnnl_memory_desc_equal\0"),
            reorder_pd_create: sym!(b"dnnl_reorder_primitive_desc_create\0"),
            matmul_pd_create: sym!(b"dnnl_matmul_primitive_desc_create\0"),
            pd_query: sym!(b"dnnl_primitive_desc_query\0"),
            pd_destroy: sym!(b"dnnl_primitive_desc_destroy\0"),
            primitive_create: sym!(b"dnnl_primitive_create\0"),
            primitive_destroy: sym!(b"dnnl_primitive_destroy\0"),
            primitive_execute: sym!(b"dnnl_primitive_execute\0"),
            memory_create: sym!(b"dnnl_memory_create\0"),
            memory_destroy: sym!(b"dnnl_memory_destroy\0"),
            // SAFETY: OpenMP's `void omp_set_num_threads(int)`, found among the library's own
            // dependencies where it runs on OpenMP.
            omp_set_num_threads: unsafe { lib.get(b"omp_set_num_threads\0") }
                .ok()
                .map(|f| *f),
            // SAFETY: OpenMP's `int omp_get_max_threads(void)`, as above.
            omp_get_max_threads: unsafe { lib.get(b"omp_get_max_threads\0") }
                .ok()
                .map(|f| *f),
        };
        Ok((lib, api, version_fn, isa_fn))
    }
}

/// `Ok` for `dnnl_success`, else a message naming `what` and the status.
pub(super) fn status(what: &str, s: c_int) -> std::result::Result<(), String> {
    if s == 0 {
        return Ok(());
    }
    let name = match s {
        1 => "out of memory",
        2 => "invalid arguments",
        3 => "unimplemented on this CPU",
        5 => "runtime error",
        _ => "failed",
    };
    Err(format!("oneDNN {what}: {name} (status {s})"))
}

/// The name of a `dnnl_cpu_isa_t` value (3.x), or the value in hex.
pub(super) fn isa_name(isa: u32) -> String {
    const NAMES: [(u32, &str); 11] = [
        (0x1, "sse41"),
        (0x3, "avx"),
        (0x7, "avx2"),
        (0xf, "avx2_vnni"),
        (0x1f, "avx2_vnni_2"),
        (0x27, "avx512_core"),
        (0x67, "avx512_core_vnni"),
        (0xe7, "avx512_core_bf16"),
        (0x1ef, "avx512_core_fp16"),
        (0xfef, "avx512_core_amx"),
        (0x1fef, "avx512_core_amx_fp16"),
    ];
    NAMES
        .iter()
        .find(|(v, _)| *v == isa)
        .map_or_else(|| format!("{isa:#x}"), |(_, n)| n.to_string())
}

/// A plain 2-D memory descriptor with the given strides (elements).
pub(super) fn memory_desc(
    api: &Api,
    rows: usize,
    cols: usize,
    strides: [usize; 2],
    dt: c_int,
) -> std::result::Result<Handle, String> {
    let mut dims: Dims = [0; 12];
    let mut st: Dims = [0; 12];
    (dims[0], dims[1]) = (rows as i64, cols as i64);
    (st[0], st[1]) = (strides[0] as i64, strides[1] as i64);
    let mut h: Handle = std::ptr::null_mut();
    // SAFETY: dims and strides hold 12 entries, 2 used.
    status("memory descriptor", unsafe {
        (api.md_create)(&mut h, 2, dims.as_ptr(), dt, st.as_ptr())
    })
    .map(|_| h)
}
