//! The prompt side FLUX.2 \[klein\] and Z-Image share: a Qwen tokenizer whose chat template the
//! pipeline renders for one user message, and the Qwen3 decoder read out the pipeline's way.
//!
//! - FLUX.2 \[klein\] ([`FLUX2_CHAT`]): thinking off (the empty think block), the hidden states after
//!   decoder layers 9, 18 and 27 concatenated per token, every row: `[1, L, 3 * hidden]`.
//! - Z-Image ([`ZIMAGE_CHAT`]): thinking on (no think block), `hidden_states[-2]` (the output of
//!   decoder layer `N-1`) of the real tokens only: `[1, n, hidden]`; the last layer is never loaded.

use crate::chat::{chat_prompt, check_chat_template, Thinking};
use crate::qwen3::{Qwen3Config, Qwen3Encoder, QWEN_TOKENIZERS};
use crate::tokenizer::{TokenizedPrompt, WanTokenizer};
use candle_core::{DType, Device, Tensor, D};
use magcache_core::{Error, Result};
use std::path::Path;

/// Which hidden states a pipeline takes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Readout {
    /// These decoder layers' outputs concatenated per token, every row (padding included).
    Stacked(&'static [usize]),
    /// `hidden_states[-2]` (decoder layer `N-1`'s output), the rows whose mask is 1.
    SecondToLast,
}

/// How a pipeline renders and reads a prompt.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChatStyle {
    pub thinking: Thinking,
    pub readout: Readout,
}

/// The decoder layers whose outputs `Flux2KleinPipeline` stacks (its `text_encoder_out_layers`
/// default; no config carries it).
pub const FLUX2_TEXT_LAYERS: [usize; 3] = [9, 18, 27];

/// `Flux2KleinPipeline`'s prompt.
pub const FLUX2_CHAT: ChatStyle = ChatStyle {
    thinking: Thinking::Off,
    readout: Readout::Stacked(&FLUX2_TEXT_LAYERS),
};

/// `ZImagePipeline`'s prompt.
pub const ZIMAGE_CHAT: ChatStyle = ChatStyle {
    thinking: Thinking::On,
    readout: Readout::SecondToLast,
};

impl ChatStyle {
    /// The decoder layers to load of an encoder of `config` (an error naming its config file when
    /// it has fewer than the pipeline reads).
    pub fn layers(&self, config: &Qwen3Config, file: &str) -> Result<usize> {
        match self.readout {
            Readout::Stacked(layers) => {
                let last = layers.iter().copied().max().unwrap_or(0);
                if last > config.num_hidden_layers {
                    return Err(Error::config(
                        file,
                        "num_hidden_layers",
                        format!(
                            "{} layers, but the pipeline reads the output of layer {last}",
                            config.num_hidden_layers
                        ),
                    ));
                }
                Ok(last)
            }
            Readout::SecondToLast => Ok(config.num_hidden_layers.saturating_sub(1)),
        }
    }
}

/// Everything one prompt went through (for tests and traces).
pub struct QwenChatEncoding {
    /// The chat-template rendering the tokenizer saw.
    pub text: String,
    /// Ids and mask, `max_sequence_length` of them.
    pub tokens: TokenizedPrompt,
    /// `hidden_states[0..=layers]` `[1, L, hidden]`: the embedding output, then each loaded layer's.
    pub hidden_states: Vec<Tensor>,
    /// What the transformer receives.
    pub prompt_embeds: Tensor,
}

/// A pipeline folder's Qwen tokenizer and Qwen3 encoder, read out in one [`ChatStyle`].
pub struct QwenChatEncoder {
    tokenizer: WanTokenizer,
    encoder: Qwen3Encoder,
    style: ChatStyle,
    layers: usize,
    /// Where the checked chat template came from.
    template: String,
}

impl QwenChatEncoder {
    /// Loads `tokenizer` (`tokenizer.json`, the chat template checked for `style`) and the layers of
    /// `text_encoder` that `style` reads.
    pub fn load(
        tokenizer: &Path,
        text_encoder: &Path,
        style: ChatStyle,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let template = check_chat_template(tokenizer, style.thinking)?;
        let tokenizer = WanTokenizer::load_as(
            tokenizer,
            QWEN_TOKENIZERS,
            "a Qwen (byte-level BPE)",
            "<|endoftext|>",
        )?;
        let config = Qwen3Config::load(text_encoder)?;
        let file = text_encoder.join("config.json").display().to_string();
        let layers = style.layers(&config, &file)?;
        let encoder = Qwen3Encoder::load(text_encoder, layers, device, dtype)?;
        Ok(QwenChatEncoder {
            tokenizer,
            encoder,
            style,
            layers,
            template,
        })
    }

    /// [`QwenChatEncoder::load`] on `ROOT/tokenizer` and `ROOT/text_encoder`.
    pub fn load_pipeline(
        root: &Path,
        style: ChatStyle,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::load(
            &root.join("tokenizer"),
            &root.join("text_encoder"),
            style,
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

    pub fn encoder(&self) -> &Qwen3Encoder {
        &self.encoder
    }

    /// The prompt through template, tokenizer and encoder, read out in the encoder's style.
    pub fn encode(&self, prompt: &str, max_len: usize) -> Result<QwenChatEncoding> {
        let text = chat_prompt(prompt, self.style.thinking);
        let tokens = self.tokenizer.encode(&text, max_len)?;
        let vocab = self.encoder.config.vocab_size;
        tokens.check_vocab(vocab, self.tokenizer.file(), "Qwen3 text encoder")?;
        let hidden_states =
            self.encoder
                .hidden_states(&tokens.ids, &tokens.attention_mask, self.layers)?;
        let state = |i: usize| {
            hidden_states
                .get(i)
                .cloned()
                .ok_or_else(|| Error::msg(format!("Qwen3 text encoder: no hidden state {i}")))
        };
        let prompt_embeds = match self.style.readout {
            Readout::Stacked(layers) => Tensor::cat(
                &layers
                    .iter()
                    .map(|&i| state(i))
                    .collect::<Result<Vec<_>>>()?,
                D::Minus1,
            )?,
            Readout::SecondToLast => {
                // Padding is on the right: the real rows are the mask's ones.
                let real: Vec<u32> = (0..tokens.attention_mask.len() as u32)
                    .filter(|&i| tokens.attention_mask[i as usize] != 0)
                    .collect();
                if real.is_empty() {
                    return Err(Error::msg(
                        "Qwen3 text encoder: the prompt has no token after truncation",
                    ));
                }
                let last = state(self.layers)?;
                let idx = Tensor::from_vec(real.clone(), real.len(), last.device())?;
                last.index_select(&idx, 1)?
            }
        };
        Ok(QwenChatEncoding {
            text,
            tokens,
            hidden_states,
            prompt_embeds,
        })
    }
}
