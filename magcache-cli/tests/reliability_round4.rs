//! Reliability round 4 (issue 42), through the binary: file headers that claim too much (GGUF
//! nesting and counts, a picture's size), special files where a file is expected (FIFOs,
//! devices), revisions that leave the hub cache, `tune` never touching a profile it did not write,
//! one-line errors that name the `[[model.lora]]` entry, and `--quiet` keeping warnings.

mod common;

use common::{bin, check_err, magcache, s, temporaries, Case};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A GGUF v3 header with no tensor and the one metadata entry `key` whose value bytes are `value`
/// (after its type id `ty`).
fn gguf_with(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key.as_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(value);
    b
}

fn run_file(dir: &Path, weights: &str, extra: &str) -> PathBuf {
    let p = dir.join("run.toml");
    std::fs::write(
        &p,
        format!(
            "[model]\nfamily = \"wan2.1\"\nweights = {weights:?}\n\n[inputs]\nlatent_shape = [1, 4, 1, 4, 4]\n\n[sampling]\nsteps = 2\n{extra}"
        ),
    )
    .unwrap();
    p
}

/// Runs `args`, and fails the test if it takes more than `secs` (a hang) or dies of a signal.
fn within(secs: u64, args: &[&str]) -> std::process::Output {
    let mut child = bin()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            panic!("`magcache {}` still running after {secs} s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn gguf_headers_that_claim_too_much_are_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    // Arrays nested 100 000 deep (a stack overflow when read recursively without a bound).
    let mut deep = Vec::new();
    for _ in 0..100_000 {
        deep.extend(9u32.to_le_bytes());
        deep.extend(1u64.to_le_bytes());
    }
    // An array claiming 2^24 entries, then nothing (capacity reserved from the claim).
    let mut big = 4u32.to_le_bytes().to_vec();
    big.extend((1u64 << 24).to_le_bytes());
    for (name, value, says) in [("deep.gguf", deep, "nested"), ("big.gguf", big, "(header)")] {
        let f = d.path().join(name);
        std::fs::write(&f, gguf_with("x", 9, &value)).unwrap();
        let run = run_file(d.path(), s(&f), "");
        for args in [vec!["plan"], vec!["run", "--quiet"]] {
            let mut args = args.clone();
            args.extend(["--config", s(&run)]);
            let o = within(60, &args);
            let e = check_err(&o, &[name]);
            assert!(
                e.contains(says) || e.contains("array") || e.contains("header"),
                "{e}"
            );
        }
    }
    // A tensor whose data offset is off the file's alignment.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    let name = "blocks.0.ffn.net.2.weight";
    b.extend((name.len() as u64).to_le_bytes());
    b.extend(name.as_bytes());
    b.extend(2u32.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(0u32.to_le_bytes()); // f32
    b.extend(3u64.to_le_bytes()); // offset 3: not a multiple of 32
    b.resize(b.len() + 256, 0);
    let f = d.path().join("shifted.gguf");
    std::fs::write(&f, b).unwrap();
    let run = run_file(d.path(), s(&f), "");
    let o = within(60, &["run", "--config", s(&run), "--quiet"]);
    check_err(&o, &["shifted.gguf", name, "alignment"]);
}

#[cfg(unix)]
#[test]
fn special_files_are_refused_at_once() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("adapter.safetensors");
    let gguf_fifo = d.path().join("model.gguf");
    for f in [&fifo, &gguf_fifo] {
        let made = std::process::Command::new("mkfifo")
            .arg(f)
            .status()
            .unwrap();
        assert!(made.success());
    }
    for (lora, what) in [
        (s(&fifo), "adapter.safetensors"),
        ("/dev/zero", "/dev/zero"),
    ] {
        let c = Case::new(&format!("\n[[model.lora]]\npath = {lora:?}\n"));
        let o = within(30, &["run", "--config", s(&c.run_file()), "--quiet"]);
        check_err(&o, &[what, "not a regular file"]);
    }
    // Weights that are a FIFO, a device or missing: the run file's error, naming the key.
    for (weights, says) in [
        (s(&gguf_fifo), "not a regular file"),
        ("/dev/zero", "not a regular file"),
        ("/nonexistent/model.gguf", "does not exist"),
    ] {
        let run = run_file(d.path(), weights, "");
        let o = within(30, &["run", "--config", s(&run), "--quiet"]);
        check_err(&o, &[weights, "model.weights", says]);
    }
}

/// A PNG whose header claims `w x h` (valid chunks and CRCs, one tiny IDAT).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn pictures_that_claim_too_much_or_are_cut_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let huge = d.path().join("huge.png");
    std::fs::write(&huge, png_claiming(100_000, 100_000)).unwrap();
    assert!(std::fs::metadata(&huge).unwrap().len() < 200);
    // A real JPEG cut short (the decoder would fill the rest with gray).
    let jpeg = d.path().join("cut.jpg");
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 90]));
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    bytes.truncate(bytes.len() * 2 / 3);
    std::fs::write(&jpeg, bytes).unwrap();
    for (pic, says) in [(&huge, "larger than a run reads"), (&jpeg, "truncated")] {
        let run = common::i2v_run(d.path(), pic);
        let o = within(120, &["run", "--config", s(&run), "--quiet"]);
        check_err(&o, &["inputs.image", says]);
    }
}

