//! Qwen-Image parts against diffusers / transformers (`fixtures/pipelines/qwenimage_*`): one
//! transformer forward with every block, the tokenizer assembled from `vocab.json` + `merges.txt`,
//! the Qwen2.5-VL language model and the 34-row drop, and the schedule stretched to its terminal.

use candle_core::{DType, Tensor};
use magcache_core::{Branch, CallCx, ScopeKey};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::config_util::ModelConfig;
use magcache_layers::weights::WeightStore;
use magcache_models::qwenimage::{QwenImageConfig, QwenImageModel, QwenImageTrace};
use magcache_tests::{fixture, load, load_json, max_abs_diff};

fn transformer(dtype: DType) -> QwenImageModel {
    let dir = fixture("pipelines/qwenimage_transformer");
    let c = QwenImageConfig::read(&dir.join("config.json"), &Default::default()).unwrap();
    let mut store = WeightStore::load_checkpoint(&dir).unwrap();
    store.set_placement(magcache_core::Placement {
        device: candle_core::Device::Cpu,
        dtype,
        ..Default::default()
    });
    QwenImageModel::from_weights(c, &store).unwrap()
}

#[test]
fn forward_matches_diffusers_with_every_block() {
    let f = load("pipelines/qwenimage_forward.safetensors");
    let meta = load_json("pipelines/qwenimage_forward.json");
    let m = transformer(DType::F32);
    let g = &meta["img_shapes"][0][0];
    let grid = (
        g[1].as_u64().unwrap() as usize,
        g[2].as_u64().unwrap() as usize,
    );
    let cx = CallCx::dense(ScopeKey::new(0, Branch::Cond));
    let mut tr = QwenImageTrace::default();
    let out = m
        .forward_traced(
            &f["hidden_states"],
            &f["encoder_hidden_states"],
            &f["timestep"],
            grid,
            &cx,
            Some(&mut tr),
        )
        .unwrap();
    let worst = std::cell::Cell::new(0f32);
    let check = |name: &str, got: &Tensor| {
        let d = max_abs_diff(&got.reshape(f[name].dims()).unwrap(), &f[name]);
        assert!(d < 1e-4, "{name}: {d}");
        worst.set(worst.get().max(d));
    };
    check("temb", tr.temb.as_ref().unwrap());
    check("img_in", tr.x_embedded.as_ref().unwrap());
    check("txt_in", tr.context_embedded.as_ref().unwrap());
    let (cos, sin) = tr.rope.as_ref().unwrap();
    let l = f["txt_rope_cos"].dim(0).unwrap();
    check("txt_rope_cos", &cos.narrow(0, 0, l).unwrap());
    check("txt_rope_sin", &sin.narrow(0, 0, l).unwrap());
    check(
        "img_rope_cos",
        &cos.narrow(0, l, cos.dim(0).unwrap() - l).unwrap(),
    );
    check(
        "img_rope_sin",
        &sin.narrow(0, l, sin.dim(0).unwrap() - l).unwrap(),
    );
    assert_eq!(tr.blocks.len(), m.cfg.num_layers);
    for (i, (e, h)) in tr.blocks.iter().enumerate() {
        check(&format!("transformer_blocks.{i}.encoder_hidden_states"), e);
        check(&format!("transformer_blocks.{i}.hidden_states"), h);
    }
    check("norm_out", tr.norm_out.as_ref().unwrap());
    check("output", &out);
    eprintln!("forward: largest difference {:.2e}", worst.get());
    let mb = transformer(DType::BF16);
    let ob = mb
        .forward(
            &f["hidden_states"],
            &f["encoder_hidden_states"],
            &f["timestep"],
            grid,
            &cx,
        )
        .unwrap();
    let d = max_abs_diff(&ob, &f["output"]);
    assert!(d < 5e-2, "bf16 output: {d}");
}

#[test]
fn tokenizer_and_qwen25vl_match_transformers() {
    use magcache_text::qwenimage::QwenImageTextEncoder;
    let meta = load_json("pipelines/qwenimage_text_encoder_cases.json");
    let f = load("pipelines/qwenimage_text_encoder_cases.safetensors");
    let enc = QwenImageTextEncoder::load(
        &fixture("pipelines/qwenimage_tokenizer"),
        &fixture("pipelines/qwenimage_text_encoder"),
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
        assert_eq!(e.tokens.ids, ids, "case {i}: ids");
        let want = &f[&format!("case{i}.prompt_embeds")];
        assert_eq!(e.prompt_embeds.dims(), want.dims(), "case {i}: rows");
        let d = max_abs_diff(&e.prompt_embeds, want);
        assert!(d <= 1e-4, "case {i}: prompt_embeds {d}");
        if i == 0 {
            let hs = &f["case0.hidden_states"];
            assert_eq!(e.hidden_states.len(), hs.dim(0).unwrap());
            for (k, h) in e.hidden_states.iter().enumerate() {
                let d = max_abs_diff(&h.squeeze(0).unwrap(), &hs.get(k).unwrap());
                assert!(d <= 1e-4, "hidden_states[{k}]: {d}");
            }
        }
    }
}

#[test]
fn schedule_matches_the_pipeline() {
    use magcache_layers::scheduler::FluxShift;
    for case in ["qwenimage_pipeline", "qwenimage_nocfg_pipeline"] {
        let meta = load_json(&format!("pipelines/{case}.json"));
        let shift = FluxShift::load(&fixture(
            "pipelines/qwenimage_scheduler/scheduler_config.json",
        ))
        .unwrap();
        let steps = meta["call"]["num_inference_steps"].as_u64().unwrap() as usize;
        let (s, mu) = shift.schedule(steps, meta["image_seq_len"].as_u64().unwrap() as usize);
        let want_mu = meta["mu"].as_f64().unwrap();
        assert!(
            (mu - want_mu).abs() <= 1e-6 * want_mu.abs(),
            "{case}: mu {mu} vs {want_mu}"
        );
        let want: Vec<f32> = serde_json::from_value(meta["sigmas"].clone()).unwrap();
        assert_eq!(s.sigmas.len(), want.len());
        for (i, (a, b)) in s.sigmas.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-6),
                "{case} sigma {i}: {a} vs {b}"
            );
        }
        let tt: Vec<f32> = serde_json::from_value(meta["timesteps"].clone()).unwrap();
        for (i, (a, b)) in s.timesteps.iter().zip(&tt).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{case} timestep {i}: {a} vs {b}"
            );
        }
    }
}
