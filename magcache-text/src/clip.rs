//! FLUX.1's CLIP side, as `FluxPipeline._get_clip_prompt_embeds` does it: the CLIP BPE tokenizer
//! ([`ClipTokenizer`], padded and truncated to `model_max_length`) and `CLIPTextModel`
//! ([`ClipTextEncoder`]: `last_hidden_state` after `final_layer_norm`, `pooler_output` at the
//! end-of-text position).
//!
//! The tokenizer: FLUX.1's `tokenizer/` folder ships only `vocab.json` and `merges.txt`, so the
//! `tokenizers` pipeline is assembled here the way transformers' `CLIPTokenizerFast` converts the
//! slow tokenizer: BPE (no continuing-subword prefix, `</w>` end-of-word suffix, unk = the unk
//! token, unknown symbols not fused), normalizer `NFC -> \s+ to one space -> lowercase`,
//! pre-tokenizer `Split(CLIP's pattern, removed, inverted) -> ByteLevel(no prefix space)`,
//! post-processor `<|startoftext|> A <|endoftext|>` (RoBERTa-style, no offsets trimming).
//!
//! The encoder is candle-transformers' `clip::text_model::ClipTextTransformer`: it reads
//! `CLIPTextModel`'s tensors under their stored names (below `text_model.`), with quick-gelu, the
//! causal mask, f32 attention and `final_layer_norm`. Two limits of that module are checked here
//! rather than run silently wrong: its layer norms use a fixed eps of 1e-5 (every released CLIP text
//! config has that; another `layer_norm_eps` is refused) and its only activation is quick-gelu
//! (another `hidden_act` is refused). Its `Module::forward` pools at `argmax(input_ids)` only,
//! transformers' rule for the legacy `eos_token_id == 2` configs; the pooling is done here instead,
//! with both of transformers' rules (see [`ClipTextEncoder::pooled_position`]). Weights are read
//! through [`WeightStore`] (single files, shards, shape and finiteness checks naming the file and
//! the tensor) and handed to its `VarBuilder` already checked.

use super::tokenizer::{TokenizedPrompt, WanTokenizer};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig as CtClipTextConfig, ClipTextTransformer,
};
use magcache_core::{Error, Result};
use magcache_layers::config_util::{config_json_in, positive_json, read_json};
use magcache_layers::weights::WeightStore;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// CLIP's word pattern (the special tokens are matched before it, as added tokens).
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// `model_max_length` when `tokenizer_config.json` does not say (CLIP's context length, and what
/// `FluxPipeline` falls back to).
pub const CLIP_DEFAULT_MAX_LENGTH: usize = 77;

/// The CLIP tokenizer of a pipeline's `tokenizer/` folder.
pub struct ClipTokenizer {
    inner: WanTokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
}

/// A string token of `tokenizer_config.json` (a string, or an AddedToken object with `content`).
fn config_token(cfg: &Value, key: &str, default: &str, file: &str) -> Result<String> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default.to_string()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                Error::config(file, key, "expected a string or an object with `content`")
            }),
    }
}

