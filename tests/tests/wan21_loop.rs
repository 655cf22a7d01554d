//! The runner reproduces every run of the reference `wan21_tiny_loop` (diffusers): per-call decisions
//! identical, final latents within 1e-3.

use magcache_tests::{check_reference_run, weights_of};

fn check_run(name: &str) {
    check_reference_run(
        "wan2.1",
        &weights_of("reference/wan21_tiny"),
        "reference/wan21_tiny_loop",
        name,
    );
}

#[test]
fn teacache_a() {
    check_run("teacache_a");
}
#[test]
fn teacache_b() {
    check_run("teacache_b");
}
#[test]
fn teacache_ret_steps() {
    check_run("teacache_ret");
}
#[test]
fn dense() {
    check_run("dense");
}
#[test]
fn magcache_a() {
    check_run("magcache_a");
}
#[test]
fn magcache_b() {
    check_run("magcache_b");
}
#[test]
fn magcache_c() {
    check_run("magcache_c");
}
#[test]
fn fbcache_a() {
    check_run("fbcache_a");
}
#[test]
fn fbcache_b() {
    check_run("fbcache_b");
}
