//! Issue 12 through the binary, one section per class of fault: outputs never replace an input or
//! another output (1), a failed run replaces nothing and a bad output folder fails fast (2), warnings
//! reach a non-terminal stderr and an error after loading is one line (6), misleading messages and
//! keys that cannot apply (7, in `reliability_keys.rs`), an interrupted write leaves nothing and outputs follow the umask (8),
//! and `compare --repeat` reports its medians (9).

mod common;

use common::{bin, check_err, magcache, s, temporaries, Case};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// ---- class 1: a user's file is never destroyed ----

#[test]
fn class1_outputs_never_replace_inputs_or_each_other() {
    let c = Case::new("[cache]\nstrategy = \"magcache\"\nmag_ratios = [1.0, 0.99, 0.98]\n");
    let run = c.run_file();
    let inputs = c.p("in.safetensors");
    let weights = c.p("w/diffusion_pytorch_model.safetensors");
    let r = s(&run);
    // run --out on the inputs file, on the weights file, on the run file.
    c.refuses(
        &["run", "--quiet", "--config", r, "--out", s(&inputs)],
        &inputs,
        &["--out", "inputs"],
    );
    c.refuses(
        &["run", "--quiet", "--config", r, "--out", s(&weights)],
        &weights,
        &["--out", "weights"],
    );
    c.refuses(
        &["run", "--quiet", "--config", r, "--out", r],
        &run,
        &["--out", "run.toml"],
    );
    // calibrate --out RUN.toml; compare --png RUN.toml.
    c.refuses(
        &["calibrate", "--quiet", "--config", r, "--out", r],
        &run,
        &["--out"],
    );
    c.refuses(
        &["compare", "--quiet", "--config", r, "--png", r],
        &run,
        &["--png"],
    );
    // --out X --report X, with X an existing file of the user's.
    let x = c.p("x.bin");
    std::fs::write(&x, b"the user's file").unwrap();
    c.refuses(
        &[
            "run",
            "--quiet",
            "--config",
            r,
            "--out",
            s(&x),
            "--report",
            s(&x),
        ],
        &x,
        &["--report", "--out"],
    );
    // The same file under another name (a symlink) is the same file.
    std::os::unix::fs::symlink(&inputs, c.p("alias.safetensors")).unwrap();
    c.refuses(
        &[
            "run",
            "--quiet",
            "--config",
            r,
            "--out",
            s(&c.p("alias.safetensors")),
        ],
        &inputs,
        &["--out"],
    );
}

// ---- class 2: a failed run replaces nothing; a bad folder fails fast ----

/// A run slow enough to be interrupted or to show a late check: the tiny model over a larger
/// random latent for many steps (each call a few ms; minutes in all).
fn slow_run(c: &Case) {
    c.write_run(
        "[model]\nfamily = \"wan2.1\"\nweights = \"w\"\n\n[inputs]\nlatent_shape = [1, 4, 2, 32, 32]\ntext_len = 8\n\n[sampling]\nsteps = 100000\nshift = 5.0\nguidance_scale = 5.0\n",
    );
}

#[test]
fn class2_failed_run_leaves_existing_output_unchanged() {
    let c = Case::new("");
    let out = c.p("o.safetensors");
    std::fs::write(&out, b"previous result").unwrap();
    // /proc/r.json cannot be created: the run fails and o.safetensors stays as it was.
    c.refuses(
        &[
            "run",
            "--quiet",
            "--config",
            s(&c.run_file()),
            "--out",
            s(&out),
            "--report",
            "/proc/r.json",
        ],
        &out,
        &["/proc/r.json", "--report"],
    );
}

#[test]
fn class2_compare_failed_png_leaves_no_plot() {
    let c = Case::new("[cache]\nstrategy = \"magcache\"\nmag_ratios = [1.0, 0.99, 0.98]\n");
    let plot = c.p("p.svg");
    let names = c.names();
    let o = magcache(&[
        "compare",
        "--quiet",
        "--config",
        s(&c.run_file()),
        "--plot",
        s(&plot),
        "--png",
        "/missing/p.png",
    ]);
    check_err(&o, &["/missing", "--png"]);
    assert!(!plot.exists(), "p.svg written by a failed compare");
    assert_eq!(c.names(), names);
}

