//! Forward parity of the Wan2.1 transformer with diffusers (`wan21_tiny_forward`).

use magcache_core::{Branch, CallCx, ScopeKey};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::weights::WeightStore;
use magcache_models::wan::load::{load_wan, original_to_diffusers};
use magcache_models::wan::model::{WanModel, WanTrace};
use magcache_tests::{fixture, load, load_json, max_abs_diff};

fn dense() -> CallCx<'static> {
    CallCx::dense(ScopeKey::new(0, Branch::Cond))
}

fn tiny() -> WanModel {
    let l = load_wan(
        &fixture("reference/wan21_tiny"),
        None,
        &Default::default(),
        "test",
    )
    .unwrap();
    WanModel::from_weights(l.config, &l.store).unwrap()
}

#[test]
fn forward_matches_reference_with_every_block() {
    let f = load("reference/wan21_tiny_forward.safetensors");
    let m = tiny();
    let mut tr = WanTrace::default();
    let out = m
        .forward_traced(
            &f["hidden_states"],
            &f["timestep"],
            &f["encoder_hidden_states"],
            &dense(),
            Some(&mut tr),
        )
        .unwrap();
    let temb = tr.temb.unwrap().squeeze(1).unwrap();
    assert!(max_abs_diff(&temb, &f["temb"]) < 1e-4);
    let tproj = tr.timestep_proj.unwrap().flatten_from(1).unwrap();
    assert!(max_abs_diff(&tproj, &f["timestep_proj"]) < 1e-4);
    assert!(
        max_abs_diff(
            &tr.encoder_embedded.unwrap(),
            &f["encoder_hidden_states_embedded"]
        ) < 1e-4
    );
    // diffusers' rope tables repeat every frequency twice: [1, S, 1, head_dim]
    let rc = f["rope_cos"].squeeze(2).unwrap().squeeze(0).unwrap();
    let even: Vec<u32> = (0..rc.dim(1).unwrap() as u32).step_by(2).collect();
    let idx = candle_core::Tensor::new(even.as_slice(), &candle_core::Device::Cpu).unwrap();
    assert!(max_abs_diff(&tr.rope_cos.unwrap(), &rc.index_select(&idx, 1).unwrap()) < 1e-5);
    for (i, b) in tr.blocks.iter().enumerate() {
        let d = max_abs_diff(b, &f[&format!("blocks.{i}.out")]);
        assert!(d < 1e-4, "block {i}: {d}");
    }
    let d = max_abs_diff(&out, &f["output"]);
    assert!(d < 1e-4, "output: {d}");
}

#[test]
fn per_token_timesteps_match_reference() {
    let f = load("reference/wan21_tiny_forward.safetensors");
    let m = tiny();
    let out = m
        .forward(
            &f["hidden_states"],
            &f["timestep_per_token"],
            &f["encoder_hidden_states"],
            &dense(),
        )
        .unwrap();
    let d = max_abs_diff(&out, &f["output_per_token"]);
    assert!(d < 1e-4, "output_per_token: {d}");
}

#[test]
fn original_wan_layout_gives_the_same_output() {
    // Convert the diffusers tensors to the original Wan names and write them as one file.
    let dir = tempfile::tempdir().unwrap();
    let src = load("reference/wan21_tiny/diffusion_pytorch_model.safetensors");
    let mut inv = std::collections::HashMap::new();
    for (k, v) in &src {
        let orig = diffusers_to_original(k);
        assert_eq!(
            original_to_diffusers(&orig),
            *k,
            "round trip of {k} via {orig}"
        );
        inv.insert(orig, v.clone());
    }
    assert!(inv.keys().any(|k| k.contains("self_attn.q.weight")));
    let path = dir.path().join("wan_original.safetensors");
    candle_core::safetensors::save(&inv, &path).unwrap();
    // The original repository's config.json of the same model (its names for the same sizes).
    let c = load_json("reference/wan21_tiny/config.json");
    let heads = &c["num_attention_heads"];
    let dim = heads.as_u64().unwrap() * c["attention_head_dim"].as_u64().unwrap();
    let original = serde_json::json!({
        "_class_name": "WanModel", "dim": dim, "num_heads": heads, "in_dim": c["in_channels"],
        "out_dim": c["out_channels"], "ffn_dim": c["ffn_dim"], "freq_dim": c["freq_dim"],
        "num_layers": c["num_layers"], "text_dim": c["text_dim"], "eps": c["eps"],
        "model_type": "t2v",
    });
    std::fs::write(dir.path().join("config.json"), original.to_string()).unwrap();
    let mut over = serde_json::Map::new();
    over.insert("rope_max_seq_len".into(), c["rope_max_seq_len"].clone());
    let l = load_wan(&path, None, &over, "test").unwrap();
    assert_eq!(l.layout, magcache_models::wan::load::WanLayout::Original);
    let m = WanModel::from_weights(l.config, &l.store).unwrap();
    let f = load("reference/wan21_tiny_forward.safetensors");
    let out = m
        .forward(
            &f["hidden_states"],
            &f["timestep"],
            &f["encoder_hidden_states"],
            &dense(),
        )
        .unwrap();
    assert!(max_abs_diff(&out, &f["output"]) < 1e-4);
    let _ = WeightStore::default();
}

/// The original Wan names (the inverse of the loader's mapping, written independently here).
fn diffusers_to_original(k: &str) -> String {
    let pairs = [
        (
            "condition_embedder.time_embedder.linear_1.",
            "time_embedding.0.",
        ),
        (
            "condition_embedder.time_embedder.linear_2.",
            "time_embedding.2.",
        ),
        ("condition_embedder.time_proj.", "time_projection.1."),
        (
            "condition_embedder.text_embedder.linear_1.",
            "text_embedding.0.",
        ),
        (
            "condition_embedder.text_embedder.linear_2.",
            "text_embedding.2.",
        ),
        ("proj_out.", "head.head."),
    ];
    for (a, b) in pairs {
        if let Some(r) = k.strip_prefix(a) {
            return format!("{b}{r}");
        }
    }
    if k == "scale_shift_table" {
        return "head.modulation".into();
    }
    k.replace("scale_shift_table", "modulation")
        .replace("attn1.to_out.0", "self_attn.o")
        .replace("attn2.to_out.0", "cross_attn.o")
        .replace("attn1.to_", "self_attn.")
        .replace("attn2.to_", "cross_attn.")
        .replace("attn1.norm", "self_attn.norm")
        .replace("attn2.norm", "cross_attn.norm")
        .replace(".norm2.", ".norm3.")
        .replace("ffn.net.0.proj", "ffn.0")
        .replace("ffn.net.2", "ffn.2")
}
