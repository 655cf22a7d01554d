//! `estimator = "fitted"` and `magcache calibrate --fit` on the trained digits model (two digits,
//! 10 steps, CFG: small enough for a debug build): zero iterations leave the order-1 forecast in
//! sigma; a fit never ends worse than its start on the calibration batch, nor on the held-out
//! slice; the profile runs the schedule it was fitted for and refuses any other.

mod common;

use common::{check_err, magcache, s};
use std::path::{Path, PathBuf};

const SCHEDULE: &str = "0,3,6,8";

fn digits_run(dir: &Path, name: &str, cache: &str) -> PathBuf {
    let weights =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/trained/digits_wan");
    let text = format!(
        "[model]\nfamily = \"wan2.1\"\nweights = {:?}\n\n[inputs]\nclasses = [2, 7]\nlatent_shape = [2, 1, 1, 16, 16]\nseed = 3\n\n[sampling]\nsteps = 10\nshift = 3.0\nguidance_scale = 4.0\n{cache}",
        weights.display().to_string()
    );
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `calibrate --fit` of `run` for [`SCHEDULE`] with `iterations`; returns the profile's TOML.
fn fit(run: &Path, out: &Path, iterations: usize) -> toml::Table {
    fit_from(run, out, iterations, "sigma")
}

/// [`fit`] starting from the order-1 forecast in `axis`.
fn fit_from(run: &Path, out: &Path, iterations: usize, axis: &str) -> toml::Table {
    let it = iterations.to_string();
    let extra = ["--start-axis", axis, "--compute-steps", SCHEDULE];
    fit_with(run, out, &it, &extra)
}

/// `calibrate --fit` of `run` into `out` with `iterations` and the `extra` flags, on calibration
/// seeds 11 and 12 and validation seed 21; the written profile.
fn fit_with(run: &Path, out: &Path, iterations: &str, extra: &[&str]) -> toml::Table {
    let mut args = vec!["calibrate", "--config", s(run), "--out", s(out), "--fit"];
    args.extend_from_slice(&["--iterations", iterations, "--calibration-seeds", "11,12"]);
    args.extend_from_slice(&["--validation-seeds", "21", "--data-range", "2", "--quiet"]);
    args.extend_from_slice(extra);
    let o = magcache(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read_to_string(out).unwrap().parse().unwrap()
}

/// `magcache plan` of a digits run `name` in `dir` with the fitted `profile`: its stdout and
/// stderr (the plan must succeed).
fn plan_fitted(dir: &Path, name: &str, profile: &str) -> String {
    let cache = format!(
        "\n[cache]\nstrategy = \"schedule\"\nestimator = \"fitted\"\nprofile = {profile:?}\n"
    );
    let run = digits_run(dir, name, &cache);
    let plan = magcache(&["plan", "--config", s(&run)]);
    let text =
        String::from_utf8_lossy(&plan.stdout).to_string() + &String::from_utf8_lossy(&plan.stderr);
    assert!(plan.status.success(), "{text}");
    text
}

fn compare(run: &Path) -> serde_json::Value {
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
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `compare`'s PSNR of `run` and its computed calls; the batch's worst sample is reported, at or
/// below the batch's PSNR (its error is at least the mean).
fn psnr(run: &Path) -> (f64, serde_json::Value) {
    let j = compare(run);
    let (batch, worst) = (&j["quality"]["psnr_db"], &j["quality"]["worst_sample"]);
    let batch = batch.as_f64().unwrap();
    let of = worst["of"].as_u64().unwrap();
    assert!(of >= 2 && worst["index"].as_u64().unwrap() < of, "{j}");
    assert!(worst["psnr_db"].as_f64().unwrap() <= batch + 1e-9, "{j}");
    (batch, j["cached_computed_calls"].clone())
}

fn f64s(v: &toml::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| {
            x.as_float()
                .unwrap_or_else(|| x.as_integer().unwrap() as f64)
        })
        .collect()
}

#[test]
fn zero_iterations_are_the_order_1_forecast_in_sigma() {
    let dir = tempfile::tempdir().unwrap();
    let run = digits_run(dir.path(), "run.toml", "");
    let prof = fit(&run, &dir.path().join("p.toml"), 0);
    let sigmas = f64s(&prof["meta"]["sigmas"]);
    let fitted = &prof["fitted"];
    assert_eq!(fitted["best_iteration"].as_integer(), Some(0));
    let calls = fitted["calls"]["main"].as_array().unwrap();
    // Every call of 10 not in the schedule, each with the order-1 weights in sigma on every channel.
    assert_eq!(calls.len(), 10 - 4);
    for c in calls {
        let k = c["step"].as_integer().unwrap() as usize;
        let from: Vec<usize> = f64s(&c["from"]).iter().map(|&v| v as usize).collect();
        let rows: Vec<Vec<f64>> = c["weights"].as_array().unwrap().iter().map(f64s).collect();
        let want = match from.as_slice() {
            [_] => vec![1.0],
            [a, b] => {
                let q = (sigmas[k] - sigmas[*b]) / (sigmas[*b] - sigmas[*a]);
                vec![-q, 1.0 + q]
            }
            other => panic!("call {k} from {other:?}"),
        };
        assert_eq!(rows.len(), want.len());
        for (row, w) in rows.iter().zip(&want) {
            assert_eq!(row.len(), 128, "one coefficient per hidden channel");
            assert!(row.iter().all(|v| (v - w).abs() < 1e-6), "call {k}: {w}");
        }
    }
    // And the run with that profile is the order-1 forecast in sigma's run.
    let fitted_run = digits_run(
        dir.path(),
        "fitted.toml",
        "\n[cache]\nstrategy = \"schedule\"\nestimator = \"fitted\"\nprofile = \"p.toml\"\n",
    );
    let taylor_run = digits_run(
        dir.path(),
        "taylor.toml",
        "\n[cache]\nstrategy = \"schedule\"\ncompute_steps = [0, 3, 6, 8]\nestimator = \"taylor1\"\nestimator_axis = \"sigma\"\n",
    );
    let ((pa, ca), (pb, cb)) = (psnr(&fitted_run), psnr(&taylor_run));
    assert_eq!(ca, cb);
    assert!(
        (pa - pb).abs() < 1e-3,
        "fitted at zero iterations {pa} dB, taylor1 in sigma {pb} dB"
    );
}

#[test]
fn a_fit_never_ends_worse_than_its_start_and_runs_its_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let run = digits_run(dir.path(), "run.toml", "");
    let prof = fit(&run, &dir.path().join("p.toml"), 3);
    let f = &prof["fitted"];
    let cal = f64s(&f["calibration_error"]);
    let val = f64s(&f["validation_psnr_db"]);
    assert!(cal[1] <= cal[0], "calibration error {cal:?}");
    assert!(val[1] >= val[0], "validation PSNR {val:?}");
    assert_eq!(f64s(&f["calibration_seeds"]), vec![11.0, 12.0]);
    // The run computes exactly the fitted schedule's calls (both branches) and says where its
    // coefficients come from.
    let fitted_run = digits_run(
        dir.path(),
        "fitted.toml",
        "\n[cache]\nstrategy = \"schedule\"\nestimator = \"fitted\"\nprofile = \"p.toml\"\n",
    );
    let o = magcache(&["run", "--config", s(&fitted_run), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["computed_calls"].as_u64(), Some(8));
    // Where the coefficients come from is a note, not a warning.
    let notes = j["notes"].to_string();
    assert!(notes.contains("fitted estimator from"), "{notes}");
    let warnings = j["warnings"].to_string();
    assert!(!warnings.contains("fitted estimator from"), "{warnings}");
    let plan = magcache(&["plan", "--config", s(&fitted_run)]);
    let text =
        String::from_utf8_lossy(&plan.stdout).to_string() + &String::from_utf8_lossy(&plan.stderr);
    assert!(plan.status.success(), "{text}");
    assert!(text.contains("computes calls [0, 3, 6, 8] of 10"), "{text}");

    // Another schedule, another step count, another strategy: refused, naming the key.
    let other = digits_run(
        dir.path(),
        "other.toml",
        "\n[cache]\nstrategy = \"schedule\"\nestimator = \"fitted\"\nprofile = \"p.toml\"\ncompute_steps = [0, 4, 8]\n",
    );
    check_err(
        &magcache(&["run", "--config", s(&other)]),
        &["cache.compute_steps", "[0, 3, 6, 8]"],
    );
    let longer = std::fs::read_to_string(&fitted_run)
        .unwrap()
        .replace("steps = 10", "steps = 12");
    let longer_run = dir.path().join("longer.toml");
    std::fs::write(&longer_run, longer).unwrap();
    check_err(
        &magcache(&["run", "--config", s(&longer_run)]),
        &["10 calls", "12"],
    );
    let mag = digits_run(
        dir.path(),
        "mag.toml",
        "\n[cache]\nstrategy = \"magcache\"\nestimator = \"fitted\"\n",
    );
    check_err(
        &magcache(&["run", "--config", s(&mag)]),
        &["cache.estimator", "schedule"],
    );
}

#[test]
fn fit_arguments_are_checked_before_any_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = digits_run(dir.path(), "run.toml", "");
    let out = dir.path().join("p.toml");
    let fit_with = |extra: &[&str]| {
        let mut args = vec![
            "calibrate",
            "--config",
            s(&run),
            "--out",
            s(&out),
            "--fit",
            "--budget",
            "4",
        ];
        args.extend_from_slice(extra);
        magcache(&args)
    };
    check_err(
        &fit_with(&["--calibration-seeds", "5", "--validation-seeds", "5"]),
        &["seed 5"],
    );
    check_err(
        &fit_with(&["--history", "5"]),
        &["--history", "5 residuals"],
    );
    let o = magcache(&["calibrate", "--config", s(&run), "--out", s(&out), "--fit"]);
    check_err(&o, &["--budget", "--compute-steps"]);
    let o = magcache(&[
        "calibrate",
        "--config",
        s(&run),
        "--out",
        s(&out),
        "--budget",
        "4",
    ]);
    check_err(&o, &["--fit"]);
    assert!(!out.exists());
    // A profile without a [fitted] table.
    let o = magcache(&[
        "calibrate",
        "--config",
        s(&run),
        "--out",
        s(&out),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let fitted_run = digits_run(
        dir.path(),
        "fitted.toml",
        "\n[cache]\nstrategy = \"schedule\"\nestimator = \"fitted\"\nprofile = \"p.toml\"\n",
    );
    check_err(
        &magcache(&["run", "--config", s(&fitted_run)]),
        &["p.toml", "fitted", "--fit"],
    );
}

/// `calibrate --fit --start-profile P` continues P's fit: zero iterations keep P's coefficients
/// (and score them as P's fit did, on the same seeds), more iterations never end worse than that
/// start, and the profile records the fit it continued; a schedule, axis or history other than
/// P's, a profile without a fit, a run of another step count and `tune` are refused.
#[test]
fn a_fit_continues_from_a_profile() {
    let dir = tempfile::tempdir().unwrap();
    let run = digits_run(dir.path(), "run.toml", "");
    let first = dir.path().join("p.toml");
    let p = fit(&run, &first, 2);
    let go = |out: &str, iterations: &str, seeds: &str, extra: &[&str]| {
        let mut args = vec![
            "calibrate",
            "--config",
            s(&run),
            "--out",
            out,
            "--fit",
            "--start-profile",
            s(&first),
            "--iterations",
            iterations,
            "--calibration-seeds",
            seeds,
            "--validation-seeds",
            "21",
            "--data-range",
            "2",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        magcache(&args)
    };
    let same = dir.path().join("same.toml");
    let o = go(s(&same), "0", "11,12", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let q: toml::Table = std::fs::read_to_string(&same).unwrap().parse().unwrap();
    let (pf, qf) = (&p["fitted"], &q["fitted"]);
    assert_eq!(pf["calls"], qf["calls"]);
    assert_eq!(pf["compute_steps"], qf["compute_steps"]);
    for key in ["calibration_error", "validation_psnr_db"] {
        let (was, now) = (f64s(&pf[key])[1], f64s(&qf[key])[0]);
        assert!(
            (was - now).abs() <= 1e-6 * was.abs(),
            "{key}: {was} then {now}"
        );
    }
    let earlier = qf["earlier"].as_array().unwrap();
    assert_eq!(earlier.len(), 1);
    assert_eq!(f64s(&earlier[0]["calibration_seeds"]), vec![11.0, 12.0]);
    assert_eq!(earlier[0]["iterations"].as_integer(), Some(2));

    let more = dir.path().join("more.toml");
    let o = go(s(&more), "2", "11,12,13", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: toml::Table = std::fs::read_to_string(&more).unwrap().parse().unwrap();
    let cal = f64s(&m["fitted"]["calibration_error"]);
    let val = f64s(&m["fitted"]["validation_psnr_db"]);
    assert!(cal[1] <= cal[0], "calibration error {cal:?}");
    assert!(val[1] >= val[0], "validation PSNR {val:?}");
    assert!((val[0] - f64s(&pf["validation_psnr_db"])[1]).abs() < 1e-6);
    // A run of the continued profile names the fit it continued as its start.
    let text = plan_fitted(dir.path(), "continued.toml", "more.toml");
    assert!(
        text.contains("continuing earlier fits on 2 seeds 11-12 (iteration ")
            && text.contains("(start: the fit it continued)"),
        "{text}"
    );

    let refused = dir.path().join("refused.toml");
    let r = s(&refused);
    check_err(
        &go(r, "1", "11", &["--compute-steps", "0,4,8"]),
        &["--compute-steps", "p.toml"],
    );
    check_err(
        &go(r, "1", "11", &["--history", "3"]),
        &["--history", "p.toml"],
    );
    check_err(
        &go(r, "1", "11", &["--start-axis", "step"]),
        &["--start-axis"],
    );
    check_err(
        &go(r, "1", "11", &["--budget", "4"]),
        &["--budget", "--start-profile"],
    );
    // The profile continued is an input: `--out` never replaces it.
    check_err(&go(s(&first), "1", "11", &[]), &["--out", "p.toml"]);
    let longer = dir.path().join("longer.toml");
    std::fs::write(
        &longer,
        std::fs::read_to_string(&run)
            .unwrap()
            .replace("steps = 10", "steps = 12"),
    )
    .unwrap();
    let mut args = vec!["calibrate", "--config", s(&longer), "--out", r, "--fit"];
    args.extend_from_slice(&["--start-profile", s(&first), "--iterations", "1"]);
    args.extend_from_slice(&["--calibration-seeds", "11", "--validation-seeds", "21"]);
    check_err(&magcache(&args), &["p.toml", "noise schedule"]);
    let o = magcache(&[
        "calibrate",
        "--config",
        s(&run),
        "--out",
        s(&same),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut args = vec!["calibrate", "--config", s(&run), "--out", r, "--fit"];
    args.extend_from_slice(&["--start-profile", s(&same)]);
    check_err(&magcache(&args), &["same.toml", "fitted"]);
    check_err(
        &magcache(&[
            "calibrate",
            "--config",
            s(&run),
            "--out",
            r,
            "--start-profile",
            s(&first),
        ]),
        &["--fit"],
    );
    let tuned = dir.path().join("tuned.toml");
    let t = s(&tuned);
    let mut args = vec![
        "tune",
        "--config",
        s(&run),
        "--out",
        t,
        "--target-speedup",
        "2",
    ];
    args.extend_from_slice(&["--fit", "--start-profile", s(&first)]);
    check_err(&magcache(&args), &["tune", "--start-profile"]);
    assert!(!refused.exists() && !tuned.exists());
}

/// The shipped fitted files (`examples/digits_3x.toml`, `digits_4x.toml`) beat order-1 forecasting
/// in step index on the same calls on noise and a class order their fit never saw (seed 1, classes
/// 9..0; docs/quality.md has every held-out figure).
/// `--per-branch` gives each CFG branch its own coefficients: split from a shared profile, zero
/// iterations keep its coefficients for both branches and its scores exactly; a fit then moves
/// the branches apart and never ends worse than that start; runs read the per-branch table.
#[test]
fn a_fit_splits_per_branch() {
    let dir = tempfile::tempdir().unwrap();
    let run = digits_run(dir.path(), "run.toml", "");
    let shared = dir.path().join("shared.toml");
    let p = fit(&run, &shared, 1);
    let go = |out: &Path, iterations: &str| {
        fit_with(
            &run,
            out,
            iterations,
            &["--per-branch", "--start-profile", s(&shared)],
        )
    };
    let weights_of = |t: &toml::Table, branch: Option<&str>| -> Vec<toml::Value> {
        t["fitted"]["calls"]["main"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c.get("branch").and_then(|b| b.as_str()) == branch)
            .map(|c| c["weights"].clone())
            .collect()
    };
    // A run with one branch (no CFG) has nothing to split: refused, not written as `cond` only.
    let one = dir.path().join("one.toml");
    let text = std::fs::read_to_string(&run).unwrap();
    std::fs::write(
        &one,
        text.replace("guidance_scale = 4.0", "guidance_scale = 1.0"),
    )
    .unwrap();
    let out = dir.path().join("nocfg.toml");
    let mut args = vec!["calibrate", "--config", s(&one), "--out", s(&out), "--fit"];
    args.extend_from_slice(&[
        "--iterations",
        "0",
        "--per-branch",
        "--compute-steps",
        SCHEDULE,
    ]);
    check_err(&magcache(&args), &["--per-branch", "one branch"]);
    assert!(!out.exists());
    let split = go(&dir.path().join("split.toml"), "0");
    let f = &split["fitted"];
    assert_eq!(f["per_branch"].as_bool(), Some(true));
    let shared_w = weights_of(&p, None);
    assert!(!shared_w.is_empty());
    assert_eq!(weights_of(&split, Some("cond")), shared_w);
    assert_eq!(weights_of(&split, Some("uncond")), shared_w);
    assert!(weights_of(&split, None).is_empty());
    for key in ["calibration_error", "validation_psnr_db"] {
        let (was, now) = (f64s(&p["fitted"][key])[1], f64s(&f[key])[0]);
        assert!(
            (was - now).abs() <= 1e-6 * was.abs(),
            "{key}: {was} then {now}"
        );
    }
    let moved = dir.path().join("moved.toml");
    let m = go(&moved, "2");
    let (cal, val) = (
        f64s(&m["fitted"]["calibration_error"]),
        f64s(&m["fitted"]["validation_psnr_db"]),
    );
    assert!(cal[1] <= cal[0] && val[1] >= val[0], "{cal:?} {val:?}");
    if m["fitted"]["best_iteration"].as_integer() != Some(0) {
        assert_ne!(weights_of(&m, Some("cond")), weights_of(&m, Some("uncond")));
    }
    // A run reads the per-branch table and says so.
    let text = plan_fitted(dir.path(), "per_branch_run.toml", "moved.toml");
    assert!(text.contains("per channel and CFG branch"), "{text}");
    let r = dir.path().join("per_branch_run.toml");
    let (db, _) = psnr(&r);
    assert!(db.is_finite() && db > 20.0, "{db}");
}

#[test]
fn shipped_fitted_files_beat_the_order_1_forecast_held_out() {
    let dir = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for (name, list, gain) in [
        ("digits_3x.toml", "[0, 4, 9, 13, 16, 18]", 1.0),
        ("digits_4x.toml", "[0, 7, 13, 16, 18]", 0.5),
    ] {
        let text = std::fs::read_to_string(examples.join(name))
            .unwrap()
            .replace(
                "../tests/fixtures",
                &examples.join("../tests/fixtures").display().to_string(),
            )
            .replace(
                "profile = \"",
                &format!("profile = \"{}/", examples.display()),
            )
            .replace("seed = 0", "seed = 1")
            .replace(
                "classes = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]",
                "classes = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]",
            );
        assert!(text.contains("estimator = \"fitted\""), "{name}");
        let fitted = dir.path().join(format!("fitted_{name}"));
        std::fs::write(&fitted, &text).unwrap();
        let cache = text.find("[cache]").unwrap();
        let taylor = dir.path().join(format!("taylor_{name}"));
        std::fs::write(
            &taylor,
            format!("{}[cache]\nstrategy = \"schedule\"\ncompute_steps = {list}\nestimator = \"taylor1\"\n", &text[..cache]),
        )
        .unwrap();
        let ((pa, ca), (pb, cb)) = (psnr(&fitted), psnr(&taylor));
        assert_eq!(ca, cb, "{name}");
        assert!(pa >= pb + gain, "{name}: fitted {pa} dB, taylor1 {pb} dB");
    }
}

/// Every family's prompted tiny pipeline fits (one iteration, checkpointed): the fit runs each
/// family's own blocks in differentiable mode, Z-Image's per-item rotary tables
/// (candle-nn's composite `rope_i_slow` took only shared tables: Z-Image's fit stopped on
/// a `narrow` error), and the joint-stream FLUX blocks.
#[test]
fn every_family_fits() {
    let dir = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for name in [
        "zimage_tiny_prompted",
        "qwenimage_tiny_prompted",
        "flux_tiny_prompted",
        "flux2_klein_tiny_prompted",
        "wan22_ti2v_tiny_prompted",
    ] {
        let out = dir.path().join(format!("{name}.toml"));
        let o = magcache(&[
            "calibrate",
            "--config",
            s(&examples.join(format!("{name}.toml"))),
            "--out",
            s(&out),
            "--fit",
            "--budget",
            "3",
            "--iterations",
            "1",
            "--calibration-seeds",
            "1",
            "--validation-seeds",
            "2",
            "--quiet",
        ]);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let t: toml::Table = std::fs::read_to_string(&out).unwrap().parse().unwrap();
        assert!(t.contains_key("fitted"), "{name}: no [fitted] table");
    }
}

/// A shipped fitted file with a guard that would compute a call its schedule reuses is refused
/// by `plan` (and so by `run`) naming the key, not partway through the run; one at another shift
/// runs and warns that its coefficients were fitted for other noise levels.
#[test]
fn a_fitted_profile_refuses_guards_off_its_calls_and_warns_on_another_shift() {
    let dir = tempfile::tempdir().unwrap();
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let shipped = std::fs::read_to_string(ex.join("digits_3x.toml")).unwrap();
    let text = shipped
        .replace(
            "\"../tests/fixtures",
            &format!("\"{}/../tests/fixtures", ex.display()),
        )
        .replace(
            "\"profiles/digits_3x.toml\"",
            &format!("\"{}/profiles/digits_3x.toml\"", ex.display()),
        );
    assert!(
        text.trim_end().ends_with("profiles/digits_3x.toml\""),
        "[cache] is last"
    );
    for (key, line) in [
        ("cache.max_consecutive", "max_consecutive = 2"),
        ("cache.warmup_steps", "warmup_steps = 2"),
        ("cache.last_steps", "last_steps = 2"),
    ] {
        let run = dir.path().join("guarded.toml");
        std::fs::write(&run, format!("{text}{line}\n")).unwrap();
        check_err(
            &magcache(&["plan", "--config", s(&run)]),
            &["guarded.toml", key, "fitted schedule [0, 4, 9, 13, 16, 18]"],
        );
    }
    // A guard the fitted calls already keep is accepted.
    let run = dir.path().join("kept.toml");
    std::fs::write(&run, format!("{text}max_consecutive = 4\n")).unwrap();
    let o = magcache(&["plan", "--config", s(&run)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let run = dir.path().join("shift5.toml");
    std::fs::write(&run, text.replace("shift = 3.0", "shift = 5.0")).unwrap();
    let o = magcache(&["plan", "--config", s(&run), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let all = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        all.contains("was fitted with shift 3, this run uses shift 5"),
        "{all}"
    );
}

/// A step so large that the next iterate's run overflows ends the fit with its best iterate so
/// far (here the start) and a warning naming `--learning-rate`; it aborted the fit blaming the
/// run file.
#[test]
fn a_diverging_step_keeps_the_best_iterate() {
    let dir = tempfile::tempdir().unwrap();
    let run = digits_run(dir.path(), "run.toml", "");
    let out = dir.path().join("p.toml");
    let mut args = vec!["calibrate", "--config", s(&run), "--out", s(&out), "--fit"];
    args.extend_from_slice(&["--iterations", "2", "--calibration-seeds", "11"]);
    args.extend_from_slice(&["--validation-seeds", "21", "--data-range", "2"]);
    args.extend_from_slice(&["--compute-steps", SCHEDULE, "--learning-rate", "1e20"]);
    let o = magcache(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("diverged") && err.contains("--learning-rate"),
        "{err}"
    );
    let p: toml::Table = std::fs::read_to_string(&out).unwrap().parse().unwrap();
    assert_eq!(p["fitted"]["best_iteration"].as_integer(), Some(0), "{p:?}");
}