#[test]
fn a_revision_never_leaves_the_hub_cache() {
    let d = tempfile::tempdir().unwrap();
    let hub = d.path().join("hub");
    let repo = hub.join("models--org--m");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::write(
        d.path().join("secret.txt"),
        "the first line of a private file\n",
    )
    .unwrap();
    for rev in ["../../../secret.txt", "/etc/hostname", "a/../../b"] {
        let run = run_file(d.path(), "org/m", "");
        let text = std::fs::read_to_string(&run).unwrap().replace(
            "weights = \"org/m\"",
            &format!("weights = \"org/m\"\nrevision = {rev:?}"),
        );
        std::fs::write(&run, text).unwrap();
        let o = bin()
            .args(["plan", "--config", s(&run)])
            .env("HF_HUB_CACHE", &hub)
            .output()
            .unwrap();
        let e = check_err(&o, &["model.revision"]);
        assert!(!e.contains("private file"), "{e}");
    }
}

#[test]
fn lora_table_errors_name_the_entry() {
    let c = Case::new("\n[[model.lora]]\npath = \"a.safetensors\"\n\n[[model.lora]]\npath = 5\n");
    let o = magcache(&["plan", "--config", s(&c.run_file())]);
    check_err(&o, &["model.lora[1].path"]);
}

#[test]
fn quiet_keeps_warnings() {
    // The 4-step distilled digits model with a cache: the few-step warning.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let text = std::fs::read_to_string(examples.join("digits_4step_lora.toml")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let fixtures = examples.join("../tests");
    let text = text.replace("\"../tests", &format!("\"{}", s(&fixtures)));
    let run = d.path().join("run.toml");
    std::fs::write(
        &run,
        format!("{text}\n[cache]\nstrategy = \"fbcache\"\nthreshold = 0.3\n"),
    )
    .unwrap();
    let o = magcache(&["run", "--config", s(&run), "--quiet"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:"),
        "--quiet dropped the warnings: {stderr}"
    );
    assert!(o.stdout.is_empty(), "--quiet printed a summary");
}

#[test]
fn tune_never_touches_a_profile_it_did_not_write() {
    let d = tempfile::tempdir().unwrap();
    let profile = d.path().join("tuned.profile.toml");
    std::fs::write(&profile, "mine\n").unwrap();
    let out = d.path().join("tuned.toml");
    let run = run_file(d.path(), "missing-weights", "");
    let tune = |run: &Path| {
        let args = ["tune", "--config", s(run), "--out", s(&out)];
        magcache(&[&args[..], &["--target-speedup", "2", "--quiet"]].concat())
    };
    // A file at NAME.profile.toml that no `--out` file names is the user's: refused before any
    // work (the run's missing weights are never reached), naming it.
    check_err(&tune(&run), &["tuned.profile.toml", "not the profile of"]);
    assert_eq!(std::fs::read_to_string(&profile).unwrap(), "mine\n");
    assert!(!out.exists());
    // The profile of an earlier tune (the run file at --out names it) may be replaced, but a
    // tune that fails leaves both as they were: here in its calibration run (no such weights).
    let earlier = "[cache]\nstrategy = \"magcache\"\nprofile = \"tuned.profile.toml\"\n";
    std::fs::write(&out, earlier).unwrap();
    check_err(&tune(&run), &["missing-weights"]);
    assert_eq!(std::fs::read_to_string(&profile).unwrap(), "mine\n");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), earlier);
    // Our own example, with a `[cache.mag_ratios]` subtable (tune replaces it with the table it
    // chooses).
    let text = common::example_text("wan22_tiny_magcache.toml");
    let digits = d.path().join("wan22.toml");
    std::fs::write(&digits, text).unwrap();
    let tune_to = |speedup: &str| {
        let args = ["tune", "--config", s(&digits), "--out", s(&out)];
        magcache(&[&args[..], &["--target-speedup", speedup, "--quiet"]].concat())
    };
    // One no schedule can reach is refused before any run, saying the most there is (one
    // computed call of each scope: 24 calls over 4 scopes): nothing written, the pair kept.
    check_err(&tune_to("100"), &["--target-speedup 100", "at most 6.00x"]);
    assert_eq!(
        std::fs::read_to_string(&profile).unwrap(),
        "mine
"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), earlier);
    // 4x is met over the two experts together (one computed call of each scope): the earlier
    // tune's pair is replaced, whole.
    let o = tune_to("4");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(written.contains("tuned.profile.toml"), "{written}");
    let p = std::fs::read_to_string(&profile).unwrap();
    assert!(
        p.parse::<toml::Table>()
            .is_ok_and(|t| t.contains_key("ratios")),
        "{p}"
    );
    let left: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".magcache-"))
        .collect();
    assert!(left.is_empty(), "temporaries left: {left:?}");
}

