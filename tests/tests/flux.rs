//! FLUX: forward parity with diffusers (`flux_tiny_forward`), the BFL single-file layout, and every
//! run of `flux_tiny_loop`.

use candle_core::Tensor;
use magcache_core::{Branch, CallCx, ScopeKey};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::scheduler::flow_match_dynamic;
use magcache_models::flux::load::{load_flux, FluxLayout};
use magcache_models::flux::model::{FluxModel, FluxTrace};
use magcache_tests::{
    check_reference_run, fixture, load, load_json, max_abs_diff, packed_call, weights_of,
};
use std::collections::HashMap;

fn tiny() -> FluxModel {
    let l = load_flux(
        &fixture("reference/flux_tiny"),
        None,
        &Default::default(),
        "test",
    )
    .unwrap();
    assert_eq!(l.layout, FluxLayout::Diffusers);
    FluxModel::from_weights(l.config, &l.store).unwrap()
}

fn forward(m: &FluxModel, f: &HashMap<String, Tensor>, trace: Option<&mut FluxTrace>) -> Tensor {
    let call = packed_call(f, true);
    let cx = CallCx::dense(ScopeKey::new(0, Branch::Cond));
    m.forward(&call, &f["pooled_projections"], &cx, trace)
        .unwrap()
}

#[test]
fn forward_matches_reference_with_every_block() {
    let f = load("reference/flux_tiny_forward.safetensors");
    let m = tiny();
    let mut tr = FluxTrace::default();
    let out = forward(&m, &f, Some(&mut tr));
    let nd = m.cfg.num_layers;
    for (i, (o0, o1)) in tr.blocks.iter().enumerate() {
        let name = if i < nd {
            format!("transformer_blocks.{i}")
        } else {
            format!("single_transformer_blocks.{}", i - nd)
        };
        let d0 = max_abs_diff(o0, &f[&format!("{name}.out0")]);
        let d1 = max_abs_diff(o1, &f[&format!("{name}.out1")]);
        assert!(d0 < 1e-4 && d1 < 1e-4, "{name}: {d0} {d1}");
    }
    let d = max_abs_diff(&out, &f["output"]);
    assert!(d < 1e-4, "output: {d}");
}

/// The diffusers tensors written in the BFL single-file layout (an independent conversion).
fn to_bfl(
    src: &HashMap<String, Tensor>,
    n_double: usize,
    n_single: usize,
) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    let mut put = |k: String, t: Tensor| {
        out.insert(k, t);
    };
    let get = |k: &str| src[k].clone();
    for s in ["weight", "bias"] {
        for (a, b) in [
            ("x_embedder", "img_in"),
            ("context_embedder", "txt_in"),
            (
                "time_text_embed.timestep_embedder.linear_1",
                "time_in.in_layer",
            ),
            (
                "time_text_embed.timestep_embedder.linear_2",
                "time_in.out_layer",
            ),
            (
                "time_text_embed.guidance_embedder.linear_1",
                "guidance_in.in_layer",
            ),
            (
                "time_text_embed.guidance_embedder.linear_2",
                "guidance_in.out_layer",
            ),
            (
                "time_text_embed.text_embedder.linear_1",
                "vector_in.in_layer",
            ),
            (
                "time_text_embed.text_embedder.linear_2",
                "vector_in.out_layer",
            ),
            ("proj_out", "final_layer.linear"),
        ] {
            put(format!("{b}.{s}"), get(&format!("{a}.{s}")));
        }
        let nm = get(&format!("norm_out.linear.{s}"));
        let d = nm.dim(0).unwrap() / 2;
        let swapped = Tensor::cat(
            &[nm.narrow(0, d, d).unwrap(), nm.narrow(0, 0, d).unwrap()],
            0,
        )
        .unwrap();
        put(format!("final_layer.adaLN_modulation.1.{s}"), swapped);
        for i in 0..n_double {
            let t = format!("transformer_blocks.{i}");
            let b = format!("double_blocks.{i}");
            let cat = |names: [&str; 3]| {
                Tensor::cat(&names.map(|n| get(&format!("{t}.attn.{n}.{s}"))), 0).unwrap()
            };
            put(
                format!("{b}.img_attn.qkv.{s}"),
                cat(["to_q", "to_k", "to_v"]),
            );
            put(
                format!("{b}.txt_attn.qkv.{s}"),
                cat(["add_q_proj", "add_k_proj", "add_v_proj"]),
            );
            for (a, c) in [
                ("norm1.linear", "img_mod.lin"),
                ("norm1_context.linear", "txt_mod.lin"),
                ("attn.to_out.0", "img_attn.proj"),
                ("attn.to_add_out", "txt_attn.proj"),
                ("ff.net.0.proj", "img_mlp.0"),
                ("ff.net.2", "img_mlp.2"),
                ("ff_context.net.0.proj", "txt_mlp.0"),
                ("ff_context.net.2", "txt_mlp.2"),
            ] {
                put(format!("{b}.{c}.{s}"), get(&format!("{t}.{a}.{s}")));
            }
        }
        for i in 0..n_single {
            let t = format!("single_transformer_blocks.{i}");
            let b = format!("single_blocks.{i}");
            let fused = Tensor::cat(
                &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                    .map(|n| get(&format!("{t}.{n}.{s}"))),
                0,
            )
            .unwrap();
            put(format!("{b}.linear1.{s}"), fused);
            put(
                format!("{b}.linear2.{s}"),
                get(&format!("{t}.proj_out.{s}")),
            );
            put(
                format!("{b}.modulation.lin.{s}"),
                get(&format!("{t}.norm.linear.{s}")),
            );
        }
    }
    for i in 0..n_double {
        let t = format!("transformer_blocks.{i}.attn");
        let b = format!("double_blocks.{i}");
        put(
            format!("{b}.img_attn.norm.query_norm.scale"),
            get(&format!("{t}.norm_q.weight")),
        );
        put(
            format!("{b}.img_attn.norm.key_norm.scale"),
            get(&format!("{t}.norm_k.weight")),
        );
        put(
            format!("{b}.txt_attn.norm.query_norm.scale"),
            get(&format!("{t}.norm_added_q.weight")),
        );
        put(
            format!("{b}.txt_attn.norm.key_norm.scale"),
            get(&format!("{t}.norm_added_k.weight")),
        );
    }
    for i in 0..n_single {
        let t = format!("single_transformer_blocks.{i}.attn");
        let b = format!("single_blocks.{i}");
        put(
            format!("{b}.norm.query_norm.scale"),
            get(&format!("{t}.norm_q.weight")),
        );
        put(
            format!("{b}.norm.key_norm.scale"),
            get(&format!("{t}.norm_k.weight")),
        );
    }
    out
}

