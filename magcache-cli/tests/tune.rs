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
    // The source's opening comment describes the dense file: the tuned file does not copy it.
    let text = std::fs::read_to_string(&run).unwrap();
    std::fs::write(&run, format!("# dense digits, no cache\n{text}")).unwrap();
    let out = dir.path().join("fast.toml");
    let tune = || {
        let args = ["tune", "--config", s(&run), "--out", s(&out)];
        magcache(
            &[
                &args[..],
                &["--target-speedup", "2.5", "--runs", "4", "--quiet"],
            ]
            .concat(),
        )
    };
    let o = tune();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // Four runs do not cover the candidates at this budget: said even when quiet.
    assert!(
        stderr.contains("--runs 4: the run budget was spent"),
        "{stderr}"
    );
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(
        written.starts_with("# Written by `magcache tune` from") && !written.contains("no cache"),
        "{written}"
    );
    let (_, computed, total) = psnr(&out);
    assert_eq!((computed, total), (8, 20));
    // The profile is written where the chosen setting reads it (here a searched schedule, which
    // does).
    let tuned: toml::Table = written.parse().unwrap();
    let reads = tuned["cache"].get("profile").is_some();
    assert!(reads, "{written}");
    assert!(dir.path().join("fast.profile.toml").is_file());
    // Tuned again to the same --out: the earlier pair is replaced (the run file names its
    // profile), not refused as a file of the user's.
    let again = tune();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // Neither target, or both: one line naming the flags.
    let o = magcache(&["tune", "--config", s(&run), "--out", s(&out)]);
    common::check_err(&o, &["--target-psnr", "--target-speedup"]);
    // No runs, a negative margin: refused before any run, naming the flag.
    let refused = |extra: &[&str], want: &[&str]| {
        let mut args = vec!["tune", "--config", s(&run), "--out", s(&out)];
        args.extend_from_slice(&["--target-speedup", "2.5"]);
        args.extend_from_slice(extra);
        common::check_err(&magcache(&args), want);
    };
    refused(&["--runs", "0"], &["--runs 0"]);
    // --margin is a PSNR target's: with a speedup target it is refused, not ignored.
    refused(&["--margin", "1"], &["--margin", "--target-psnr"]);
    let args = ["tune", "--config", s(&run), "--out", s(&out)];
    let psnr_target = [&args[..], &["--target-psnr", "30", "--margin", "-1"]].concat();
    common::check_err(&magcache(&psnr_target), &["--margin -1"]);
    // A negative number is read as the flag's value (and refused as such), not as a flag.
    refused(&["--fit", "--learning-rate", "-0.01"], &["--learning-rate"]);
}

/// The profile at `path` where the tuned run file `text` reads one (it is then written), else
/// `None` (and none was written).
fn written_profile(text: &str, path: &Path) -> Option<toml::Table> {
    let reads = text.contains("profile = ");
    assert_eq!(path.exists(), reads, "{text}");
    reads.then(|| std::fs::read_to_string(path).unwrap().parse().unwrap())
}