#[test]
fn a_refused_export_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let preset = |family: &str, preset: &str| {
        let p = d.path().join(format!("{family}.toml"));
        std::fs::write(
            &p,
            format!("[model]\nfamily = \"{family}\"\npreset = \"{preset}\"\nseed = 7\n\n[inputs]\nlatent_shape = [1, 16, 2, 4, 4]\n\n[sampling]\nsteps = 2\n"),
        )
        .unwrap();
        p
    };
    let wan = preset("wan2.1", "wan2.1-t2v-1.3b");
    let flux = preset("flux", "flux-dev");
    let out = d.path().join("out");
    for (run, gguf, says) in [(&wan, "q9_9", "q9_9"), (&flux, "q8_0", "no GGUF export")] {
        let o = magcache(&[
            "export",
            "--config",
            s(run),
            "--out",
            s(&out),
            "--gguf",
            gguf,
        ]);
        check_err(&o, &[says]);
        assert!(!out.exists());
        assert_eq!(temporaries(d.path()), Vec::<String>::new());
    }
}

#[test]
fn a_non_finite_lora_is_named_with_its_key() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/lora/wan21_diffusers.safetensors");
    let mut tensors = candle_core::safetensors::load(&fixture, &candle_core::Device::Cpu).unwrap();
    let key = tensors
        .keys()
        .find(|k| k.contains("lora_B") || k.contains("lora_up"))
        .unwrap()
        .clone();
    let t = &tensors[&key];
    let bad = (t.ones_like().unwrap() * f64::NAN).unwrap();
    tensors.insert(key.clone(), bad);
    let c = Case::new("\n[[model.lora]]\npath = \"nan.safetensors\"\n");
    candle_core::safetensors::save(&tensors, c.dir.path().join("nan.safetensors")).unwrap();
    let o = magcache(&["run", "--config", s(&c.run_file()), "--quiet"]);
    check_err(&o, &["nan.safetensors", &key, "non-finite"]);
}

#[test]
fn a_zero_dimensional_lora_factor_is_named() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/lora/wan21_diffusers.safetensors");
    let mut tensors = candle_core::safetensors::load(&fixture, &candle_core::Device::Cpu).unwrap();
    let key = tensors
        .keys()
        .find(|k| k.contains("lora_A") || k.contains("lora_down"))
        .unwrap()
        .clone();
    tensors.insert(
        key.clone(),
        candle_core::Tensor::new(1f32, &candle_core::Device::Cpu).unwrap(),
    );
    let c = Case::new("\n[[model.lora]]\npath = \"zero_d.safetensors\"\n");
    candle_core::safetensors::save(&tensors, c.dir.path().join("zero_d.safetensors")).unwrap();
    let o = magcache(&["run", "--config", s(&c.run_file()), "--quiet"]);
    check_err(&o, &["zero_d.safetensors", &key, "dimensions"]);
}

