//! LoRA on Z-Image and Qwen-Image: an adapter in each layout the families read (diffusers/PEFT with
//! `lora_alpha` metadata, original names with `.alpha` and Z-Image's fused `qkv`, musubi's
//! `lora_unet_` spelling) runs to the final latents of the same pipeline whose checkpoint has the
//! deltas merged by hand (`W += scale * alpha / r * B @ A`), and moves them measurably.

use candle_core::{Device, Tensor};
use magcache_tests::max_abs_diff;
use magcache_tests::prompted::{q, setup};
use std::collections::HashMap;
use std::path::Path;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A fixed small pseudo-random tensor (reproducible without a RNG dependency).
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let x = ((i as u64 + 1) * 2654435761 + seed * 97) % 10007;
            (x as f32 / 10007.0 - 0.5) * 0.2
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// One module's adapter: `(module as the file names it, diffusers targets with their row ranges)`.
struct Module {
    key: String,
    /// `(diffusers weight, first row, rows)` each delta row block lands on.
    targets: Vec<(String, usize, usize)>,
}

/// Runs `case` densely with `loras` (TOML tables) and the base checkpoint, or without adapters on
/// `transformer` (a replacement folder); returns the final latents.
fn run(family: &str, case: &str, loras: &str, transformer: Option<&Path>) -> Tensor {
    let (dir, cfg, _) = setup(family, case, "dense", "f32");
    if let Some(t) = transformer {
        let dst = dir.path().join("pipeline").join("transformer");
        std::fs::remove_dir_all(&dst).unwrap();
        magcache_tests::copy_dir(t, &dst);
    }
    let text = std::fs::read_to_string(&cfg).unwrap() + loras;
    std::fs::write(&cfg, text).unwrap();
    let mut p = magcache_cli::prepare(&cfg).unwrap();
    magcache_cli::generate(&mut p, magcache_cli::Verbosity::Quiet)
        .unwrap()
        .0
}

/// The fixture transformer folder `folder` with `delta` added to the named weights, in `out`.
fn merged_checkpoint(folder: &str, deltas: &HashMap<String, Tensor>, out: &Path) {
    let src = magcache_tests::fixture(&format!("pipelines/{folder}"));
    magcache_tests::copy_dir(&src, out);
    for e in std::fs::read_dir(out).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
            let mut changed = false;
            for (k, d) in deltas {
                if let Some(w) = t.get_mut(k) {
                    *w = (&*w + d).unwrap();
                    changed = true;
                }
            }
            if changed {
                candle_core::safetensors::save(&t, &p).unwrap();
            }
        }
    }
}

/// Writes an adapter of `modules` (rank 2) under `prefix` / suffixes of `layout`, and returns the
/// deltas it stands for at `scale`, per diffusers weight.
fn adapter(
    path: &Path,
    modules: &[Module],
    layout: &str,
    d_in: usize,
    scale: f64,
) -> HashMap<String, Tensor> {
    let r = 2;
    let alpha = 4.0;
    let mut file = HashMap::new();
    let mut deltas: HashMap<String, Tensor> = HashMap::new();
    for (i, m) in modules.iter().enumerate() {
        let rows: usize = m.targets.iter().map(|t| t.2).sum();
        let a = randn(&[r, d_in], 2 * i as u64 + 1);
        let b = randn(&[rows, r], 2 * i as u64 + 2);
        let (down, up) = match layout {
            "diffusers" => ("lora_A.weight", "lora_B.weight"),
            _ => ("lora_down.weight", "lora_up.weight"),
        };
        file.insert(format!("{}.{down}", m.key), a.clone());
        file.insert(format!("{}.{up}", m.key), b.clone());
        let mult = if layout == "diffusers" {
            scale * alpha / r as f64 // lora_alpha from the metadata below
        } else {
            file.insert(
                format!("{}.alpha", m.key),
                Tensor::new(alpha as f32, &Device::Cpu).unwrap(),
            );
            scale * alpha / r as f64
        };
        let full = (b.matmul(&a).unwrap() * mult).unwrap();
        for (w, start, n) in &m.targets {
            deltas.insert(w.clone(), full.narrow(0, *start, *n).unwrap());
        }
    }
    let meta = if layout == "diffusers" {
        Some(HashMap::from([(
            "lora_adapter_metadata".to_string(),
            format!("{{\"transformer.r\": {r}, \"transformer.lora_alpha\": {alpha}}}"),
        )]))
    } else {
        None
    };
    write_safetensors(path, &file, meta);
    deltas
}

