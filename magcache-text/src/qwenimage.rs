//! The text side of a Qwen-Image run, as diffusers' `QwenImagePipeline` encodes a prompt:
//!
//! - the pipeline's own template (a fixed system message, then the prompt as the user turn and the
//!   opened assistant turn; the folder's chat template is never rendered);
//! - Qwen2.5-VL's byte-level BPE, assembled from `vocab.json` + `merges.txt` as transformers'
//!   slow `Qwen2Tokenizer` is (the released folder has no `tokenizer.json`): NFC, Qwen2's split
//!   pattern, byte-level, no BOS/EOS, the added tokens matched whole; no padding for one prompt,
//!   truncation past `1024 + 34` tokens;
//! - the Qwen2.5-VL language model (every layer and the final norm: `hidden_states[-1]`), the
//!   first 34 rows dropped (the template's prefix in the real vocabulary, a constant of the
//!   pipeline), at most `max_sequence_length` rows kept.

use crate::qwen3::{Qwen3Config, Qwen3Encoder, QWEN_TOKENIZERS};
use crate::tokenizer::{check_tokenizer_class, TokenizedPrompt, WanTokenizer};
use candle_core::{DType, Device, Tensor};
use magcache_core::{Error, Result};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// `prompt_template_encode` of `QwenImagePipeline`.
pub const QWENIMAGE_TEMPLATE: &str = "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n";
/// `prompt_template_encode_start_idx`: rows dropped from the front of the embeddings.
pub const QWENIMAGE_DROP: usize = 34;
/// `tokenizer_max_length`: the most embedding rows a prompt may ask for.
pub const QWENIMAGE_MAX_LEN: usize = 1024;

/// Qwen2's pre-tokenizer split.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pipeline's template around `prompt`.
pub fn qwenimage_prompt(prompt: &str) -> String {
    QWENIMAGE_TEMPLATE.replacen("{}", prompt, 1)
}

/// The added tokens of a Qwen tokenizer folder, in id order: `tokenizer_config.json`'s
/// `added_tokens_decoder` (content, special), else `added_tokens.json` (all special).
fn added_tokens(dir: &Path) -> Result<Vec<(u32, String, bool)>> {
    let cfg = dir.join("tokenizer_config.json");
    let shown = cfg.display().to_string();
    let v: serde_json::Value = serde_json::from_str(&magcache_core::error::read_text(&cfg)?)
        .map_err(|e| Error::config(&shown, "(document)", format!("invalid JSON: {e}")))?;
    check_tokenizer_class(&v, &shown, QWEN_TOKENIZERS, "a Qwen (byte-level BPE)")?;
    let mut out = Vec::new();
    if let Some(m) = v.get("added_tokens_decoder").and_then(|m| m.as_object()) {
        for (id, t) in m {
            let id: u32 = id.parse().map_err(|_| {
                Error::config(
                    &shown,
                    format!("added_tokens_decoder.{id}"),
                    "not a token id",
                )
            })?;
            let content = t.get("content").and_then(|c| c.as_str()).ok_or_else(|| {
                Error::config(
                    &shown,
                    format!("added_tokens_decoder.{id}.content"),
                    "missing",
                )
            })?;
            let special = t.get("special").and_then(|s| s.as_bool()).unwrap_or(false);
            out.push((id, content.to_string(), special));
        }
    } else {
        let f = dir.join("added_tokens.json");
        let fshown = f.display().to_string();
        let m: std::collections::BTreeMap<String, u32> =
            serde_json::from_str(&magcache_core::error::read_text(&f)?)
                .map_err(|e| Error::config(&fshown, "(document)", format!("{e}")))?;
        out.extend(m.into_iter().map(|(c, id)| (id, c, true)));
    }
    out.sort_by_key(|t| t.0);
    Ok(out)
}

