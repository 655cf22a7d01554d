//! The UMT5 text encoder (transformers' `UMT5EncoderModel`), Wan's text side.
//!
//! Own module rather than candle-transformers' `t5`: that implementation (0.11) builds the relative
//! position bias only in block 0 (`T5Block::load(i == 0, ..)`) and hands block 0's bias to every
//! later block, as T5 does, whereas UMT5 stores and uses a `relative_attention_bias` in **every**
//! layer, so later layers' biases would be ignored. Its `T5EncoderModel::forward` also takes no
//! attention mask, so padded positions would be attended to and rows < seq_len would depend on the
//! padding. (It would also pull candle-transformers and its dependency tree in for ~200 lines.)
//!
//! Semantics (transformers `modeling_umt5.py`, checked against the fixtures): `h = shared[ids]`
//! (no scaling); per layer `h += o(attn(rms(h)))`, `h += wo(act(wi_0(rms(h))) * wi_1(rms(h)))`
//! (gated) or `h += wo(act(wi(rms(h))))`; finally `rms`. Attention scores are `q . k` **without**
//! `1/sqrt(d_kv)`, plus the layer's relative position bias, plus `f32::MIN` on masked keys.
//! Activations stay in f32 (linear products in the run's weight dtype), so transformers' fp16
//! clamping of hidden states is not needed.

use candle_core::{DType, Device, Tensor};
use magcache_core::{Error, Result};
use magcache_layers::config_util::{config_json_in, positive_json, read_json};
use magcache_layers::nn::{merge_heads, split_heads, Linear, RmsNorm};
use magcache_layers::weights::WeightStore;
use serde_json::Value;
use std::path::Path;

/// The feed-forward activation (`feed_forward_proj` = `[gated-]ACT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Umt5Act {
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation (`gated-gelu` maps here).
    GeluTanh,
    /// `gelu`: the exact (erf) form.
    Gelu,
    Relu,
}

/// The sizes of `text_encoder/config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Umt5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    pub gated: bool,
    pub act: Umt5Act,
    /// `t5` checkpoints have the relative bias in block 0 only (shared by every block); `umt5`
    /// ones have one per block.
    pub bias_per_layer: bool,
}

impl Umt5Config {
    /// What encoding one prompt of `max_len` tokens holds (the size guard, checked before the
    /// encoder loads): the weights (`dtype_bytes` per parameter) named by `config` (the config
    /// file) and its sizes, and the activations (hidden states, feed-forward, attention scores and
    /// the relative bias, in f32) named by `prompt.max_sequence_length`.
    ///
    /// `streamed` ([`Umt5Encoder::load_with`]): the weights held at once are the embedding (during
    /// the lookup, dropped after it) or a layer being read beside the one running: the larger.
    pub fn footprint(
        &self,
        max_len: usize,
        dtype_bytes: usize,
        config: &str,
        streamed: bool,
    ) -> magcache_core::runtime::guard::Footprint {
        use magcache_layers::footprint::sz;
        let d = sz(self.d_model);
        let inner = sz(self.num_heads) * sz(self.d_kv);
        let ff = sz(self.d_ff) * sz(if self.gated { 3 } else { 2 });
        let bias = sz(self.relative_attention_num_buckets) * sz(self.num_heads);
        let layers = if self.bias_per_layer {
            sz(self.num_layers)
        } else {
            sz(1)
        };
        let block = d * inner * sz(4) + d * ff + d * sz(2);
        let params = if streamed {
            // The embedding is read for the lookup and dropped before the first layer is read.
            (sz(self.vocab_size) * d).max(sz(2) * (block + bias)) + d
        } else {
            sz(self.vocab_size) * d + sz(self.num_layers) * block + layers * bias + d
        };
        let l = sz(max_len);
        let scores = sz(self.num_heads) * l * l * sz(3);
        let acts = (l * (d * sz(8) + inner * sz(4) + sz(self.d_ff) * sz(3)) + scores) * sz(4);
        let mut fp = magcache_core::runtime::guard::Footprint::default();
        fp.add(
            if streamed {
                "text encoder weights (streamed: the embedding, or two layers)"
            } else {
                "text encoder weights"
            },
            format!("{config}: num_layers, d_model, d_ff, vocab_size"),
            (params * sz(dtype_bytes)).0,
        );
        fp.add(
            "text encoder activations",
            "prompt.max_sequence_length",
            acts.0,
        );
        fp
    }