impl ClipTokenizer {
    /// Loads `DIR/vocab.json` + `DIR/merges.txt` (assembled as described in the module docs) and
    /// `DIR/tokenizer_config.json` (`model_max_length`, `bos_token`, `eos_token`, `pad_token`,
    /// `unk_token`; CLIP's defaults when absent). A folder with only a `tokenizer.json` is read
    /// from that file instead.
    pub fn load(dir: &Path) -> Result<Self> {
        let shown = dir.display().to_string();
        if !dir.is_dir() {
            return Err(Error::io(&shown, "CLIP tokenizer folder does not exist"));
        }
        let (cfg, cfg_shown) = super::tokenizer::read_tokenizer_config(dir)?.unwrap_or_else(|| {
            let shown = dir.join("tokenizer_config.json").display().to_string();
            (Value::Object(Default::default()), shown)
        });
        super::tokenizer::check_tokenizer_class(
            &cfg,
            &cfg_shown,
            &[
                "CLIPTokenizer",
                "CLIPTokenizerFast",
                "TokenizersBackend",
                "PreTrainedTokenizerFast",
            ],
            "a CLIP (byte-level BPE)",
        )?;
        let bos = config_token(&cfg, "bos_token", "<|startoftext|>", &cfg_shown)?;
        let eos = config_token(&cfg, "eos_token", "<|endoftext|>", &cfg_shown)?;
        let pad = config_token(&cfg, "pad_token", &eos, &cfg_shown)?;
        let unk = config_token(&cfg, "unk_token", &eos, &cfg_shown)?;
        let max_length = model_max_length(&cfg, &cfg_shown)?;

        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let json = dir.join("tokenizer.json");
        // Present in any form (a FIFO, a dangling link): the regular-file check below says why.
        let present = |p: &Path| p.symlink_metadata().is_ok();
        let (tokenizer, file) = if present(&vocab) || present(&merges) {
            let file = vocab.display().to_string();
            for f in [&vocab, &merges] {
                if let Some(why) = magcache_core::error::not_a_file(f) {
                    return Err(Error::io(f.display().to_string(), why));
                }
                magcache_core::files::record_read(f);
            }
            let tok = Self::assemble(&vocab, &merges, &bos, &eos, &unk)?;
            (tok, file)
        } else if present(&json) {
            let file = json.display().to_string();
            if let Some(why) = magcache_core::error::not_a_file(&json) {
                return Err(Error::io(&file, why));
            }
            magcache_core::files::record_read(&json);
            let tok = Tokenizer::from_file(&json)
                .map_err(|e| Error::config(&file, "(tokenizer)", format!("cannot load: {e}")))?;
            (tok, file)
        } else {
            return Err(Error::io(
                &shown,
                "CLIP tokenizer folder has neither vocab.json + merges.txt nor tokenizer.json",
            ));
        };
        let id_of = |t: &str, key: &str| {
            tokenizer.token_to_id(t).ok_or_else(|| {
                Error::config(
                    &file,
                    key,
                    format!(
                        "the token `{t}` (tokenizer_config.json `{key}`) is not in the vocabulary"
                    ),
                )
            })
        };
        let bos_id = id_of(&bos, "bos_token")?;
        let eos_id = id_of(&eos, "eos_token")?;
        let inner = WanTokenizer::from_tokenizer(tokenizer, &file, &pad)?;
        if max_length < inner.added_tokens() {
            return Err(Error::config(
                &cfg_shown,
                "model_max_length",
                format!(
                    "{max_length} cannot hold the {} special tokens",
                    inner.added_tokens()
                ),
            ));
        }
        Ok(ClipTokenizer {
            inner,
            max_length,
            bos_id,
            eos_id,
        })
    }