/// `tune --fit --json` on `run` at `speedup` with `runs` runs and `iterations` fit iterations (one
/// calibration and one validation seed), writing `out`; its report.
fn tune_fit_json(
    run: &Path,
    out: &Path,
    speedup: &str,
    runs: &str,
    iterations: &str,
) -> serde_json::Value {
    let o = magcache(&[
        "tune",
        "--config",
        s(run),
        "--out",
        s(out),
        "--target-speedup",
        speedup,
        "--runs",
        runs,
        "--data-range",
        "2",
        "--fit",
        "--iterations",
        iterations,
        "--calibration-seeds",
        "1000",
        "--validation-seeds",
        "2000",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let mut j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    j["stderr"] = stderr.to_string().into();
    j
}

/// `--fit`: the fitted estimator is fitted on the chosen schedule and run as one more candidate on
/// the same calls; the run file and profile written match what was chosen (the profile carries the
/// `[fitted]` table only where the fitted candidate won).
#[test]
fn fit_joins_the_candidates_on_the_chosen_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let run = digits_run(dir.path(), "run.toml", 0, "[3, 6]");
    let out = dir.path().join("fast.toml");
    let j = tune_fit_json(&run, &out, "2.5", "12", "2");
    let tried = j["tried"].as_array().unwrap();
    let (from, fitted) = (
        j["fit"]["from"].as_u64().unwrap() as usize,
        j["fit"]["fitted"].as_u64().unwrap() as usize,
    );
    assert!(tried[fitted]["label"]
        .as_str()
        .unwrap()
        .starts_with("fitted"));
    // The fitted candidate ran the schedule it was fitted on, the best schedule at the budget.
    assert_eq!(tried[fitted]["schedule"], tried[from]["schedule"]);
    assert_eq!(tried[fitted]["computed_calls"], 8);
    // Every setting tried, the moved lists of the refinement included, computes the budget.
    assert!(tried.len() > 8, "{j}");
    for t in tried {
        assert_eq!(t["computed_calls"], 8, "{t}");
    }
    assert_eq!(j["fit"]["report"]["compute_steps"], tried[from]["schedule"]);
    assert_eq!(j["fit"]["report"]["steps"].as_array().unwrap().len(), 3);
    let chosen = j["chosen"].as_u64().unwrap() as usize;
    let best_other = tried
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != fitted)
        .map(|(_, t)| t["psnr_db"].as_f64().unwrap())
        .fold(f64::NEG_INFINITY, f64::max);
    let fitted_psnr = tried[fitted]["psnr_db"].as_f64().unwrap();
    let kept = j["fit"]["report"]["best_iteration"].as_u64().unwrap();
    assert_eq!(
        chosen == fitted,
        fitted_psnr > best_other && kept > 0,
        "{j}"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.contains("estimator = \"fitted\""), chosen == fitted);
    // The profile is written where the chosen setting reads it (the fitted estimator does).
    let profile = written_profile(&text, &dir.path().join("fast.profile.toml"));
    assert!(profile.is_some() || chosen != fitted, "{text}");
    assert_eq!(
        profile.is_some_and(|p| p.contains_key("fitted")),
        chosen == fitted
    );
    // The written file runs as it is, at the chosen speed and no worse than measured.
    let (p, computed, total) = psnr(&out);
    assert_eq!((computed, total), (8, 20));
    assert!(
        p + 1e-6 >= tried[chosen]["psnr_db"].as_f64().unwrap(),
        "{p}"
    );
    // With no iteration the fitted candidate is the order-1 forecast in the axis its schedule was
    // chosen for: the same PSNR, so not chosen, and the profile is left without a `[fitted]` table.
    let out0 = dir.path().join("zero.toml");
    let j = tune_fit_json(&run, &out0, "2.5", "6", "0");
    let tried = j["tried"].as_array().unwrap();
    let (from, fitted) = (
        j["fit"]["from"].as_u64().unwrap() as usize,
        j["fit"]["fitted"].as_u64().unwrap() as usize,
    );
    let (a, b) = (
        tried[from]["psnr_db"].as_f64().unwrap(),
        tried[fitted]["psnr_db"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-3, "{a} against {b}");
    assert_ne!(j["chosen"].as_u64().unwrap() as usize, fitted);
    // A fit that kept its start says so (on stderr too, as a warning).
    assert!(
        j["notes"][0].as_str().unwrap().contains("kept its start"),
        "{j}"
    );
    assert!(j["stderr"]
        .as_str()
        .unwrap()
        .contains("warning: --fit: the fit kept its start"));
    let text0 = std::fs::read_to_string(&out0).unwrap();
    let profile = written_profile(&text0, &dir.path().join("zero.profile.toml"));
    assert!(!profile.is_some_and(|p| p.contains_key("fitted")));
    assert!(!text0.contains("fitted"));
    // At 1.67x the best schedule is `foca` in sigma; the fit's start, `taylor1` in sigma on its
    // calls, measures higher here (42.47 against 42.40 dB) but fitted nothing: not chosen.
    let j = tune_fit_json(&run, &dir.path().join("foca.toml"), "1.6", "10", "0");
    let fitted = j["fit"]["fitted"].as_u64().unwrap();
    assert_ne!(j["chosen"].as_u64().unwrap(), fitted, "{j}");
    assert!(!std::fs::read_to_string(dir.path().join("foca.toml"))
        .unwrap()
        .contains("fitted"));
    // The fit's flags without `--fit` would do nothing: refused, in both commands.
    for command in ["tune", "calibrate"] {
        let o = magcache(
            &[
                command,
                "--config",
                s(&run),
                "--out",
                s(&dir.path().join("x.toml")),
                "--target-speedup",
                "2",
                "--iterations",
                "5",
            ]
            .into_iter()
            .filter(|a| command == "tune" || !["--target-speedup", "2"].contains(a))
            .collect::<Vec<_>>(),
        );
        common::check_err(&o, &[command, "--iterations", "--fit"]);
        assert!(!dir.path().join("x.toml").exists());
    }
    // What the fit would refuse is refused before any run, naming the flag.
    for (flag, value, words) in [
        ("--start-axis", "time", vec!["--start-axis", "time"]),
        ("--validation-seeds", "1000", vec!["1000", "validation"]),
    ] {
        let o = magcache(&[
            "tune",
            "--config",
            s(&run),
            "--out",
            s(&dir.path().join("x.toml")),
            "--target-speedup",
            "2",
            "--fit",
            "--calibration-seeds",
            "1000",
            flag,
            value,
        ]);
        common::check_err(&o, &words);
        assert!(!dir.path().join("x.toml").exists());
    }
}

/// `--fit` on a run whose two experts run different step counts is refused from the plan, before
/// any run or weight load, and writes nothing.
#[test]
fn fit_refuses_experts_with_other_step_counts_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let text = common::example_text("wan22_i2v_tiny_prompted.toml");
    let run = dir.path().join("wan22_i2v_tiny_prompted.toml");
    std::fs::write(&run, text).unwrap();
    let out = dir.path().join("x.toml");
    let o = magcache(&[
        "tune",
        "--config",
        s(&run),
        "--out",
        s(&out),
        "--target-speedup",
        "2",
        "--fit",
    ]);
    common::check_err(
        &o,
        &["wan22_i2v_tiny_prompted.toml", "--fit", "step counts"],
    );
    assert!(!out.exists());
    // `calibrate --fit` the same, before any run (it wrote a profile every run then refused).
    let o = magcache(&[
        "calibrate",
        "--config",
        s(&run),
        "--out",
        s(&out),
        "--fit",
        "--compute-steps",
        "0,3",
        "--calibration-seeds",
        "1000",
        "--validation-seeds",
        "2000",
        "--iterations",
        "0",
    ]);
    common::check_err(
        &o,
        &[
            "wan22_i2v_tiny_prompted.toml",
            "calibrate --fit",
            "step counts",
        ],
    );
    assert!(!out.exists());
}

