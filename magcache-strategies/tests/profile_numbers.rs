//! A calibration profile whose numbers were edited by hand (or damaged) is refused naming its
//! table, never read as another schedule: every measured number finite and in its range, every
//! call index of the forecast tables a call of the calibration, in its order.

use magcache_strategies::profile::Profile;
use std::path::Path;

/// The committed digits profile with its first `from` replaced by `to` (which must occur).
fn edited(from: &str, to: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/profiles/digits_3x.toml");
    let text = std::fs::read_to_string(src).unwrap();
    assert!(text.contains(from), "the profile holds {from:?}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.profile.toml");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    (dir, path)
}

#[test]
fn the_committed_profile_loads() {
    let (_d, p) = edited("[meta]", "[meta]");
    Profile::load(&p).unwrap();
}

#[test]
fn bad_numbers_are_refused_naming_the_table() {
    let cases = [
        // (what, from, to, the key the error names)
        (
            "a NaN error",
            "[[0.0, 1.0, 0.09236369246532784]",
            "[[0.0, 1.0, nan]",
            "forecast_errors.main.cond.reuse",
        ),
        (
            "a negative error",
            "reuse = [[0.0, 1.0, 0.",
            "reuse = [[0.0, 1.0, -0.",
            "forecast_errors.main.cond.reuse",
        ),
        (
            "a call past the steps",
            "reuse = [[0.0, 1.0,",
            "reuse = [[0.0, 1e300,",
            "forecast_errors.main.cond.reuse",
        ),
        (
            "a negative call",
            "reuse = [[0.0, 1.0,",
            "reuse = [[-5.0, 1.0,",
            "forecast_errors.main.cond.reuse",
        ),
        (
            "a fractional call",
            "reuse = [[0.0, 1.0,",
            "reuse = [[0.5, 1.0,",
            "forecast_errors.main.cond.reuse",
        ),
        (
            "a NaN call",
            "reuse = [[0.0, 1.0,",
            "reuse = [[nan, 1.0,",
            "forecast_errors.main.cond.reuse",
        ),
        (
            "calls out of order",
            "reuse = [[0.0, 1.0,",
            "reuse = [[1.0, 0.0,",
            "forecast_errors.main.cond.reuse",
        ),
        (
            "taylor1 out of order",
            "taylor1 = [[0.0, 1.0, 2.0,",
            "taylor1 = [[1.0, 1.0, 2.0,",
            "forecast_errors.main.cond.taylor1",
        ),
        (
            "a NaN dot product",
            "[[0.0, 0.0, 112933.34713513152]",
            "[[0.0, 0.0, nan]",
            "forecast_errors.main.cond.gram",
        ),
        (
            "a negative square",
            "gram = [[0.0, 0.0, 1",
            "gram = [[0.0, 0.0, -1",
            "forecast_errors.main.cond.gram",
        ),
        (
            "a huge gram call",
            "gram = [[0.0, 0.0,",
            "gram = [[0.0, 1e18,",
            "forecast_errors.main.cond.gram",
        ),
        (
            "a cross call past the steps",
            "cross = [[0.0, 1.0,",
            "cross = [[0.0, 20.0,",
            "forecast_errors.main.cond.cross",
        ),
        ("a NaN sigma", "main = [1.0,", "main = [nan,", "sigmas.main"),
        (
            "a NaN meta sigma",
            "sigmas = [1.0,",
            "sigmas = [nan,",
            "meta.sigmas",
        ),
        (
            "a NaN std",
            "cond = [0.0, 0.006",
            "cond = [nan, 0.006",
            "mag_stds.main.cond",
        ),
        (
            "an infinite cosine distance",
            "cond = [0.0, 0.0026",
            "cond = [inf, 0.0026",
            "cos_dists.main.cond",
        ),
    ];
    for (what, from, to, key) in cases {
        let (_d, p) = edited(from, to);
        let e = match Profile::load(&p) {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("p.profile.toml") && e.contains(key) && !e.contains('\n'),
            "{what}: {e}"
        );
    }
}

#[test]
fn a_fitted_call_combining_a_later_call_is_refused() {
    let (_d, p) = edited("step = 1\nfrom = [0]", "step = 1\nfrom = [6]");
    let e = match Profile::load(&p) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("p.profile.toml") && e.contains("fitted.calls.main") && e.contains("[6]"),
        "{e}"
    );
}

/// What a calibration itself writes is read back: a cosine distance a hair below 0 (the cosine
/// of two equal residuals rounds above 1) and an infinite error over a zero residual.
#[test]
fn rounding_and_zero_residuals_load() {
    for (from, to) in [
        ("cond = [0.0, 0.0026", "cond = [-1.2e-7, 0.0026"),
        ("[[0.0, 1.0, 0.09236369246532784]", "[[0.0, 1.0, inf]"),
    ] {
        let (_d, p) = edited(from, to);
        assert!(
            Profile::load(&p).is_ok(),
            "{to}: {:?}",
            Profile::load(&p).err()
        );
    }
}