    /// transformers' `CLIPConverter` pipeline over `vocab.json` + `merges.txt`.
    fn assemble(vocab: &Path, merges: &Path, bos: &str, eos: &str, unk: &str) -> Result<Tokenizer> {
        let vshown = vocab.display().to_string();
        let mshown = merges.display().to_string();
        let path_str = |p: &Path, shown: &str| -> Result<String> {
            p.to_str()
                .map(str::to_string)
                .ok_or_else(|| Error::io(shown, "path is not valid UTF-8"))
        };
        let bpe = BPE::from_file(&path_str(vocab, &vshown)?, &path_str(merges, &mshown)?)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .unk_token(unk.to_string())
            .fuse_unk(false)
            .build()
            .map_err(|e| {
                Error::config(
                    &vshown,
                    "(vocab)",
                    format!("cannot build the BPE model with {mshown}: {e}"),
                )
            })?;
        let mut tok = Tokenizer::new(bpe);
        let internal = |what: &str, e: tokenizers::Error| {
            Error::msg(format!("{vshown}: assembling the CLIP {what}: {e}"))
        };
        let replace = Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ")
            .map_err(|e| internal("normalizer", e))?;
        tok.with_normalizer(Some(NormSequence::new(vec![
            NFC.into(),
            replace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| internal("normalizer", e))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.to_string()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| internal("pre-tokenizer", e))?;
        tok.with_pre_tokenizer(Some(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        let id_of = |t: &str, key: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                Error::config(
                    &vshown,
                    key,
                    format!("the special token `{t}` is not in the vocabulary"),
                )
            })
        };
        let (bos_id, eos_id) = (id_of(bos, "bos_token")?, id_of(eos, "eos_token")?);
        tok.with_post_processor(Some(
            RobertaProcessing::new((eos.to_string(), eos_id), (bos.to_string(), bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        // Matched after normalisation, as the slow tokenizer matches them in the lower-cased text.
        let mut specials = vec![AddedToken::from(bos, true).normalized(true)];
        for t in [eos, unk] {
            if !specials.iter().any(|s| s.content == t) {
                specials.push(AddedToken::from(t, true).normalized(true));
            }
        }
        tok.add_special_tokens(specials)
            .map_err(|e| internal("special tokens", e))?;
        Ok(tok)
    }

    /// The file the vocabulary came from (for messages).
    pub fn file(&self) -> &str {
        self.inner.file()
    }

    /// `model_max_length` of `tokenizer_config.json` (77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.inner.pad_id()
    }

    /// The bare tokenizer call with bos/eos, no truncation or padding.
    pub fn encode_unpadded(&self, text: &str) -> Result<TokenizedPrompt> {
        self.inner.encode_unpadded(text, true)
    }

    /// The pipeline's call: `padding="max_length", max_length=model_max_length, truncation=True`.
    pub fn encode(&self, text: &str) -> Result<TokenizedPrompt> {
        self.inner.encode(text, self.max_length)
    }
}

/// The sizes of a `CLIPTextModel` `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub projection_dim: usize,
    /// Selects transformers' pooling rule (2: the legacy `argmax(input_ids)`).
    pub eos_token_id: i64,
}

/// The layer-norm eps candle-transformers' CLIP text model uses.
const CANDLE_CLIP_LN_EPS: f64 = 1e-5;

impl ClipTextModelConfig {
    /// What encoding one prompt holds (the size guard, checked before the encoder loads): the
    /// weights (`dtype_bytes` per parameter) named by `config` (the config file) and its sizes, and
    /// the activations of its `max_position_embeddings` tokens (f32).
    pub fn footprint(
        &self,
        dtype_bytes: usize,
        config: &str,
    ) -> magcache_core::runtime::guard::Footprint {
        use magcache_layers::footprint::sz;
        let h = sz(self.hidden_size);
        let inter = sz(self.intermediate_size);
        let layer = h * h * sz(4) + h * inter * sz(2) + h * sz(9) + inter;
        let params = sz(self.vocab_size) * h
            + sz(self.max_position_embeddings) * h
            + sz(self.num_hidden_layers) * layer
            + h * sz(2);
        let l = sz(self.max_position_embeddings);
        let acts = (l * (h * sz(8) + inter * sz(2)) + sz(self.num_attention_heads) * l * l * sz(2))
            * sz(4);
        let mut fp = magcache_core::runtime::guard::Footprint::default();
        fp.add(
            "CLIP text encoder weights",
            format!("{config}: num_hidden_layers, hidden_size, intermediate_size, vocab_size"),
            (params * sz(dtype_bytes)).0,
        );
        fp.add(
            "CLIP text encoder activations",
            format!("{config}: max_position_embeddings"),
            acts.0,
        );
        fp
    }

    /// Reads `config.json` (the file, or `DIR/config.json`); a full `CLIPModel` config is read from
    /// its `text_config`.
    pub fn load(path: &Path) -> Result<Self> {
        let (v, shown) = read_json(&config_json_in(path))?;
        match v.get("text_config") {
            Some(t) if t.is_object() => Self::from_json(t, &shown),
            _ => Self::from_json(&v, &shown),
        }
    }

    pub fn from_json(v: &Value, file: &str) -> Result<Self> {
        let usize_of = |key: &str, default: Option<usize>| {
            positive_json(v, file, key, default, "the CLIP text encoder config")
        };
        match v.get("hidden_act") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "quick_gelu" => {}
            Some(x) => {
                return Err(Error::config(
                    file,
                    "hidden_act",
                    format!("{x} is not supported: the CLIP text encoder (candle-transformers) runs quick_gelu only"),
                ))
            }
        }
        match v.get("layer_norm_eps") {
            None | Some(Value::Null) => {}
            Some(x) => match x.as_f64() {
                Some(e) if (e - CANDLE_CLIP_LN_EPS).abs() <= 1e-12 => {}
                _ => {
                    return Err(Error::config(
                        file,
                        "layer_norm_eps",
                        format!("{x} is not supported: the CLIP text encoder (candle-transformers) uses 1e-5"),
                    ))
                }
            },
        }
        let hidden_size = usize_of("hidden_size", None)?;
        let num_attention_heads = usize_of("num_attention_heads", None)?;
        if hidden_size % num_attention_heads != 0 {
            return Err(Error::config(
                file,
                "num_attention_heads",
                format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
            ));
        }
        let eos_token_id = match v.get("eos_token_id") {
            None | Some(Value::Null) => 2,
            Some(x) => x.as_i64().ok_or_else(|| {
                Error::config(
                    file,
                    "eos_token_id",
                    format!("expected an integer, got {x}"),
                )
            })?,
        };
        Ok(ClipTextModelConfig {
            vocab_size: usize_of("vocab_size", None)?,
            hidden_size,
            intermediate_size: usize_of("intermediate_size", None)?,
            num_hidden_layers: usize_of("num_hidden_layers", None)?,
            num_attention_heads,
            max_position_embeddings: usize_of("max_position_embeddings", Some(77))?,
            projection_dim: usize_of("projection_dim", Some(hidden_size))?,
            eos_token_id,
        })
    }
}

/// transformers' `CLIPTextModel` (no projection): `forward(ids) -> (last_hidden_state, pooled)`.
pub struct ClipTextEncoder {
    pub config: ClipTextModelConfig,
    model: ClipTextTransformer,
    device: Device,
}

impl ClipTextEncoder {
    /// Loads `DIR/config.json` and the folder's weights (a single `model.safetensors`, or shards
    /// with `model.safetensors.index.json`), all in `dtype` on `device` (candle-transformers' module
    /// runs in one dtype; its attention is computed in f32).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config = ClipTextModelConfig::load(dir)?;
        let files: Vec<PathBuf> = magcache_layers::weights::weight_files(dir)?;
        let mut store = WeightStore::load_files(&dir.display().to_string(), &files)?;
        store.set_placement(magcache_core::Placement {
            device: device.clone(),
            dtype,
            ..Default::default()
        });
        let model = Self::from_weights(config, &store)?;
        // A whole layer left over: the config has fewer layers than the checkpoint.
        let cfg_file = dir.join("config.json").display().to_string();
        let n = model.config.num_hidden_layers;
        store.check_unused(&cfg_file, |_| {
            format!("num_hidden_layers = {n} in {cfg_file}")
        })?;
        Ok(model)
    }

    /// Builds the model from a store holding `CLIPTextModel`'s tensors, with or without the
    /// `text_model.` prefix.
    pub fn from_weights(config: ClipTextModelConfig, store: &WeightStore) -> Result<Self> {
        let c = &config;
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let prefix = if !store.contains("text_model.embeddings.token_embedding.weight")
            && store.contains("embeddings.token_embedding.weight")
        {
            ""
        } else {
            "text_model."
        };
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "embeddings.token_embedding.weight".into(),
                vec![c.vocab_size, d],
            ),
            (
                "embeddings.position_embedding.weight".into(),
                vec![c.max_position_embeddings, d],
            ),
            ("final_layer_norm.weight".into(), vec![d]),
            ("final_layer_norm.bias".into(), vec![d]),
        ];
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layers.{i}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                shapes.push((format!("{p}.self_attn.{proj}.weight"), vec![d, d]));
                shapes.push((format!("{p}.self_attn.{proj}.bias"), vec![d]));
            }
            for ln in ["layer_norm1", "layer_norm2"] {
                shapes.push((format!("{p}.{ln}.weight"), vec![d]));
                shapes.push((format!("{p}.{ln}.bias"), vec![d]));
            }
            shapes.push((format!("{p}.mlp.fc1.weight"), vec![f, d]));
            shapes.push((format!("{p}.mlp.fc1.bias"), vec![f]));
            shapes.push((format!("{p}.mlp.fc2.weight"), vec![d, f]));
            shapes.push((format!("{p}.mlp.fc2.bias"), vec![d]));
        }
        let placement = store.placement().clone();
        let mut map: HashMap<String, Tensor> = HashMap::with_capacity(shapes.len());
        for (name, shape) in shapes {
            let t = store.get_weight(&format!("{prefix}{name}"), &shape)?;
            map.insert(name, t);
        }
        let vb = candle_nn::VarBuilder::from_tensors(map, placement.dtype, &placement.device);
        let ct = CtClipTextConfig {
            vocab_size: c.vocab_size,
            embed_dim: d,
            activation: Activation::QuickGelu,
            intermediate_size: f,
            max_position_embeddings: c.max_position_embeddings,
            pad_with: None,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            projection_dim: c.projection_dim,
        };
        let model = ClipTextTransformer::new(vb, &ct).map_err(|e| {
            Error::weights(
                &store.origin,
                "text_model",
                format!("building the CLIP text model: {e}"),
            )
        })?;
        Ok(ClipTextEncoder {
            config,
            model,
            device: placement.device,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The position `pooler_output` is taken from, as transformers' `CLIPTextTransformer` picks
    /// it: with the legacy `eos_token_id == 2` the first position of the largest id
    /// (`argmax(input_ids)`), otherwise the first position holding `eos_token_id` (0 when none).
    pub fn pooled_position(&self, ids: &[u32]) -> usize {
        if self.config.eos_token_id == 2 {
            let mut best = 0;
            for (i, &x) in ids.iter().enumerate() {
                if x > ids[best] {
                    best = i;
                }
            }
            best
        } else {
            ids.iter()
                .position(|&x| i64::from(x) == self.config.eos_token_id)
                .unwrap_or(0)
        }
    }

    /// `ids [B, L]` (u32 or i64) -> `(last_hidden_state [B, L, D], pooler_output [B, D])`, both f32.
    pub fn forward(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = &self.config;
        let (b, l) = ids.dims2()?;
        if b == 0 || l == 0 {
            return Err(Error::msg(format!(
                "CLIP text encoder: empty input ids {:?}",
                ids.dims()
            )));
        }
        if l > c.max_position_embeddings {
            return Err(Error::msg(format!(
                "CLIP text encoder: {l} tokens, but config.json max_position_embeddings is {} (tokenizer_config.json model_max_length must not exceed it)",
                c.max_position_embeddings
            )));
        }
        let ids = ids.to_dtype(DType::U32)?.to_device(&self.device)?;
        let rows = ids.to_vec2::<u32>()?;
        if let Some(&bad) = rows.iter().flatten().find(|&&x| x as usize >= c.vocab_size) {
            return Err(Error::msg(format!(
                "CLIP text encoder: token id {bad} is outside the vocabulary ({} entries in config.json)",
                c.vocab_size
            )));
        }
        let last = self
            .model
            .forward_with_mask(&ids, usize::MAX)?
            .to_dtype(DType::F32)?;
        let pooled = rows
            .iter()
            .enumerate()
            .map(|(bi, row)| last.get(bi)?.get(self.pooled_position(row)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&pooled, 0)?;
        Ok((last, pooled))
    }
}

/// `model_max_length` of a CLIP `tokenizer_config.json` (77 when absent).
fn model_max_length(cfg: &Value, cfg_shown: &str) -> Result<usize> {
    Ok(match cfg.get("model_max_length") {
        None | Some(Value::Null) => CLIP_DEFAULT_MAX_LENGTH,
        Some(x) => {
            // transformers writes 1e30 for "no limit": FluxPipeline would then pad to it.
            let n = x.as_f64().unwrap_or(f64::NAN);
            if !((2.0..=1e6).contains(&n) && n.fract() == 0.0) {
                return Err(Error::config(
                    cfg_shown,
                    "model_max_length",
                    format!("expected an integer between 2 and 1000000 (CLIP's is 77), got {x}"),
                ));
            }
            n as usize
        }
    })
}
