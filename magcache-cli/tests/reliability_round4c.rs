//! Reliability round 4, third pass (issue 42), through the binary: pictures decoded within the
//! memory a run may use and JPEG headers checked against their data; an output path the system
//! reads as a folder refused before the run; `tune` refusing to write a run file whose relative
//! paths would not resolve from its folder; a Wan checkpoint whose blocks differ refused.

mod common;

use common::{check_err, i2v_run, magcache, s, Case};
use std::path::{Path, PathBuf};

fn encoded(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), format)
        .unwrap();
    bytes
}

/// A 16-bit picture of 2000 x 2000 pixels (a few KB as a file; decoded, turned and made 8-bit, 60
/// MB) is refused under a 40 MB limit before it is decoded, naming the limit.
#[test]
fn a_picture_is_decoded_within_the_memory_a_run_may_use() {
    let d = tempfile::tempdir().unwrap();
    let pic = d.path().join("deep.png");
    let img = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_pixel(
        2000,
        2000,
        image::Rgb([40000, 2000, 9000]),
    );
    std::fs::write(
        &pic,
        encoded(
            image::DynamicImage::ImageRgb16(img),
            image::ImageFormat::Png,
        ),
    )
    .unwrap();
    assert!(std::fs::metadata(&pic).unwrap().len() < 1 << 20);
    let run = i2v_run(d.path(), &pic);
    let o = common::bin()
        .args(["plan", "--config", s(&run)])
        .env("MAGCACHE_MEMORY_LIMIT", "40M")
        .output()
        .unwrap();
    // `plan` reads no picture; the run does, and refuses it before decoding.
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = common::bin()
        .args(["run", "--quiet", "--config", s(&run)])
        .env("MAGCACHE_MEMORY_LIMIT", "40M")
        .output()
        .unwrap();
    check_err(
        &o,
        &[
            "inputs.image",
            "deep.png",
            "MAGCACHE_MEMORY_LIMIT=40M",
            "2000x2000",
        ],
    );
}

/// A JPEG whose frame header claims 8000 x 8000 pixels over a 64 x 64 picture's data is refused
/// (the decoder would fill it with gray); one with a motion photo's trailer after its end marker
/// is read.
#[test]
fn a_jpeg_is_checked_against_its_data_not_its_tail() {
    let d = tempfile::tempdir().unwrap();
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 90]));
    let jpeg = encoded(
        image::DynamicImage::ImageRgb8(img),
        image::ImageFormat::Jpeg,
    );
    let mut lie = jpeg.clone();
    let sof = lie.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    lie[sof + 5..sof + 9].copy_from_slice(&[0x1F, 0x40, 0x1F, 0x40]);
    let pic = d.path().join("lie.jpg");
    std::fs::write(&pic, &lie).unwrap();
    let run = i2v_run(d.path(), &pic);
    let o = magcache(&["run", "--quiet", "--config", s(&run)]);
    check_err(&o, &["inputs.image", "lie.jpg", "claims"]);
    // A motion photo: 64 KB of video after the end-of-image marker.
    let mut motion = jpeg;
    motion.extend(b"\0\0\0\x18ftypmp42");
    motion.extend(vec![7u8; 64 << 10]);
    let pic = d.path().join("motion.jpg");
    std::fs::write(&pic, &motion).unwrap();
    let run = i2v_run(d.path(), &pic);
    let out = d.path().join("out.safetensors");
    let o = magcache(&["run", "--quiet", "--config", s(&run), "--out", s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.is_file());
}

/// `--out out.safetensors/` names a folder to the system: refused before the run, and nothing
/// appears.
#[test]
fn an_output_path_ending_in_a_separator_is_refused_before_the_run() {
    let c = Case::new("");
    let names = c.names();
    for cmd in ["run", "calibrate"] {
        let out = format!("{}/", s(&c.p("out.safetensors")));
        let o = magcache(&[cmd, "--config", s(&c.run_file()), "--out", &out]);
        check_err(&o, &["--out", "out.safetensors/", "separator"]);
        assert_eq!(c.names(), names, "{cmd}");
    }
}

/// Flags that would do nothing or write what their name does not say are refused before the run:
/// `--png` under another extension (it writes PNG), `--fps` without `--video`.
#[test]
fn flags_that_would_be_ignored_or_misnamed_are_refused() {
    let c = Case::new("");
    let names = c.names();
    for cmd in ["run", "compare"] {
        let jpg = s(&c.p("out.jpg")).to_string();
        let o = magcache(&[cmd, "--config", s(&c.run_file()), "--png", &jpg]);
        check_err(&o, &["--png", "out.jpg", ".png"]);
        let o = magcache(&[cmd, "--config", s(&c.run_file()), "--fps", "10"]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && stderr.contains("--video"),
            "{stderr}"
        );
        assert_eq!(c.names(), names, "{cmd}");
    }
}

