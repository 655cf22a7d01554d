//! The Wan text side against diffusers' `WanPipeline.encode_prompt` (`pipelines/wan_pipeline.*`):
//! prompt cleaning, the tokenizer (ids, masks, tokens, padding, truncation) and the UMT5 encoder
//! (`last_hidden_state`, `prompt_embeds` with exact zero rows). Every size comes from the fixture
//! files.

use candle_core::{DType, Device, Tensor};
use magcache_tests::{fixture, load, load_json, max_abs_diff};
use magcache_text::{html_unescape, prompt_clean, TokenizedPrompt, WanTextEncoder, WanTokenizer};
use serde_json::Value;
use std::collections::HashMap;

const TOL: f32 = 1e-4;

fn tokenizer_dir() -> std::path::PathBuf {
    fixture("pipelines/wan_tokenizer")
}

fn encoder_dir() -> std::path::PathBuf {
    fixture("pipelines/wan_text_encoder")
}

fn json() -> Value {
    load_json("pipelines/wan_pipeline.json")
}

fn max_len(j: &Value) -> usize {
    j["call"]["max_sequence_length"].as_u64().unwrap() as usize
}

fn encoder() -> WanTextEncoder {
    WanTextEncoder::load(&tokenizer_dir(), &encoder_dir(), &Device::Cpu, DType::F32).unwrap()
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

fn check_tokens(got: &TokenizedPrompt, ids: &[u32], mask: &[u32], what: &str) {
    assert_eq!(got.ids, ids, "{what}: input_ids");
    assert_eq!(got.attention_mask, mask, "{what}: attention_mask");
    assert_eq!(
        got.seq_len,
        mask.iter().filter(|&&m| m == 1).count(),
        "{what}: seq_len"
    );
}

#[test]
fn prompts_are_cleaned_and_tokenized_as_the_pipeline() {
    let j = json();
    let l = max_len(&j);
    let t = load("pipelines/wan_pipeline.safetensors");
    let tok = WanTokenizer::load(&tokenizer_dir()).unwrap();
    for name in ["prompt", "negative_prompt"] {
        let p = &j[name];
        let cleaned = prompt_clean(p["text"].as_str().unwrap());
        assert_eq!(cleaned, p["cleaned"].as_str().unwrap(), "{name}: cleaned");
        let got = tok.encode(&cleaned, l).unwrap();
        check_tokens(
            &got,
            &u32s(&p["input_ids"]),
            &u32s(&p["attention_mask"]),
            name,
        );
        assert_eq!(got.seq_len as u64, p["seq_len"].as_u64().unwrap(), "{name}");
        assert_eq!(got.tokens, strings(&p["tokens"]), "{name}: tokens");
        // The stored tensors say the same.
        assert_eq!(got.ids, tensor_u32s(&t[&format!("{name}.input_ids")]));
        assert_eq!(
            got.attention_mask,
            tensor_u32s(&t[&format!("{name}.attention_mask")])
        );
    }
}

#[test]
fn tokenizer_cases_match_unpadded_and_padded() {
    let j = json();
    let l = max_len(&j);
    let tok = WanTokenizer::load(&tokenizer_dir()).unwrap();
    let cases = j["tokenizer_cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let mut truncated = 0;
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let raw = tok.encode_unpadded(text, true).unwrap();
        assert_eq!(raw.ids, u32s(&c["input_ids"]), "{text:?}: input_ids");
        assert_eq!(raw.tokens, strings(&c["tokens"]), "{text:?}: tokens");
        let padded = tok.encode(text, l).unwrap();
        check_tokens(
            &padded,
            &u32s(&c["padded_input_ids"]),
            &u32s(&c["padded_attention_mask"]),
            text,
        );
        if raw.ids.len() > l {
            truncated += 1;
        }
    }
    // The fixture covers both sides of max_sequence_length.
    assert!(truncated > 0 && truncated < cases.len());
}

#[test]
fn encoder_matches_last_hidden_state_and_prompt_embeds() {
    let j = json();
    let l = max_len(&j);
    let t = load("pipelines/wan_pipeline.safetensors");
    let enc = encoder();
    let d = enc.d_model().unwrap();
    for (name, embeds) in [
        ("prompt", "prompt_embeds"),
        ("negative_prompt", "negative_prompt_embeds"),
    ] {
        let text = j[name]["text"].as_str().unwrap();
        let e = enc.encode_detailed(text, l).unwrap();
        assert_eq!(e.last_hidden_state.dims(), [1, l, d]);
        let lhs_err = max_abs_diff(
            &e.last_hidden_state,
            &t[&format!("{name}.last_hidden_state")],
        );
        let emb_err = max_abs_diff(&e.prompt_embeds, &t[embeds]);
        eprintln!(
            "{name}: last_hidden_state max abs err {lhs_err:.3e}, prompt_embeds {emb_err:.3e}"
        );
        assert!(lhs_err < TOL, "{name}: last_hidden_state {lhs_err}");
        assert!(emb_err < TOL, "{name}: prompt_embeds {emb_err}");
        let seq_len = e.tokens.seq_len;
        let zeros = e
            .prompt_embeds
            .narrow(1, seq_len, l - seq_len)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(zeros.iter().all(|&x| x.to_bits() == 0), "{name}: zero rows");
        let (pe, s) = enc.encode(text, l).unwrap();
        assert_eq!(s, seq_len);
        assert_eq!(max_abs_diff(&pe, &e.prompt_embeds), 0.0);
    }
}

/// `offload = "stream"`'s text encoder (layers read from the checkpoint as they run) gives the held
/// encoder's output bit for bit, within the reference tolerance, and says it streams.
#[test]
fn a_streamed_encoder_matches_the_held_one_exactly() {
    let j = json();
    let l = max_len(&j);
    let t = load("pipelines/wan_pipeline.safetensors");
    let held = encoder();
    let tok = WanTokenizer::load(&tokenizer_dir()).unwrap();
    let enc = magcache_text::Umt5Encoder::load_with(&encoder_dir(), &Device::Cpu, DType::F32, true)
        .unwrap();
    assert!(enc.is_streamed());
    assert!(!held.encoder().unwrap().is_streamed());
    let streamed = WanTextEncoder::from_parts(tok, enc);
    for (name, embeds) in [
        ("prompt", "prompt_embeds"),
        ("negative_prompt", "negative_prompt_embeds"),
    ] {
        let text = j[name]["text"].as_str().unwrap();
        let (a, _) = held.encode(text, l).unwrap();
        let (b, _) = streamed.encode(text, l).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{name}");
        assert!(max_abs_diff(&b, &t[embeds]) < TOL, "{name}");
    }
}

#[test]
fn empty_prompt_is_eos_alone() {
    let j = json();
    let l = max_len(&j);
    let enc = encoder();
    for text in ["", "   \n\t "] {
        let (pe, seq_len) = enc.encode(text, l).unwrap();
        assert_eq!(seq_len, 1);
        assert_eq!(pe.dims(), [1, l, enc.d_model().unwrap()]);
        let rest = pe.narrow(1, 1, l - 1).unwrap().abs().unwrap().max_all();
        assert_eq!(rest.unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
    // The shortest length that holds `</s>`; shorter is a clear error, not a panic.
    let (pe, seq_len) = enc.encode("a dog", 1).unwrap();
    assert_eq!((pe.dims()[1], seq_len), (1, 1));
    let err = enc.encode("a dog", 0).unwrap_err().to_string();
    assert!(err.contains("max_sequence_length"), "{err}");
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let j = json();
    let l = max_len(&j);
    let single = encoder();
    // Every tensor of the encoder's folder, one file or shards (the layout differs between variants).
    let weights: HashMap<String, Tensor> = magcache_tests::load_folder(&encoder_dir());
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        encoder_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    let shards = 2;
    for k in 0..shards {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
        let part: HashMap<String, Tensor> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == k)
            .map(|(_, n)| ((*n).clone(), weights[*n].clone()))
            .collect();
        for n in part.keys() {
            weight_map.insert(n.clone(), Value::String(file.clone()));
        }
        candle_core::safetensors::save(&part, dir.path().join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded =
        WanTextEncoder::load(&tokenizer_dir(), dir.path(), &Device::Cpu, DType::F32).unwrap();
    let text = j["prompt"]["text"].as_str().unwrap();
    let (a, _) = single.encode(text, l).unwrap();
    let (b, _) = sharded.encode(text, l).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);

    // A shard without one tensor: the error names the tensor.
    // (UMT5 gives every block its own position bias; the last block's exists at any depth.)
    let last = (0..)
        .take_while(|i| {
            weights.contains_key(&format!("encoder.block.{i}.layer.0.SelfAttention.q.weight"))
        })
        .last()
        .unwrap();
    let victim =
        format!("encoder.block.{last}.layer.0.SelfAttention.relative_attention_bias.weight");
    let victim = victim.as_str();
    let mut w = weights.clone();
    w.remove(victim);
    let broken = tempfile::tempdir().unwrap();
    std::fs::copy(
        encoder_dir().join("config.json"),
        broken.path().join("config.json"),
    )
    .unwrap();
    candle_core::safetensors::save(&w, broken.path().join("model.safetensors")).unwrap();
    let err = match WanTextEncoder::load(&tokenizer_dir(), broken.path(), &Device::Cpu, DType::F32)
    {
        Ok(_) => panic!("loaded without {victim}"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(victim) && err.contains("missing"), "{err}");
}

#[test]
fn released_encoder_and_bad_folders_are_errors() {
    let mut enc = encoder();
    enc.release_encoder();
    assert!(enc.encoder().is_none());
    let err = enc.encode("a dog", 8).unwrap_err().to_string();
    assert!(err.contains("released"), "{err}");
    // The tokenizer stays usable.
    assert_eq!(enc.tokenizer().encode("", 4).unwrap().seq_len, 1);

    let missing = fixture("pipelines/no_such_folder");
    let err = match WanTextEncoder::load(&missing, &encoder_dir(), &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loaded a missing tokenizer"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("tokenizer.json"), "{err}");
    let err = match WanTextEncoder::load(&tokenizer_dir(), &missing, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loaded a missing encoder"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("config.json"), "{err}");
}

/// Expected outputs from Python 3.11: `html.unescape(html.unescape(t)).strip()`, `re.sub(r"\s+",
/// " ", ...)`, `.strip()` (the fixtures' `prompt_clean`, ftfy absent).
#[test]
fn prompt_clean_matches_python() {
    let cases: Vec<(String, String)> = serde_json::from_str(
        r#"[["A red fox &amp; a  dog", "A red fox & a dog"],
        ["&amp;amp; &lt;b&gt; &ampx &notit; &notin; &#65;&#x42;&#X43 &#0; &#128; &#x110000; &#xD800; &#1; &#99999999999999999999;", "& <b> &x \u00acit; \u2209 ABC \ufffd \u20ac \ufffd \ufffd \ufffd"],
        ["  tabs\t\tand\nnewlines\r\n and\u00a0nbsp\u3000ideo\u2028ls \u001c sep\u001f end  ", "tabs and newlines and nbsp ideo ls sep end"],
        ["&#; &#x; & ; &;&&amp", "&#; &#x; & ; &;&&"],
        ["caf&eacute; &Eacute;t&eacute; &frac12 &frac12; &thetasym; &AMP &copy2023", "caf\u00e9 \u00c9t\u00e9 \u00bd \u00bd \u03d1 & \u00a92023"],
        ["no entities here", "no entities here"], ["", ""], ["   ", ""],
        ["\u200bzero\u200bwidth", "\u200bzero\u200bwidth"],
        ["&abcdefghijklmnopqrstuvwxyzabcdefghijk;", "&abcdefghijklmnopqrstuvwxyzabcdefghijk;"],
        ["&lt&gt&quot&apos;", "<>\"'"]]"#,
    )
    .unwrap();
    for (input, want) in cases {
        assert_eq!(prompt_clean(&input), want, "{input:?}");
    }
    assert_eq!(html_unescape("&amp;amp;"), "&amp;");
}

/// bf16 weights (activations stay f32): close to the f32 reference, zero rows still exact.
#[test]
fn bf16_weights_stay_close() {
    let j = json();
    let l = max_len(&j);
    let t = load("pipelines/wan_pipeline.safetensors");
    let enc =
        WanTextEncoder::load(&tokenizer_dir(), &encoder_dir(), &Device::Cpu, DType::BF16).unwrap();
    let (pe, seq_len) = enc
        .encode(j["prompt"]["text"].as_str().unwrap(), l)
        .unwrap();
    assert_eq!(pe.dtype(), DType::F32);
    let reference = &t["prompt_embeds"];
    let scale = reference
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let err = max_abs_diff(&pe, reference);
    eprintln!("bf16: prompt_embeds max abs err {err:.3e} (max |ref| {scale:.3})");
    assert!(err < 0.05 * scale, "{err} vs {scale}");
    if seq_len < l {
        let rest = pe
            .narrow(1, seq_len, l - seq_len)
            .unwrap()
            .abs()
            .unwrap()
            .max_all();
        assert_eq!(rest.unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
