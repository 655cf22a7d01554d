//! GGUF checkpoints (city96's layout) against diffusers: every quant type of the zoo dequantizes to
//! gguf-py's values, and every run of `fixtures/gguf/gguf_loop` (Q8_0 and Q4_0, Wan2.1 and FLUX,
//! dense, MagCache, FBCache) reproduces through the runner with identical decisions and final latents
//! within the fixture's tolerances (0.06 Wan, 0.01 FLUX), with the quantized weights kept quantized
//! (candle's `QMatMul`).

use magcache_layers::weights::WeightStore;
use magcache_tests::{
    assert_calls_match, cache_table_for, family_inputs_file, family_name, fixture, load, load_json,
    loop_toml, max_abs_diff, run_toml,
};

const LOOP: &str = "gguf/gguf_loop";

#[test]
fn every_quant_type_dequantizes_as_gguf_py() {
    let (store, _) = WeightStore::load_gguf(&fixture("gguf/gguf_dequant_zoo.gguf")).unwrap();
    let want = load("gguf/gguf_dequant_zoo.safetensors");
    let mut seen = 0;
    for (name, t) in &want {
        let Some(ty) = name.strip_prefix("zoo.") else {
            continue;
        };
        let key = store
            .keys()
            .find(|k| k.as_str() == ty || k.ends_with(&format!(".{ty}")))
            .unwrap_or_else(|| {
                panic!(
                    "no zoo tensor for {ty}: {:?}",
                    store.keys().collect::<Vec<_>>()
                )
            })
            .clone();
        let got = store.get_shape(&key, t.dims()).unwrap();
        let d = max_abs_diff(&got, t);
        assert!(d == 0.0, "{ty}: dequantized values differ by {d}");
        seen += 1;
    }
    assert!(seen >= 13, "zoo types checked: {seen}");
}

fn check_run(name: &str, model_extra: &str) {
    let meta = load_json(&format!("{LOOP}.json"));
    let tensors = load(&format!("{LOOP}.safetensors"));
    let run = &meta["runs"][name];
    let fam_key = run["family"].as_str().unwrap();
    let fam = &meta["families"][fam_key];
    let cache = match run["cache"].get("strategy").and_then(|s| s.as_str()) {
        None => None,
        Some(strategy) => cache_table_for(strategy, &run["cache"]),
    };
    let dir = tempfile::tempdir().unwrap();
    let inputs = family_inputs_file(dir.path(), LOOP, fam);
    let weights = format!(
        "\"{}\"",
        fixture(&format!("gguf/{}", run["file"].as_str().unwrap())).display()
    );
    let mut text = loop_toml(
        family_name(fam_key),
        &weights,
        &inputs,
        fam,
        cache.as_deref(),
    );
    text = text.replacen("[model]\n", &format!("[model]\n{model_extra}\n"), 1);
    text.push_str("\n[model.overrides]\n");
    for (k, v) in fam["config_overrides"].as_object().unwrap() {
        text.push_str(&format!("{k} = {v}\n"));
    }
    let (fin, report) = run_toml(dir.path(), &text);
    // Decisions identical; metrics within 5 %: candle's QMatMul rounds the activations to 8 bits
    // (the fixture's decision margins are >= 6 % for FBCache, 0.05 absolute for MagCache).
    assert_calls_match(name, &report, &run["calls"], 0.05);
    assert_eq!(
        report.computed_calls as u64,
        run["computed_calls"].as_u64().unwrap(),
        "{name}: computed calls"
    );
    let tol = if fam_key == "flux" { 0.01 } else { 0.06 };
    let d = max_abs_diff(&fin, &tensors[&format!("{name}.final")]);
    eprintln!("{name} {model_extra}: final max abs diff {d:.2e}");
    assert!(d < tol, "{name}: final differs by {d}");
}

fn runs() -> Vec<String> {
    let meta = load_json(&format!("{LOOP}.json"));
    meta["runs"].as_object().unwrap().keys().cloned().collect()
}

#[test]
fn every_gguf_run_reproduces() {
    for name in runs() {
        check_run(&name, "");
    }
}

#[test]
fn streamed_gguf_runs_reproduce() {
    // A cached Wan run and a dense FLUX one, of whatever quant types the fixtures hold.
    let all = runs();
    let pick = |family: &str, suffix: &str| {
        all.iter()
            .find(|n| n.starts_with(family) && n.ends_with(suffix))
            .unwrap_or_else(|| panic!("no {family}*{suffix} run in {all:?}"))
            .clone()
    };
    for name in [pick("wan21_", "_magcache"), pick("flux_", "_dense")] {
        check_run(&name, "offload = \"stream\"");
    }
}

