//! Z-Image parts against diffusers / transformers (`fixtures/pipelines/zimage_*`): one transformer
//! forward with every intermediate (embedders, pad tokens, RoPE, refiners, unified sequence, every
//! main block, final layer), the chat template, tokenizer and Qwen3 `hidden_states[-2]`, and the
//! schedule with its reversed transformer time.

use candle_core::{DType, Tensor};
use magcache_core::{Branch, CallCx, ScopeKey};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::config_util::ModelConfig;
use magcache_layers::weights::WeightStore;
use magcache_models::zimage::{ZImageConfig, ZImageModel, ZImageTrace};
use magcache_tests::{fixture, load, load_json, max_abs_diff};

fn transformer(folder: &str, dtype: DType) -> ZImageModel {
    let dir = fixture(&format!("pipelines/{folder}"));
    let c = ZImageConfig::read(&dir.join("config.json"), &Default::default()).unwrap();
    let mut store = WeightStore::load_checkpoint(&dir).unwrap();
    store.set_placement(magcache_core::Placement {
        device: candle_core::Device::Cpu,
        dtype,
        ..Default::default()
    });
    ZImageModel::from_weights(c, &store).unwrap()
}

fn dense() -> CallCx<'static> {
    CallCx::dense(ScopeKey::new(0, Branch::Batched))
}

#[test]
fn forward_matches_diffusers_with_every_intermediate() {
    let f = load("pipelines/zimage_forward.safetensors");
    let meta = load_json("pipelines/zimage_forward.json");
    let m = transformer(meta["transformer"].as_str().unwrap(), DType::F32);
    let x = f["x"].squeeze(1).unwrap().unsqueeze(0).unwrap(); // [16, 1, h, w] -> [1, 16, h, w]
    let mut tr = ZImageTrace::default();
    let out = m
        .forward_traced(
            &x,
            &[f["cap_feats"].clone()],
            &f["t"],
            &dense(),
            Some(&mut tr),
        )
        .unwrap();
    let worst = std::cell::Cell::new(0f32);
    let check = |name: &str, got: &Tensor| {
        let want = &f[name];
        let got = got.reshape(want.dims()).unwrap();
        let d = max_abs_diff(&got, want);
        assert!(d < 1e-4, "{name}: {d}");
        worst.set(worst.get().max(d));
    };
    check("adaln_input", tr.adaln_input.as_ref().unwrap());
    // The image's tokens, padded to a multiple of 32 with copies of the last (the sizes from the data).
    let tokens = m.patchify(&x).unwrap();
    let n = tokens.dim(1).unwrap();
    check(
        "x_tokens",
        &tokens.pad_with_same(1, 0, n.div_ceil(32) * 32 - n).unwrap(),
    );
    check("x_embedded", tr.x_embedded.as_ref().unwrap());
    check("cap_embedded", tr.cap_embedded.as_ref().unwrap());
    for (i, t) in tr.noise_refiner.iter().enumerate() {
        check(&format!("noise_refiner.{i}"), t);
    }
    for (i, t) in tr.context_refiner.iter().enumerate() {
        check(&format!("context_refiner.{i}"), t);
    }
    check("unified", tr.unified.as_ref().unwrap());
    assert_eq!(tr.layers.len(), m.cfg.n_layers);
    for (i, t) in tr.layers.iter().enumerate() {
        check(&format!("layers.{i}"), t);
    }
    check("final_layer", tr.final_layer.as_ref().unwrap());
    check("output", &out);
    eprintln!("forward: largest difference {:.2e}", worst.get());
    // bf16 weights: the same call within bf16's rounding.
    let mb = transformer(meta["transformer"].as_str().unwrap(), DType::BF16);
    let ob = mb
        .forward(&x, &[f["cap_feats"].clone()], &f["t"], &dense())
        .unwrap();
    let d = max_abs_diff(&ob.reshape(f["output"].dims()).unwrap(), &f["output"]);
    assert!(d < 5e-2, "bf16 output: {d}");
}

