//! The text side of a Z-Image run, as diffusers' `ZImagePipeline` encodes a prompt: the Qwen3 chat
//! template for one user message with thinking on (no think block), the Qwen2 byte-level BPE padded
//! and truncated on the right to `max_sequence_length`, the Qwen3 decoder with the padding mask, and
//! `hidden_states[-2]` (the output of decoder layer `N-1`) of the real tokens only: `[1, n, hidden]`
//! with `n` the number of mask ones. The last decoder layer and the final norm never matter, so they
//! are never loaded.

use crate::chat::{chat_prompt, check_chat_template, Thinking};
use crate::qwen3::{Qwen3Config, Qwen3Encoder, QWEN_TOKENIZERS};
use crate::tokenizer::{TokenizedPrompt, WanTokenizer};
use candle_core::{DType, Device, Tensor};
use magcache_core::{Error, Result};
use std::path::Path;

/// Everything one prompt went through (for tests and traces).
pub struct ZImagePromptEncoding {
    /// The chat-template rendering the tokenizer saw.
    pub text: String,
    /// Ids and mask, `max_sequence_length` of them.
    pub tokens: TokenizedPrompt,
    /// `hidden_states[0..N-1]` `[1, L, hidden]` (the embedding output, then each loaded layer's).
    pub hidden_states: Vec<Tensor>,
    /// `[1, n, hidden]`: what the transformer receives (the real tokens' rows of `hidden_states[-2]`).
    pub prompt_embeds: Tensor,
}

/// The tokenizer and the Qwen3 encoder (its first `N-1` layers) of a Z-Image pipeline folder.
pub struct ZImageTextEncoder {
    tokenizer: WanTokenizer,
    encoder: Qwen3Encoder,
    /// The hidden state the pipeline takes: `N-1` (`hidden_states[-2]`).
    layer: usize,
    template: String,
}

/// The decoder layers a Z-Image run loads of a Qwen3 text encoder of `config`: all but the last.
pub fn zimage_text_layers(config: &Qwen3Config) -> usize {
    config.num_hidden_layers.saturating_sub(1)
}

impl ZImageTextEncoder {
    /// Loads `tokenizer` (`tokenizer.json`, the chat template checked) and `text_encoder`.
    pub fn load(
        tokenizer: &Path,
        text_encoder: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let template = check_chat_template(tokenizer, Thinking::On)?;
        let tokenizer = WanTokenizer::load_as(
            tokenizer,
            QWEN_TOKENIZERS,
            "a Qwen (byte-level BPE)",
            "<|endoftext|>",
        )?;
        let config = Qwen3Config::load(text_encoder)?;
        let layer = zimage_text_layers(&config);
        let encoder = Qwen3Encoder::load(text_encoder, layer, device, dtype)?;
        Ok(ZImageTextEncoder {
            tokenizer,
            encoder,
            layer,
            template,
        })
    }

    /// [`ZImageTextEncoder::load`] on `ROOT/tokenizer` and `ROOT/text_encoder`.
    pub fn load_pipeline(root: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load(
            &root.join("tokenizer"),
            &root.join("text_encoder"),
            device,
            dtype,
        )
    }

    /// The file the chat template was read from (checked when the encoder loaded).
    pub fn template_source(&self) -> &str {
        &self.template
    }

    pub fn tokenizer(&self) -> &WanTokenizer {
        &self.tokenizer
    }

    /// The hidden width of the embeddings (the transformer's `cap_feat_dim`).
    pub fn hidden_size(&self) -> usize {
        self.encoder.config.hidden_size
    }

    /// The prompt through template, tokenizer and encoder.
    pub fn encode(&self, prompt: &str, max_len: usize) -> Result<ZImagePromptEncoding> {
        let text = chat_prompt(prompt, Thinking::On);
        let tokens = self.tokenizer.encode(&text, max_len)?;
        let hidden_states =
            self.encoder
                .hidden_states(&tokens.ids, &tokens.attention_mask, self.layer)?;
        let last = hidden_states.get(self.layer).ok_or_else(|| {
            Error::msg(format!(
                "Qwen3 text encoder: no hidden state {}",
                self.layer
            ))
        })?;
        // Padding is on the right: the real rows are the first `seq_len`, whatever the padding.
        let real: Vec<u32> = tokens
            .attention_mask
            .iter()
            .enumerate()
            .filter(|(_, &m)| m != 0)
            .map(|(i, _)| i as u32)
            .collect();
        if real.is_empty() {
            return Err(Error::msg(
                "Z-Image text encoder: the prompt has no token after truncation",
            ));
        }
        let idx = Tensor::from_vec(real.clone(), real.len(), last.device())?;
        let prompt_embeds = last.index_select(&idx, 1)?;
        Ok(ZImagePromptEncoding {
            text,
            tokens,
            hidden_states,
            prompt_embeds,
        })
    }
}