/// Qwen2's slow tokenizer over `DIR/vocab.json` + `DIR/merges.txt` (see the module docs).
pub fn qwen2_tokenizer(dir: &Path) -> Result<WanTokenizer> {
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    let vshown = vocab.display().to_string();
    for f in [&vocab, &merges] {
        if let Some(why) = magcache_core::error::not_a_file(f) {
            return Err(Error::io(
                f.display().to_string(),
                format!(
                    "tokenizer file {why} (a Qwen tokenizer folder has vocab.json and merges.txt)"
                ),
            ));
        }
        magcache_core::files::record_read(f);
    }
    let utf8 = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| Error::io(p.display().to_string(), "path is not valid UTF-8"))
    };
    let bpe = BPE::from_file(&utf8(&vocab)?, &utf8(&merges)?)
        .build()
        .map_err(|e| {
            Error::config(
                &vshown,
                "(vocab)",
                format!("cannot build the BPE model with merges.txt: {e}"),
            )
        })?;
    let mut tok = Tokenizer::new(bpe);
    let internal = |what: &str, e: tokenizers::Error| {
        Error::msg(format!("{vshown}: assembling the Qwen2 {what}: {e}"))
    };
    tok.with_normalizer(Some(NFC))
        .map_err(|e| internal("normalizer", e))?;
    let split = Split::new(
        SplitPattern::Regex(QWEN2_PATTERN.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| internal("pre-tokenizer", e))?;
    tok.with_pre_tokenizer(Some(PreSequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let shown = dir.join("tokenizer_config.json").display().to_string();
    for (id, content, special) in added_tokens(dir)? {
        let t = AddedToken::from(content.clone(), special).normalized(false);
        let added = if special {
            tok.add_special_tokens(vec![t])
        } else {
            tok.add_tokens(vec![t])
        };
        added.map_err(|e| internal("added tokens", e))?;
        if tok.token_to_id(&content) != Some(id) {
            return Err(Error::config(
                &shown,
                "added_tokens_decoder",
                format!("`{content}` would get id {:?}, the folder says {id} (the vocabulary and the added tokens disagree)", tok.token_to_id(&content)),
            ));
        }
    }
    WanTokenizer::from_tokenizer(tok, &vshown, "<|endoftext|>")
}

/// Everything one prompt went through (for tests and traces).
pub struct QwenImagePromptEncoding {
    pub text: String,
    /// The template's tokens (no padding).
    pub tokens: TokenizedPrompt,
    /// `hidden_states[0..=N]` `[1, T, hidden]`, the last one normed.
    pub hidden_states: Vec<Tensor>,
    /// `[1, L, hidden]`, `L = min(T - 34, max_sequence_length)`.
    pub prompt_embeds: Tensor,
}

/// The tokenizer and the Qwen2.5-VL language model of a Qwen-Image pipeline folder.
pub struct QwenImageTextEncoder {
    tokenizer: WanTokenizer,
    encoder: Qwen3Encoder,
}

impl QwenImageTextEncoder {
    pub fn load(
        tokenizer: &Path,
        text_encoder: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let tokenizer = qwen2_tokenizer(tokenizer)?;
        let layers = Qwen3Config::load(text_encoder)?.num_hidden_layers;
        let encoder = Qwen3Encoder::load(text_encoder, layers, device, dtype)?;
        Ok(QwenImageTextEncoder { tokenizer, encoder })
    }

    /// [`QwenImageTextEncoder::load`] on `ROOT/tokenizer` and `ROOT/text_encoder`.
    pub fn load_pipeline(root: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load(
            &root.join("tokenizer"),
            &root.join("text_encoder"),
            device,
            dtype,
        )
    }

    pub fn tokenizer(&self) -> &WanTokenizer {
        &self.tokenizer
    }

    /// The hidden width of the embeddings (the transformer's `joint_attention_dim`).
    pub fn hidden_size(&self) -> usize {
        self.encoder.config.hidden_size
    }

    /// The prompt through template, tokenizer and encoder; `max_len` rows at most (1..=1024).
    pub fn encode(&self, prompt: &str, max_len: usize) -> Result<QwenImagePromptEncoding> {
        let text = qwenimage_prompt(prompt);
        let mut tokens = self.tokenizer.encode_unpadded(&text, false)?;
        let cap = QWENIMAGE_MAX_LEN + QWENIMAGE_DROP;
        if tokens.ids.len() > cap {
            tokens.ids.truncate(cap);
            tokens.attention_mask.truncate(cap);
            tokens.tokens.truncate(cap);
            tokens.seq_len = cap;
        }
        let vocab = self.encoder.config.vocab_size;
        tokens.check_vocab(vocab, self.tokenizer.file(), "Qwen2.5-VL text encoder")?;
        let t = tokens.ids.len();
        let n = self.encoder.config.num_hidden_layers;
        let mut hidden_states =
            self.encoder
                .hidden_states(&tokens.ids, &tokens.attention_mask, n)?;
        let last = hidden_states
            .pop()
            .ok_or_else(|| Error::msg("Qwen2.5-VL text encoder: no hidden state"))?;
        hidden_states.push(self.encoder.final_norm(&last)?);
        if t <= QWENIMAGE_DROP {
            return Err(Error::msg(format!(
                "Qwen-Image text encoder: the templated prompt has {t} tokens, not more than the {QWENIMAGE_DROP} the pipeline drops (is this Qwen2.5-VL's tokenizer?)"
            )));
        }
        let keep = (t - QWENIMAGE_DROP).min(max_len);
        let prompt_embeds = hidden_states[n].narrow(1, QWENIMAGE_DROP, keep)?;
        Ok(QwenImagePromptEncoding {
            text,
            tokens,
            hidden_states,
            prompt_embeds,
        })
    }
}