/// A batch of two captions of different padded lengths: each item's output is what it gets alone
/// (the batch padding is masked, as the reference's key mask does).
#[test]
fn batched_items_of_different_lengths_match_single_calls() {
    let f = load("pipelines/zimage_forward.safetensors");
    let meta = load_json("pipelines/zimage_forward.json");
    let m = transformer(meta["transformer"].as_str().unwrap(), DType::F32);
    let x = f["x"].squeeze(1).unwrap().unsqueeze(0).unwrap();
    let cap = f["cap_feats"].clone();
    let long = Tensor::cat(&[&cap, &cap], 0).unwrap(); // 48 rows: pads to 64, not 32
    let both = m
        .forward(
            &Tensor::cat(&[&x, &x], 0).unwrap(),
            &[cap.clone(), long.clone()],
            &Tensor::cat(&[&f["t"], &f["t"]], 0).unwrap(),
            &dense(),
        )
        .unwrap();
    for (i, c) in [cap, long].iter().enumerate() {
        let one = m
            .forward(&x, std::slice::from_ref(c), &f["t"], &dense())
            .unwrap();
        let d = max_abs_diff(&both.narrow(0, i, 1).unwrap(), &one);
        assert!(d < 1e-4, "item {i}: {d}");
    }
}

#[test]
fn chat_template_tokenizer_and_qwen3_match_transformers() {
    use magcache_text::qwen_chat::{QwenChatEncoder, ZIMAGE_CHAT};
    let meta = load_json("pipelines/zimage_text_encoder_cases.json");
    let f = load("pipelines/zimage_text_encoder_cases.safetensors");
    let enc = QwenChatEncoder::load(
        &fixture("pipelines/zimage_tokenizer"),
        &fixture("pipelines/zimage_text_encoder"),
        ZIMAGE_CHAT,
        &candle_core::Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let max_len = meta["max_sequence_length"].as_u64().unwrap() as usize;
    for (i, case) in meta["cases"].as_array().unwrap().iter().enumerate() {
        let e = enc
            .encode(case["prompt"].as_str().unwrap(), max_len)
            .unwrap();
        assert_eq!(e.text, case["text"].as_str().unwrap(), "case {i}: template");
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let mask: Vec<u32> = serde_json::from_value(case["attention_mask"].clone()).unwrap();
        assert_eq!(e.tokens.ids, ids, "case {i}: ids");
        assert_eq!(e.tokens.attention_mask, mask, "case {i}: mask");
        let want = &f[&format!("case{i}.prompt_embeds")];
        assert_eq!(
            e.prompt_embeds.dims(),
            want.dims(),
            "case {i}: embedding rows"
        );
        let d = max_abs_diff(&e.prompt_embeds, want);
        assert!(d <= 1e-4, "case {i}: prompt_embeds {d}");
        if i == 0 {
            let hs = &f["case0.hidden_states"];
            for (k, h) in e.hidden_states.iter().enumerate() {
                let d = max_abs_diff(&h.squeeze(0).unwrap(), &hs.get(k).unwrap());
                assert!(d <= 1e-4, "hidden_states[{k}]: {d}");
            }
        }
    }
}

#[test]
fn schedule_and_transformer_time_match_the_pipeline() {
    use magcache_layers::scheduler::FluxShift;
    for case in ["zimage_turbo_pipeline", "zimage_cfg_pipeline"] {
        let meta = load_json(&format!("pipelines/{case}.json"));
        let shift =
            FluxShift::load(&fixture("pipelines/zimage_scheduler/scheduler_config.json")).unwrap();
        let steps = meta["call"]["num_inference_steps"].as_u64().unwrap() as usize;
        let seq = meta["image_seq_len"].as_u64().unwrap() as usize;
        let (s, _) = shift.schedule(steps, seq);
        let want: Vec<f32> = serde_json::from_value(meta["sigmas"].clone()).unwrap();
        let tt: Vec<f32> = serde_json::from_value(meta["transformer_timestep"].clone()).unwrap();
        for (i, (a, b)) in s.sigmas.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-6),
                "{case} sigma {i}: {a} vs {b}"
            );
        }
        for (i, t) in s.timesteps.iter().enumerate() {
            let got = (1000f32 - t) / 1000f32;
            assert!(
                (got - tt[i]).abs() <= 1e-6,
                "{case} t {i}: {got} vs {}",
                tt[i]
            );
        }
    }
}
