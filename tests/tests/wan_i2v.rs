//! Prompted image-to-video Wan runs against diffusers' `WanImageToVideoPipeline` (and `WanPipeline`
//! on the TI2V-5B folder): `fixtures/pipelines/{wan21_i2v,wan22_i2v,wan22_ti2v}_*`. Each case's
//! parts are assembled into a folder laid out as the released one (its `model_index.json` as
//! recorded), the first frame given as `[inputs] image`, and every reference run repeated through
//! the runner: decisions identical, embeddings and the condition within 1e-4, final latents 1e-3,
//! decoded video 3e-3. Sizes, prompts, steps and settings all come from the case's json.

use magcache_tests::{
    assert_calls_match, cache_table_for, copy_dir, fixture, link_all, load, load_json, max_abs,
    max_abs_diff,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The case's pipeline folder as released: each component under its own name beside the recorded
/// `model_index.json`.
fn assemble(dir: &Path, meta: &Value) -> PathBuf {
    let root = dir.join("pipeline");
    for (part, folder) in meta["components"].as_object().unwrap() {
        copy_dir(
            &fixture(&format!("pipelines/{}", folder.as_str().unwrap())),
            &root.join(part),
        );
    }
    std::fs::write(
        root.join("model_index.json"),
        serde_json::to_string_pretty(&meta["model_index"]).unwrap(),
    )
    .unwrap();
    root
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// The contract's image-to-video run file for reference run `name` of `case`.
fn run_toml(root: &Path, case: &str, meta: &Value, name: &str) -> String {
    let call = &meta["call"];
    let run = &meta["runs"][name];
    let image = run["mode"].as_str() != Some("t2v");
    let mut s = format!(
        "[model]\nfamily = {}\nweights = {}\n\n[prompt]\ntext = {}\nnegative = {}\nmax_sequence_length = {}\n\n[inputs]\nheight = {}\nwidth = {}\nnum_frames = {}\nfile = {}\n",
        q(meta["family"].as_str().unwrap()),
        q(&root.display().to_string()),
        q(call["prompt"].as_str().unwrap()),
        q(call["negative_prompt"].as_str().unwrap()),
        call["max_sequence_length"],
        call["height"],
        call["width"],
        call["num_frames"],
        q(&fixture(&format!("pipelines/{case}_pipeline.safetensors"))
            .display()
            .to_string()),
    );
    if image {
        let png = fixture(&format!("pipelines/{}", meta["image"].as_str().unwrap()));
        s.push_str(&format!("image = {}\n", q(&png.display().to_string())));
    }
    s.push_str(&format!(
        "\n[sampling]\nsteps = {}\nguidance_scale = {}\n",
        call["num_inference_steps"], call["guidance_scale"]
    ));
    if let Some(g2) = call.get("guidance_scale_2") {
        s.push_str(&format!("guidance_scale_2 = {g2}\n"));
    }
    let base = name.strip_prefix("t2v_").unwrap_or(name);
    if base != "dense" {
        s.push_str("\n[cache]\n");
        s.push_str(&cache_table_for(base, &run["config"]).unwrap());
    }
    s
}

fn check_run(case: &str, name: &str) {
    link_all();
    let meta = load_json(&format!("pipelines/{case}_pipeline.json"));
    let want = load(&format!("pipelines/{case}_pipeline.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    let root = assemble(dir.path(), &meta);
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, run_toml(&root, case, &meta, name)).unwrap();
    let mut p = magcache_cli::prepare(&cfg).unwrap();
    let (fin, report) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
    let extra = magcache_tests::decoded_outputs(&mut *p.pipeline, &fin);
    let get = |k: &str| extra.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone());
    let run = &meta["runs"][name];
    assert_calls_match(&format!("{case}/{name}"), &report, &run["calls"], 1e-3);
    assert_eq!(
        report.computed_calls as u64,
        run["computed_calls"].as_u64().unwrap(),
        "{case}/{name}: computed calls"
    );
    for k in ["prompt_embeds", "negative_prompt_embeds", "image_embeds"] {
        match (get(k), want.get(k)) {
            (Some(got), Some(w)) => {
                let d = max_abs_diff(&got, w);
                eprintln!("{case}/{name}: {k} max |diff| {d:.3e}");
                assert!(d <= 1e-4, "{case}/{name}: {k} differs by {d}");
            }
            (None, None) => {}
            (g, w) => panic!(
                "{case}/{name}: {k} written {} but recorded {}",
                g.is_some(),
                w.is_some()
            ),
        }
    }
    let image_run = run["mode"].as_str() != Some("t2v");
    match get("condition") {
        Some(c) => {
            assert!(image_run, "{case}/{name}: a text run wrote a condition");
            let d = max_abs_diff(&c, &want["condition"]);
            let scale = max_abs(&want["condition"]);
            eprintln!("{case}/{name}: condition max |diff| {d:.3e} (max |ref| {scale:.3})");
            assert!(
                d <= 1e-4 * scale.max(1.0),
                "{case}/{name}: condition differs by {d}"
            );
        }
        None => assert!(!image_run, "{case}/{name}: no condition written"),
    }
    let d = max_abs_diff(&fin, &want[&format!("{name}.final")]);
    eprintln!("{case}/{name}: final max |diff| {d:.3e}");
    assert!(d <= 1e-3, "{case}/{name}: final differs by {d}");
    let d = max_abs_diff(&get("decoded").unwrap(), &want[&format!("{name}.video")]);
    eprintln!("{case}/{name}: decoded max |diff| {d:.3e}");
    assert!(d <= 3e-3, "{case}/{name}: decoded differs by {d}");
}

#[test]
fn wan22_i2v_dense_matches_the_pipeline() {
    check_run("wan22_i2v", "dense");
}

#[test]
fn wan22_i2v_magcache_per_expert_scopes_match_the_pipeline() {
    check_run("wan22_i2v", "magcache");
}

#[test]
fn wan22_i2v_fbcache_matches_the_pipeline() {
    check_run("wan22_i2v", "fbcache");
}

#[test]
fn wan21_i2v_dense_matches_the_pipeline() {
    check_run("wan21_i2v", "dense");
}

#[test]
fn wan21_i2v_magcache_matches_the_pipeline() {
    check_run("wan21_i2v", "magcache");
}

#[test]
fn wan21_i2v_fbcache_matches_the_pipeline() {
    check_run("wan21_i2v", "fbcache");
}

#[test]
fn wan22_ti2v_image_runs_match_the_pipeline() {
    for name in ["dense", "magcache", "fbcache"] {
        check_run("wan22_ti2v", name);
    }
}

#[test]
fn wan22_ti2v_text_runs_match_the_pipeline() {
    for name in ["t2v_dense", "t2v_magcache", "t2v_fbcache"] {
        check_run("wan22_ti2v", name);
    }
}

/// The CLIP image processor's `pixel_values` (1e-6) from the PNG and the folder's
/// `preprocessor_config.json`.
#[test]
fn wan21_i2v_clip_pixel_values_match_the_processor() {
    use magcache_models::wan::image_encoder::ClipImageProcessor;
    let meta = load_json("pipelines/wan21_i2v_pipeline.json");
    let want = load("pipelines/wan21_i2v_pipeline.safetensors");
    let png = fixture(&format!("pipelines/{}", meta["image"].as_str().unwrap()));
    let img = magcache_layers::picture::load_rgb8(&png, "run.toml", "inputs.image").unwrap();
    let cfg = fixture("pipelines/wan21_i2v_image_processor/preprocessor_config.json");
    let proc = ClipImageProcessor::read(&cfg).unwrap();
    let px = proc
        .pixel_values(&img, &candle_core::Device::Cpu, "cfg")
        .unwrap();
    let d = max_abs_diff(&px, &want["image.pixel_values"]);
    assert!(d <= 1e-6, "pixel_values differ by {d}");
}

/// A picture so narrow that the processor's resize (shorter side to `shortest_edge`) would make
/// a multi-gigabyte picture is refused before the resize allocates it (1 x 32768 at the released
/// 224 would be 224 x 7340032).
#[test]
fn a_picture_the_clip_resize_would_blow_up_is_refused() {
    use magcache_layers::picture::Rgb8;
    use magcache_models::wan::image_encoder::ClipImageProcessor;
    let src = fixture("pipelines/wan21_i2v_image_processor/preprocessor_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    cfg["size"]["shortest_edge"] = 224.into();
    cfg["crop_size"] = serde_json::json!({"height": 224, "width": 224});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preprocessor_config.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let proc = ClipImageProcessor::read(&path).unwrap();
    let narrow = Rgb8 {
        width: 1,
        height: 32768,
        data: vec![128; 3 * 32768],
    };
    let e = proc
        .pixel_values(&narrow, &candle_core::Device::Cpu, "cfg")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("inputs.image") && e.contains("224x7340032"),
        "{e}"
    );
    // A picture of ordinary proportions still goes through.
    let ok = Rgb8 {
        width: 40,
        height: 30,
        data: vec![128; 3 * 40 * 30],
    };
    let px = proc
        .pixel_values(&ok, &candle_core::Device::Cpu, "cfg")
        .unwrap();
    assert_eq!(px.dims(), &[1, 3, 224, 224]);
}

fn prepare_err(toml_text: &str, dir: &Path) -> String {
    link_all();
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, toml_text).unwrap();
    match magcache_cli::prepare(&cfg) {
        Ok(_) => panic!("prepared: {toml_text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn image_folders_refuse_what_they_cannot_run() {
    let meta = load_json("pipelines/wan22_i2v_pipeline.json");
    let dir = tempfile::tempdir().unwrap();
    let root = assemble(dir.path(), &meta);
    let text = run_toml(&root, "wan22_i2v", &meta, "dense");
    // No image for an image-to-video folder.
    let no_image: String = text
        .lines()
        .filter(|l| !l.starts_with("image = "))
        .map(|l| format!("{l}\n"))
        .collect();
    let e = prepare_err(&no_image, dir.path());
    assert!(e.contains("inputs.image") && e.contains("missing"), "{e}");
    // A missing picture names the key and the file.
    let e = prepare_err(
        &text.replace("_first_frame.png", "_no_such.png"),
        dir.path(),
    );
    assert!(
        e.contains("inputs.image") && e.contains("_no_such.png"),
        "{e}"
    );
    // An empty path is said to be empty (it joined to the run's folder, "a folder, not a file").
    let empty: String = text
        .lines()
        .map(|l| match l.starts_with("image = ") {
            true => "image = \"\"\n".to_string(),
            false => format!("{l}\n"),
        })
        .collect();
    let e = prepare_err(&empty, dir.path());
    assert!(e.contains("inputs.image") && e.contains("is empty"), "{e}");
    // A speech-to-video folder.
    let mut idx = meta["model_index"].clone();
    idx["_class_name"] = "WanSpeechToVideoPipeline".into();
    std::fs::write(root.join("model_index.json"), idx.to_string()).unwrap();
    let e = prepare_err(&text, dir.path());
    assert!(e.contains("S2V-14B") && e.contains("_class_name"), "{e}");
    // A text-to-video folder given an image.
    idx["_class_name"] = "WanPipeline".into();
    std::fs::write(root.join("model_index.json"), idx.to_string()).unwrap();
    let e = prepare_err(&text, dir.path());
    assert!(
        e.contains("inputs.image") && e.contains("text-to-video"),
        "{e}"
    );
}

/// The image stage is guarded before it loads: an image encoder too large for the machine is
/// refused naming its config file and key.
#[test]
fn image_encoder_size_is_guarded_naming_the_key() {
    let meta = load_json("pipelines/wan21_i2v_pipeline.json");
    let dir = tempfile::tempdir().unwrap();
    let root = assemble(dir.path(), &meta);
    let cfg = root.join("image_encoder").join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["num_hidden_layers"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = prepare_err(&run_toml(&root, "wan21_i2v", &meta, "dense"), dir.path());
    assert!(
        e.contains("image_encoder/config.json") && e.contains("num_hidden_layers"),
        "{e}"
    );
}

/// `picture::resize` against PIL's `Image.resize` (Pillow 13, `fixtures/picture/`, written by
/// `fixtures/tools/make_picture_fixtures.py`): LANCZOS (the VAE input) and BICUBIC (the CLIP
/// processor) down and up, both axes and one at a time; the bytes must be PIL's.
#[test]
fn resampling_matches_pil_byte_for_byte() {
    use magcache_layers::picture::{load_rgb8, resize, Filter};
    let dir = fixture("picture");
    let src = load_rgb8(&dir.join("source.png"), "run.toml", "inputs.image").unwrap();
    let mut checked = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        let Some(rest) = name
            .strip_prefix("PIL-")
            .and_then(|r| r.strip_suffix(".png"))
        else {
            continue;
        };
        let (filter, size) = rest.split_once('-').unwrap();
        let (w, h) = size.split_once('x').unwrap();
        let (w, h): (usize, usize) = (w.parse().unwrap(), h.parse().unwrap());
        let f = if filter == "lanczos" {
            Filter::Lanczos
        } else {
            Filter::Bicubic
        };
        let want = load_rgb8(&dir.join(&name), "run.toml", "inputs.image").unwrap();
        let got = resize(&src, w, h, f).unwrap();
        assert_eq!((got.width, got.height), (want.width, want.height), "{name}");
        let diff: Vec<i32> = got
            .data
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .collect();
        let off = diff.iter().filter(|d| **d > 0).count();
        let max = diff.iter().max().copied().unwrap_or(0);
        eprintln!("{name}: {off} of {} bytes differ, max {max}", diff.len());
        assert_eq!(max, 0, "{name}: {off} bytes differ from PIL's (max {max})");
        checked += 1;
    }
    assert_eq!(checked, 10);
}

/// A JPEG whose EXIF orientation says "rotate 90 degrees" is read upright, as diffusers'
/// `load_image` (`exif_transpose`) reads it: same size, and the pixels within JPEG decoders'
/// rounding (libjpeg against zune-jpeg).
/// Also where the `image` crate alone would not turn it and PIL does: a PNG's `eXIf` chunk after the
/// pixel data (exact pixels), an orientation stored as LONG.
#[test]
fn exif_orientation_is_applied() {
    use magcache_layers::picture::load_rgb8;
    let dir = fixture("picture");
    for (name, as_loaded, exact) in [
        ("exif6.jpg", "exif6-as-loaded.png", false),
        ("exif6_long.jpg", "exif6_long-as-loaded.png", false),
        ("exif6_late.png", "exif6_late-as-loaded.png", true),
    ] {
        let got = load_rgb8(&dir.join(name), "run.toml", "inputs.image").unwrap();
        let want = load_rgb8(&dir.join(as_loaded), "run.toml", "inputs.image").unwrap();
        assert_eq!((got.width, got.height), (want.width, want.height), "{name}");
        assert_eq!((got.width, got.height), (47, 61), "{name}");
        let mean: f64 = got
            .data
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / got.data.len() as f64;
        eprintln!("{name}: mean |diff| {mean:.3} levels against PIL's decode");
        match exact {
            true => assert_eq!(got.data, want.data, "{name}"),
            false => assert!(mean < 2.0, "{name}: mean |diff| {mean}"),
        }
    }
}

/// `got` against PIL's reading of the picture `name` in `dir` (`want_NAME_EXT.png`): the same size,
/// and the largest and mean differences of its bytes.
fn against_pil(
    dir: &std::path::Path,
    name: &str,
    got: &magcache_layers::picture::Rgb8,
) -> (u8, f64) {
    let want = format!("want_{}.png", name.replace('.', "_"));
    let want =
        magcache_layers::picture::load_rgb8(&dir.join(want), "run.toml", "inputs.image").unwrap();
    assert_eq!((got.width, got.height), (want.width, want.height), "{name}");
    let diffs = || got.data.iter().zip(&want.data).map(|(a, b)| a.abs_diff(*b));
    let worst = diffs().max().unwrap();
    let mean = diffs().map(f64::from).sum::<f64>() / got.data.len() as f64;
    (worst, mean)
}

/// Where the EXIF block has no orientation entry, the XMP packet's `tiff:Orientation` turns the
/// picture, as PIL's `getexif` falls back on it (`picture/xmp/`, made by
/// `tests/fixtures/tools/make_picture_fixtures.py`: a JPEG's XMP segment; a PNG's XMP in `iTXt`,
/// compressed `iTXt`, `zTXt`, after the pixel data; an EXIF orientation of 1 that hides it; an EXIF
/// block without one that does not): PIL's size and pixels, PNGs exactly, the JPEG within its
/// decoders' rounding.
#[test]
fn the_xmp_orientation_is_applied_where_exif_has_none() {
    use magcache_layers::picture::load_rgb8;
    let dir = fixture("picture/xmp");
    let cases = std::fs::read_to_string(dir.join("cases.txt")).unwrap();
    let mut turned = 0;
    for line in cases.lines() {
        let [name, size, _, orientation] = line.split(' ').collect::<Vec<_>>()[..] else {
            panic!("{line}")
        };
        let got = load_rgb8(&dir.join(name), "run.toml", "inputs.image").unwrap();
        assert_eq!(format!("{}x{}", got.width, got.height), size, "{name}");
        let (worst, mean) = against_pil(&dir, name, &got);
        eprintln!("{name}: orientation {orientation}, max |diff| {worst}, mean {mean:.3}");
        match name.ends_with(".png") {
            true => assert_eq!(worst, 0, "{name}"),
            false => assert!(mean < 2.0, "{name}: mean |diff| {mean}"),
        }
        turned += usize::from(orientation != "1");
    }
    assert!(turned >= 6, "{cases}");
}

/// Every pixel format a PNG or JPEG may hold reads as diffusers' `load_image` reads it
/// (`picture/modes/`, `tests/fixtures/tools/make_picture_fixtures.py`): PNGs byte for byte (alpha
/// dropped, gray, 1-bit and palettes expanded, 16-bit values cut to their high byte as PIL does),
/// JPEGs within 2 levels (another decoder); a 16-bit grayscale PNG (with a transparent colour or
/// not), which PIL clips to white, is refused naming the file and key.
#[test]
fn every_pixel_format_reads_as_pil_converts_it() {
    use magcache_layers::picture::load_rgb8;
    let dir = fixture("picture/modes");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with("want_"))
        .collect();
    names.sort();
    assert!(names.len() >= 14, "{names:?}");
    for n in names {
        let got = load_rgb8(&dir.join(&n), "run.toml", "inputs.image");
        if n.starts_with("l16") {
            let e = got.err().unwrap().to_string();
            assert!(
                e.contains("run.toml") && e.contains("inputs.image") && e.contains("16-bit"),
                "{e}"
            );
            continue;
        }
        let got = got.unwrap_or_else(|e| panic!("{n}: {e}"));
        let (worst, _) = against_pil(&dir, &n, &got);
        let bound = if n.ends_with(".jpg") { 2 } else { 0 };
        assert!(worst <= bound, "{n}: {worst} levels from PIL's");
    }
}

/// `WanImageToVideoPipeline` runs ftfy on every prompt (`prompt_cleaning_cases` of each image
/// case: curly quotes, ligatures, full-width forms, mojibake, markup, whitespace): the cleaned text
/// matches, and an image run's encoder cleans curly quotes to straight ones (the same embeddings),
/// where a text-only run's keeps them (as a `WanPipeline` without ftfy installed: the text-to-video
/// reference's cleaning, `magcache_text::clean`).
#[test]
fn image_runs_clean_prompts_as_ftfy_does() {
    for case in ["wan21_i2v", "wan22_i2v", "wan22_ti2v"] {
        let meta = load_json(&format!("pipelines/{case}_pipeline.json"));
        let cases = meta["prompt_cleaning_cases"].as_array().unwrap();
        assert!(!cases.is_empty(), "{case}");
        for c in cases {
            let got = magcache_text::prompt_clean_ftfy(c["text"].as_str().unwrap()).unwrap();
            assert_eq!(
                got,
                c["cleaned"].as_str().unwrap(),
                "{case}: {:?}",
                c["text"]
            );
        }
    }
    let enc = |ftfy: bool| {
        magcache_text::WanTextEncoder::load(
            &fixture("pipelines/wan21_i2v_tokenizer"),
            &fixture("pipelines/wan21_i2v_text_encoder"),
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
        .unwrap()
        .with_ftfy(ftfy)
    };
    let (curly, straight) = (
        "It\u{2019}s a \u{201c}quiet\u{201d} lake",
        "It's a \"quiet\" lake",
    );
    let e = enc(true);
    assert_eq!(e.clean(curly).unwrap(), straight);
    let (a, _) = e.encode(curly, 16).unwrap();
    let (b, _) = e.encode(straight, 16).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert_eq!(enc(false).clean(curly).unwrap(), curly);
}

/// The image run cleans its prompt with ftfy end to end: the TI2V case's image run with its prompt
/// wrapped in terminal escapes (which ftfy removes) reproduces the reference's embeddings and
/// latents; its text-only run (cleaned as a `WanPipeline` without ftfy) keeps the escapes and does
/// not.
#[test]
fn an_image_runs_prompt_goes_through_ftfy() {
    link_all();
    let case = "wan22_ti2v";
    let meta = load_json(&format!("pipelines/{case}_pipeline.json"));
    let want = load(&format!("pipelines/{case}_pipeline.safetensors"));
    let prompt = meta["call"]["prompt"].as_str().unwrap();
    let wrapped = format!("\u{1b}[1m{prompt}\u{1b}[0m");
    for (name, same) in [("dense", true), ("t2v_dense", false)] {
        let dir = tempfile::tempdir().unwrap();
        let root = assemble(dir.path(), &meta);
        let cfg = dir.path().join("run.toml");
        let text = run_toml(&root, case, &meta, name).replace(&q(prompt), &q(&wrapped));
        assert!(text.contains("\\u001b"), "{text}");
        std::fs::write(&cfg, text).unwrap();
        let mut p = magcache_cli::prepare(&cfg).unwrap();
        let (fin, _) = magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet).unwrap();
        let extra = magcache_tests::decoded_outputs(&mut *p.pipeline, &fin);
        let embeds = &extra.iter().find(|(n, _)| n == "prompt_embeds").unwrap().1;
        let d = max_abs_diff(embeds, &want["prompt_embeds"]);
        assert_eq!(d <= 1e-4, same, "{name}: prompt_embeds differ by {d}");
        let d = max_abs_diff(&fin, &want[&format!("{name}.final")]);
        assert_eq!(d <= 1e-3, same, "{name}: final differs by {d}");
    }
}