    /// Reads `config.json` (the file, or `DIR/config.json`). Sizes are required; the relative
    /// attention fields, epsilon and `feed_forward_proj` default as in transformers' `UMT5Config`.
    pub fn load(path: &Path) -> Result<Self> {
        let (v, shown) = read_json(&config_json_in(path))?;
        Self::from_json(&v, &shown)
    }

    pub fn from_json(v: &Value, file: &str) -> Result<Self> {
        let usize_of = |key: &str, default: Option<usize>| {
            positive_json(v, file, key, default, "the text encoder config")
        };
        let model_type = v
            .get("model_type")
            .and_then(|m| m.as_str())
            .unwrap_or("umt5");
        let bias_per_layer = match model_type {
            "umt5" => true,
            "t5" => false,
            other => {
                return Err(Error::config(
                    file,
                    "model_type",
                    format!("`{other}` is not a UMT5/T5 encoder (expected `umt5` or `t5`)"),
                ))
            }
        };
        let proj = match v.get("feed_forward_proj") {
            None | Some(Value::Null) => "gated-gelu".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(x) => {
                return Err(Error::config(
                    file,
                    "feed_forward_proj",
                    format!("expected a string, got {x}"),
                ))
            }
        };
        let (gated, act_name) = match proj.strip_prefix("gated-") {
            Some(a) => (true, a),
            None => (false, proj.as_str()),
        };
        let act = match (gated, act_name) {
            // transformers maps `gated-gelu` to `gelu_new`.
            (true, "gelu") | (_, "gelu_new") | (_, "gelu_pytorch_tanh") => Umt5Act::GeluTanh,
            (false, "gelu") => Umt5Act::Gelu,
            (_, "relu") => Umt5Act::Relu,
            _ => {
                return Err(Error::config(
                    file,
                    "feed_forward_proj",
                    format!(
                        "`{proj}` is not supported (gated-gelu, gelu, gelu_new, relu, gated-relu)"
                    ),
                ))
            }
        };
        let eps = match v.get("layer_norm_epsilon") {
            None | Some(Value::Null) => 1e-6,
            Some(x) => x.as_f64().filter(|e| *e > 0.0).ok_or_else(|| {
                Error::config(
                    file,
                    "layer_norm_epsilon",
                    format!("expected a positive number, got {x}"),
                )
            })?,
        };
        let relative_attention_num_buckets = usize_of("relative_attention_num_buckets", Some(32))?;
        if relative_attention_num_buckets < 2 {
            return Err(Error::config(
                file,
                "relative_attention_num_buckets",
                format!("must be at least 2, got {relative_attention_num_buckets}"),
            ));
        }
        Ok(Umt5Config {
            vocab_size: usize_of("vocab_size", None)?,
            d_model: usize_of("d_model", None)?,
            d_kv: usize_of("d_kv", None)?,
            d_ff: usize_of("d_ff", None)?,
            num_layers: usize_of("num_layers", None)?,
            num_heads: usize_of("num_heads", None)?,
            relative_attention_num_buckets,
            relative_attention_max_distance: usize_of(
                "relative_attention_max_distance",
                Some(128),
            )?,
            layer_norm_epsilon: eps,
            gated,
            act,
            bias_per_layer,
        })
    }
}

/// T5's bidirectional relative position bucket of `rel = key_pos - query_pos`: half the buckets for
/// keys after the query; distances below `num_buckets / 4` exact, then logarithmic up to
/// `max_distance` (the log in f32, as transformers computes it), saturating at the last bucket.
pub fn relative_position_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let base = if rel > 0 { half } else { 0 };
    let n = rel.abs();
    let max_exact = half / 2;
    if n < max_exact {
        return (base + n) as u32;
    }
    let denom = (max_distance as f64 / max_exact as f64).ln() as f32;
    let ratio = (n as f32 / max_exact as f32).ln() / denom * (half - max_exact) as f32;
    // `.to(int64)` truncates toward zero; a non-finite ratio (degenerate configs) saturates.
    let large = if ratio.is_finite() {
        max_exact + ratio as i64
    } else {
        half - 1
    };
    (base + large.min(half - 1)) as u32
}

