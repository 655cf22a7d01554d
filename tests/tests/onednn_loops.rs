//! The reference loops with the linear layers' products on oneDNN (`MAGCACHE_ONEDNN`, issue 45):
//! per-call decisions identical, final latents within the reference's 1e-3, as on candle's
//! kernels; and in bf16, every loop within the bf16 tolerances on oneDNN's bf16 products (the
//! path of CPUs with AMX, forced here where the library implements bf16). The library comes from `MAGCACHE_TEST_ONEDNN` (or `MAGCACHE_ONEDNN`; `.ci/run`
//! installs `onednn-cpu-gomp` and sets it); without one these tests print a note and test nothing.
//! Their own binary: the library chosen is the process's.

use magcache_layers::nn::onednn::{self, State};
use magcache_tests::{check_reference_run, weights_of};

/// Opens the library; `None` (with a note) when none is named. bf16 weights run their products
/// on it wherever it implements them (`MAGCACHE_ONEDNN_BF16=on`, set once before it opens, while
/// every other test of this binary waits): the path of CPUs with AMX, on this one. The attention
/// takes its queries 16 at a time (`MAGCACHE_ONEDNN_QUERY_ROWS=16`) and its keys 32 at a time
/// (`MAGCACHE_ONEDNN_KEY_ROWS=32`, the softmax carried across the blocks): the tiny models'
/// sequences then span several blocks of each, and past two blocks of queries the keys and
/// values are packed, as at real sizes (by default one block would hold them whole).
fn library() -> Option<&'static onednn::OneDnn> {
    let spec = std::env::var("MAGCACHE_TEST_ONEDNN")
        .or_else(|_| std::env::var(onednn::ENV))
        .ok();
    let Some(spec) = spec else {
        eprintln!("note: no oneDNN named (MAGCACHE_TEST_ONEDNN or MAGCACHE_ONEDNN): the loops on oneDNN are not tested");
        return None;
    };
    static OPEN: std::sync::Once = std::sync::Once::new();
    OPEN.call_once(|| {
        std::env::set_var(onednn::BF16_ENV, "on");
        std::env::set_var(onednn::QUERY_ROWS_ENV, "16");
        std::env::set_var(onednn::KEY_ROWS_ENV, "32");
        onednn::init(Some(&spec));
    });
    match onednn::init(Some(&spec)) {
        State::Loaded(d) => Some(d),
        State::Failed(e) => panic!("{e}"),
        State::Off => None,
    }
}

/// Held by each test while it runs: the products counted before and after are its own.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn check(family: &str, model: &str, name: &str) {
    let Some(d) = library() else { return };
    let _one = one_at_a_time();
    let before = d.products();
    check_reference_run(
        family,
        &weights_of(&format!("reference/{model}")),
        &format!("reference/{model}_loop"),
        name,
    );
    assert!(d.products() > before, "no product ran on oneDNN");
}

#[test]
fn wan21_dense() {
    check("wan2.1", "wan21_tiny", "dense");
}
#[test]
fn wan21_magcache() {
    check("wan2.1", "wan21_tiny", "magcache_a");
}
#[test]
fn wan21_fbcache() {
    check("wan2.1", "wan21_tiny", "fbcache_a");
}
#[test]
fn wan21_teacache() {
    check("wan2.1", "wan21_tiny", "teacache_a");
}
#[test]
fn flux_dense() {
    check("flux", "flux_tiny", "dense");
}
#[test]
fn flux_teacache() {
    check("flux", "flux_tiny", "teacache_a");
}

/// The library when it implements a bf16 product here (AMX, AVX512-BF16, or AVX-512's emulation),
/// which `MAGCACHE_ONEDNN_BF16=on` then runs bf16 weights on; `None`, with a note, elsewhere.
fn bf16_library() -> Option<&'static onednn::OneDnn> {
    let d = library()?;
    if !d.bf16_implemented() {
        eprintln!("note: oneDNN implements no bf16 product on this CPU: the bf16 loops on oneDNN are not tested");
        return None;
    }
    assert!(
        d.bf16_products(),
        "MAGCACHE_ONEDNN_BF16=on did not turn bf16 products on"
    );
    assert!(
        d.describe().contains("MAGCACHE_ONEDNN_BF16=on"),
        "{}",
        d.describe()
    );
    Some(d)
}

/// [`magcache_tests::check_bf16_loops`] with `model_extra`, alone, and at least one linear layer's
/// bf16 product on oneDNN.
fn bf16_loops_on(d: &onednn::OneDnn, model_extra: &str) {
    let _one = one_at_a_time();
    let before = d.bf16_linear_products();
    magcache_tests::check_bf16_loops(model_extra);
    let ran = d.bf16_linear_products() - before;
    assert!(
        ran > 0,
        "{model_extra}: no linear layer's bf16 product ran on oneDNN"
    );
}

/// bf16 weights on oneDNN's bf16 products and attention: every reference loop with the f32 run's
/// decisions where the margins allow, its final within the bf16 tolerance of the f32 one.
#[test]
fn bf16_weights_run_every_loop_on_onednn() {
    let Some(d) = bf16_library() else { return };
    bf16_loops_on(d, "dtype = \"bf16\"\n");
}

/// `matmul_precision = "bf16"` with f32 weights: where oneDNN runs bf16 products, the weights
/// rounded to bf16 run there, with the same tolerances (the key needs AVX512-BF16 on the CPU).
#[test]
fn f32_weights_with_bf16_products_run_every_loop_on_onednn() {
    let Some(d) = bf16_library() else { return };
    if !magcache_layers::nn::bf16_gemm::cpu_has_bf16() {
        eprintln!("note: no AVX512-BF16 here: matmul_precision = \"bf16\" is refused, not tested on oneDNN");
        return;
    }
    bf16_loops_on(d, "matmul_precision = \"bf16\"\n");
}
