//! The text side of prompted runs. FLUX.1 (CLIP + T5): see [`flux`]. Wan, as diffusers'
//! `WanPipeline.encode_prompt` does it: prompt cleaning ([`prompt_clean`]), the tokenizer
//! ([`WanTokenizer`], padded and truncated to `max_sequence_length`), the UMT5 encoder
//! ([`Umt5Encoder`]), and the embeddings the transformer receives: `last_hidden_state[:seq_len]`
//! followed by exact zero rows up to `max_sequence_length`.
//!
//! ```no_run
//! # fn main() -> magcache_core::Result<()> {
//! use magcache_text::WanTextEncoder;
//! let root = std::path::Path::new("Wan2.1-T2V-1.3B-Diffusers");
//! let enc = WanTextEncoder::load(
//!     &root.join("tokenizer"),
//!     &root.join("text_encoder"),
//!     &candle_core::Device::Cpu,
//!     candle_core::DType::F32,
//! )?;
//! let (cond, _) = enc.encode("A red fox in the snow.", 512)?;
//! let (uncond, _) = enc.encode("", 512)?;
//! drop(enc); // frees the encoder (UMT5-XXL: 5.7B parameters) before the transformer loads
//! # Ok(()) }
//! ```

pub mod chat;
pub mod clean;
pub mod clip;
pub mod flux;
pub mod ftfy;
pub mod qwen3;
pub mod qwen_chat;
pub mod qwenimage;
pub mod tokenizer;
pub mod umt5;

pub use clean::{html_unescape, prompt_clean, prompt_clean_ftfy};
pub use clip::{ClipTextEncoder, ClipTextModelConfig, ClipTokenizer};
pub use flux::{FluxPromptEncoding, FluxTextEncoders};
pub use qwen3::{Qwen3Config, Qwen3Encoder};
pub use qwen_chat::{QwenChatEncoder, QwenChatEncoding, FLUX2_CHAT, ZIMAGE_CHAT};
pub use tokenizer::{TokenizedPrompt, WanTokenizer};
pub use umt5::{Umt5Config, Umt5Encoder};

use candle_core::{DType, Device, Tensor};
use magcache_core::{Error, Result};
use std::path::Path;

/// Everything one prompt went through (for tests and traces).
pub struct WanPromptEncoding {
    /// The prompt after [`WanTextEncoder::clean`].
    pub cleaned: String,
    /// Tokenizer output, padded to `max_len`.
    pub tokens: TokenizedPrompt,
    /// `[1, L, D]`: the encoder output, all `L` rows.
    pub last_hidden_state: Tensor,
    /// `[1, L, D]`: what the transformer gets (rows >= `seq_len` exactly 0).
    pub prompt_embeds: Tensor,
}

/// Tokenizer + UMT5 encoder of a Wan pipeline folder (`tokenizer/`, `text_encoder/`).
pub struct WanTextEncoder {
    tokenizer: WanTokenizer,
    encoder: Option<Umt5Encoder>,
    /// Run [`ftfy::fix_text`] before [`prompt_clean`] (`WanImageToVideoPipeline` does, always).
    ftfy: bool,
}

impl WanTextEncoder {
    /// Loads `dir_tokenizer/tokenizer.json` and `dir_text_encoder/{config.json, weights}` (a single
    /// `model.safetensors`, or shards with `model.safetensors.index.json`). Linear weights and the
    /// embedding are kept in `dtype` on `device`; activations are f32.
    pub fn load(
        dir_tokenizer: &Path,
        dir_text_encoder: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let tokenizer = WanTokenizer::load(dir_tokenizer)?;
        let encoder = Umt5Encoder::load(dir_text_encoder, device, dtype)?;
        Ok(Self::from_parts(tokenizer, encoder))
    }

    /// [`WanTextEncoder::load`] on `ROOT/tokenizer` and `ROOT/text_encoder` of a pipeline folder.
    pub fn load_pipeline(root: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_pipeline_with(root, device, dtype, false)
    }

    /// [`WanTextEncoder::load_pipeline`], the encoder `streamed` or not ([`Umt5Encoder::load_with`]).
    pub fn load_pipeline_with(
        root: &Path,
        device: &Device,
        dtype: DType,
        streamed: bool,
    ) -> Result<Self> {
        let tokenizer = WanTokenizer::load(&root.join("tokenizer"))?;
        let encoder = Umt5Encoder::load_with(&root.join("text_encoder"), device, dtype, streamed)?;
        Ok(Self::from_parts(tokenizer, encoder))
    }