struct Layer {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// `[num_buckets, heads]` (f32); `None`: use block 0's (T5).
    rel_bias: Option<Tensor>,
    ff_norm: RmsNorm,
    /// `wi_0` (gated) or `wi`.
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
}

/// The embedding's checkpoint name: `shared.weight`, or T5's `encoder.embed_tokens.weight`.
fn shared_name(store: &WeightStore) -> &'static str {
    if store.contains("shared.weight") || !store.contains("encoder.embed_tokens.weight") {
        "shared.weight"
    } else {
        "encoder.embed_tokens.weight"
    }
}

/// Layer `i` read from `store`: linear weights in the store's dtype, norms and bias in f32.
fn build_layer(c: &Umt5Config, store: &WeightStore, i: usize) -> Result<Layer> {
    let (d, inner) = (c.d_model, c.num_heads * c.d_kv);
    let p = format!("encoder.block.{i}.layer");
    let lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
        Linear::new(store.get_weight(name, &[out, inp])?, None)
    };
    let norm = |name: &str| -> Result<RmsNorm> {
        Ok(RmsNorm::new(
            store.get_shape(name, &[d])?,
            c.layer_norm_epsilon,
        ))
    };
    let bias_name = format!("{p}.0.SelfAttention.relative_attention_bias.weight");
    let rel_bias = if c.bias_per_layer || i == 0 {
        Some(store.get_shape(&bias_name, &[c.relative_attention_num_buckets, c.num_heads])?)
    } else {
        None
    };
    let (wi_0, wi_1) = if c.gated {
        (
            lin(&format!("{p}.1.DenseReluDense.wi_0.weight"), c.d_ff, d)?,
            Some(lin(
                &format!("{p}.1.DenseReluDense.wi_1.weight"),
                c.d_ff,
                d,
            )?),
        )
    } else {
        (
            lin(&format!("{p}.1.DenseReluDense.wi.weight"), c.d_ff, d)?,
            None,
        )
    };
    Ok(Layer {
        attn_norm: norm(&format!("{p}.0.layer_norm.weight"))?,
        q: lin(&format!("{p}.0.SelfAttention.q.weight"), inner, d)?,
        k: lin(&format!("{p}.0.SelfAttention.k.weight"), inner, d)?,
        v: lin(&format!("{p}.0.SelfAttention.v.weight"), inner, d)?,
        o: lin(&format!("{p}.0.SelfAttention.o.weight"), d, inner)?,
        rel_bias,
        ff_norm: norm(&format!("{p}.1.layer_norm.weight"))?,
        wi_0,
        wi_1,
        wo: lin(&format!("{p}.1.DenseReluDense.wo.weight"), d, c.d_ff)?,
    })
}

/// Where the encoder's embedding and layers live.
enum Weights {
    /// Loaded once and held (the default).
    Held { shared: Tensor, layers: Vec<Layer> },
    /// Read from the memory-mapped checkpoint when used and dropped after (`offload = "stream"`): the
    /// embedding for the lookup, then one layer at a time.
    Streamed { store: Box<WeightStore> },
}

/// `UMT5EncoderModel`: `forward(ids, mask) -> last_hidden_state`.
pub struct Umt5Encoder {
    pub config: Umt5Config,
    /// `shared.weight` (`[vocab, d_model]`, in the run's weight dtype), or the T5 spelling.
    shared_name: String,
    weights: Weights,
    final_norm: RmsNorm,
    device: Device,
}