#[test]
fn class2_bad_output_folder_fails_before_the_generation() {
    let c = Case::new("");
    slow_run(&c);
    for (cmd, flag) in [("run", "--out"), ("run", "--report"), ("compare", "--plot")] {
        let t0 = Instant::now();
        let o = magcache(&[
            cmd,
            "--config",
            s(&c.run_file()),
            flag,
            "/missing/folder/o.file",
        ]);
        check_err(&o, &["/missing/folder", flag]);
        // The generation would take minutes: the check came first.
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{cmd} {flag}: took {:?}",
            t0.elapsed()
        );
    }
}

// ---- class 6: lost or doubled messages ----

#[test]
fn class6_warnings_reach_a_non_terminal_stderr() {
    // num_inference_steps that matches no scope is a warning (configs written for diffusers).
    let c = Case::new(
        "[cache]\nstrategy = \"magcache\"\nmag_ratios = [1.0, 0.99, 0.98]\nnum_inference_steps = 7\n",
    );
    let o = magcache(&["run", "--config", s(&c.run_file())]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: ") && stderr.contains("num_inference_steps"),
        "{stderr}"
    );
    // No model description or progress when stderr is not a terminal: only the warning.
    assert!(
        stderr.lines().all(|l| l.starts_with("warning: ")),
        "{stderr}"
    );
    // The summary, kept apart from stderr, repeats it at its end; one log of both has it once.
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.matches("num_inference_steps").count(), 1, "{stdout}");
    let log_path = c.dir.path().join("both.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let status = common::bin()
        .args(["run", "--config", s(&c.run_file())])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
    assert!(status.success());
    let both = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(both.matches("num_inference_steps").count(), 1, "{both}");
    // --quiet keeps it (docs/runner.md: nothing but errors and warnings; issue 42) and prints
    // nothing else.
    let o = magcache(&["run", "--quiet", "--config", s(&c.run_file())]);
    assert!(o.status.success());
    let quiet = String::from_utf8_lossy(&o.stderr);
    assert!(quiet.contains("num_inference_steps"), "{quiet}");
    assert!(quiet.lines().all(|l| l.starts_with("warning: ")), "{quiet}");
    assert!(o.stdout.is_empty());
}

#[test]
fn class6_error_after_loading_is_one_line() {
    // The model loads, then guidance this large overflows at the first step.
    let c = Case::new("");
    let text = std::fs::read_to_string(c.run_file())
        .unwrap()
        .replace("guidance_scale = 5.0", "guidance_scale = 1e38");
    c.write_run(&text);
    let o = magcache(&["run", "--config", s(&c.run_file())]);
    check_err(&o, &["non-finite"]);
}

// ---- class 8: leftovers and permissions ----

#[test]
fn class8_sigint_during_a_run_leaves_nothing() {
    signal_during_a_run_leaves_nothing("INT", 130, false);
}

/// SIGTERM and SIGHUP clean up as SIGINT does, and the exit code says which signal came (128 + its
/// number, as a shell reports a process the signal ended), not SIGINT's 130 for all three.
#[test]
fn class8_sigterm_and_sighup_exit_with_their_own_codes() {
    signal_during_a_run_leaves_nothing("TERM", 143, false);
    signal_during_a_run_leaves_nothing("HUP", 129, false);
}

/// Under `nohup` (SIGHUP ignored from the start) a SIGHUP leaves the run going; a SIGINT then
/// stops it as ever.
#[test]
fn class8_sighup_stays_ignored_under_nohup() {
    signal_during_a_run_leaves_nothing("INT", 130, true);
}

