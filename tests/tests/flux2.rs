//! FLUX.2 [klein] parts against diffusers / transformers (`fixtures/pipelines/flux2_*`): one
//! transformer forward with every block, the chat template, tokenizer and Qwen3 text encoder, and
//! the schedule.

use candle_core::{DType, Tensor};
use magcache_core::{Branch, CallCx, ScopeKey};
use magcache_layers::chain_model::ChainModel;
use magcache_models::flux2::load::load_flux2;
use magcache_models::flux2::{Flux2Model, Flux2Trace};
use magcache_tests::{fixture, load, load_json, max_abs_diff, packed_call};

fn transformer(folder: &str) -> Flux2Model {
    let l = load_flux2(
        &fixture(&format!("pipelines/{folder}")),
        None,
        &Default::default(),
        "test",
    )
    .unwrap();
    Flux2Model::from_weights(l.config, &l.store).unwrap()
}

#[test]
fn forward_matches_diffusers_with_every_block() {
    let f = load("pipelines/flux2_forward.safetensors");
    let meta = load_json("pipelines/flux2_forward.json");
    let m = transformer(meta["transformer"].as_str().unwrap());
    let mut tr = Flux2Trace::default();
    let call = packed_call(&f, false);
    let cx = CallCx::dense(ScopeKey::new(0, Branch::Cond));
    let out = m.forward(&call, &cx, Some(&mut tr)).unwrap();
    let worst = std::cell::Cell::new(0f32);
    let check = |name: &str, got: &Tensor| {
        let d = max_abs_diff(got, &f[name]);
        assert!(d < 1e-4, "{name}: {d}");
        worst.set(worst.get().max(d));
    };
    check("temb", tr.temb.as_ref().unwrap());
    check("x_embedded", tr.x_embedded.as_ref().unwrap());
    check("context_embedded", tr.context_embedded.as_ref().unwrap());
    // The fixture's tables repeat each value pairwise; ours hold one per pair (`rope_i`).
    let (cos, sin) = tr.rope.as_ref().unwrap();
    let (s, d) = f["rope_cos"].dims2().unwrap();
    let half = |t: &Tensor| {
        t.reshape((s, d / 2, 2))
            .unwrap()
            .narrow(2, 0, 1)
            .unwrap()
            .squeeze(2)
            .unwrap()
    };
    assert!(max_abs_diff(cos, &half(&f["rope_cos"])) < 1e-6);
    assert!(max_abs_diff(sin, &half(&f["rope_sin"])) < 1e-6);
    let nd = m.cfg.num_layers;
    assert_eq!(tr.blocks.len(), m.cfg.num_layers + m.cfg.num_single_layers);
    for (i, (e, h)) in tr.blocks.iter().enumerate() {
        if i < nd {
            check(&format!("transformer_blocks.{i}.encoder_hidden_states"), e);
            check(&format!("transformer_blocks.{i}.hidden_states"), h);
        } else {
            let fused = Tensor::cat(&[e, h], 1).unwrap();
            check(
                &format!("single_transformer_blocks.{}.hidden_states", i - nd),
                &fused,
            );
        }
    }
    check("norm_out", tr.norm_out.as_ref().unwrap());
    check("output", &out);
    eprintln!(
        "forward: largest difference over every checked tensor {:.2e}",
        worst.get()
    );
    // bf16 weights: the same call within bf16's rounding.
    let l = load_flux2(
        &fixture(&format!(
            "pipelines/{}",
            meta["transformer"].as_str().unwrap()
        )),
        None,
        &Default::default(),
        "test",
    )
    .unwrap();
    let mut store = l.store;
    store.set_placement(magcache_core::Placement {
        device: candle_core::Device::Cpu,
        dtype: DType::BF16,
        ..Default::default()
    });
    let mb = Flux2Model::from_weights(l.config, &store).unwrap();
    let call = packed_call(&f, false);
    let cx = CallCx::dense(ScopeKey::new(0, Branch::Cond));
    let ob = mb.forward(&call, &cx, None).unwrap();
    let d = max_abs_diff(&ob, &f["output"]);
    assert!(d < 5e-2, "bf16 output: {d}");
}

#[test]
fn chat_template_tokenizer_and_qwen3_match_transformers() {
    use magcache_text::qwen3::flux2_chat_prompt;
    use magcache_text::qwen_chat::{QwenChatEncoder, FLUX2_CHAT};
    let meta = load_json("pipelines/flux2_text_encoder_cases.json");
    let f = load("pipelines/flux2_text_encoder_cases.safetensors");
    let enc = QwenChatEncoder::load(
        &fixture("pipelines/flux2_tokenizer"),
        &fixture("pipelines/flux2_text_encoder"),
        FLUX2_CHAT,
        &candle_core::Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let max_len = meta["max_sequence_length"].as_u64().unwrap() as usize;
    for (i, case) in meta["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(flux2_chat_prompt(prompt), case["text"].as_str().unwrap());
        let e = enc.encode(prompt, max_len).unwrap();
        let ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let mask: Vec<u32> = case["attention_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(e.tokens.ids, ids, "case {i}: ids");
        assert_eq!(e.tokens.attention_mask, mask, "case {i}: mask");
        let d = max_abs_diff(&e.prompt_embeds, &f[&format!("case{i}.prompt_embeds")]);
        assert!(d < 1e-4, "case {i}: prompt_embeds {d}");
        eprintln!("text case {i}: ids exact, prompt_embeds within {d:.2e}");
    }
    // Every hidden state of case 0, layer by layer.
    let case = &meta["cases"][0];
    let e = enc
        .encode(case["prompt"].as_str().unwrap(), max_len)
        .unwrap();
    let want = &f["case0.hidden_states"];
    let n = want.dim(0).unwrap() - 1;
    let hs = enc
        .encoder()
        .hidden_states(&e.tokens.ids, &e.tokens.attention_mask, n.min(27))
        .unwrap();
    for (k, h) in hs.iter().enumerate() {
        let d = max_abs_diff(&h.squeeze(0).unwrap(), &want.get(k).unwrap());
        assert!(d < 1e-4, "hidden_states[{k}]: {d}");
    }
}

#[test]
fn schedule_matches_the_pipeline() {
    use magcache_layers::scheduler::flux2_schedule;
    for case in ["flux2_klein_pipeline", "flux2_klein_base_pipeline"] {
        let meta = load_json(&format!("pipelines/{case}.json"));
        let steps = meta["call"]["num_inference_steps"].as_u64().unwrap() as usize;
        let seq = meta["image_seq_len"].as_u64().unwrap() as usize;
        let (s, mu) = flux2_schedule(steps, seq);
        let want_mu = meta["mu"].as_f64().unwrap();
        assert!(
            (mu - want_mu).abs() <= 1e-6 * want_mu.abs(),
            "{case}: mu {mu}"
        );
        for (key, got) in [("sigmas", &s.sigmas), ("timesteps", &s.timesteps)] {
            let want = meta[key].as_array().unwrap();
            assert_eq!(got.len(), want.len(), "{case}: {key}");
            for (g, w) in got.iter().zip(want) {
                let w = w.as_f64().unwrap();
                assert!(
                    (*g as f64 - w).abs() <= 1e-6 * w.abs().max(1e-6),
                    "{case}: {key} {g} vs {w}"
                );
            }
        }
    }
}
