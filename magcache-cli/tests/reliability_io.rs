//! Issue 24 through the binary: inputs reached through links, hard links and indexes are never
//! destroyed and special files are never replaced (1), outputs are committed all or nothing (2),
//! random tensors go through the size guard (3), a checkpoint truncated under a streamed run is an
//! error (4), non-finite decodes and encodings stop the run (5), and messages and leftovers (7):
//! long output names, killed exports, MP4 without ffmpeg, a bad `flow_shift`.

mod common;

use candle_core::{Device, Tensor};
use common::{bin, check_err, magcache, s, temporaries, Case};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn pipelines() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pipelines")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// Every file name under `dir`, recursively, sorted (what appeared or vanished).
fn tree(dir: &Path) -> Vec<String> {
    fn walk(d: &Path, root: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                walk(&p, root, out);
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// Asserts the run `args` fails with one line naming `must_name`, and that `protected` (read
/// through the path given) is byte for byte what it was.
fn refuses(args: &[&str], protected: &[&Path], must_name: &[&str]) -> String {
    let before: Vec<Vec<u8>> = protected
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let o = magcache(args);
    let e = check_err(&o, must_name);
    for (p, b) in protected.iter().zip(before) {
        assert_eq!(std::fs::read(p).unwrap(), b, "{} changed: {e}", p.display());
    }
    e
}

// ---- class 1: every file a run reads is an input, however a path reaches it ----

/// A Hugging Face cache layout: `blobs/` holds the files, `snapshots/rev/transformer/` holds
/// symlinks into it, and `w` is a symlink to that folder. No output path reaching a blob replaces
/// it: through the symlinked folder, the blob's own path, or a hard link.
#[test]
fn class1_hf_snapshot_files_are_inputs_through_every_path() {
    let c = Case::new("");
    let hub = c.p("hub");
    let blobs = hub.join("blobs");
    let snap = hub.join("snapshots/rev/transformer");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for (f, blob) in [
        ("diffusion_pytorch_model.safetensors", "b1"),
        ("config.json", "b2"),
    ] {
        std::fs::rename(c.p("w").join(f), blobs.join(blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../../blobs/{blob}"), snap.join(f)).unwrap();
    }
    std::fs::remove_dir(c.p("w")).unwrap();
    std::os::unix::fs::symlink(&snap, c.p("w")).unwrap();
    let blob = blobs.join("b1");
    std::fs::hard_link(&blob, c.p("hard.safetensors")).unwrap();
    let run = c.run_file();
    let r = s(&run);
    let through = c.p("w/diffusion_pytorch_model.safetensors");
    let cfg_through = c.p("w/config.json");
    for (flag, target, names) in [
        ("--out", &through, &["--out", "blobs/b1"][..]),
        ("--report", &cfg_through, &["--report", "blobs/b2"][..]),
        ("--out", &blob, &["--out", "model weights"][..]),
        (
            "--png",
            &c.p("hard.safetensors"),
            &["--png", "blobs/b1"][..],
        ),
    ] {
        let e = refuses(
            &["run", "--quiet", "--config", r, flag, s(target)],
            &[&blob, &blobs.join("b2")],
            names,
        );
        assert!(e.contains("refusing to overwrite"), "{e}");
    }
    // The run itself works through the links (nothing above was a false alarm on a good run).
    let o = magcache(&["run", "--quiet", "--config", r, "--out", s(&c.p("o.st"))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `[sampling] scheduler_config`, the shards an index names (a `../` one included), and every file
/// of a prompted run's pipeline folder reached through a symlinked folder are inputs.
#[test]
fn class1_scheduler_config_index_shards_and_pipeline_files_are_inputs() {
    let c = Case::new("");
    let sched = c.p("sched.json");
    std::fs::copy(
        pipelines().join("wan_scheduler/scheduler_config.json"),
        &sched,
    )
    .unwrap();
    // An index naming a shard outside its folder.
    let w2 = c.p("w2");
    std::fs::create_dir(&w2).unwrap();
    std::fs::copy(c.p("w/config.json"), w2.join("config.json")).unwrap();
    let shard = c.p("outside.safetensors");
    std::fs::copy(c.p("w/diffusion_pytorch_model.safetensors"), &shard).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": {"x": "../outside.safetensors"}});
    std::fs::write(
        w2.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    c.write_run("[model]\nfamily = \"wan2.1\"\nweights = \"w2\"\n\n[inputs]\nfile = \"in.safetensors\"\n\n[sampling]\nsteps = 3\nscheduler_config = \"sched.json\"\n");
    let run = c.run_file();
    let r = s(&run);
    refuses(
        &["run", "--quiet", "--config", r, "--out", s(&sched)],
        &[&sched],
        &["--out", "sched.json", "scheduler_config"],
    );
    refuses(
        &["run", "--quiet", "--config", r, "--report", s(&shard)],
        &[&shard],
        &["--report", "outside.safetensors"],
    );
    // A prompted run's pipeline folder, reached through a symlink: its tokenizer, text encoder and
    // VAE files are inputs.
    let real = c.p("real_pipe");
    copy_dir(&pipelines().join("wan_tiny_folder"), &real);
    std::os::unix::fs::symlink(&real, c.p("pipe")).unwrap();
    c.write_run("[model]\nfamily = \"wan2.1\"\nweights = \"pipe\"\n\n[prompt]\ntext = \"a fox\"\nmax_sequence_length = 8\n\n[inputs]\nheight = 16\nwidth = 16\nnum_frames = 1\n\n[sampling]\nsteps = 2\n");
    for f in [
        "tokenizer/tokenizer.json",
        "text_encoder/model.safetensors",
        "vae/config.json",
        "scheduler/scheduler_config.json",
    ] {
        let target = c.p("pipe").join(f);
        refuses(
            &["run", "--quiet", "--config", r, "--out", s(&target)],
            &[&real.join(f)],
            &["--out", "refusing to overwrite"],
        );
    }
}

/// Outputs that exist and are not regular files are refused, and stay what they were: a character
/// device, a FIFO, a link to this process's stdout, a folder, a dangling link.
#[test]
fn class1_special_files_are_never_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let c = Case::new("");
    let run = c.run_file();
    let r = s(&run);
    let fifo = c.p("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let stdout = c.p("stdout");
    std::os::unix::fs::symlink("/proc/self/fd/1", &stdout).unwrap();
    let dir = c.p("folder");
    std::fs::create_dir(&dir).unwrap();
    let dangling = c.p("dangling");
    std::os::unix::fs::symlink(c.p("nowhere/x"), &dangling).unwrap();
    let mine = c.p("mine.txt");
    std::fs::write(&mine, b"the user's file").unwrap();
    let link = c.p("link");
    std::os::unix::fs::symlink(&mine, &link).unwrap();
    for (flag, target, names) in [
        (
            "--report",
            Path::new("/dev/null"),
            &["/dev/null", "character device"][..],
        ),
        ("--out", fifo.as_path(), &["fifo", "FIFO"][..]),
        (
            "--report",
            stdout.as_path(),
            &["stdout", "not a regular file"][..],
        ),
        ("--report", dir.as_path(), &["folder", "is a folder"][..]),
        (
            "--out",
            dangling.as_path(),
            &["dangling", "symbolic link"][..],
        ),
        ("--out", link.as_path(), &["link", "symbolic link"][..]),
    ] {
        let names_before = c.names();
        let o = bin()
            .args(["run", "--quiet", "--config", r, flag])
            .arg(target)
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        check_err(&o, names);
        assert!(o.stdout.is_empty());
        assert_eq!(c.names(), names_before);
    }
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(std::fs::symlink_metadata(&stdout)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(dir.is_dir());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&mine).unwrap(), b"the user's file");
}

// ---- class 2: all outputs or none ----

/// A run slow enough to change its outputs' targets while it runs.
fn slow_run(c: &Case, steps: usize, extra_model: &str) {
    c.write_run(&format!(
        "[model]\nfamily = \"wan2.1\"\nweights = \"w\"\n{extra_model}\n[inputs]\nlatent_shape = [1, 4, 2, 32, 32]\ntext_len = 8\n\n[sampling]\nsteps = {steps}\nshift = 5.0\nguidance_scale = 5.0\n"
    ));
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A folder appears at `--report` while the run runs: the run fails at commit and `--out` keeps
/// its previous content (it was not replaced first).
#[test]
fn class2_a_late_failure_replaces_no_output() {
    let c = Case::new("");
    slow_run(&c, 100, "");
    let out = c.p("o.safetensors");
    let report = c.p("r.json");
    std::fs::write(&out, b"previous result").unwrap();
    let child = bin()
        .args(["run", "--quiet", "--config"])
        .arg(c.run_file())
        .arg("--out")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("no temporary appeared", 30, || {
        temporaries(c.dir.path()).len() >= 2
    });
    std::fs::create_dir(&report).unwrap();
    let o = child.wait_with_output().unwrap();
    check_err(&o, &["--report", "r.json", "folder"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"previous result");
    assert!(report.is_dir());
    assert_eq!(temporaries(c.dir.path()), Vec::<String>::new());
}

// ---- class 3: random tensors go through the size guard ----

#[test]
fn class3_random_inputs_too_large_are_refused_naming_the_key() {
    let c = Case::new("");
    // Without the guard's whole-run estimate in the way, the random tensor itself is checked.
    for (shape, text_len, key) in [
        ("[1, 16, 300, 400, 400]", 8, "inputs.latent_shape"),
        ("[1, 16, 1, 2, 2]", 1_000_000_000, "inputs.text_len"),
    ] {
        c.write_run(&format!("[model]\nfamily = \"wan2.1\"\nweights = \"w\"\n\n[inputs]\nlatent_shape = {shape}\ntext_len = {text_len}\n\n[sampling]\nsteps = 2\n"));
        let o = bin()
            .args(["run", "--quiet", "--config", s(&c.run_file())])
            .env("MAGCACHE_MEMORY_LIMIT", "2G")
            .output()
            .unwrap();
        check_err(&o, &["run.toml", key]);
    }
}

// ---- class 4: a checkpoint truncated under a streamed run ----

#[test]
fn class4_a_streamed_checkpoint_truncated_under_the_run_is_an_error() {
    let c = Case::new("");
    slow_run(&c, 100_000, "offload = \"stream\"\n");
    let out = c.p("o.safetensors");
    let mut child = bin()
        .args(["run", "--quiet", "--config"])
        .arg(c.run_file())
        .arg("--out")
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("no temporary appeared", 30, || {
        !temporaries(c.dir.path()).is_empty()
    });
    std::thread::sleep(Duration::from_millis(800));
    assert!(child.try_wait().unwrap().is_none(), "the run ended early");
    let w = c.p("w/diffusion_pytorch_model.safetensors");
    let len = std::fs::metadata(&w).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&w)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let status = common::wait_within(
        &mut child,
        Duration::from_secs(60),
        "the run did not stop after its checkpoint was truncated",
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "killed by a signal? {status:?} {stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("diffusion_pytorch_model.safetensors") && stderr.contains("changed"),
        "{stderr}"
    );
    assert!(!out.exists());
    assert_eq!(temporaries(c.dir.path()), Vec::<String>::new());
}

// ---- class 5: non-finite encodings and decodes stop the run ----

fn load(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

/// Replaces, in the safetensors file `p`, every tensor `pick` selects by a constant `value` (finite).
fn set_tensors(p: &Path, pick: impl Fn(&str, &Tensor) -> bool, value: f64) -> usize {
    let mut m = load(p);
    let mut n = 0;
    for (k, t) in m.iter_mut() {
        if pick(k, t) {
            *t = (t.ones_like().unwrap() * value).unwrap();
            n += 1;
        }
    }
    candle_core::safetensors::save(&m, p).unwrap();
    n
}

fn prompted_case(dir: &Path) -> PathBuf {
    let root = dir.join("pipe");
    copy_dir(&pipelines().join("wan_tiny_folder"), &root);
    std::fs::write(
        dir.join("run.toml"),
        "[model]\nfamily = \"wan2.1\"\nweights = \"pipe\"\n\n[prompt]\ntext = \"a fox\"\nmax_sequence_length = 8\n\n[inputs]\nheight = 16\nwidth = 16\nnum_frames = 1\n\n[sampling]\nsteps = 2\n",
    )
    .unwrap();
    root
}

#[test]
fn class5_a_vae_that_overflows_stops_the_run_naming_the_decode() {
    let d = tempfile::tempdir().unwrap();
    let root = prompted_case(d.path());
    let n = set_tensors(
        &root.join("vae/diffusion_pytorch_model.safetensors"),
        |k, t| k.starts_with("decoder.") && t.rank() == 5,
        1e37,
    );
    assert!(n > 3);
    let out = d.path().join("o.safetensors");
    let png = d.path().join("o.png");
    let o = magcache(&[
        "run",
        "--quiet",
        "--config",
        s(&d.path().join("run.toml")),
        "--out",
        s(&out),
        "--png",
        s(&png),
    ]);
    check_err(&o, &["non-finite", "VAE decode"]);
    assert!(!out.exists() && !png.exists());
}

#[test]
fn class5_a_text_encoder_that_overflows_stops_the_run_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let root = prompted_case(d.path());
    set_tensors(
        &root.join("text_encoder/model.safetensors"),
        |k, _| k == "encoder.final_layer_norm.weight",
        3e38,
    );
    let out = d.path().join("o.safetensors");
    let o = magcache(&[
        "run",
        "--quiet",
        "--config",
        s(&d.path().join("run.toml")),
        "--out",
        s(&out),
    ]);
    check_err(&o, &["non-finite", "text encoder", "prompt_embeds"]);
    assert!(!out.exists());
}

// ---- class 7: messages and leftovers ----

#[test]
fn class7_a_245_character_output_name_works() {
    let c = Case::new("");
    let name = format!("{}.safetensors", "o".repeat(245 - ".safetensors".len()));
    assert_eq!(name.len(), 245);
    let out = c.p(&name);
    let report = c.p(&format!("{}.json", "r".repeat(240)));
    let o = magcache(&[
        "run",
        "--quiet",
        "--config",
        s(&c.run_file()),
        "--out",
        s(&out),
        "--report",
        s(&report),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.is_file() && report.is_file());
    assert_eq!(temporaries(c.dir.path()), Vec::<String>::new());
}

fn export_toml(layers: usize, dims: &str) -> String {
    format!(
        "[model]\nfamily = \"wan2.1\"\npreset = \"wan2.1-t2v-1.3b\"\nseed = 7\ndtype = \"bf16\"\n\
         [model.overrides]\nnum_layers = {layers}\n{dims}\n\
         [inputs]\nlatent_shape = [1, 16, 2, 4, 4]\ntext_len = 5\n[sampling]\nsteps = 4\n"
    )
}

/// An export killed with SIGKILL leaves its hidden partial folder; the next export into the same
/// folder names it in a warning and removes nothing (a name of the runner's pattern may be a user's,
/// or another machine's run on a shared folder).
#[test]
fn class7_a_killed_exports_partial_folder_is_named_by_the_next() {
    let d = tempfile::tempdir().unwrap();
    let big = d.path().join("big.toml");
    // About 300 MB in bf16: seconds to write.
    std::fs::write(&big, export_toml(4, "")).unwrap();
    let mut child = bin()
        .args(["export", "--quiet", "--config"])
        .arg(&big)
        .arg("--out")
        .arg(d.path().join("big"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("no partial folder appeared", 60, || {
        !temporaries(d.path()).is_empty()
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the export ended before it was killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let left = temporaries(d.path());
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(!d.path().join("big").exists());
    // A hidden folder of the user's that only looks like a temporary stays.
    let mine = d.path().join(".photos.partial-2024");
    std::fs::create_dir(&mine).unwrap();
    let small = d.path().join("small.toml");
    std::fs::write(
        &small,
        export_toml(1, "num_attention_heads = 2\nattention_head_dim = 12\nffn_dim = 40\ntext_dim = 16\nfreq_dim = 8"),
    )
    .unwrap();
    let o = magcache(&[
        "export",
        "--quiet",
        "--config",
        s(&small),
        "--out",
        s(&d.path().join("small")),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let mut expected = vec![".photos.partial-2024".to_string(), left[0].clone()];
    expected.sort();
    let mut now = temporaries(d.path());
    now.sort();
    assert_eq!(now, expected);
    assert!(
        err.contains(&left[0]) && err.contains("not removed"),
        "{err}"
    );
    assert!(mine.is_dir());
    assert!(d.path().join("small/config.json").is_file());
}

/// `.mp4` is written in process: an `ffmpeg` first on PATH that would write nothing (and exit 0)
/// is never run, and the video is a real MP4 (`ftyp` then `moov`).
#[test]
fn class7_mp4_is_written_without_running_ffmpeg() {
    let d = tempfile::tempdir().unwrap();
    prompted_case(d.path());
    let fake = d.path().join("bin");
    std::fs::create_dir(&fake).unwrap();
    let ffmpeg = fake.join("ffmpeg");
    std::fs::write(&ffmpeg, "#!/bin/sh\ncat > /dev/null\nexit 0\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ffmpeg, std::fs::Permissions::from_mode(0o755)).unwrap();
    let video = d.path().join("v.mp4");
    let before = tree(d.path());
    let o = bin()
        .args(["run", "--quiet", "--config"])
        .arg(d.path().join("run.toml"))
        .arg("--video")
        .arg(&video)
        .env("PATH", &fake)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Only the video appeared (no temporary left behind).
    let mut want = before;
    want.push("v.mp4".to_string());
    want.sort();
    assert_eq!(tree(d.path()), want);
    let bytes = std::fs::read(&video).unwrap();
    assert_eq!(&bytes[4..8], b"ftyp");
    let moov = u32::from_be_bytes(bytes[0..4].try_into().unwrap()) as usize;
    assert_eq!(&bytes[moov + 4..moov + 8], b"moov");
}

/// A `flow_shift` in a scheduler config that breaks the schedule is blamed on that file and key.
#[test]
fn class7_a_bad_flow_shift_is_blamed_on_the_scheduler_config() {
    let c = Case::new("");
    let text = std::fs::read_to_string(pipelines().join("wan_scheduler/scheduler_config.json"))
        .unwrap()
        .replace("\"flow_shift\": 3.0", "\"flow_shift\": 1e-300");
    assert!(text.contains("1e-300"));
    std::fs::write(c.p("sched.json"), text).unwrap();
    c.write_run("[model]\nfamily = \"wan2.1\"\nweights = \"w\"\n\n[inputs]\nfile = \"in.safetensors\"\n\n[sampling]\nsteps = 3\nscheduler_config = \"sched.json\"\n");
    for cmd in ["run", "plan"] {
        let e = check_err(
            &magcache(&[cmd, "--config", s(&c.run_file())]),
            &["sched.json", "flow_shift"],
        );
        assert!(!e.contains("sampling.shift"), "{e}");
    }
}

// ---- class 3: prompted runs go through the size guard, stage by stage ----

fn edit_json(p: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

/// Runs the prompted case's run file with a 2 GB memory limit; expects a refusal naming `must_name`
/// within seconds (nothing allocated first).
fn prompted_refused(dir: &Path, must_name: &[&str]) -> String {
    let t0 = Instant::now();
    let o = bin()
        .args(["run", "--quiet", "--config"])
        .arg(dir.join("run.toml"))
        .env("MAGCACHE_MEMORY_LIMIT", "2G")
        .output()
        .unwrap();
    let e = check_err(&o, must_name);
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    e
}

#[test]
fn class3_prompted_sizes_are_guarded_naming_the_key() {
    let d = tempfile::tempdir().unwrap();
    let root = prompted_case(d.path());
    let run = d.path().join("run.toml");
    let base = std::fs::read_to_string(&run).unwrap();
    // A 16.9 GB latent through [inputs] height/width/num_frames.
    std::fs::write(
        &run,
        base.replace(
            "height = 16\nwidth = 16\nnum_frames = 1",
            "height = 4096\nwidth = 4096\nnum_frames = 401",
        ),
    )
    .unwrap();
    prompted_refused(d.path(), &["run.toml", "inputs.height/width/num_frames"]);
    // A huge max_sequence_length.
    std::fs::write(
        &run,
        base.replace(
            "max_sequence_length = 8",
            "max_sequence_length = 1000000000",
        ),
    )
    .unwrap();
    prompted_refused(d.path(), &["run.toml", "prompt.max_sequence_length"]);
    // A text encoder config claiming 10^9 layers.
    std::fs::write(&run, &base).unwrap();
    edit_json(&root.join("text_encoder/config.json"), |v| {
        v["num_layers"] = serde_json::json!(1_000_000_000u64)
    });
    prompted_refused(d.path(), &["text_encoder/config.json", "num_layers"]);
}

#[test]
fn class3_a_decode_too_large_for_one_frame_points_at_vae_tiling_which_fits_it() {
    let d = tempfile::tempdir().unwrap();
    prompted_case(d.path());
    let run = d.path().join("run.toml");
    let base = std::fs::read_to_string(&run).unwrap().replace(
        "height = 16\nwidth = 16\nnum_frames = 1",
        "height = 1024\nwidth = 1024\nnum_frames = 5",
    );
    std::fs::write(&run, &base).unwrap();
    let base = base.replace("weights = \"pipe\"", "weights = \"pipe\"\ndtype = \"f32\"");
    std::fs::write(&run, &base).unwrap();
    // Untiled, the VAE's feature cache and working set of a 1024x1024 frame are the largest part
    // (1.0 GB; tiled 0.2 GB).
    let run_with = |limit: &str| {
        bin()
            .args(["run", "--quiet", "--config"])
            .arg(&run)
            .env("MAGCACHE_MEMORY_LIMIT", limit)
            .output()
            .unwrap()
    };
    let e = check_err(
        &run_with("600M"),
        &["run.toml: vae.tiling:", "set `tiling = true` in [vae]"],
    );
    assert!(e.contains("VAE decode working set (one frame"), "{e}");
    // Tiled, the same run fits: the plan's estimate is under the same limit.
    std::fs::write(&run, format!("{base}\n[vae]\ntiling = true\n")).unwrap();
    let o = bin()
        .args(["plan", "--config"])
        .arg(&run)
        .env("MAGCACHE_MEMORY_LIMIT", "600M")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("VAE decode tiles") && !out.contains("DOES NOT FIT"),
        "{out}"
    );
    // Tile sizes without tiling, bad sizes, and tiling on a run without a VAE are refused by key.
    std::fs::write(
        &run,
        format!("{base}\n[vae]\ntile_sample_min_height = 128\n"),
    )
    .unwrap();
    prompted_refused(d.path(), &["run.toml: vae.tiling:", "tiling = true"]);
    std::fs::write(
        &run,
        format!("{base}\n[vae]\ntiling = true\ntile_sample_stride_width = 100\n"),
    )
    .unwrap();
    prompted_refused(
        d.path(),
        &["run.toml: vae.tile_sample_stride_width: 100", "multiple of"],
    );
    // A small run with small tiles decodes through the tiles: same shape as untiled, other pixels.
    let small = base.replace(
        "height = 1024\nwidth = 1024\nnum_frames = 5",
        "height = 48\nwidth = 64\nnum_frames = 5",
    );
    let decoded = |text: &str, name: &str| {
        std::fs::write(&run, text).unwrap();
        let out = d.path().join(name);
        let o = bin()
            .args(["run", "--quiet", "--config"])
            .arg(&run)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["decoded"].clone()
    };
    let plain = decoded(&small, "plain.safetensors");
    let tiled = decoded(
        &format!("{small}\n[vae]\ntiling = true\ntile_sample_min_height = 32\ntile_sample_min_width = 32\ntile_sample_stride_height = 16\ntile_sample_stride_width = 24\n"),
        "tiled.safetensors",
    );
    assert_eq!(plain.dims(), tiled.dims());
    let diff = (plain - tiled)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 1e-4, "tiling changed nothing ({diff})");
    let c = Case::new("\n[vae]\ntiling = true\n");
    let o = magcache(&["run", "--quiet", "--config", s(&c.run_file())]);
    check_err(&o, &["vae.tiling", "prompted runs"]);
}

#[test]
fn class3_a_config_that_is_not_a_regular_file_is_refused_at_once() {
    let d = tempfile::tempdir().unwrap();
    let root = prompted_case(d.path());
    std::fs::remove_file(root.join("model_index.json")).unwrap();
    std::os::unix::fs::symlink("/dev/urandom", root.join("model_index.json")).unwrap();
    prompted_refused(d.path(), &["model_index.json", "not a regular file"]);
}

// ---- class 6: ambiguous or inconsistent input is refused ----

#[test]
fn class6_a_tensor_under_two_names_is_refused() {
    let c = Case::new("");
    let w = c.p("w/diffusion_pytorch_model.safetensors");
    let mut m = load(&w);
    let name = "blocks.0.attn1.to_q.weight";
    let t = m[name].clone();
    m.insert(format!("model.diffusion_model.{name}"), t);
    candle_core::safetensors::save(&m, &w).unwrap();
    check_err(
        &magcache(&["run", "--quiet", "--config", s(&c.run_file())]),
        &[name, "model.diffusion_model.", "two names"],
    );
}

/// Report timesteps of the prompted case's run.
fn timesteps(dir: &Path) -> Vec<f64> {
    let report = dir.join("r.json");
    let o = magcache(&[
        "run",
        "--quiet",
        "--config",
        s(&dir.join("run.toml")),
        "--report",
        s(&report),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    v["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["timestep"].as_f64().unwrap())
        .collect()
}

#[test]
fn class6_a_wan_folders_scheduler_is_read_or_refused() {
    let d = tempfile::tempdir().unwrap();
    let root = prompted_case(d.path());
    let run = d.path().join("run.toml");
    let base = std::fs::read_to_string(&run).unwrap();
    let sched = root.join("scheduler/scheduler_config.json");
    // An Euler scheduler at shift 3: the folder's shift is the default.
    std::fs::write(
        &sched,
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": false}"#,
    )
    .unwrap();
    let folder = timesteps(d.path());
    let with = |extra: &str| {
        std::fs::write(
            &run,
            base.replace("steps = 2\n", &format!("steps = 2\n{extra}")),
        )
        .unwrap();
        timesteps(d.path())
    };
    assert_eq!(folder, with("scheduler = \"euler\"\nshift = 3.0\n"));
    assert_ne!(folder, with("scheduler = \"euler\"\nshift = 5.0\n"));
    assert_eq!(folder, with("scheduler = \"euler\"\n"));
    std::fs::write(&run, &base).unwrap();
    // A class no Wan loop has.
    std::fs::write(&sched, r#"{"_class_name": "DDIMScheduler"}"#).unwrap();
    check_err(
        &magcache(&["run", "--quiet", "--config", s(&run)]),
        &["scheduler_config.json", "_class_name", "DDIMScheduler"],
    );
    // A missing scheduler/ is an error, as a missing tokenizer/ is.
    std::fs::remove_dir_all(root.join("scheduler")).unwrap();
    check_err(
        &magcache(&["run", "--quiet", "--config", s(&run)]),
        &["scheduler_config.json", "does not exist"],
    );
}

#[test]
fn class6_a_text_encoder_shallower_than_its_checkpoint_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let root = prompted_case(d.path());
    edit_json(&root.join("text_encoder/config.json"), |v| {
        v["num_layers"] = serde_json::json!(1)
    });
    check_err(
        &magcache(&["run", "--quiet", "--config", s(&d.path().join("run.toml"))]),
        &["encoder.block.1.*", "num_layers = 1"],
    );
}

#[test]
fn class6_a_tokenizer_of_another_model_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let root = prompted_case(d.path());
    edit_json(&root.join("tokenizer/tokenizer_config.json"), |v| {
        v["tokenizer_class"] = serde_json::json!("LlamaTokenizer")
    });
    check_err(
        &magcache(&["run", "--quiet", "--config", s(&d.path().join("run.toml"))]),
        &["tokenizer_config.json", "tokenizer_class", "LlamaTokenizer"],
    );
}

/// A FLUX pipeline folder's scheduler is read: a schnell-style config (no dynamic shifting, shift 1)
/// samples `linspace(1, 1/steps, steps)` unshifted; a scheduler FLUX has not is refused.
#[test]
fn class6_a_flux_folders_scheduler_is_read() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("pipe");
    copy_dir(&pipelines().join("flux_tiny_folder"), &root);
    std::fs::write(
        d.path().join("run.toml"),
        "[model]\nfamily = \"flux\"\nweights = \"pipe\"\n\n[prompt]\ntext = \"a cat\"\nmax_sequence_length = 8\n\n[inputs]\nheight = 32\nwidth = 32\n\n[sampling]\nsteps = 4\n",
    )
    .unwrap();
    let dev = timesteps(d.path());
    let sched = root.join("scheduler/scheduler_config.json");
    edit_json(&sched, |v| {
        v["use_dynamic_shifting"] = serde_json::json!(false);
        v["shift"] = serde_json::json!(1.0);
    });
    let schnell = timesteps(d.path());
    assert_ne!(dev, schnell);
    let want = [1000.0, 750.0, 500.0, 250.0];
    for (t, w) in schnell.iter().zip(want) {
        assert!((t - w).abs() < 1e-3, "{schnell:?}");
    }
    assert_eq!(schnell.len(), 4);
    edit_json(&sched, |v| {
        v["_class_name"] = serde_json::json!("UniPCMultistepScheduler")
    });
    check_err(
        &magcache(&["run", "--quiet", "--config", s(&d.path().join("run.toml"))]),
        &["scheduler_config.json", "_class_name"],
    );
}

/// A schedule `budget` larger than the calls of a scope is refused naming it (it was clamped
/// silently).
#[test]
fn class6_a_schedule_budget_beyond_the_steps_is_refused() {
    let c = Case::new("");
    let profile = c.p("p.toml");
    let o = magcache(&[
        "calibrate",
        "--quiet",
        "--config",
        s(&c.run_file()),
        "--out",
        s(&profile),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let base = std::fs::read_to_string(c.run_file()).unwrap();
    for (budget, ok) in [(3, true), (4, false)] {
        c.write_run(&format!(
            "{base}[cache]\nstrategy = \"schedule\"\nprofile = \"p.toml\"\nbudget = {budget}\n"
        ));
        let o = magcache(&["run", "--quiet", "--config", s(&c.run_file())]);
        if ok {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        } else {
            check_err(&o, &["cache.budget", "4"]);
        }
    }
}

/// A FLUX image whose untiled VAE decode does not fit is refused naming `vae.tiling`; with
/// `[vae] tiling = true` the decode's estimate is one tile's and the run's plan fits; the tiling keys
/// are checked by name.
#[test]
fn class3_a_flux_decode_too_large_points_at_vae_tiling_which_fits_it() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("pipe");
    copy_dir(&pipelines().join("flux_tiny_folder"), &root);
    let run = d.path().join("run.toml");
    let base = "[model]\nfamily = \"flux\"\nweights = \"pipe\"\ndtype = \"f32\"\n\n[prompt]\ntext = \"a cat\"\nmax_sequence_length = 8\n\n[inputs]\nheight = 4096\nwidth = 4096\n\n[sampling]\nsteps = 2\n";
    std::fs::write(&run, base).unwrap();
    let with_limit = |cmd: &str| {
        bin()
            .args([cmd, "--quiet", "--config"])
            .arg(&run)
            .env("MAGCACHE_MEMORY_LIMIT", "3G")
            .output()
            .unwrap()
    };
    let e = check_err(
        &with_limit("run"),
        &["run.toml: vae.tiling:", "set `tiling = true` in [vae]"],
    );
    assert!(e.contains("VAE decode working set"), "{e}");
    std::fs::write(&run, format!("{base}\n[vae]\ntiling = true\n")).unwrap();
    let o = bin()
        .args(["plan", "--config"])
        .arg(&run)
        .env("MAGCACHE_MEMORY_LIMIT", "3G")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("VAE decode tiles")
            && out.contains("8x8-latent tile")
            && !out.contains("DOES NOT FIT"),
        "{out}"
    );
    for (table, must) in [
        (
            "tile_sample_min_size = 32\n",
            vec!["run.toml: vae.tiling:", "tiling = true"],
        ),
        (
            "tiling = true\ntile_sample_min_size = 48\n",
            vec!["run.toml: vae: tile_sample_min_size 48", "multiple of 32"],
        ),
    ] {
        std::fs::write(&run, format!("{base}\n[vae]\n{table}")).unwrap();
        check_err(&with_limit("run"), &must);
    }
}

#[test]
fn class3_prompted_flux_sizes_are_guarded_naming_the_key() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("pipe");
    copy_dir(&pipelines().join("flux_tiny_folder"), &root);
    let run = d.path().join("run.toml");
    let base = "[model]\nfamily = \"flux\"\nweights = \"pipe\"\n\n[prompt]\ntext = \"a cat\"\nmax_sequence_length = 8\n\n[inputs]\nheight = 32\nwidth = 32\n\n[sampling]\nsteps = 2\n";
    std::fs::write(
        &run,
        base.replace("height = 32\nwidth = 32", "height = 65536\nwidth = 65536"),
    )
    .unwrap();
    prompted_refused(d.path(), &["run.toml", "inputs.height/width"]);
    // `plan` prints the stages' estimates: the text encoders, the transformer, then the VAE decode
    // (the transformer freed first), whose working set grows with the image.
    std::fs::write(
        &run,
        base.replace("height = 32\nwidth = 32", "height = 1024\nwidth = 1024"),
    )
    .unwrap();
    let o = bin().args(["plan", "--config"]).arg(&run).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    for want in [
        "encode text",
        "CLIP text encoder weights",
        "denoise",
        "decode",
        "VAE decode working set",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    std::fs::write(&run, base).unwrap();
    for (dir, key) in [
        ("text_encoder", "num_hidden_layers"),
        ("text_encoder_2", "num_layers"),
    ] {
        let cfg = root.join(dir).join("config.json");
        let before = std::fs::read(&cfg).unwrap();
        edit_json(&cfg, |v| v[key] = serde_json::json!(1_000_000_000u64));
        prompted_refused(d.path(), &[&format!("{dir}/config.json"), key]);
        std::fs::write(&cfg, before).unwrap();
    }
}
