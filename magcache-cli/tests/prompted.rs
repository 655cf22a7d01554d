//! Prompted runs through the binary (the contract's "Prompted runs"): a Wan pipeline folder
//! assembled from the fixture parts as a released one is laid out; every output written; errors.
//! Parity with diffusers' pipeline is tested in `tests/tests/wan_pipeline.rs`.

use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

const PIPELINE: &str = "pipelines/wan_pipeline";

fn load_json(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// A released-style pipeline folder from the fixture parts: `wan_X/` becomes `X/`.
fn assemble(dir: &Path) -> PathBuf {
    let root = dir.join("Wan-Tiny-Diffusers");
    for part in [
        "tokenizer",
        "text_encoder",
        "transformer",
        "vae",
        "scheduler",
    ] {
        let to = root.join(part);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(fixture(&format!("pipelines/wan_{part}"))).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    std::fs::write(
        root.join("model_index.json"),
        r#"{"_class_name": "WanPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}"#,
    )
    .unwrap();
    root
}

/// The contract's prompted run with the fixture call's prompt, size and sampling; FBCache.
fn run_toml(root: &Path, meta: &Value) -> String {
    let call = &meta["call"];
    format!(
        "[model]\nfamily = \"wan2.1\"\nweights = {}\n\n[prompt]\ntext = {}\nnegative = {}\nmax_sequence_length = {}\n\n[inputs]\nheight = {}\nwidth = {}\nnum_frames = {}\n\n[sampling]\nsteps = {}\nguidance_scale = {}\n\n[cache]\nstrategy = \"fbcache\"\nthreshold = 0.1\n",
        toml_str(&root.display().to_string()),
        toml_str(call["prompt"].as_str().unwrap()),
        toml_str(call["negative_prompt"].as_str().unwrap()),
        call["max_sequence_length"],
        call["height"],
        call["width"],
        call["num_frames"],
        call["num_inference_steps"],
        call["guidance_scale"],
    )
}

/// The contract's prompted run through the binary: `--out` holds `final`, `decoded` and both
/// embeddings; `--video` (GIF) and `--png` (frame grid) are written; the report has the stages, and
/// the warning that the GIF plays slower than `--fps 60` (on stderr as it is written, too).
#[test]
fn prompted_run_through_the_binary_writes_every_output() {
    let meta = load_json(&format!("{PIPELINE}.json"));
    let dir = tempfile::tempdir().unwrap();
    let root = assemble(dir.path());
    let cfg = dir.path().join("run.toml");
    // Seeded latents (no inputs file): the size comes from height/width/num_frames.
    std::fs::write(&cfg, run_toml(&root, &meta)).unwrap();
    let out = dir.path().join("out.safetensors");
    let gif = dir.path().join("video.gif");
    let png = dir.path().join("frames.png");
    let report = dir.path().join("report.json");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(["run", "--quiet", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .arg("--video")
        .arg(&gif)
        .args(["--fps", "60"])
        .arg("--png")
        .arg(&png)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("a GIF plays at most 50"), "{stderr}");
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let call = &meta["call"];
    let (h, w, f) = (
        call["height"].as_u64().unwrap() as usize,
        call["width"].as_u64().unwrap() as usize,
        call["num_frames"].as_u64().unwrap() as usize,
    );
    assert_eq!(t["decoded"].dims(), &[1, f, h, w, 3]);
    let lat: Vec<usize> = serde_json::from_value(meta["latent_shape"].clone()).unwrap();
    assert_eq!(t["final"].dims(), lat.as_slice());
    assert!(t.contains_key("prompt_embeds") && t.contains_key("negative_prompt_embeds"));
    let px = t["decoded"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        px.iter().all(|v| (0.0..=1.0).contains(v)),
        "pixels in [0, 1]"
    );
    assert!(std::fs::read(&gif).unwrap().starts_with(b"GIF89a"));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let stages: Vec<&str> = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["encode text", "denoise", "decode"]);
    let warned = r["warnings"].as_array().unwrap().iter();
    assert!(
        warned
            .filter(|w| w.as_str().unwrap().contains("a GIF plays at most 50"))
            .count()
            == 1,
        "{}",
        r["warnings"]
    );
    // Each stage's own peak, the run's true peak over all of them, the run's whole wall time.
    let st = r["stages"].as_array().unwrap();
    let run_peak = r["run_peak_rss_bytes"].as_u64().unwrap();
    let mut walls = 0.0;
    for s in st {
        assert!(s["peak_rss_bytes"].as_u64().unwrap() <= run_peak, "{s}");
        assert!(s["own_peak"].is_boolean(), "{s}");
        walls += s["wall_seconds"].as_f64().unwrap();
    }
    assert!(r["run_wall_seconds"].as_f64().unwrap() >= walls, "{r}");
    // The denoising loop's time in the linear layers and the attention: both ran, and within the
    // loop's wall time (the text encoder's layers before it not counted).
    let (lin, att) = (
        r["cpu_time"]["linear_seconds"].as_f64().unwrap(),
        r["cpu_time"]["attention_seconds"].as_f64().unwrap(),
    );
    assert!(lin > 0.0 && att > 0.0, "{r}");
    assert!(lin + att <= r["wall_seconds"].as_f64().unwrap(), "{r}");
    // Not on a terminal and not --quiet: a long stage's progress on stderr (every unit and stage
    // here, with the interval at 0 s), the stages and the run in the summary.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("MAGCACHE_PROGRESS_SECONDS", "0")
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}");
    for note in [
        "encode text done in",
        "encode text: layer 1/",
        "denoise: step 1/",
        "decode: latent frame 1/",
        "decode done in",
    ] {
        assert!(err.contains(note), "stderr should say `{note}`:\n{err}");
    }
    assert!(out.contains("stages: encode text"), "{out}");
    // `plan` estimates each stage the run goes through.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(["plan", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan: Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = plan["memory"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["encode text", "denoise", "decode"]);
    // With the default interval a run this short prints no progress at all.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let quiet_err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !quiet_err.contains("done in") && !quiet_err.contains("denoise:"),
        "{quiet_err}"
    );
    assert!(out.contains("run: peak RSS"), "{out}");
}

