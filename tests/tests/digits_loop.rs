//! The runner reproduces every run of `trained/digits_loop` (a trained Wan-architecture digit
//! generator, batch of 10, decisions per call for the whole batch).

use magcache_tests::{check_reference_run, weights_of};

fn check_run(name: &str) {
    check_reference_run(
        "wan2.1",
        &weights_of("trained/digits_wan"),
        "trained/digits_loop",
        name,
    );
}

#[test]
fn dense() {
    check_run("dense");
}
#[test]
fn magcache_slow() {
    check_run("magcache_slow");
}
#[test]
fn magcache_fast() {
    check_run("magcache_fast");
}
#[test]
fn fbcache_slow() {
    check_run("fbcache_slow");
}
#[test]
fn fbcache_fast() {
    check_run("fbcache_fast");
}
