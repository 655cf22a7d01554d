//! Helpers shared by the runner's integration tests: the binary, its one-line errors, and a
//! folder with a copy of the tiny Wan checkpoint.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference")
}

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_magcache"));
    c.env("RUST_BACKTRACE", "1");
    // A developer's oneDNN (docs/config.md) adds a note line to stderr, which the one-line error
    // checks would count; the oneDNN paths have tests of their own that name it.
    c.env_remove("MAGCACHE_ONEDNN");
    c
}

/// Waits for `child` to end by itself within `limit`; kills it and fails with `what` otherwise.
pub fn wait_within(
    child: &mut std::process::Child,
    limit: std::time::Duration,
    what: &str,
) -> std::process::ExitStatus {
    let t = std::time::Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} (not ended within {limit:?})");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

pub fn magcache(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts a failure with one line on stderr naming each of `must_name`; returns stderr.
pub fn check_err(o: &Output, must_name: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line:\n{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in must_name {
        assert!(stderr.contains(n), "stderr should name `{n}`: {stderr}");
    }
    stderr
}

/// A folder with a copy of the tiny Wan checkpoint (`w/`), its inputs (`in.safetensors`) and a run
/// file (`run.toml`) over them; `extra` is appended to the run file.
pub struct Case {
    pub dir: tempfile::TempDir,
}

impl Case {
    pub fn new(extra: &str) -> Case {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("w");
        std::fs::create_dir(&w).unwrap();
        for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
            std::fs::copy(fixtures().join("wan21_tiny").join(f), w.join(f)).unwrap();
        }
        std::fs::copy(
            fixtures().join("wan21_tiny_loop.safetensors"),
            dir.path().join("in.safetensors"),
        )
        .unwrap();
        let c = Case { dir };
        c.write_run(&format!(
            "[model]\nfamily = \"wan2.1\"\nweights = \"w\"\n\n[inputs]\nfile = \"in.safetensors\"\n\n[sampling]\nsteps = 3\nshift = 5.0\nguidance_scale = 5.0\n{extra}"
        ));
        c
    }
    pub fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn run_file(&self) -> PathBuf {
        self.p("run.toml")
    }
    pub fn write_run(&self, text: &str) {
        std::fs::write(self.run_file(), text).unwrap();
    }
    /// Every file name in the folder (not recursing), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }
    /// Runs `args`, expects an error naming `must_name`, and asserts `protected` is byte for byte
    /// unchanged and no file appeared.
    pub fn refuses(&self, args: &[&str], protected: &Path, must_name: &[&str]) -> String {
        let before = std::fs::read(protected).unwrap();
        let names = self.names();
        let o = magcache(args);
        let e = check_err(&o, must_name);
        assert_eq!(
            std::fs::read(protected).unwrap(),
            before,
            "{} changed",
            protected.display()
        );
        assert_eq!(self.names(), names, "files appeared or vanished: {e}");
        e
    }
}

/// The text of `examples/NAME`, its fixture paths (`"../tests/...`) made absolute so that the run
/// file can be written anywhere.
pub fn example_text(name: &str) -> String {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    std::fs::read_to_string(examples.join(name))
        .unwrap()
        .replace("\"../tests", &format!("\"{}/../tests", s(&examples)))
}

/// The tiny prompted I2V run, its first frame replaced by `picture`.
pub fn i2v_run(dir: &Path, picture: &Path) -> PathBuf {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let text = std::fs::read_to_string(examples.join("wan21_i2v_tiny_prompted.toml")).unwrap();
    let folder = examples.join("../tests/fixtures/pipelines/wan21_i2v_folder");
    let body: String = text
        .lines()
        .map(|l| {
            if l.starts_with("weights") {
                format!("weights = {:?}", s(&folder))
            } else if l.starts_with("image") {
                format!("image = {:?}", s(picture))
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let run = dir.join("run.toml");
    std::fs::write(&run, body).unwrap();
    run
}

/// Names in `dir` of what the runner writes while an output is not whole: its temporaries
/// (`.NAME.magcache-PID.tmp`, `.magcache-*` folders) and partial outputs.
pub fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("magcache-") || n.ends_with(".tmp") || n.contains("partial"))
        .collect()
}