    pub fn from_parts(tokenizer: WanTokenizer, encoder: Umt5Encoder) -> Self {
        WanTextEncoder {
            tokenizer,
            encoder: Some(encoder),
            ftfy: false,
        }
    }

    /// Cleans prompts as `WanImageToVideoPipeline` does (`on`: [`ftfy::fix_text`], then
    /// [`prompt_clean`]) or as `WanPipeline` does without ftfy installed (the default).
    pub fn with_ftfy(mut self, on: bool) -> Self {
        self.ftfy = on;
        self
    }

    /// `prompt` as this encoder cleans it before the tokenizer.
    pub fn clean(&self, prompt: &str) -> Result<String> {
        match self.ftfy {
            true => clean::prompt_clean_ftfy(prompt),
            false => Ok(prompt_clean(prompt)),
        }
    }

    pub fn tokenizer(&self) -> &WanTokenizer {
        &self.tokenizer
    }

    /// The encoder, `None` after [`WanTextEncoder::release_encoder`].
    pub fn encoder(&self) -> Option<&Umt5Encoder> {
        self.encoder.as_ref()
    }

    /// `d_model` of the encoder (the transformer's `text_dim`), `None` once released.
    pub fn d_model(&self) -> Option<usize> {
        self.encoder.as_ref().map(|e| e.config.d_model)
    }

    /// Frees the encoder's weights (keeping the tokenizer), e.g. once both prompts are encoded and
    /// before the transformer loads. Later [`WanTextEncoder::encode`] calls fail with a clear error.
    pub fn release_encoder(&mut self) {
        self.encoder = None;
    }

    /// `(prompt_embeds [1, max_len, D] f32, seq_len)`: the cleaned prompt through the tokenizer and
    /// encoder; rows >= `seq_len` (the attention mask's ones) are exactly 0. An empty prompt gives
    /// `seq_len` 1 (`</s>` alone).
    pub fn encode(&self, prompt: &str, max_len: usize) -> Result<(Tensor, usize)> {
        let e = self.encode_detailed(prompt, max_len)?;
        Ok((e.prompt_embeds, e.tokens.seq_len))
    }

    /// [`WanTextEncoder::encode`] with its intermediates.
    pub fn encode_detailed(&self, prompt: &str, max_len: usize) -> Result<WanPromptEncoding> {
        let encoder = self.encoder.as_ref().ok_or_else(|| {
            Error::msg("text encoder: the UMT5 weights were released; load the encoder again to encode prompts")
        })?;
        let cleaned = self.clean(prompt)?;
        let tokens = self.tokenizer.encode(&cleaned, max_len)?;
        let vocab = encoder.config.vocab_size;
        tokens.check_vocab(vocab, self.tokenizer.file(), "UMT5 text encoder")?;
        let dev = encoder.device();
        let ids = Tensor::from_slice(&tokens.ids, (1, max_len), dev)?;
        let mask = Tensor::from_slice(&tokens.attention_mask, (1, max_len), dev)?;
        let last_hidden_state = encoder.forward(&ids, &mask)?;
        let prompt_embeds = zero_padding_rows(&last_hidden_state, tokens.seq_len)?;
        Ok(WanPromptEncoding {
            cleaned,
            tokens,
            last_hidden_state,
            prompt_embeds,
        })
    }
}

/// `[1, L, D]` -> rows `[0, seq_len)` kept, rows `[seq_len, L)` replaced by exact zeros (the
/// pipeline's `cat([u[:v], u.new_zeros(L - v, D)])`, not a multiplication by the mask).
pub fn zero_padding_rows(last_hidden_state: &Tensor, seq_len: usize) -> Result<Tensor> {
    let (b, l, d) = last_hidden_state.dims3()?;
    if seq_len >= l {
        return Ok(last_hidden_state.clone());
    }
    let zeros = Tensor::zeros(
        (b, l - seq_len, d),
        last_hidden_state.dtype(),
        last_hidden_state.device(),
    )?;
    if seq_len == 0 {
        return Ok(zeros);
    }
    Ok(Tensor::cat(
        &[&last_hidden_state.narrow(1, 0, seq_len)?, &zeros],
        1,
    )?)
}
