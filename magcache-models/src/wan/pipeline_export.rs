//! The parts of a released Wan text-to-video pipeline folder beside the transformer, as generated
//! weights: the UMT5-XXL text encoder (`text_encoder/`, transformers' `model-0000N-of-0000M`
//! shards) and the Wan VAE (`vae/`), at the released sizes with seeded random values, for
//! `magcache export` of a preset run with a `[prompt]` table (`scripts/real-size-pipeline.sh` adds
//! the tokenizer, the scheduler and `model_index.json`). The tensor lists come from the loaders
//! themselves (a recording store), so what is written is what a run reads.

use candle_core::DType;
use magcache_core::{Error, GeneratedWeights, Result};
use magcache_layers::autoencoder_kl_wan::{WanVae, WanVaeConfig};
use magcache_layers::weights::WeightStore;
use magcache_text::{Umt5Config, Umt5Encoder};
use serde_json::{json, Map, Value};

/// `text_encoder/config.json` of the released Wan2.1 / Wan2.2 diffusers folders (UMT5-XXL's
/// encoder: 24 layers, d_model 4096, d_ff 10240, 64 heads of 64, a 256384-token vocabulary).
pub fn umt5_xxl_config() -> Value {
    json!({
        "architectures": ["UMT5EncoderModel"],
        "d_ff": 10240,
        "d_kv": 64,
        "d_model": 4096,
        "dense_act_fn": "gelu_new",
        "feed_forward_proj": "gated-gelu",
        "is_gated_act": true,
        "layer_norm_epsilon": 1e-6,
        "model_type": "umt5",
        "num_heads": 64,
        "num_layers": 24,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "vocab_size": 256384
    })
}

/// `vae/config.json` of the released Wan2.1 folders (`AutoencoderKLWan`, z_dim 16, base_dim 96).
pub fn wan21_vae_config() -> Result<Value> {
    let c = WanVaeConfig::from_json(&json!({}), "(released defaults)")?;
    Ok(json!({
        "_class_name": "AutoencoderKLWan",
        "attn_scales": c.attn_scales,
        "base_dim": c.base_dim,
        "dim_mult": c.dim_mult,
        "dropout": 0.0,
        "latents_mean": c.latents_mean,
        "latents_std": c.latents_std,
        "num_res_blocks": c.num_res_blocks,
        "temperal_downsample": c.temperal_downsample,
        "z_dim": c.z_dim
    }))
}

fn object(v: Value) -> Result<Map<String, Value>> {
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(Error::msg("internal: a config that is not a JSON object")),
    }
}

/// The text encoder and the VAE as [`GeneratedWeights`]: every tensor stored in `dtype` (the
/// released folders store f32), norm scales ones, biases zeros, the rest uniform with std
/// `1/sqrt(fan_in)` ([`magcache_layers::random::random_tensor`]), seeded by `seed`.
pub fn pipeline_parts(seed: u64, dtype: DType) -> Result<Vec<GeneratedWeights>> {
    let te_json = umt5_xxl_config();
    let te = Umt5Config::from_json(&te_json, "(released UMT5-XXL)")?;
    let rec = WeightStore::recording();
    Umt5Encoder::from_weights(te.clone(), &rec)?;
    let te_shapes = rec.recorded()?;
    let vae_json = wan21_vae_config()?;
    let vae = WanVaeConfig::from_json(&vae_json, "(released Wan VAE)")?;
    let rec = WeightStore::recording();
    WanVae::from_store(vae, &rec)?;
    let vae_shapes = rec.recorded()?;
    // Every tensor in `dtype`, as the released folders store them (f32).
    let gen = |folder: &str, config: Value, shapes: Vec<(String, Vec<usize>)>, s: u64, d: usize| {
        Ok::<_, Error>(GeneratedWeights {
            folder: folder.to_string(),
            config: object(config)?,
            tensors: shapes.into_iter().map(|(n, sh)| (n, sh, dtype)).collect(),
            generate: Box::new(move |name, shape| {
                magcache_layers::random::random_tensor(s, name, shape, d, dtype)
            }),
        })
    };
    Ok(vec![
        gen("text_encoder", te_json, te_shapes, seed + 100, te.d_model)?,
        gen("vae", vae_json, vae_shapes, seed + 200, 1)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(g: &GeneratedWeights) -> u64 {
        g.tensors
            .iter()
            .map(|(_, s, d)| s.iter().product::<usize>() as u64 * d.size_in_bytes() as u64)
            .sum()
    }

    /// The released folders' sizes (f32): UMT5-XXL's encoder 22.7 GB, the Wan VAE 0.51 GB; the
    /// tensor lists are the loaders' own, and a generated tensor has its listed shape.
    #[test]
    fn the_parts_have_the_released_sizes_and_the_loaders_names() {
        let parts = pipeline_parts(0, DType::F32).unwrap();
        let (te, vae) = (&parts[0], &parts[1]);
        assert_eq!(
            (te.folder.as_str(), vae.folder.as_str()),
            ("text_encoder", "vae")
        );
        let gb = |b: u64| b as f64 / 1e9;
        assert!((gb(bytes(te)) - 22.7).abs() < 0.1, "{}", gb(bytes(te)));
        assert!((gb(bytes(vae)) - 0.51).abs() < 0.02, "{}", gb(bytes(vae)));
        let names: Vec<&str> = te.tensors.iter().map(|(n, _, _)| n.as_str()).collect();
        assert!(names.contains(&"shared.weight"));
        assert!(names.contains(&"encoder.block.23.layer.1.DenseReluDense.wi_1.weight"));
        assert!(names
            .contains(&"encoder.block.23.layer.0.SelfAttention.relative_attention_bias.weight"));
        assert!(vae
            .tensors
            .iter()
            .any(|(n, _, _)| n == "post_quant_conv.weight"));
        let (n, s, _) = &vae.tensors[0];
        let t = (vae.generate)(n, s).unwrap();
        assert_eq!(t.dims(), s.as_slice());
        assert_eq!(te.config["num_layers"], 24);
    }
}