impl Umt5Encoder {
    /// Loads `DIR/config.json` and the folder's weights: a single `model.safetensors` or shards
    /// with `model.safetensors.index.json`. Weights are handed out on `device`, linear weights and
    /// the embedding in `dtype`; norms and relative biases in f32.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(dir, device, dtype, false)
    }

    /// As [`Umt5Encoder::load`], with `streamed`: the embedding and the layers stay in the
    /// memory-mapped checkpoint and are read (converted to `dtype`, moved to `device`) when used,
    /// then dropped: the encoder holds one layer at a time (or the embedding, during the lookup),
    /// so a 5.7B UMT5-XXL runs in the memory of its embedding. Every tensor's name and shape is
    /// checked here, before any is read. The results are the held encoder's, bit for bit.
    pub fn load_with(dir: &Path, device: &Device, dtype: DType, streamed: bool) -> Result<Self> {
        let config = Umt5Config::load(dir)?;
        let files = magcache_layers::weights::weight_files(dir)?;
        let mut store = WeightStore::load_files(&dir.display().to_string(), &files)?;
        store.set_placement(magcache_core::Placement {
            device: device.clone(),
            dtype,
            ..Default::default()
        });
        let cfg_file = dir.join("config.json").display().to_string();
        let n = config.num_layers;
        if streamed {
            // Read for every prompt, never kept by a server's warm cache.
            store
                .streamed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let shared_name = shared_name(&store).to_string();
            let c = &config;
            store.expect(&shared_name, &[c.vocab_size, c.d_model])?;
            // Each layer's names and shapes from its own loader, run on a recording store.
            for i in 0..c.num_layers {
                let rec = WeightStore::recording();
                build_layer(c, &rec, i)?;
                for (name, shape) in rec.recorded()? {
                    store.expect(&name, &shape)?;
                }
            }
            let final_norm = RmsNorm::new(
                store.get_shape("encoder.final_layer_norm.weight", &[c.d_model])?,
                c.layer_norm_epsilon,
            );
            store.check_unused(&cfg_file, |_| format!("num_layers = {n} in {cfg_file}"))?;
            return Ok(Umt5Encoder {
                device: device.clone(),
                config,
                shared_name,
                weights: Weights::Streamed {
                    store: Box::new(store),
                },
                final_norm,
            });
        }
        // The store is dropped on return: the model then holds the only copy of each weight.
        let model = Self::from_weights(config, &store)?;
        // A whole block left over: the config has fewer layers than the checkpoint (the
        // transformer's rule).
        store.check_unused(&cfg_file, |_| format!("num_layers = {n} in {cfg_file}"))?;
        Ok(model)
    }

    /// Whether the weights are read from the checkpoint as they are used ([`Umt5Encoder::load_with`]).
    pub fn is_streamed(&self) -> bool {
        matches!(self.weights, Weights::Streamed { .. })
    }

    pub fn from_weights(config: Umt5Config, store: &WeightStore) -> Result<Self> {
        let c = &config;
        let name = shared_name(store).to_string();
        let shared = store.get_weight(&name, &[c.vocab_size, c.d_model])?;
        let layers = (0..c.num_layers)
            .map(|i| build_layer(c, store, i))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = RmsNorm::new(
            store.get_shape("encoder.final_layer_norm.weight", &[c.d_model])?,
            c.layer_norm_epsilon,
        );
        Ok(Umt5Encoder {
            device: store.placement().device.clone(),
            config,
            shared_name: name,
            weights: Weights::Held { shared, layers },
            final_norm,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The checked ids' embeddings `[B, L, d_model]` (f32), with `B` and `L`.
    fn embed(&self, ids: &Tensor, mask: &Tensor) -> Result<(Tensor, usize, usize)> {
        let c = &self.config;
        let (b, l) = ids.dims2()?;
        if b == 0 || l == 0 {
            return Err(Error::msg(format!(
                "text encoder: empty input ids {:?} (the tokenizer always adds `</s>`)",
                ids.dims()
            )));
        }
        if mask.dims() != [b, l] {
            return Err(Error::msg(format!(
                "text encoder: attention mask has shape {:?}, the ids {:?}",
                mask.dims(),
                ids.dims()
            )));
        }
        let ids = ids.to_dtype(DType::U32)?.to_device(&self.device)?;
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id as usize >= c.vocab_size {
            return Err(Error::msg(format!(
                "text encoder: token id {max_id} is outside the vocabulary ({} entries in config.json)",
                c.vocab_size
            )));
        }
        let h = match &self.weights {
            Weights::Held { shared, .. } => shared.index_select(&ids.flatten_all()?, 0)?,
            // Read for the lookup and dropped at once.
            Weights::Streamed { store } => store
                .get_weight(&self.shared_name, &[c.vocab_size, c.d_model])?
                .index_select(&ids.flatten_all()?, 0)?,
        }
        .to_dtype(DType::F32)?
        .reshape((b, l, c.d_model))?;
        Ok((h, b, l))
    }

    /// `ids [B, L]` (u32 or i64), `mask [B, L]` (1 = token, 0 = padding; any dtype) ->
    /// `last_hidden_state [B, L, d_model]` in f32.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (mut h, b, l) = self.embed(ids, mask)?;

        // Additive key mask [B, 1, 1, L]: 0 on tokens, f32::MIN on padding.
        let keep = mask
            .to_device(&self.device)?
            .to_dtype(DType::F32)?
            .ne(0f32)?
            .to_dtype(DType::F32)?;
        let key_bias = ((1.0 - keep)? * f64::from(f32::MIN))?.reshape((b, 1, 1, l))?;

        let buckets: Vec<u32> = (0..l as i64)
            .flat_map(|q| {
                (0..l as i64).map(move |k| {
                    relative_position_bucket(
                        k - q,
                        c.relative_attention_num_buckets,
                        c.relative_attention_max_distance,
                    )
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, l * l, &self.device)?;
        let bias_of = |table: &Tensor| -> Result<Tensor> {
            // [L*L, H] -> [1, H, L, L], plus the key mask -> [B, H, L, L].
            let pos = table
                .index_select(&buckets, 0)?
                .reshape((l, l, c.num_heads))?
                .permute((2, 0, 1))?
                .unsqueeze(0)?;
            Ok(pos.broadcast_add(&key_bias)?.contiguous()?)
        };
        let mut shared_bias: Option<Tensor> = None;

        let n_layers = c.num_layers;
        for li in 0..n_layers {
            magcache_core::runtime::progress::tick("encode text: layer", li + 1, n_layers);
            magcache_core::cancel::check()?;
            let read;
            let layer = match &self.weights {
                Weights::Held { layers, .. } => layers
                    .get(li)
                    .ok_or_else(|| Error::msg(format!("text encoder: no layer {li}")))?,
                Weights::Streamed { store } => {
                    read = build_layer(c, store, li)?;
                    &read
                }
            };
            let bias = match &layer.rel_bias {
                Some(t) => {
                    let bb = bias_of(t)?;
                    if !c.bias_per_layer {
                        shared_bias = Some(bb.clone());
                    }
                    bb
                }
                None => shared_bias
                    .clone()
                    .ok_or_else(|| Error::msg("text encoder: block 0 has no relative bias"))?,
            };
            let x = layer.attn_norm.forward(&h)?;
            let q = split_heads(&layer.q.forward(&x)?, c.num_heads)?;
            let k = split_heads(&layer.k.forward(&x)?, c.num_heads)?;
            let v = split_heads(&layer.v.forward(&x)?, c.num_heads)?;
            let scores = q.matmul(&k.t()?.contiguous()?)?.add(&bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let a = merge_heads(&probs.matmul(&v)?)?;
            h = (h + layer.o.forward(&a)?)?;

            let x = layer.ff_norm.forward(&h)?;
            let mut y = self.act(&layer.wi_0.forward(&x)?)?;
            if let Some(wi_1) = &layer.wi_1 {
                y = (y * wi_1.forward(&x)?)?;
            }
            h = (h + layer.wo.forward(&y)?)?;
        }
        self.final_norm.forward(&h)
    }

    /// `ids [B, L]` -> `last_hidden_state [B, L, d_model]` (f32) with every position attended,
    /// padding included: what FLUX's `T5EncoderModel(input_ids)` call does (no attention mask).
    pub fn forward_unmasked(&self, ids: &Tensor) -> Result<Tensor> {
        let mask = Tensor::ones(ids.dims(), DType::U8, &self.device)?;
        self.forward(ids, &mask)
    }

    fn act(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.config.act {
            Umt5Act::GeluTanh => magcache_layers::nn::gelu(x)?,
            Umt5Act::Gelu => x.gelu_erf()?,
            Umt5Act::Relu => x.relu()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    #[test]
    fn buckets_follow_the_t5_rule() {
        // 32 buckets, max distance 128: exact below 8, log up to 128, keys after the query + 16.
        let b = |r| relative_position_bucket(r, 32, 128);
        assert_eq!(b(0), 0);
        assert_eq!(b(-7), 7);
        assert_eq!(b(7), 23);
        assert_eq!(b(-8), 8);
        assert_eq!(b(-16), 10);
        assert_eq!(b(-64), 14);
        assert_eq!(b(64), 30);
        assert_eq!(b(-90), 14);
        assert_eq!(b(-100), 15);
        assert_eq!(b(-128), 15);
        assert_eq!(b(1000), 31);
    }
}