/// A run sent `kill -SIGNAL` in the middle of its generation: exit `code`, one line, no
/// temporaries, the earlier output kept, no report. Where `nohup`, the run starts with SIGHUP
/// ignored and is sent one first, which must leave it running.
fn signal_during_a_run_leaves_nothing(signal: &str, code: i32, nohup: bool) {
    let c = Case::new("");
    slow_run(&c);
    let out = c.p("o.safetensors");
    let report = c.p("r.json");
    std::fs::write(&out, b"previous result").unwrap();
    let names = c.names();
    let mut cmd = bin();
    cmd.args(["run", "--quiet", "--config"])
        .arg(c.run_file())
        .arg("--out")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // The runner leaves SIGHUP ignored where it started so (`nohup`): the test's own start may be.
    let hup = if nohup { libc::SIG_IGN } else { libc::SIG_DFL };
    // SAFETY: `signal` is async-signal-safe, as the forked child's code before exec must be.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            libc::signal(libc::SIGHUP, hup);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    // Wait for the temporaries (created when the outputs are planned, before the model loads), then
    // give the run a moment to be in the middle of its generation.
    let t0 = Instant::now();
    while temporaries(c.dir.path()).len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no temporary appeared"
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended before the signal"
    );
    if nohup {
        let st = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            child.try_wait().unwrap().is_none(),
            "SIGHUP stopped a nohup run"
        );
    }
    let st = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = common::wait_within(
        &mut child,
        Duration::from_secs(30),
        "the run did not stop on the signal",
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert_eq!(status.code(), Some(code), "SIG{signal}: {stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_eq!(temporaries(c.dir.path()), Vec::<String>::new());
    assert_eq!(c.names(), names, "leftovers");
    assert_eq!(std::fs::read(&out).unwrap(), b"previous result");
    assert!(!report.exists());
}

#[test]
fn class8_outputs_follow_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let c = Case::new("");
    for (umask, mode) in [("022", 0o644), ("077", 0o600), ("002", 0o664)] {
        let out = c.p(&format!("o{umask}.safetensors"));
        let report = c.p(&format!("r{umask}.json"));
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask {umask} && exec \"$0\" run --quiet --config \"$1\" --out \"$2\" --report \"$3\""
            ))
            .arg(env!("CARGO_BIN_EXE_magcache"))
            .arg(c.run_file())
            .arg(&out)
            .arg(&report)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for f in [&out, &report] {
            let m = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, mode, "{} under umask {umask}: {m:o}", f.display());
        }
    }
    assert_eq!(temporaries(c.dir.path()), Vec::<String>::new());
}

// ---- class 9: honest timing ----

#[test]
fn class9_compare_repeat_reports_medians() {
    let c = Case::new("[cache]\nstrategy = \"magcache\"\nmag_ratios = [1.0, 0.99, 0.98]\n");
    let o = magcache(&[
        "compare",
        "--config",
        s(&c.run_file()),
        "--repeat",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["repeat"], 3);
    let runs = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (d, cr) = (runs("dense_wall_runs"), runs("cached_wall_runs"));
    assert_eq!((d.len(), cr.len()), (3, 3));
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[1]
    };
    let dw = v["dense_wall_seconds"].as_f64().unwrap();
    let cw = v["cached_wall_seconds"].as_f64().unwrap();
    assert_eq!(dw, median(d));
    assert_eq!(cw, median(cr));
    let sp = v["speedup_wall"].as_f64().unwrap();
    assert!((sp - dw / cw).abs() < 1e-9 * sp.max(1.0), "{sp} {dw} {cw}");
    assert_eq!(v["warmup"], "cached");
    assert_eq!(v["cached"]["wall_seconds"].as_f64().unwrap(), cw);
    // --repeat 0 is refused before any work.
    check_err(
        &magcache(&["compare", "--config", s(&c.run_file()), "--repeat", "0"]),
        &["--repeat"],
    );
    // Default: one timed run of each kind.
    let o = magcache(&["compare", "--config", s(&c.run_file()), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["repeat"], 1);
    for k in ["speedup_wall", "dense_wall_seconds", "cached_wall_seconds"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}");
    }
}
