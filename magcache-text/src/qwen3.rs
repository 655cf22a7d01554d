//! The Qwen decoder the image pipelines use as their text encoder, returning every hidden state:
//! Qwen3 (FLUX.2 \[klein\], Z-Image: per-head q/k RMS norms, no biases) and the language model of
//! Qwen2.5-VL (Qwen-Image: q/k/v biases, no q/k norms, its multimodal RoPE the ordinary one for
//! text), with the padding mask applied (causal attention over the real tokens). How each pipeline
//! renders and reads a prompt: [`crate::qwen_chat`] (FLUX.2, Z-Image), [`crate::qwenimage`].
//!
//! Our own Qwen3 module, not candle-transformers' `qwen3`: that one returns only the final-norm
//! output (no per-layer hidden states), builds a causal mask without the padding mask the pipeline
//! passes (padded keys would be attended), loads through `VarBuilder` (one dtype for norms and
//! weights, errors naming neither file nor tensor) and keeps a KV cache we do not need. Layers after
//! the last one asked for are never loaded. Norms, RoPE, softmax and activations run in f32.

use candle_core::{DType, Device, Tensor};
use magcache_core::{Error, Result};
use magcache_layers::config_util::{config_json_in, positive_json, read_json};
use magcache_layers::nn::{heads_normed, merge_heads, split_heads};
use magcache_layers::nn::{Linear, RmsNorm};
use magcache_layers::weights::WeightStore;
use serde_json::Value;
use std::path::Path;

/// `tokenizer_class` values of a Qwen tokenizer.
pub const QWEN_TOKENIZERS: &[&str] = &[
    "Qwen2Tokenizer",
    "Qwen2TokenizerFast",
    "TokenizersBackend",
    "PreTrainedTokenizerFast",
];

/// `Qwen3ForCausalLM` / `Qwen3Model` configuration (`config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub attention_bias: bool,
    /// Per-head RMS norms on the queries and keys (Qwen3; Qwen2 and Qwen2.5-VL have none).
    pub qk_norm: bool,
}

impl Qwen3Config {
    /// Reads `DIR/config.json` (or the file); errors name the file and key.
    pub fn load(path: &Path) -> Result<Self> {
        let (v, shown) = read_json(&config_json_in(path))?;
        Self::from_json(&v, &shown)
    }