/// The tiny prompted Wan example at a 2x target chooses an explicit schedule, which reads no
/// profile: the profile is then not written (and the line says so).
#[test]
fn a_setting_that_reads_no_profile_writes_none() {
    let dir = tempfile::tempdir().unwrap();
    let text = common::example_text("wan21_tiny_prompted.toml");
    let run = dir.path().join("wp.toml");
    std::fs::write(&run, text).unwrap();
    let out = dir.path().join("t.toml");
    // An earlier tune's pair at --out: its profile goes with the run file it replaces.
    let profile = dir.path().join("t.profile.toml");
    std::fs::write(
        &out,
        "[cache]\nstrategy = \"magcache\"\nprofile = \"t.profile.toml\"\n",
    )
    .unwrap();
    std::fs::write(&profile, "earlier\n").unwrap();
    let tune = || {
        let args = ["tune", "--config", s(&run), "--out", s(&out)];
        magcache(&[&args[..], &["--target-speedup", "2"]].concat())
    };
    let o = tune();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tuned: toml::Table = std::fs::read_to_string(&out).unwrap().parse().unwrap();
    assert!(tuned["cache"].get("compute_steps").is_some(), "{tuned}");
    assert!(tuned["cache"].get("profile").is_none(), "{tuned}");
    assert!(!profile.exists());
    assert!(stdout.contains("reads no profile"), "{stdout}");
    // Tuned again to the same --out: nothing left in its way.
    let o = tune();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Two experts running 8 and 4 calls: a budget computes that many calls of each (all of the
/// shorter one's), so 2x is budget 3 (6 of 12 calls) and 4x budget 1; the budget was taken from
/// all 12 steps (2x: budget 6, then 4, 1.5x) and missed targets the run can meet.
#[test]
fn a_speedup_target_is_met_over_experts_of_other_step_counts() {
    let dir = tempfile::tempdir().unwrap();
    let text = common::example_text("wan22_tiny_magcache.toml");
    let run = dir.path().join("wan22.toml");
    std::fs::write(&run, text).unwrap();
    for target in ["2", "4"] {
        let out = dir.path().join(format!("x{target}.toml"));
        let o = magcache(&[
            "tune",
            "--config",
            s(&run),
            "--out",
            s(&out),
            "--target-speedup",
            target,
            "--runs",
            "3",
            "--quiet",
        ]);
        assert!(
            o.status.success(),
            "{target}x: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let (_, computed, total) = psnr(&out);
        let want: f64 = target.parse().unwrap();
        assert!(
            total as f64 / computed as f64 + 1e-9 >= want,
            "{target}x: {computed}/{total}"
        );
    }
}
