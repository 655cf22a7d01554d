//! `magcache tune` on the trained digits model (two digits, 10 steps, CFG: small enough for a debug
//! build): the run file it writes reaches the PSNR target on noise and digits it was not tuned on,
//! within 1 dB; a speedup target is met exactly. With two digits a setting's PSNR varies by up to
//! 7 dB between inputs, so the test asks for a 7 dB margin on the tuning inputs (`--margin`).

mod common;

use common::{magcache, s};
use std::path::Path;

fn digits_run(dir: &Path, name: &str, seed: u64, classes: &str) -> std::path::PathBuf {
    let weights =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/trained/digits_wan");
    let text = format!(
        "[model]\nfamily = \"wan2.1\"\nweights = {:?}\n\n[inputs]\nclasses = {classes}\nlatent_shape = [2, 1, 1, 16, 16]\nseed = {seed}\n\n[sampling]\nsteps = 10\nshift = 3.0\nguidance_scale = 4.0\n",
        weights.display().to_string()
    );
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// PSNR of `run`'s `[cache]` against its dense run, through `magcache compare`.
fn psnr(run: &Path) -> (f64, usize, usize) {
    let o = magcache(&[
        "compare",
        "--config",
        s(run),
        "--data-range",
        "2",
        "--json",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    (
        j["quality"]["psnr_db"].as_f64().unwrap(),
        j["cached_computed_calls"].as_u64().unwrap() as usize,
        j["total_calls"].as_u64().unwrap() as usize,
    )
}

/// `held`'s inputs with the `[cache]` of the tuned run file `tuned`.
fn with_cache_of(tuned: &Path, held: &Path) -> std::path::PathBuf {
    let t = std::fs::read_to_string(tuned).unwrap();
    let cache = &t[t.find("[cache]").unwrap()..];
    let out = tuned.with_file_name("held_tuned.toml");
    std::fs::write(
        &out,
        format!("{}\n{cache}", std::fs::read_to_string(held).unwrap()),
    )
    .unwrap();
    out
}

#[test]
fn tuned_run_keeps_the_psnr_target_on_held_out_noise() {
    let dir = tempfile::tempdir().unwrap();
    let run = digits_run(dir.path(), "run.toml", 0, "[2, 7]");
    let out = dir.path().join("tuned.toml");
    let target = 36.0;
    let o = magcache(&[
        "tune",
        "--config",
        s(&run),
        "--out",
        s(&out),
        "--target-psnr",
        "36",
        "--data-range",
        "2",
        "--runs",
        "12",
        "--margin",
        "7",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("<- chosen"), "{stdout}");
    assert!(dir.path().join("tuned.profile.toml").is_file());
    // The written run file runs as it is, with fewer calls than dense.
    let (p0, computed, total) = psnr(&out);
    assert!(computed < total, "{computed}/{total}");
    assert!(p0 >= target, "{p0} on the tuning noise");
    // Other noise, other digits.
    for (seed, classes) in [(5, "[4, 1]"), (9, "[0, 8]")] {
        let held = digits_run(dir.path(), &format!("held{seed}.toml"), seed, classes);
        let (p, c, _) = psnr(&with_cache_of(&out, &held));
        assert_eq!(c, computed);
        assert!(
            p >= target - 1.0,
            "seed {seed}: {p:.2} dB for a {target} dB target"
        );
    }
}

#[test]
fn speedup_target_sets_the_computed_calls() {
    let dir = tempfile::tempdir().unwrap();
    let run = digits_run(dir.path(), "run.toml", 0, "[3, 6]");
    let out = dir.path().join("fast.toml");
    let o = magcache(&[
        "tune",
        "--config",
        s(&run),
        "--out",
        s(&out),
        "--target-speedup",
        "2.5",
        "--runs",
        "4",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, computed, total) = psnr(&out);
    assert_eq!((computed, total), (8, 20));
    // Neither target, or both: one line naming the flags.
    let o = magcache(&["tune", "--config", s(&run), "--out", s(&out)]);
    common::check_err(&o, &["--target-psnr", "--target-speedup"]);
}