#[cfg(unix)]
#[test]
fn a_dangling_config_link_says_so() {
    let c = Case::new("");
    let cfg = c.dir.path().join("w").join("config.json");
    std::fs::remove_file(&cfg).unwrap();
    std::os::unix::fs::symlink("../blobs/0123abcd", &cfg).unwrap();
    let o = magcache(&["run", "--config", s(&c.run_file()), "--quiet"]);
    check_err(&o, &["config.json", "symbolic link", "does not exist"]);
}

#[test]
fn the_stale_temporary_cleanup_never_takes_an_input() {
    // An inputs file whose name matches the runner's temporaries, of a process that is gone.
    let c = Case::new("");
    let name = ".magcache-4000000-0.tmp";
    std::fs::rename(c.dir.path().join("in.safetensors"), c.dir.path().join(name)).unwrap();
    let text = std::fs::read_to_string(c.run_file())
        .unwrap()
        .replace("in.safetensors", name);
    c.write_run(&text);
    // A user's file of the same pattern (or the backup a killed commit left): never removed.
    let precious = c.dir.path().join(".magcache-4000001-0.bak");
    std::fs::write(&precious, "precious").unwrap();
    let out = c.dir.path().join("out.safetensors");
    let o = magcache(&[
        "run",
        "--config",
        s(&c.run_file()),
        "--out",
        s(&out),
        "--quiet",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        c.dir.path().join(name).exists(),
        "the run's input was removed"
    );
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "precious");
    assert!(
        stderr.contains(".magcache-4000001-0.bak") && stderr.contains("not removed"),
        "{stderr}"
    );
    assert!(out.exists());
}