#[test]
fn bfl_single_file_gives_the_same_output() {
    let src = load("reference/flux_tiny/diffusion_pytorch_model.safetensors");
    let bfl = to_bfl(&src, 2, 3);
    assert!(bfl
        .keys()
        .all(|k| !k.starts_with("transformer_blocks") && !k.starts_with("x_embedder")));
    assert!(
        bfl.contains_key("double_blocks.0.img_attn.qkv.weight")
            && bfl.contains_key("single_blocks.2.linear1.weight")
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux1-tiny.safetensors");
    candle_core::safetensors::save(&bfl, &path).unwrap();
    // No config.json: the architecture is inferred from the tensors, the head size given as override.
    let mut over = serde_json::Map::new();
    over.insert("attention_head_dim".into(), 16.into());
    over.insert("num_attention_heads".into(), 2.into());
    over.insert("axes_dims_rope".into(), serde_json::json!([4, 6, 6]));
    let l = load_flux(&path, None, &over, "test").unwrap();
    assert_eq!(l.layout, FluxLayout::Bfl);
    assert_eq!(
        (
            l.config.num_layers,
            l.config.num_single_layers,
            l.config.in_channels
        ),
        (2, 3, 16)
    );
    let m = FluxModel::from_weights(l.config, &l.store).unwrap();
    let f = load("reference/flux_tiny_forward.safetensors");
    let d = max_abs_diff(&forward(&m, &f, None), &f["output"]);
    assert!(d < 1e-4, "BFL layout output differs by {d}");
}

#[test]
fn dynamic_shift_schedule_matches_reference() {
    let meta = load_json("reference/flux_tiny_loop.json");
    let s = flow_match_dynamic(10, meta["mu"].as_f64().unwrap());
    for (i, t) in meta["timesteps"].as_array().unwrap().iter().enumerate() {
        assert!(
            (s.timesteps[i] as f64 - t.as_f64().unwrap()).abs() < 1e-3,
            "timestep {i}"
        );
    }
    assert!((magcache_layers::scheduler::flux_mu(24) - meta["mu"].as_f64().unwrap()).abs() < 1e-12);
}

fn check_run(name: &str) {
    check_reference_run(
        "flux",
        &weights_of("reference/flux_tiny"),
        "reference/flux_tiny_loop",
        name,
    );
}

#[test]
fn loop_teacache_a() {
    check_run("teacache_a");
}
#[test]
fn loop_teacache_b() {
    check_run("teacache_b");
}
#[test]
fn loop_dense() {
    check_run("dense");
}
#[test]
fn loop_magcache_flux_ratios() {
    check_run("magcache_flux_ratios");
}
#[test]
fn loop_magcache_flux_ratios_fast() {
    check_run("magcache_flux_ratios_fast");
}
#[test]
fn loop_fbcache_a() {
    check_run("fbcache_a");
}
#[test]
fn loop_fbcache_b() {
    check_run("fbcache_b");
}
