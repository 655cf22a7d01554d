//! A one-block Wan model carries the head and the tail hook on the same block and caches correctly.

use magcache_tests::{max_abs_diff, run_toml};

fn toml(cache: &str) -> String {
    format!(
        r#"[model]
family = "wan2.1"
preset = "wan2.1-t2v-1.3b"
seed = 3
[model.overrides]
num_layers = 1
num_attention_heads = 2
attention_head_dim = 16
ffn_dim = 32
text_dim = 16
freq_dim = 32
in_channels = 4
out_channels = 4
[inputs]
latent_shape = [1, 4, 2, 8, 8]
text_len = 5
[sampling]
steps = 8
shift = 3.0
guidance_scale = 4.0
[cache]
{cache}"#
    )
}

#[test]
fn fbcache_on_one_block_equals_dense_and_reuses() {
    let dir = tempfile::tempdir().unwrap();
    let (dense, _) = run_toml(dir.path(), &toml("strategy = \"none\"\n"));
    let (fb, rep) = run_toml(
        dir.path(),
        &toml("strategy = \"fbcache\"\nthreshold = 1000.0\n"),
    );
    // Everything after the first call of each branch is "reused", with a zero residual: exact.
    assert_eq!(rep.computed_calls, 2);
    assert!(max_abs_diff(&dense, &fb) < 1e-6);
}

#[test]
fn magcache_on_one_block_reuses_and_matches_dense_when_it_never_skips() {
    let dir = tempfile::tempdir().unwrap();
    let (dense, _) = run_toml(dir.path(), &toml("strategy = \"none\"\n"));
    let never = "strategy = \"magcache\"\nthreshold = 0.0\nmax_skip_steps = 2\nretention_ratio = 0.2\nmag_ratios = [0.9]\n";
    let (m0, rep0) = run_toml(dir.path(), &toml(never));
    assert_eq!(rep0.computed_calls, rep0.total_calls);
    assert!(max_abs_diff(&dense, &m0) < 1e-6);
    let often = "strategy = \"magcache\"\nthreshold = 0.5\nmax_skip_steps = 2\nretention_ratio = 0.2\nmag_ratios = [1.0, 0.99]\n";
    let (m1, rep1) = run_toml(dir.path(), &toml(often));
    assert!(rep1.computed_calls < rep1.total_calls, "no call was reused");
    // Reuse changes the result (a cached residual stands in for the block), and nothing blows up.
    let d = max_abs_diff(&dense, &m1);
    assert!(d > 0.0 && d.is_finite(), "difference {d}");
    // Both branches reuse on the same steps (same curve), each counted in its own scope.
    for s in &rep1.scopes {
        assert_eq!(s.calls, 8);
        assert!(s.longest_reuse_run <= 2);
    }
}