    pub fn from_json(v: &Value, file: &str) -> Result<Self> {
        // Qwen2.5-VL (Qwen-Image's text encoder): the language model's fields at the top level as
        // released (transformers 4.5x), or only under `text_config` (5.x).
        let v = match v.get("hidden_size") {
            None => v.get("text_config").unwrap_or(v),
            Some(_) => v,
        };
        let positive = |key: &str, default: Option<usize>| {
            positive_json(v, file, key, default, "the Qwen3 text encoder")
        };
        let float =
            |x: Option<&Value>, key: &str, default: f64| positive_float(x, file, key, default);
        // Qwen2.5-VL's language model: q/k/v biases, no q/k norms, and a multimodal RoPE whose three
        // position rows are equal for text, which makes it the ordinary RoPE.
        let vl = matches!(
            v.get("model_type").and_then(|m| m.as_str()),
            Some("qwen2_5_vl" | "qwen2_5_vl_text")
        );
        match v.get("model_type").and_then(|m| m.as_str()) {
            None | Some("qwen3" | "qwen2_5_vl" | "qwen2_5_vl_text") => {}
            Some(other) => {
                return Err(Error::config(
                    file,
                    "model_type",
                    format!("`{other}` is not a Qwen3 or Qwen2.5-VL text encoder (expected \"qwen3\" or \"qwen2_5_vl\")"),
                ))
            }
        }
        if let Some(a) = v.get("hidden_act").and_then(|a| a.as_str()) {
            if a != "silu" {
                return Err(Error::config(
                    file,
                    "hidden_act",
                    format!("`{a}` is not supported (only \"silu\")"),
                ));
            }
        }
        let theta = rope_theta(v, file, vl)?;
        let hidden_size = positive("hidden_size", None)?;
        let num_attention_heads = positive("num_attention_heads", None)?;
        let cfg = Qwen3Config {
            vocab_size: positive("vocab_size", None)?,
            hidden_size,
            intermediate_size: positive("intermediate_size", None)?,
            num_hidden_layers: positive("num_hidden_layers", None)?,
            num_attention_heads,
            num_key_value_heads: positive("num_key_value_heads", Some(num_attention_heads))?,
            // transformers' Qwen3 defaults `head_dim` to 128; Qwen2 / Qwen2.5-VL have no such key
            // (hidden / heads).
            head_dim: positive(
                "head_dim",
                Some(if vl {
                    hidden_size / num_attention_heads.max(1)
                } else {
                    128
                }),
            )?,
            rms_norm_eps: float(v.get("rms_norm_eps"), "rms_norm_eps", 1e-6)?,
            rope_theta: theta,
            attention_bias: v
                .get("attention_bias")
                .and_then(|b| b.as_bool())
                .unwrap_or(vl),
            qk_norm: !vl,
        };
        if !cfg
            .num_attention_heads
            .is_multiple_of(cfg.num_key_value_heads)
        {
            return Err(Error::config(
                file,
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    cfg.num_key_value_heads, cfg.num_attention_heads
                ),
            ));
        }
        if !cfg.head_dim.is_multiple_of(2) {
            return Err(Error::config(file, "head_dim", "must be even (RoPE pairs)"));
        }
        Ok(cfg)
    }

    /// Parameters of the embedding and the first `layers` decoder layers.
    pub fn params(&self, layers: usize) -> magcache_layers::footprint::Sz {
        use magcache_layers::footprint::sz;
        let d = sz(self.hidden_size);
        let q = sz(self.num_attention_heads) * sz(self.head_dim);
        let kv = sz(self.num_key_value_heads) * sz(self.head_dim);
        let layer = d * q * sz(2) + d * kv * sz(2) + d * sz(self.intermediate_size) * sz(3);
        sz(self.vocab_size) * d + sz(layers) * layer
    }

    /// What encoding one prompt of `max_len` tokens holds: the weights of the layers it runs and the
    /// activations (scores of every head, f32).
    pub fn footprint(
        &self,
        layers: usize,
        max_len: usize,
        dtype_bytes: usize,
        config: &str,
    ) -> magcache_core::runtime::guard::Footprint {
        use magcache_layers::footprint::sz;
        let l = sz(max_len);
        let scores = sz(self.num_attention_heads) * l * l * sz(3);
        let d = sz(self.hidden_size);
        let acts = (l
            * (d * sz(8)
                + sz(self.num_attention_heads) * sz(self.head_dim) * sz(4)
                + sz(self.intermediate_size) * sz(3))
            + scores)
            * sz(4);
        let mut fp = magcache_core::runtime::guard::Footprint::default();
        fp.add(
            "text encoder weights",
            format!("{config}: num_hidden_layers, hidden_size, intermediate_size, vocab_size"),
            (self.params(layers) * sz(dtype_bytes)).0,
        );
        fp.add(
            "text encoder activations",
            "prompt.max_sequence_length",
            acts.0,
        );
        fp
    }
}

struct Layer {
    ln1: RmsNorm,
    ln2: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    qn: Option<RmsNorm>,
    kn: Option<RmsNorm>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The first decoder layers of a Qwen3 model, returning every hidden state.
pub struct Qwen3Encoder {
    pub config: Qwen3Config,
    embed: Tensor,
    layers: Vec<Layer>,
    /// The final RMS norm, loaded when the encoder has every layer (`hidden_states[-1]` is normed).
    norm: Option<RmsNorm>,
    device: Device,
}

impl Qwen3Encoder {
    /// Loads `DIR/config.json` and the embedding and first `layers` decoder layers of the weights
    /// (a single file or shards with their index; names with or without the `model.` prefix).
    /// Linear weights and the embedding are kept in `dtype` on `device`; norms are f32.
    pub fn load(dir: &Path, layers: usize, device: &Device, dtype: DType) -> Result<Self> {
        let config = Qwen3Config::load(dir)?;
        let cfg_file = dir.join("config.json").display().to_string();
        if layers > config.num_hidden_layers {
            return Err(Error::config(
                &cfg_file,
                "num_hidden_layers",
                format!(
                    "{} layers, but the pipeline reads the output of layer {layers}",
                    config.num_hidden_layers
                ),
            ));
        }
        let files = magcache_layers::weights::weight_files(dir)?;
        let mut store = WeightStore::load_files(&dir.display().to_string(), &files)?;
        store.set_placement(magcache_core::Placement {
            device: device.clone(),
            dtype,
            ..Default::default()
        });
        Self::from_weights(config, &store, layers)
    }

