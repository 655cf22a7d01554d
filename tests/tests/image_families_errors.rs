//! Bad input for the Z-Image and Qwen-Image families: one-line errors naming the file and key.

use magcache_tests::prompted::{q, set_key, setup};

fn prepare_err(text: &str, dir: &std::path::Path) -> String {
    magcache_tests::link_all();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, text).unwrap();
    match magcache_cli::prepare(&cfg) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn wrong_folders_and_keys_are_named() {
    let (dir, cfg, _) = setup("z-image", "zimage_turbo_pipeline", "dense", "f32");
    let good = std::fs::read_to_string(&cfg).unwrap();
    // A Z-Image folder under the other family: the index's class is named.
    let e = prepare_err(&good.replace("\"z-image\"", "\"qwen-image\""), dir.path());
    assert!(
        e.contains("model_index.json") && e.contains("ZImagePipeline"),
        "{e}"
    );
    // A GGUF file as weights.
    let gguf = dir.path().join("z.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let root = dir.path().join("pipeline").display().to_string();
    let e = prepare_err(
        &good.replace(&q(&root), &q(&gguf.display().to_string())),
        dir.path(),
    );
    assert!(e.contains("model.weights") && e.contains("GGUF"), "{e}");
    // A picture smaller than one 2x2 patch of latents.
    let e = prepare_err(&set_key(&good, "height", "8"), dir.path());
    assert!(e.contains("inputs.height"), "{e}");
    // max_sequence_length 0.
    let e = prepare_err(&set_key(&good, "max_sequence_length", "0"), dir.path());
    assert!(e.contains("max_sequence_length"), "{e}");
    // An unknown preset names the known ones.
    let e = prepare_err(
        "[model]\nfamily = \"z-image\"\npreset = \"z-image-xl\"\n[sampling]\nsteps = 2\n",
        dir.path(),
    );
    assert!(
        e.contains("model.preset") && e.contains("z-image-turbo"),
        "{e}"
    );
    // Qwen-Image: more than 1024 text rows.
    let (qdir, qcfg, _) = setup("qwen-image", "qwenimage_nocfg_pipeline", "dense", "f32");
    let qgood = std::fs::read_to_string(&qcfg).unwrap();
    let e = prepare_err(&set_key(&qgood, "max_sequence_length", "2000"), qdir.path());
    assert!(
        e.contains("prompt.max_sequence_length") && e.contains("1024"),
        "{e}"
    );
    // A latents file of the wrong grid.
    let lat = qdir.path().join("lat.safetensors");
    let t = candle_core::Tensor::zeros(
        (1, 7, 64),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents_init".to_string(), t)]),
        &lat,
    )
    .unwrap();
    let file_line = qgood.lines().find(|l| l.starts_with("file = ")).unwrap();
    let e = prepare_err(
        &qgood.replace(
            file_line,
            &format!("file = {}", q(&lat.display().to_string())),
        ),
        qdir.path(),
    );
    assert!(
        e.contains("latents_init") && e.contains("lat.safetensors"),
        "{e}"
    );
}

/// Z-Image refuses a size that is not a multiple of 16 (as `ZImagePipeline` does); Qwen-Image rounds
/// it down and says so (as `QwenImagePipeline` does).
#[test]
fn sizes_off_the_grid_follow_each_pipeline() {
    let (dir, cfg, meta) = setup("z-image", "zimage_turbo_pipeline", "dense", "f32");
    let good = std::fs::read_to_string(&cfg).unwrap();
    let h = meta["call"]["height"].as_u64().unwrap();
    let e = prepare_err(&set_key(&good, "height", &(h + 8).to_string()), dir.path());
    assert!(
        e.contains("inputs.height") && e.contains("multiple of 16"),
        "{e}"
    );
    magcache_tests::link_all();
    let (_qdir, qcfg, qmeta) = setup("qwen-image", "qwenimage_nocfg_pipeline", "dense", "f32");
    let (h, w) = (&qmeta["call"]["height"], &qmeta["call"]["width"]);
    let (h, w) = (h.as_u64().unwrap(), w.as_u64().unwrap());
    let text = std::fs::read_to_string(&qcfg).unwrap();
    // No inputs file: seeded latents of the rounded-down grid.
    let file_line = text
        .lines()
        .find(|l| l.starts_with("file = "))
        .unwrap()
        .to_string();
    std::fs::write(
        &qcfg,
        set_key(&text, "height", &(h + 8).to_string()).replace(&file_line, "seed = 1"),
    )
    .unwrap();
    let p = magcache_cli::prepare(&qcfg).unwrap();
    let warned = p.pipeline.warnings().join("\n");
    assert!(
        warned.contains(&format!("{}x{w}", h + 8)) && warned.contains(&format!("{h}x{w}")),
        "{warned}"
    );
}

/// A run file for a GPU plans on a machine without one (resolving opens no device); building it
/// there is refused naming `model.device`.
#[test]
fn a_gpu_run_file_plans_without_the_gpu() {
    for (family, case) in [
        ("flux2", "flux2_klein_pipeline"),
        ("z-image", "zimage_turbo_pipeline"),
        ("qwen-image", "qwenimage_nocfg_pipeline"),
    ] {
        let (_dir, cfg, _) = setup(family, case, "dense", "f32");
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(
            &cfg,
            text.replace("dtype = \"f32\"", "dtype = \"f32\"\ndevice = \"cuda\""),
        )
        .unwrap();
        let plan = magcache_cli::plan(&cfg);
        assert!(plan.is_ok(), "{family}: {:?}", plan.err());
        if candle_core::utils::cuda_is_available() {
            continue;
        }
        match magcache_cli::prepare(&cfg) {
            Ok(_) => panic!("{family}: built on a device this machine lacks"),
            Err(e) => assert!(e.to_string().contains("model.device"), "{family}: {e}"),
        }
    }
}