fn write_safetensors(
    path: &Path,
    t: &HashMap<String, Tensor>,
    meta: Option<HashMap<String, String>>,
) {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = t
        .iter()
        .map(|(k, v)| {
            let f: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            (
                k.clone(),
                f.iter().flat_map(|x| x.to_le_bytes()).collect(),
                v.dims().to_vec(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, b, s)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

fn check(family: &str, case: &str, folder: &str, modules: &[Module], layout: &str, d: usize) {
    magcache_tests::link_all();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{layout}.safetensors"));
    let deltas = adapter(&file, modules, layout, d, 0.7);
    let table = format!(
        "\n[[model.lora]]\npath = {}\nscale = 0.7\n",
        q(&file.display().to_string())
    );
    let with = run(family, case, &table, None);
    let ckpt = dir.path().join("merged");
    merged_checkpoint(folder, &deltas, &ckpt);
    let by_hand = run(family, case, "", Some(&ckpt));
    let dense = run(family, case, "", None);
    let d_hand = max_abs_diff(&with, &by_hand);
    let effect = max_abs_diff(&with, &dense);
    assert!(
        d_hand <= 1e-5,
        "{family} {layout}: LoRA run vs merged checkpoint {d_hand}"
    );
    assert!(
        effect > 1e-4,
        "{family} {layout}: the adapter moved the result by only {effect}"
    );
    eprintln!("{family} {layout}: vs merged {d_hand:.1e}, effect {effect:.2e}");
}

fn t(w: &str, start: usize, n: usize) -> (String, usize, usize) {
    (w.to_string(), start, n)
}

/// The fixture transformer `folder`'s config and the rows (output features) of each weight, read
/// from its files: the adapters below take every size from them, so that another variant of the
/// fixtures (`MAGCACHE_TEST_FIXTURES`) runs the same checks.
fn transformer_sizes(folder: &str) -> (serde_json::Value, HashMap<String, usize>) {
    let dir = magcache_tests::fixture(&format!("pipelines/{folder}"));
    let config = magcache_tests::load_json(&format!("pipelines/{folder}/config.json"));
    let rows = magcache_tests::load_folder(&dir)
        .into_iter()
        .map(|(k, t)| (k, t.dim(0).unwrap()))
        .collect();
    (config, rows)
}

fn size(config: &serde_json::Value, key: &str) -> usize {
    config[key].as_u64().unwrap() as usize
}

#[test]
fn zimage_adapters_in_every_layout_match_merged_weights() {
    let (config, rows) = transformer_sizes("zimage_transformer");
    let d = size(&config, "dim");
    let last = size(&config, "n_layers") - 1;
    let w1 = "noise_refiner.0.feed_forward.w1.weight";
    let diffusers = [
        Module {
            key: "transformer.layers.0.attention.to_q".into(),
            targets: vec![t("layers.0.attention.to_q.weight", 0, d)],
        },
        Module {
            key: "transformer.noise_refiner.0.feed_forward.w1".into(),
            targets: vec![t(w1, 0, rows[w1])],
        },
    ];
    check(
        "z-image",
        "zimage_turbo_pipeline",
        "zimage_transformer",
        &diffusers,
        "diffusers",
        d,
    );
    let original = [Module {
        key: format!("diffusion_model.layers.{last}.attention.qkv"),
        targets: vec![
            t(&format!("layers.{last}.attention.to_q.weight"), 0, d),
            t(&format!("layers.{last}.attention.to_k.weight"), d, d),
            t(&format!("layers.{last}.attention.to_v.weight"), 2 * d, d),
        ],
    }];
    check(
        "z-image",
        "zimage_turbo_pipeline",
        "zimage_transformer",
        &original,
        "original",
        d,
    );
    let musubi = [Module {
        key: format!("lora_unet_layers_{last}_attention_to_out_0"),
        targets: vec![t(&format!("layers.{last}.attention.to_out.0.weight"), 0, d)],
    }];
    check(
        "z-image",
        "zimage_turbo_pipeline",
        "zimage_transformer",
        &musubi,
        "musubi",
        d,
    );
}

#[test]
fn qwenimage_adapters_in_every_layout_match_merged_weights() {
    let (config, rows) = transformer_sizes("qwenimage_transformer");
    let d = size(&config, "num_attention_heads") * size(&config, "attention_head_dim");
    let last = size(&config, "num_layers") - 1;
    let diffusers = [
        Module {
            key: "transformer.transformer_blocks.0.attn.to_q".into(),
            targets: vec![t("transformer_blocks.0.attn.to_q.weight", 0, d)],
        },
        Module {
            key: format!("transformer.transformer_blocks.{last}.attn.add_k_proj"),
            targets: vec![t(
                &format!("transformer_blocks.{last}.attn.add_k_proj.weight"),
                0,
                d,
            )],
        },
    ];
    check(
        "qwen-image",
        "qwenimage_nocfg_pipeline",
        "qwenimage_transformer",
        &diffusers,
        "diffusers",
        d,
    );
    let mlp = format!("transformer_blocks.{last}.img_mlp.net.0.proj.weight");
    let original = [Module {
        key: format!("diffusion_model.transformer_blocks.{last}.img_mlp.net.0.proj"),
        targets: vec![t(&mlp, 0, rows[&mlp])],
    }];
    check(
        "qwen-image",
        "qwenimage_nocfg_pipeline",
        "qwenimage_transformer",
        &original,
        "original",
        d,
    );
    let modulation = "transformer_blocks.0.img_mod.1.weight";
    let musubi = [Module {
        key: "lora_unet_transformer_blocks_0_img_mod_1".into(),
        targets: vec![t(modulation, 0, rows[modulation])],
    }];
    check(
        "qwen-image",
        "qwenimage_nocfg_pipeline",
        "qwenimage_transformer",
        &musubi,
        "musubi",
        d,
    );
}