/// A prompted run needs a pipeline folder, and `--video` a prompted run: one-line errors.
#[test]
fn prompted_run_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nfamily = \"wan2.1\"\nweights = {}\n\n[prompt]\ntext = \"a fox\"\n\n[sampling]\nsteps = 2\n",
            toml_str(&fixture("pipelines/wan_transformer").display().to_string())
        ),
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("model.weights") && err.contains("model_index.json"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// A Wan2.2 A14B-style folder (`transformer/` + `transformer_2/`, `boundary_ratio` in
/// `model_index.json`) runs prompted: both experts run their own steps and the video is decoded.
#[test]
fn wan22_two_expert_pipeline_folder_runs_prompted() {
    let meta = load_json(&format!("{PIPELINE}.json"));
    let dir = tempfile::tempdir().unwrap();
    let root = assemble(dir.path());
    let t2 = root.join("transformer_2");
    std::fs::create_dir_all(&t2).unwrap();
    for e in std::fs::read_dir(root.join("transformer")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), t2.join(e.file_name())).unwrap();
    }
    std::fs::write(
        root.join("model_index.json"),
        r#"{"_class_name": "WanPipeline", "boundary_ratio": 0.875, "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": ["diffusers", "WanTransformer3DModel"]}"#,
    )
    .unwrap();
    let cfg = dir.path().join("run.toml");
    let text = run_toml(&root, &meta).replace("family = \"wan2.1\"", "family = \"wan2.2\"");
    std::fs::write(&cfg, text).unwrap();
    let report = dir.path().join("r.json");
    let out = dir.path().join("o.safetensors");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(["run", "--quiet", "--config"])
        .arg(&cfg)
        .arg("--report")
        .arg(&report)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let experts: std::collections::BTreeSet<u64> = r["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["expert"].as_u64().unwrap())
        .collect();
    assert_eq!(experts.len(), 2, "both experts run: {experts:?}");
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert!(t.contains_key("decoded"));
}

/// A FLUX.1 pipeline folder (the fixture example) runs prompted through the binary: `--out` holds
/// `decoded` `[1, H, W, 3]` and both embeddings, `--png` writes the picture.
#[test]
fn flux_prompted_run_writes_the_picture() {
    let ex = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/flux_tiny_prompted.toml");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let png = dir.path().join("cat.png");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_magcache"))
        .args(["run", "--quiet", "--config"])
        .arg(&ex)
        .arg("--out")
        .arg(&out)
        .arg("--png")
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let cfg: toml::Table = std::fs::read_to_string(&ex).unwrap().parse().unwrap();
    let h = cfg["inputs"]["height"].as_integer().unwrap() as usize;
    let w = cfg["inputs"]["width"].as_integer().unwrap() as usize;
    assert_eq!(t["decoded"].dims(), &[1, h, w, 3]);
    assert!(t.contains_key("prompt_embeds") && t.contains_key("pooled_prompt_embeds"));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
}

/// `offload = "stream"` streams the text encoder with the transformer: the same embeddings, latents
/// and pixels as the held run, bit for bit.
#[test]
fn a_streamed_prompted_run_matches_the_held_one() {
    let meta = load_json(&format!("{PIPELINE}.json"));
    let dir = tempfile::tempdir().unwrap();
    let root = assemble(dir.path());
    let held = run_toml(&root, &meta);
    let streamed = held.replacen("[model]\n", "[model]\noffload = \"stream\"\n", 1);
    let mut outs = Vec::new();
    for (name, text) in [("held", &held), ("streamed", &streamed)] {
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, text).unwrap();
        let out = dir.path().join(format!("{name}.safetensors"));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_magcache"))
            .args(["run", "--quiet", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        outs.push(candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap());
    }
    for k in [
        "prompt_embeds",
        "negative_prompt_embeds",
        "final",
        "decoded",
    ] {
        let a = outs[0][k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = outs[1][k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{k} differs"
        );
    }
}

/// GIF frame delays are whole hundredths of a second, rounded to the nearest, never under the 2/100 s
/// players keep (a shorter one plays at 1/10 s); a `--video` name without an extension says so.
#[test]
fn gif_delays_round_to_what_players_show() {
    use magcache_cli::video::{gif_delay, video_kind, GIF_MAX_FPS};
    assert_eq!(gif_delay(16), 6); // 6.25
    assert_eq!(gif_delay(3), 33);
    assert_eq!(gif_delay(24), 4); // 4.17
    assert_eq!(gif_delay(15), 7); // 6.67
    assert_eq!(gif_delay(GIF_MAX_FPS), 2);
    assert_eq!(gif_delay(60), 2);
    assert_eq!(gif_delay(1000), 2);
    for name in ["v", ".gif", "dir/out"] {
        let e = video_kind("--video", std::path::Path::new(name))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no extension"), "{name}: {e}");
    }
}