/// `retention_ratio = 1.0` retains every call as warm-up: the run is dense, and `plan` says so as
/// it does for the guards' warm-up and last steps.
#[test]
fn a_retention_covering_every_call_warns_that_the_run_is_dense() {
    let c = Case::new(
        "\n[cache]\nstrategy = \"magcache\"\nthreshold = 0.1\nmag_ratios = [1.0, 0.99]\nretention_ratio = 1.0\n",
    );
    let o = magcache(&["plan", "--config", s(&c.run_file()), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let warned = j["warnings"].as_array().unwrap().iter().any(|w| {
        let w = w.as_str().unwrap();
        w.contains("cache.retention_ratio (1)") && w.contains("the run is dense")
    });
    assert!(warned, "{}", j["warnings"]);
}

/// A Wan2.2 boundary that gives one expert no step: said (the expert is loaded for nothing, and
/// the cache's curve for it unused), in `plan` as in a run.
#[test]
fn a_boundary_that_leaves_an_expert_idle_is_said() {
    let d = tempfile::tempdir().unwrap();
    let text = common::example_text("wan22_tiny_magcache.toml");
    for (boundary, idle) in [("0.0", "expert 1 (the low-noise one)"), ("0.875", "")] {
        let run = d.path().join("wan22.toml");
        let edited = text.replace(
            "boundary_ratio = 0.875",
            &format!("boundary_ratio = {boundary}"),
        );
        std::fs::write(&run, edited).unwrap();
        let o = magcache(&["plan", "--config", s(&run), "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let said = j["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("none of the 12 steps"));
        assert_eq!(said, !idle.is_empty(), "{}", j["warnings"]);
        if said {
            assert!(
                j["warnings"].to_string().contains(idle),
                "{}",
                j["warnings"]
            );
        }
    }
}

/// `model.gguf_repack = false` on weights that are not a GGUF file does nothing: said in the
/// run's warnings (Wan through its own run, FLUX.1 through the shared `RunSpec`), not ignored, and
/// in `plan`'s, which gives the warnings a run gives at its start.
#[test]
fn gguf_repack_off_on_a_checkpoint_that_is_not_gguf_is_said() {
    let d = tempfile::tempdir().unwrap();
    for example in ["wan21_tiny_magcache.toml", "flux_tiny_magcache.toml"] {
        for (extra, said) in [("gguf_repack = false\n", true), ("", false)] {
            let run = d.path().join("r.toml");
            let text = common::example_text(example).replacen(
                "[model]\n",
                &format!("[model]\n{extra}"),
                1,
            );
            std::fs::write(&run, text).unwrap();
            let line = "model.gguf_repack = false is not used: the weights are not a GGUF file";
            let o = magcache(&["run", "--config", s(&run), "--quiet"]);
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{example}: {stderr}");
            assert_eq!(stderr.contains(line), said, "{example}: {stderr}");
            let o = magcache(&["plan", "--config", s(&run), "--json"]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let in_plan = j["warnings"].to_string().contains(line);
            assert_eq!(in_plan, said, "{example}: {}", j["warnings"]);
        }
    }
}

/// A guidance scale on a step-distilled FLUX.2 klein (one call per step, no guidance embedding)
/// does nothing: said in the run's warnings, as a negative prompt there is.
#[test]
fn a_guidance_scale_a_distilled_model_ignores_is_said() {
    let d = tempfile::tempdir().unwrap();
    let text = common::example_text("flux2_klein_tiny_prompted.toml");
    for (extra, said) in [("guidance_scale = 7.0\n", true), ("", false)] {
        let run = d.path().join("k.toml");
        std::fs::write(
            &run,
            text.replacen("[sampling]\n", &format!("[sampling]\n{extra}"), 1),
        )
        .unwrap();
        let o = magcache(&["run", "--config", s(&run), "--quiet"]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        assert_eq!(
            stderr.contains("guidance_scale = 7 is not used"),
            said,
            "{stderr}"
        );
    }
}

/// `tune --out sub/fast.toml` would copy `weights = "w"` into `sub/`, where it names nothing:
/// refused before any run, naming the key; beside the run file, or with absolute paths, it works.
#[test]
fn tune_refuses_a_run_file_in_another_folder_with_relative_paths() {
    let c = Case::new("");
    std::fs::create_dir(c.p("sub")).unwrap();
    let out = c.p("sub/fast.toml");
    let o = magcache(&[
        "tune",
        "--config",
        s(&c.run_file()),
        "--out",
        s(&out),
        "--target-speedup",
        "1.5",
    ]);
    check_err(&o, &["run.toml", "inputs.file", "--out", "absolute"]);
    assert_eq!(std::fs::read_dir(c.p("sub")).unwrap().count(), 0);
    // Absolute paths travel.
    let text = std::fs::read_to_string(c.run_file())
        .unwrap()
        .replace("\"w\"", &format!("{:?}", s(&c.p("w"))))
        .replace(
            "\"in.safetensors\"",
            &format!("{:?}", s(&c.p("in.safetensors"))),
        );
    c.write_run(&text);
    let o = magcache(&[
        "tune",
        "--quiet",
        "--config",
        s(&c.run_file()),
        "--out",
        s(&out),
        "--target-speedup",
        "1.5",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = magcache(&["plan", "--config", s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A GGUF file (f32 tensors, `general.architecture = "wan"`) of `tensors`.
fn gguf(tensors: &std::collections::HashMap<String, candle_core::Tensor>) -> Vec<u8> {
    gguf_as(tensors, Ok("wan"))
}

/// [`gguf`] with `general.architecture` a string, or a u32 (`Err`).
fn gguf_as(
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
    arch: Result<&str, u32>,
) -> Vec<u8> {
    fn text(b: &mut Vec<u8>, t: &str) {
        b.extend((t.len() as u64).to_le_bytes());
        b.extend(t.as_bytes());
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((names.len() as u64).to_le_bytes());
    b.extend(1u64.to_le_bytes());
    text(&mut b, "general.architecture");
    match arch {
        Ok(a) => {
            b.extend(8u32.to_le_bytes()); // string
            text(&mut b, a);
        }
        Err(n) => {
            b.extend(4u32.to_le_bytes()); // u32
            b.extend(n.to_le_bytes());
        }
    }
    let mut data: Vec<u8> = Vec::new();
    for n in &names {
        let t = &tensors[*n];
        text(&mut b, n);
        let dims = t.dims();
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims.iter().rev() {
            b.extend((*d as u64).to_le_bytes());
        }
        b.extend(0u32.to_le_bytes()); // f32
        b.extend((data.len() as u64).to_le_bytes());
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        data.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        data.resize(data.len().div_ceil(32) * 32, 0);
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    b.extend(data);
    b
}

/// A GGUF Wan checkpoint has no config: it is read off block 0's tensors. A block 0 without the
/// query norm that the other blocks have is refused, naming the tensor, rather than run without
/// any block's norms; a size read off the header as zero names the file.
#[test]
fn a_wan_checkpoint_whose_blocks_differ_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let src = common::fixtures().join("wan21_tiny/diffusion_pytorch_model.safetensors");
    let mut t = candle_core::safetensors::load(&src, &candle_core::Device::Cpu).unwrap();
    let run = d.path().join("run.toml");
    let write_run = |f: &Path| {
        std::fs::write(
            &run,
            format!(
                "[model]\nfamily = \"wan2.1\"\nweights = {:?}\n\n[model.overrides]\nattention_head_dim = 16\n\n[inputs]\nlatent_shape = [1, 4, 1, 4, 4]\ntext_len = 4\n\n[sampling]\nsteps = 2\n",
                s(f)
            ),
        )
        .unwrap();
    };
    // Whole, it runs.
    let f = d.path().join("whole.gguf");
    std::fs::write(&f, gguf(&t)).unwrap();
    write_run(&f);
    let o = magcache(&["run", "--quiet", "--config", s(&run)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A size read off the header as zero is the file's fault: named with the file, not the run
    // file.
    let mut zero = t.clone();
    let k = "condition_embedder.time_embedder.linear_1.weight";
    let rows = zero[k].dim(0).unwrap();
    zero.insert(
        k.into(),
        candle_core::Tensor::zeros(
            (rows, 0),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    let f = d.path().join("zero.gguf");
    std::fs::write(&f, gguf(&zero)).unwrap();
    write_run(&f);
    let o = magcache(&["run", "--quiet", "--config", s(&run)]);
    check_err(&o, &["zero.gguf", "inferred from its tensors", "freq_dim"]);
    assert!(t.remove("blocks.0.attn1.norm_q.weight").is_some());
    let f = d.path().join("odd.gguf");
    std::fs::write(&f, gguf(&t)).unwrap();
    write_run(&f);
    let o = magcache(&["run", "--quiet", "--config", s(&run)]);
    check_err(&o, &["odd.gguf", "attn1.norm_q.weight", "block 0"]);
}

/// `plan` refuses the seeded latent shapes `run` refuses (a 4-d shape for Wan, channels that do
/// not pack into the model's, odd sides), with the same message, for every family.
#[test]
fn plan_refuses_the_latent_shapes_run_refuses() {
    let d = tempfile::tempdir().unwrap();
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let cases = [
        (
            "wan2.1",
            f.join("reference/wan21_tiny"),
            "[1, 4, 1, 4, 4]",
            "[1, 4, 1, 4]",
            "[1, 5, 1, 4, 4]",
        ),
        (
            "flux",
            f.join("reference/flux_tiny"),
            "[1, 4, 4, 4]",
            "[1, 4, 3, 4]",
            "[1, 5, 4, 4]",
        ),
        (
            "flux2",
            f.join("pipelines/flux2_transformer"),
            "[1, 32, 4, 4]",
            "[1, 4, 4, 4]",
            "[1, 32, 4, 3]",
        ),
        (
            "z-image",
            f.join("pipelines/zimage_transformer"),
            "[1, 16, 4, 4]",
            "[1, 16, 3, 4]",
            "[1, 4, 4, 4, 4]",
        ),
        (
            "qwen-image",
            f.join("pipelines/qwenimage_transformer"),
            "[1, 16, 4, 4]",
            "[1, 5, 4, 4]",
            "[1, 16, 4]",
        ),
    ];
    for (family, weights, good, bad1, bad2) in cases {
        for (shape, ok) in [(good, true), (bad1, false), (bad2, false)] {
            let run = d.path().join("run.toml");
            std::fs::write(
                &run,
                format!(
                    "[model]\nfamily = {family:?}\nweights = {:?}\n\n[inputs]\nlatent_shape = {shape}\ntext_len = 4\n\n[sampling]\nsteps = 2\n",
                    s(&weights)
                ),
            )
            .unwrap();
            let plan = magcache(&["plan", "--config", s(&run)]);
            let run = magcache(&["run", "--quiet", "--config", s(&run)]);
            let what = format!("{family} {shape}");
            assert_eq!(
                plan.status.success(),
                ok,
                "{what}: {}",
                String::from_utf8_lossy(&plan.stderr)
            );
            assert_eq!(
                run.status.success(),
                ok,
                "{what}: {}",
                String::from_utf8_lossy(&run.stderr)
            );
            if !ok {
                let e = check_err(&plan, &["inputs.latent_shape"]);
                assert_eq!(e, String::from_utf8_lossy(&run.stderr), "{what}");
            }
        }
    }
}

/// The tiny pipeline folder of `example` (its `weights`), linked into `dir/folder` with its
/// `model_index.json` changed by `edit`, and the example's run file pointing there.
#[cfg(unix)]
fn edited_folder(
    dir: &Path,
    example: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> PathBuf {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let text = std::fs::read_to_string(examples.join(example)).unwrap();
    let w = text
        .lines()
        .find_map(|l| l.strip_prefix("weights = "))
        .unwrap()
        .trim_matches('"');
    let src = examples.join(w);
    let folder = dir.join("folder");
    std::fs::create_dir(&folder).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "model_index.json" {
            std::os::unix::fs::symlink(e.path(), folder.join(e.file_name())).unwrap();
        }
    }
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("model_index.json")).unwrap())
            .unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(folder.join("model_index.json"), v.to_string()).unwrap();
    let run = dir.join("run.toml");
    let body: String = text
        .lines()
        .map(|l| match l.strip_prefix("weights = ") {
            Some(_) => format!("weights = {:?}", s(&folder)),
            None if l.starts_with("image = \"../") => {
                l.replace("\"../", &format!("\"{}/../", s(&examples)))
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&run, body).unwrap();
    run
}

/// A pipeline folder's `model_index.json` must declare each component the run loads as
/// `[library, class]`: a null, a bare string or a one-sided pair is refused naming the key, for
/// every family; `[null, null]` for an optional one (Wan2.2's image encoder) stays "absent".
#[cfg(unix)]
#[test]
fn pipeline_components_are_declared_library_and_class() {
    use serde_json::json;
    let cases = [
        ("wan21_tiny_prompted.toml", "text_encoder", json!(null)),
        ("flux_tiny_prompted.toml", "vae", json!("AutoencoderKL")),
        (
            "flux2_klein_tiny_prompted.toml",
            "transformer",
            json!(["diffusers", null]),
        ),
        (
            "zimage_tiny_prompted.toml",
            "scheduler",
            json!([null, null]),
        ),
        ("qwenimage_tiny_prompted.toml", "tokenizer", json!(7)),
        // A tokenizer class this runner does not implement for Wan (it tokenizes with T5's).
        (
            "wan21_tiny_prompted.toml",
            "tokenizer",
            json!(["transformers", "GPT2Tokenizer"]),
        ),
        (
            "wan21_i2v_tiny_prompted.toml",
            "image_encoder",
            json!(["transformers"]),
        ),
    ];
    for (example, key, value) in cases {
        let d = tempfile::tempdir().unwrap();
        let run = edited_folder(d.path(), example, |m| {
            m.insert(key.into(), value.clone());
        });
        let o = magcache(&["plan", "--config", s(&run)]);
        let o = if o.status.success() {
            magcache(&["run", "--quiet", "--config", s(&run)])
        } else {
            o
        };
        check_err(&o, &["model_index.json", key]);
    }
    // Unchanged, each folder plans.
    let d = tempfile::tempdir().unwrap();
    let run = edited_folder(d.path(), "wan22_i2v_tiny_prompted.toml", |_| {});
    let o = magcache(&["plan", "--config", s(&run)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Errors about files the run file names say the key: a FIFO as `model.config` or a scheduler
/// config, a missing adapter; a GGUF `general.architecture` that is a number is said to be one
/// (was "missing"), and called a key, not a tensor.
#[cfg(unix)]
#[test]
fn named_files_and_gguf_metadata_are_named_as_such() {
    let c = Case::new("");
    let fifo = c.p("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let text = std::fs::read_to_string(c.run_file()).unwrap();
    for (edit, key) in [
        (
            text.replace("weights = \"w\"", "weights = \"w\"\nconfig = \"fifo\""),
            "model.config",
        ),
        (
            format!("{text}\n[[model.lora]]\npath = \"gone.safetensors\"\n"),
            "model.lora[0].path",
        ),
        (
            text.replace("shift = 5.0", "shift = 5.0\nscheduler_config = \"fifo\""),
            "sampling.scheduler_config",
        ),
    ] {
        c.write_run(&edit);
        let o = magcache(&["plan", "--config", s(&c.run_file())]);
        check_err(&o, &["run.toml", key]);
    }
    let src = common::fixtures().join("wan21_tiny/diffusion_pytorch_model.safetensors");
    let t = candle_core::safetensors::load(&src, &candle_core::Device::Cpu).unwrap();
    let f = c.p("n.gguf");
    std::fs::write(&f, gguf_as(&t, Err(7))).unwrap();
    c.write_run(
        "[model]\nfamily = \"wan2.1\"\nweights = \"n.gguf\"\n\n[inputs]\nlatent_shape = [1, 4, 1, 4, 4]\ntext_len = 4\n\n[sampling]\nsteps = 2\n",
    );
    let o = magcache(&["plan", "--config", s(&c.run_file())]);
    let e = check_err(
        &o,
        &["n.gguf", "key `general.architecture`", "not a string"],
    );
    assert!(!e.contains("tensor"), "{e}");
}

/// FLUX.2's chat template is read from the folder: one this runner cannot render (another chat
/// format) is refused through the binary, naming the file, before any weight loads.
#[cfg(unix)]
#[test]
fn a_flux2_chat_template_this_runner_cannot_render_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let run = edited_folder(d.path(), "flux2_klein_tiny_prompted.toml", |_| {});
    // The tokenizer folder copied (the others stay links) with another chat format as template.
    let tok = d.path().join("folder").join("tokenizer");
    let src = std::fs::read_link(&tok).unwrap();
    std::fs::remove_file(&tok).unwrap();
    std::fs::create_dir(&tok).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tok.join(e.file_name())).unwrap();
    }
    let other = "{% for m in messages %}USER: {{ m.content }}\n{% endfor %}ASSISTANT:";
    std::fs::write(tok.join("chat_template.jinja"), other).unwrap();
    let o = magcache(&["run", "--quiet", "--config", s(&run)]);
    check_err(
        &o,
        &["chat_template.jinja", "not a template this runner renders"],
    );
}