#[test]
fn lora_metadata_of_the_wrong_type_is_named() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/lora/wan21_diffusers.safetensors");
    let tensors = candle_core::safetensors::load(&fixture, &candle_core::Device::Cpu).unwrap();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                k.clone(),
                t.dims().to_vec(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let rank = data
        .iter()
        .find(|(k, _, _)| k.ends_with(".lora_A.weight"))
        .map(|(_, sh, _)| sh[0])
        .expect("a lora_A matrix");
    let cases: Vec<(String, String)> = vec![
        (
            r#"{"transformer.lora_alpha": "8"}"#.into(),
            "transformer.lora_alpha".into(),
        ),
        (
            r#"{"transformer.use_rslora": "true"}"#.into(),
            "transformer.use_rslora".into(),
        ),
        // Not an object; DoRA (its magnitude vectors would be dropped); a rank as a string; an
        // alpha for a module the adapter does not have (it would apply to nothing).
        (r#"[8.0]"#.into(), "must be a JSON object".into()),
        (r#"{"transformer.use_dora": true}"#.into(), "DoRA".into()),
        (r#"{"transformer.r": "4"}"#.into(), "transformer.r".into()),
        (
            r#"{"transformer.alpha_pattern": {"blocks.9.attn1.to_q": 2.0}}"#.into(),
            "alpha_pattern.blocks.9.attn1.to_q".into(),
        ),
        // A pattern that names a module applies: this one still runs (checked below).
        (
            r#"{"transformer.alpha_pattern": {"attn1.to_q": 2.0}}"#.into(),
            "".into(),
        ),
        // A rank the tensors do not have, globally or for one module (PEFT builds its layers
        // from these and refuses the file), and a rank pattern naming no module.
        (
            format!(r#"{{"transformer.r": {}}}"#, rank + 3),
            "transformer.r".into(),
        ),
        (format!(r#"{{"transformer.r": {rank}}}"#), "".into()),
        (
            format!(
                r#"{{"transformer.r": {rank}, "transformer.rank_pattern": {{"attn1.to_k": {}}}}}"#,
                rank + 1
            ),
            "rank_pattern.attn1.to_k".into(),
        ),
        (
            format!(r#"{{"transformer.rank_pattern": {{"blocks.9.attn1.to_k": {rank}}}}}"#),
            "rank_pattern.blocks.9.attn1.to_k".into(),
        ),
    ];
    for (meta, key) in &cases {
        let (meta, key) = (meta.as_str(), key.as_str());
        let c = Case::new("\n[[model.lora]]\npath = \"meta.safetensors\"\n");
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(k, sh, b)| {
                let v =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, sh.clone(), b);
                (k.clone(), v.unwrap())
            })
            .collect();
        let m = std::collections::HashMap::from([(
            "lora_adapter_metadata".to_string(),
            meta.to_string(),
        )]);
        safetensors::tensor::serialize_to_file(
            views,
            Some(m),
            &c.dir.path().join("meta.safetensors"),
        )
        .unwrap();
        let o = magcache(&["run", "--config", s(&c.run_file()), "--quiet"]);
        if key.is_empty() {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        } else {
            check_err(&o, &["meta.safetensors", key]);
        }
    }
}

#[cfg(unix)]
#[test]
fn sigint_during_tune_leaves_the_profile() {
    let d = tempfile::tempdir().unwrap();
    let profile = d.path().join("tuned.profile.toml");
    std::fs::write(&profile, "mine\n").unwrap();
    let text = common::example_text("wan22_tiny_magcache.toml");
    let run = d.path().join("wan22.toml");
    std::fs::write(&run, text).unwrap();
    let out = d.path().join("tuned.toml");
    // An earlier tune's pair (the run file names its profile): the only profile tune replaces.
    let earlier = "[cache]\nstrategy = \"magcache\"\nprofile = \"tuned.profile.toml\"\n";
    std::fs::write(&out, earlier).unwrap();
    let mut child = bin()
        .args([
            "tune",
            "--config",
            s(&run),
            "--out",
            s(&out),
            "--target-psnr",
            "300",
            "--quiet",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupted once the calibration profile is in its temporary (the candidates are running).
    let start = Instant::now();
    loop {
        let written = std::fs::read_dir(d.path()).unwrap().any(|e| {
            let e = e.unwrap();
            e.file_name().to_string_lossy().starts_with(".magcache-")
                && e.metadata().map(|m| m.len() > 0).unwrap_or(false)
        });
        if written || child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no profile written"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    eprintln!("tune ended with {:?}: {stderr}", o.status.code());
    // Interrupted (130), or, had it ended first, refused (1): never a written profile.
    assert!(matches!(o.status.code(), Some(130) | Some(1)), "{stderr}");
    assert_eq!(std::fs::read_to_string(&profile).unwrap(), "mine\n");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), earlier);
    assert_eq!(temporaries(d.path()), Vec::<String>::new(), "{stderr}");
}

/// A safetensors file of f32 tensors `(name, shape, value)`, each filled with its one value.
fn safetensors_of(tensors: &[(&str, Vec<usize>, f32)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, v) in tensors {
        let n: usize = shape.iter().product();
        let start = data.len();
        for _ in 0..n {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    out
}

/// `export` in f16 of a preset whose adapter pushes a weight past f16's range (65504) refuses,
/// naming the tensor, and writes nothing (it used to write `inf` with exit 0).
#[test]
fn an_f16_export_that_overflows_is_refused() {
    let d = tempfile::tempdir().unwrap();
    // Wan2.1 shrunk: 2 heads of 12 -> width 24; the adapter adds 3e5 to every `to_q` weight of block 0.
    let lora = d.path().join("big.safetensors");
    std::fs::write(
        &lora,
        safetensors_of(&[
            (
                "transformer.blocks.0.attn1.to_q.lora_A.weight",
                vec![1, 24],
                1.0,
            ),
            (
                "transformer.blocks.0.attn1.to_q.lora_B.weight",
                vec![24, 1],
                3e5,
            ),
        ]),
    )
    .unwrap();
    let run = d.path().join("run.toml");
    std::fs::write(
        &run,
        format!(
            "[model]\nfamily = \"wan2.1\"\npreset = \"wan2.1-t2v-1.3b\"\nseed = 7\ndtype = \"f16\"\n\n[[model.lora]]\npath = {:?}\n\n[model.overrides]\nnum_layers = 2\nnum_attention_heads = 2\nattention_head_dim = 12\nffn_dim = 40\ntext_dim = 16\nfreq_dim = 8\n\n[inputs]\nlatent_shape = [1, 16, 2, 4, 4]\ntext_len = 5\n\n[sampling]\nsteps = 2\n",
            s(&lora)
        ),
    )
    .unwrap();
    let out = d.path().join("out");
    let o = magcache(&["export", "--config", s(&run), "--out", s(&out)]);
    check_err(&o, &["blocks.0.attn1.to_q.weight", "non-finite"]);
    assert!(!out.exists());
    assert_eq!(temporaries(d.path()), Vec::<String>::new());
    // In f32 the values are finite, but a GGUF block's f16 scale (its largest value over 127 for
    // Q8_0, over 8 for Q4_0) is not: refused as written, naming the tensor.
    std::fs::write(&lora, {
        let big = |k: &str, shape: Vec<usize>, v: f32| (k.to_string(), shape, v);
        let t = [
            big(
                "transformer.blocks.0.attn1.to_q.lora_A.weight",
                vec![1, 24],
                1.0,
            ),
            big(
                "transformer.blocks.0.attn1.to_q.lora_B.weight",
                vec![24, 1],
                3e7,
            ),
        ];
        let refs: Vec<(&str, Vec<usize>, f32)> = t
            .iter()
            .map(|(k, s, v)| (k.as_str(), s.clone(), *v))
            .collect();
        safetensors_of(&refs)
    })
    .unwrap();
    let text = std::fs::read_to_string(&run).unwrap();
    std::fs::write(&run, text.replace("dtype = \"f16\"", "dtype = \"f32\"")).unwrap();
    for quant in ["q8_0", "q4_0"] {
        let o = magcache(&[
            "export",
            "--config",
            s(&run),
            "--out",
            s(&out),
            "--gguf",
            quant,
        ]);
        check_err(&o, &["blocks.0.attn1.to_q.weight", "overflows"]);
        assert!(!out.exists(), "{quant}");
        assert_eq!(temporaries(d.path()), Vec::<String>::new(), "{quant}");
    }
}

/// `export` of a preset with an adapter whose `.alpha` is NaN refuses, naming the adapter file and
/// the key, and writes nothing, as f32 safetensors and as GGUF (it wrote all-NaN tensors, and Q8_0
/// NaNs as zeros, with exit 0).
#[test]
fn an_export_with_a_nan_alpha_adapter_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let lora = d.path().join("nan.safetensors");
    let q = "transformer.blocks.0.attn1.to_q";
    std::fs::write(
        &lora,
        safetensors_of(&[
            (&format!("{q}.lora_A.weight"), vec![1, 24], 0.5),
            (&format!("{q}.lora_B.weight"), vec![24, 1], 0.5),
            (&format!("{q}.alpha"), vec![], f32::NAN),
        ]),
    )
    .unwrap();
    let run = d.path().join("run.toml");
    std::fs::write(
        &run,
        format!(
            "[model]\nfamily = \"wan2.1\"\npreset = \"wan2.1-t2v-1.3b\"\nseed = 7\ndtype = \"f32\"\n\n[[model.lora]]\npath = {:?}\n\n[model.overrides]\nnum_layers = 2\nnum_attention_heads = 2\nattention_head_dim = 12\nffn_dim = 40\ntext_dim = 16\nfreq_dim = 8\n\n[inputs]\nlatent_shape = [1, 16, 2, 4, 4]\ntext_len = 5\n\n[sampling]\nsteps = 2\n",
            s(&lora)
        ),
    )
    .unwrap();
    let out = d.path().join("out");
    for extra in [&[][..], &["--gguf", "q8_0"][..]] {
        let mut args = vec!["export", "--config", s(&run), "--out", s(&out)];
        args.extend_from_slice(extra);
        let o = magcache(&args);
        check_err(
            &o,
            &["nan.safetensors", &format!("{q}.alpha"), "non-finite"],
        );
        assert!(!out.exists(), "{extra:?}");
        assert_eq!(temporaries(d.path()), Vec::<String>::new(), "{extra:?}");
    }
}
