//! The FLUX.1 text side against diffusers' `FluxPipeline.encode_prompt`
//! (`pipelines/flux_text_encoders.*`, see `pipelines/README_flux.md`): the CLIP tokenizer assembled
//! from `vocab.json` + `merges.txt`, the T5 tokenizer, CLIP's `last_hidden_state` and
//! `pooler_output`, T5's `last_hidden_state` (no mask). Every size comes from the fixture files.

use candle_core::{DType, Device, Tensor};
use magcache_tests::{fixture, load, load_json, max_abs_diff};
use magcache_text::{ClipTokenizer, FluxTextEncoders, WanTokenizer};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn dir(name: &str) -> PathBuf {
    fixture(&format!("pipelines/flux_{name}"))
}

fn json() -> Value {
    load_json("pipelines/flux_text_encoders.json")
}

fn t5_max_len(j: &Value) -> usize {
    j["t5"]["max_sequence_length"].as_u64().unwrap() as usize
}

fn load_from(text_encoder: &Path, text_encoder_2: &Path) -> FluxTextEncoders {
    FluxTextEncoders::load(
        &dir("tokenizer"),
        &dir("tokenizer_2"),
        text_encoder,
        text_encoder_2,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

fn encoders() -> FluxTextEncoders {
    load_from(&dir("text_encoder"), &dir("text_encoder_2"))
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn tensor_u32s(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

fn cases(j: &Value) -> &Vec<Value> {
    let c = j["cases"].as_array().unwrap();
    assert!(!c.is_empty());
    c
}

#[test]
fn clip_tokenizer_matches_every_case() {
    let j = json();
    let t = load("pipelines/flux_text_encoders.safetensors");
    let tok = ClipTokenizer::load(&dir("tokenizer")).unwrap();
    let clip = &j["clip"];
    assert_eq!(
        tok.max_length() as u64,
        clip["model_max_length"].as_u64().unwrap()
    );
    assert_eq!(tok.bos_id() as u64, clip["bos_token_id"].as_u64().unwrap());
    assert_eq!(tok.eos_id() as u64, clip["eos_token_id"].as_u64().unwrap());
    assert_eq!(tok.pad_id() as u64, clip["pad_token_id"].as_u64().unwrap());
    let mut truncated = 0;
    for (i, c) in cases(&j).iter().enumerate() {
        let prompt = c["prompt"].as_str().unwrap();
        let raw = tok.encode_unpadded(prompt).unwrap();
        assert_eq!(
            raw.ids,
            u32s(&c["clip_untruncated_ids"]),
            "case {i} {prompt:?}: untruncated ids"
        );
        let got = tok.encode(prompt).unwrap();
        assert_eq!(got.ids, u32s(&c["clip_input_ids"]), "case {i}: input_ids");
        assert_eq!(
            got.ids,
            tensor_u32s(&t[&format!("case{i}.clip_input_ids")]),
            "case {i}: stored input_ids"
        );
        assert_eq!(got.tokens, strings(&c["clip_tokens"]), "case {i}: tokens");
        assert_eq!(
            got.seq_len as u64,
            c["clip_unpadded_len"].as_u64().unwrap(),
            "case {i}: unpadded length"
        );
        if raw.ids.len() > tok.max_length() {
            truncated += 1;
        }
    }
    assert!(truncated > 0, "the fixture has a truncated prompt");
}

#[test]
fn t5_tokenizer_matches_every_case() {
    let j = json();
    let l = t5_max_len(&j);
    let t = load("pipelines/flux_text_encoders.safetensors");
    let tok = WanTokenizer::load(&dir("tokenizer_2")).unwrap();
    assert_eq!(
        tok.pad_id() as u64,
        j["t5"]["pad_token_id"].as_u64().unwrap()
    );
    for (i, c) in cases(&j).iter().enumerate() {
        let prompt = c["prompt"].as_str().unwrap();
        let raw = tok.encode_unpadded(prompt, true).unwrap();
        assert_eq!(
            raw.ids,
            u32s(&c["t5_untruncated_ids"]),
            "case {i} {prompt:?}: untruncated ids"
        );
        let got = tok.encode(prompt, l).unwrap();
        assert_eq!(got.ids, u32s(&c["t5_input_ids"]), "case {i}: input_ids");
        assert_eq!(
            got.attention_mask,
            u32s(&c["t5_attention_mask"]),
            "case {i}: mask"
        );
        assert_eq!(got.tokens, strings(&c["t5_tokens"]), "case {i}: tokens");
        assert_eq!(
            got.ids,
            tensor_u32s(&t[&format!("case{i}.t5_input_ids")]),
            "case {i}: stored input_ids"
        );
        assert_eq!(
            got.attention_mask,
            tensor_u32s(&t[&format!("case{i}.t5_attention_mask")]),
            "case {i}: stored mask"
        );
    }
}

#[test]
fn encoders_match_clip_and_t5_outputs() {
    let j = json();
    let l = t5_max_len(&j);
    let t = load("pipelines/flux_text_encoders.safetensors");
    let enc = encoders();
    let d_clip = enc.clip_hidden_size().unwrap();
    let d_t5 = enc.t5_d_model().unwrap();
    let mut worst = [0f32; 3];
    for (i, c) in cases(&j).iter().enumerate() {
        let prompt = c["prompt"].as_str().unwrap();
        let e = enc.encode_detailed(prompt, None, l).unwrap();
        assert_eq!(
            e.clip_pooled_position as u64,
            c["clip_pooled_position"].as_u64().unwrap(),
            "case {i}: pooled position"
        );
        assert_eq!(e.pooled_prompt_embeds.dims(), [1, d_clip]);
        assert_eq!(e.prompt_embeds.dims(), [1, l, d_t5]);
        let errs = [
            max_abs_diff(
                &e.clip_last_hidden_state,
                &t[&format!("case{i}.clip_last_hidden_state")],
            ),
            max_abs_diff(
                &e.pooled_prompt_embeds,
                &t[&format!("case{i}.clip_pooler_output")],
            ),
            max_abs_diff(
                &e.prompt_embeds,
                &t[&format!("case{i}.t5_last_hidden_state")],
            ),
        ];
        eprintln!(
            "case {i}: clip last_hidden_state {:.3e}, pooler_output {:.3e}, t5 last_hidden_state {:.3e}",
            errs[0], errs[1], errs[2]
        );
        for (w, e) in worst.iter_mut().zip(errs) {
            *w = w.max(e);
        }
        // The short form gives the same tensors.
        let (pe, pooled) = enc.encode(prompt, l).unwrap();
        assert_eq!(max_abs_diff(&pe, &e.prompt_embeds), 0.0);
        assert_eq!(max_abs_diff(&pooled, &e.pooled_prompt_embeds), 0.0);
    }
    assert!(worst.iter().all(|&w| w <= TOL), "max errors {worst:?}");
}

/// Writes the tensors of `src` (one file or shards) into `dst/` as two shards plus
/// `model.safetensors.index.json`, renaming keys through `rename`.
fn shard(src: &Path, dst: &Path, rename: impl Fn(&str) -> String) {
    shard_with(src, dst, rename, None)
}

/// [`shard`], with one extra tensor in the first shard.
fn shard_with(
    src: &Path,
    dst: &Path,
    rename: impl Fn(&str) -> String,
    extra: Option<(&str, Tensor)>,
) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let map = magcache_tests::load_folder(src);
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    let half = names.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (k, part) in [&names[..half], &names[half..]].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        let mut tensors: HashMap<String, Tensor> =
            part.iter().map(|n| (rename(n), map[*n].clone())).collect();
        if let (0, Some((name, t))) = (k, &extra) {
            tensors.insert(name.to_string(), t.clone());
        }
        for n in tensors.keys() {
            weight_map.insert(n.clone(), Value::String(file.clone()));
        }
        candle_core::safetensors::save(&tensors, dst.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dst.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
}

#[test]
fn sharded_text_encoders_load_identically() {
    let j = json();
    let l = t5_max_len(&j);
    let tmp = tempfile::tempdir().unwrap();
    let (te, te2) = (
        tmp.path().join("text_encoder"),
        tmp.path().join("text_encoder_2"),
    );
    // With the int64 `position_ids` buffer older transformers versions saved (skipped on load).
    let l_clip = ClipTokenizer::load(&dir("tokenizer")).unwrap().max_length();
    let position_ids = Tensor::arange(0i64, l_clip as i64, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    shard_with(
        &dir("text_encoder"),
        &te,
        |n| n.to_string(),
        Some(("text_model.embeddings.position_ids", position_ids)),
    );
    // The T5 embedding under its tied name `encoder.embed_tokens.weight` instead of `shared.weight`.
    shard(&dir("text_encoder_2"), &te2, |n| {
        if n == "shared.weight" {
            "encoder.embed_tokens.weight".to_string()
        } else {
            n.to_string()
        }
    });
    let single = encoders();
    let sharded = load_from(&te, &te2);
    for c in cases(&j) {
        let prompt = c["prompt"].as_str().unwrap();
        let (a_pe, a_pool) = single.encode(prompt, l).unwrap();
        let (b_pe, b_pool) = sharded.encode(prompt, l).unwrap();
        assert_eq!(max_abs_diff(&a_pe, &b_pe), 0.0, "{prompt:?}: prompt_embeds");
        assert_eq!(max_abs_diff(&a_pool, &b_pool), 0.0, "{prompt:?}: pooled");
    }
}

#[test]
fn a_pipeline_folder_loads_and_encoders_can_be_released() {
    let j = json();
    let l = t5_max_len(&j);
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"] {
        let dst = tmp.path().join(name);
        std::fs::create_dir_all(&dst).unwrap();
        for f in std::fs::read_dir(dir(name)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
        }
    }
    let mut enc = FluxTextEncoders::load_pipeline(tmp.path(), &Device::Cpu, DType::F32).unwrap();
    let prompt = cases(&j)[0]["prompt"].as_str().unwrap();
    let (pe, pooled) = enc.encode(prompt, l).unwrap();
    let t = load("pipelines/flux_text_encoders.safetensors");
    assert!(max_abs_diff(&pe, &t["case0.t5_last_hidden_state"]) <= TOL);
    assert!(max_abs_diff(&pooled, &t["case0.clip_pooler_output"]) <= TOL);
    enc.release_encoders();
    assert!(enc.clip().is_none() && enc.t5().is_none());
    let err = enc.encode(prompt, l).unwrap_err().to_string();
    assert!(err.contains("released"), "{err}");
    // The tokenizers stay usable.
    assert_eq!(
        enc.clip_tokenizer().encode(prompt).unwrap().ids,
        u32s(&cases(&j)[0]["clip_input_ids"])
    );
}

#[test]
fn bad_input_gives_one_line_errors_naming_file_and_tensor() {
    let enc = encoders();
    for bad in [0, 513] {
        let err = enc.encode("a cat", bad).unwrap_err().to_string();
        assert!(err.contains("max_sequence_length"), "{err}");
    }
    // A CLIP checkpoint with a tensor missing: the error names the folder and the tensor.
    let tmp = tempfile::tempdir().unwrap();
    let te = tmp.path().join("text_encoder");
    shard(&dir("text_encoder"), &te, |n| {
        if n == "text_model.final_layer_norm.bias" {
            "something_else".to_string()
        } else {
            n.to_string()
        }
    });
    let err = FluxTextEncoders::load(
        &dir("tokenizer"),
        &dir("tokenizer_2"),
        &te,
        &dir("text_encoder_2"),
        &Device::Cpu,
        DType::F32,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("text_model.final_layer_norm.bias") && err.contains("text_encoder"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
    // A missing tokenizer folder.
    let err = ClipTokenizer::load(&tmp.path().join("nope"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope"), "{err}");
    // Unknown characters and control text tokenise without failing.
    let tok = ClipTokenizer::load(&dir("tokenizer")).unwrap();
    let got = tok.encode("é\u{0}\t<|endoftext|> ☃").unwrap();
    assert_eq!(got.ids.len(), tok.max_length());
}

/// A `tokenizer_config.json` that is there but not a readable JSON object (a FIFO that would
/// block, a dangling link, a JSON array) is refused naming the file, for the CLIP and the T5
/// tokenizers alike, rather than passed over for the defaults.
#[test]
fn a_tokenizer_config_that_is_not_a_json_object_file_is_refused() {
    for name in ["tokenizer", "tokenizer_2"] {
        let load = |d: &Path| -> Result<(), String> {
            if name == "tokenizer" {
                ClipTokenizer::load(d)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                WanTokenizer::load(d).map(|_| ()).map_err(|e| e.to_string())
            }
        };
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for f in std::fs::read_dir(dir(name)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), d.join(f.file_name())).unwrap();
        }
        load(&d).unwrap();
        let cfg = d.join("tokenizer_config.json");
        std::fs::write(&cfg, "[1, 2]").unwrap();
        let e = load(&d).unwrap_err();
        assert!(
            e.contains("tokenizer_config.json") && e.contains("object"),
            "{name}: {e}"
        );
        std::fs::remove_file(&cfg).unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(t.path().join("gone.json"), &cfg).unwrap();
            let e = load(&d).unwrap_err();
            assert!(e.contains("tokenizer_config.json"), "{name}: {e}");
            std::fs::remove_file(&cfg).unwrap();
            let made = std::process::Command::new("mkfifo").arg(&cfg).status();
            if matches!(made, Ok(s) if s.success()) {
                let e = load(&d).unwrap_err();
                assert!(e.contains("tokenizer_config.json"), "{name}: {e}");
            }
        }
    }
}