/// `gguf_repack = false`: the quantized products read the file's own blocks (no SIMD-tiled copy)
/// and every run still reproduces.
#[test]
fn gguf_runs_without_repacking_reproduce() {
    for name in runs() {
        check_run(&name, "gguf_repack = false");
    }
}

/// A file made for another family is refused naming `general.architecture`.
#[test]
fn another_familys_file_is_refused() {
    let err = magcache_models::wan::load::load_wan(
        &fixture("gguf/flux_tiny-Q8_0.gguf"),
        None,
        &serde_json::Map::new(),
        "run.toml",
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("general.architecture") && err.contains("flux"),
        "{err}"
    );
}

/// A held GGUF model keeps its quantized linear weights quantized: `get_linear` hands every
/// quantized 2-D weight out as a quantized tensor, never dequantized; one the file stores in F16 or
/// F32 (ggml quantizes only rows of whole blocks) as a dense one.
#[test]
fn quantized_linear_weights_are_handed_out_quantized() {
    use magcache_layers::weights::gguf::read_header;
    use magcache_layers::weights::{LinearWeight, WeightStore};
    let path = magcache_tests::fixture("gguf/wan21_tiny-Q8_0.gguf");
    let (store, _) = WeightStore::load_gguf(&path).unwrap();
    let mut f = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
    // ggml type ids of the file's tensors: 0 F32, 1 F16, 30 BF16; any other is a quantization.
    let types: std::collections::HashMap<String, u32> = read_header(&mut f, "fixture")
        .unwrap()
        .tensors
        .into_iter()
        .map(|(name, _, t, _)| (name, t))
        .collect();
    let (mut quantized, mut dense) = (0, 0);
    let mut names: Vec<String> = store.keys().cloned().collect();
    names.sort();
    for name in names {
        let shape = store.shape(&name).unwrap();
        if shape.len() != 2 || !name.ends_with(".weight") {
            continue;
        }
        let stored = types[&name];
        let in_file = !matches!(stored, 0 | 1 | 30);
        let handed = matches!(
            store.get_linear(&name, &shape).unwrap(),
            LinearWeight::Quantized(_)
        );
        assert_eq!(handed, in_file, "{name}: stored as ggml type {stored}");
        if handed {
            quantized += 1;
        } else {
            dense += 1;
        }
    }
    eprintln!("quantized {quantized}, dense {dense}");
    if quantized == 0 {
        eprintln!("note: this fixture stores no linear weight quantized (no row of whole blocks)");
    }
}

/// A GGUF file without a config (city96's) whose width is no multiple of the released head size is
/// refused naming the tensor and the overrides that give the heads, not run with a wrong head count.
#[test]
fn a_width_the_head_size_does_not_divide_asks_for_the_heads() {
    let file = fixture("gguf/wan21_tiny-Q8_0.gguf");
    let header = magcache_layers::weights::gguf::gguf_header(&file).unwrap();
    assert!(header.config.is_none());
    let e = magcache_models::wan::load::load_wan(&file, None, &serde_json::Map::new(), "run.toml")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("patch_embedding.weight") && e.contains("attention_head_dim"),
        "{e}"
    );
}

/// A config-less GGUF file with diffusers tensor names (not city96's original ones) has its config
/// inferred from those names as they are: the cross-attention norm (diffusers' `norm2`, the
/// original `norm3`) is seen, and every size is the checkpoint's own.
#[test]
fn a_diffusers_named_gguf_without_config_is_read_as_it_is_named() {
    let src = fixture("reference/wan21_tiny");
    let want = magcache_models::wan::load::load_wan(&src, None, &Default::default(), "run.toml")
        .unwrap()
        .config;
    assert!(want.cross_attn_norm);
    let tensors = magcache_tests::load_folder(&src);
    let mut list: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    list.sort();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("diffusers-named.gguf");
    magcache_layers::weights::gguf::write_gguf(
        &file,
        "wan",
        None,
        &list,
        candle_core::quantized::GgmlDType::Q8_0,
        &|name, _| Ok(tensors[name].clone()),
        &mut |_| {},
    )
    .unwrap();
    let mut heads = serde_json::Map::new();
    heads.insert(
        "num_attention_heads".into(),
        want.num_attention_heads.into(),
    );
    heads.insert("attention_head_dim".into(), want.attention_head_dim.into());
    let got = magcache_models::wan::load::load_wan(&file, None, &heads, "run.toml")
        .unwrap()
        .config;
    assert_eq!(got.cross_attn_norm, want.cross_attn_norm);
    assert_eq!(
        (got.num_layers, got.ffn_dim, got.text_dim, got.freq_dim),
        (want.num_layers, want.ffn_dim, want.text_dim, want.freq_dim)
    );
}