    pub fn from_weights(config: Qwen3Config, store: &WeightStore, layers: usize) -> Result<Self> {
        let c = &config;
        let p = ["model.language_model.", "model.", ""]
            .into_iter()
            .find(|p| store.contains(&format!("{p}embed_tokens.weight")))
            .unwrap_or("");
        let d = c.hidden_size;
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let embed = store.get_weight(&format!("{p}embed_tokens.weight"), &[c.vocab_size, d])?;
        let lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let b = if bias {
                Some(store.get_shape(&format!("{name}.bias"), &[out])?)
            } else {
                None
            };
            Linear::new(store.get_weight(&format!("{name}.weight"), &[out, inp])?, b)
        };
        let norm = |name: &str, n: usize| -> Result<RmsNorm> {
            Ok(RmsNorm::new(
                store.get_shape(&format!("{name}.weight"), &[n])?,
                c.rms_norm_eps,
            ))
        };
        let ab = c.attention_bias;
        let layers = (0..layers)
            .map(|i| {
                let l = format!("{p}layers.{i}");
                let a = format!("{l}.self_attn");
                let m = format!("{l}.mlp");
                Ok(Layer {
                    ln1: norm(&format!("{l}.input_layernorm"), d)?,
                    ln2: norm(&format!("{l}.post_attention_layernorm"), d)?,
                    q: lin(&format!("{a}.q_proj"), q, d, ab)?,
                    k: lin(&format!("{a}.k_proj"), kv, d, ab)?,
                    v: lin(&format!("{a}.v_proj"), kv, d, ab)?,
                    o: lin(&format!("{a}.o_proj"), d, q, false)?,
                    qn: c
                        .qk_norm
                        .then(|| norm(&format!("{a}.q_norm"), c.head_dim))
                        .transpose()?,
                    kn: c
                        .qk_norm
                        .then(|| norm(&format!("{a}.k_norm"), c.head_dim))
                        .transpose()?,
                    gate: lin(&format!("{m}.gate_proj"), c.intermediate_size, d, false)?,
                    up: lin(&format!("{m}.up_proj"), c.intermediate_size, d, false)?,
                    down: lin(&format!("{m}.down_proj"), d, c.intermediate_size, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = (layers.len() == c.num_hidden_layers)
            .then(|| norm(&format!("{p}norm"), d))
            .transpose()?;
        Ok(Qwen3Encoder {
            norm,
            device: store.placement().device.clone(),
            config,
            embed,
            layers,
        })
    }

    /// Rotate-half RoPE tables `[L, head_dim/2]` for positions `0..L` (computed in f32, as
    /// transformers does).
    fn rope(&self, len: usize) -> Result<(Tensor, Tensor)> {
        let hd = self.config.head_dim;
        let theta = self.config.rope_theta as f32;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|j| 1.0 / theta.powf((2 * j) as f32 / hd as f32))
            .collect();
        let mut cos = Vec::with_capacity(len * hd / 2);
        let mut sin = Vec::with_capacity(len * hd / 2);
        for pos in 0..len {
            for f in &inv {
                let a = pos as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (len, hd / 2), &self.device)?,
            Tensor::from_vec(sin, (len, hd / 2), &self.device)?,
        ))
    }

    /// `hidden_states[0..=n]` for one sequence (`ids` and its padding `mask`, 1 = real token):
    /// the embedding output, then each decoder layer's output, `[1, L, hidden]` f32. Query `q`
    /// attends to the keys `k <= q` whose mask is 1. `n` is at most the layers loaded.
    pub fn hidden_states(&self, ids: &[u32], mask: &[u32], n: usize) -> Result<Vec<Tensor>> {
        let c = &self.config;
        let len = ids.len();
        if mask.len() != len || len == 0 {
            return Err(Error::msg(format!(
                "Qwen3 text encoder: {len} ids and {} mask values (need as many, at least one)",
                mask.len()
            )));
        }
        if n > self.layers.len() {
            return Err(Error::msg(format!(
                "Qwen3 text encoder: layer {n} asked, {} loaded",
                self.layers.len()
            )));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= c.vocab_size) {
            return Err(Error::msg(format!(
                "Qwen3 text encoder: token id {bad} is outside the vocabulary ({})",
                c.vocab_size
            )));
        }
        let ids_t = Tensor::from_vec(ids.to_vec(), len, &self.device)?;
        let mut x = self
            .embed
            .index_select(&ids_t, 0)?
            .to_dtype(DType::F32)?
            .unsqueeze(0)?;
        let mut bias = Vec::with_capacity(len * len);
        for q in 0..len {
            for (k, &m) in mask.iter().enumerate() {
                bias.push(if k <= q && m != 0 { 0f32 } else { f32::MIN });
            }
        }
        let bias = Tensor::from_vec(bias, (1, 1, len, len), &self.device)?;
        let (cos, sin) = self.rope(len)?;
        let (h, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let rep = h / kvh;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![x.clone()];
        for (li, layer) in self.layers.iter().take(n).enumerate() {
            magcache_core::runtime::progress::tick("encode text: layer", li + 1, n);
            magcache_core::cancel::check()?;
            let a = layer.ln1.forward(&x)?;
            let rope = |t: Tensor| -> Result<Tensor> {
                Ok(candle_nn::rotary_emb::rope(&t.contiguous()?, &cos, &sin)?)
            };
            let heads = |x: Tensor, n: usize, norm: &Option<RmsNorm>| match norm {
                Some(norm) => heads_normed(&x, n, norm),
                None => split_heads(&x, n),
            };
            let q = rope(heads(layer.q.forward(&a)?, h, &layer.qn)?)?;
            let k = rope(heads(layer.k.forward(&a)?, kvh, &layer.kn)?)?;
            let v = split_heads(&layer.v.forward(&a)?, kvh)?;
            // Key/value head j serves query heads j*rep .. (j+1)*rep.
            let expand = |t: Tensor| -> Result<Tensor> {
                if rep == 1 {
                    return Ok(t);
                }
                let (b, _, l, d) = t.dims4()?;
                Ok(t.unsqueeze(2)?
                    .broadcast_as((b, kvh, rep, l, d))?
                    .reshape((b, h, l, d))?)
            };
            let (k, v) = (expand(k)?, expand(v)?);
            let s = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&bias)?;
            let p = candle_nn::ops::softmax_last_dim(&s)?;
            let o = merge_heads(&p.matmul(&v.contiguous()?)?)?;
            x = (x + layer.o.forward(&o)?)?;
            let m = layer.ln2.forward(&x)?;
            let g = layer.gate.forward(&m)?.silu()?;
            let u = layer.up.forward(&m)?;
            x = (&x + layer.down.forward(&(g * u)?)?)?;
            out.push(x.clone());
        }
        Ok(out)
    }
}

impl Qwen3Encoder {
    /// The final RMS norm of the last hidden state (`hidden_states[-1]` of transformers); an error
    /// when the encoder was loaded without its last layers.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        match &self.norm {
            Some(n) => n.forward(x),
            None => Err(Error::msg(
                "Qwen text encoder: loaded without its last layers, so without the final norm",
            )),
        }
    }
}

/// [`crate::chat::check_chat_template`] for FLUX.2's call (thinking off).
pub fn check_chat_template(tokenizer: &Path) -> Result<String> {
    crate::chat::check_chat_template(tokenizer, crate::chat::Thinking::Off)
}

/// The chat template's rendering of one user message with the generation prompt and thinking
/// disabled (Qwen3's template, as `Flux2KleinPipeline` calls it).
pub fn flux2_chat_prompt(prompt: &str) -> String {
    crate::chat::chat_prompt(prompt, crate::chat::Thinking::Off)
}

/// `rope_theta` of a Qwen config, refusing RoPE scalings this encoder does not apply: transformers
/// 4.5x writes `rope_theta` / `rope_scaling` at the top, 5.x `rope_parameters`; Qwen2.5-VL's
/// multimodal sections (`mrope_section`, `vl`) are the ordinary RoPE for text.
fn rope_theta(v: &Value, file: &str, vl: bool) -> Result<f64> {
    let float = |x: Option<&Value>, key: &str, default: f64| positive_float(x, file, key, default);
    // transformers 4.5x: `rope_theta` / `rope_scaling` at the top; 5.x: `rope_parameters`.
    let params = v.get("rope_parameters");
    let mrope = |s: &&Value| {
        vl && s.get("mrope_section").is_some()
            && matches!(
                s.get("rope_type")
                    .or(s.get("type"))
                    .and_then(|t| t.as_str()),
                None | Some("default" | "mrope")
            )
    };
    let scaling = v
        .get("rope_scaling")
        .filter(|s| !s.is_null() && !mrope(s))
        .or_else(|| {
            params.filter(|p| {
                matches!(p.get("rope_type").and_then(|t| t.as_str()), Some(t) if t != "default")
                    && !mrope(p)
            })
        });
    if let Some(s) = scaling {
        return Err(Error::config(
            file,
            "rope_scaling",
            format!("{s} is not supported (only the default RoPE)"),
        ));
    }
    let theta = match v.get("rope_theta") {
        Some(t) if !t.is_null() => float(Some(t), "rope_theta", 1e6)?,
        _ => float(
            params.and_then(|p| p.get("rope_theta")),
            "rope_parameters.rope_theta",
            1e6,
        )?,
    };
    Ok(theta)
}

/// A positive finite number at `key` (`default` when absent or null), or an error naming it.
fn positive_float(x: Option<&Value>, file: &str, key: &str, default: f64) -> Result<f64> {
    match x {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| {
                Error::config(file, key, format!("expected a positive number, got {x}"))
            }),
    }
}
