//! The reference loops with the linear layers' products on oneDNN (`MAGCACHE_ONEDNN`, issue 45):
//! per-call decisions identical, final latents within the reference's 1e-3, as on candle's
//! kernels. The library comes from `MAGCACHE_TEST_ONEDNN` (or `MAGCACHE_ONEDNN`; `.ci/run`
//! installs `onednn-cpu-gomp` and sets it); without one these tests print a note and test nothing.
//! Their own binary: the library chosen is the process's.

use magcache_layers::nn::onednn::{self, State};
use magcache_tests::{check_reference_run, weights_of};

/// Opens the library; `None` (with a note) when none is named.
fn library() -> Option<&'static onednn::OneDnn> {
    let spec = std::env::var("MAGCACHE_TEST_ONEDNN")
        .or_else(|_| std::env::var(onednn::ENV))
        .ok();
    let Some(spec) = spec else {
        eprintln!("note: no oneDNN named (MAGCACHE_TEST_ONEDNN or MAGCACHE_ONEDNN): the loops on oneDNN are not tested");
        return None;
    };
    match onednn::init(Some(&spec)) {
        State::Loaded(d) => Some(d),
        State::Failed(e) => panic!("{e}"),
        State::Off => None,
    }
}

fn check(family: &str, model: &str, name: &str) {
    let Some(d) = library() else { return };
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
