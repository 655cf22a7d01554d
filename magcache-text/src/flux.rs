//! The text side of a FLUX.1 run, as diffusers' `FluxPipeline.encode_prompt` does it:
//!
//! - `pooled_prompt_embeds [1, D_clip]`: `prompt` through the CLIP tokenizer (`tokenizer/`, padded
//!   and truncated to its `model_max_length`, 77) and `CLIPTextModel` (`text_encoder/`), its
//!   `pooler_output` (see [`super::clip`]);
//! - `prompt_embeds [1, L, D_t5]`: `prompt_2` (= `prompt` unless given) through the T5 tokenizer
//!   (`tokenizer_2/tokenizer.json`, padded and truncated to `max_sequence_length` = L) and the T5 v1.1
//!   encoder (`text_encoder_2/`, [`Umt5Encoder`] with `model_type: "t5"`). **No attention mask**
//!   reaches the encoder: padding positions are attended and encoded, and all L rows are kept.
//!
//! CLIP runs on candle-transformers' `clip::text_model` (see [`super::clip`]). T5 does not use
//! candle-transformers' `t5` although it would read these tensors: the project already has a T5/UMT5
//! encoder checked against transformers (Wan's), which keeps activations in f32 with bf16/f16
//! weights, takes `shared.weight` or `encoder.embed_tokens.weight`, and loads through
//! [`magcache_layers::weights::WeightStore`] (shards, errors naming file and tensor, finiteness checks); one
//! T5 implementation for both families.
//!
//! ```no_run
//! # fn main() -> magcache_core::Result<()> {
//! use magcache_text::FluxTextEncoders;
//! let root = std::path::Path::new("FLUX.1-dev");
//! let enc = FluxTextEncoders::load_pipeline(root, &candle_core::Device::Cpu, candle_core::DType::BF16)?;
//! let (prompt_embeds, pooled) = enc.encode("A red fox in the snow.", 512)?;
//! drop(enc); // frees CLIP and T5-XXL (4.7B parameters) before the transformer loads
//! # Ok(()) }
//! ```

use super::clip::{ClipTextEncoder, ClipTokenizer};
use super::tokenizer::{TokenizedPrompt, WanTokenizer};
use super::umt5::Umt5Encoder;
use candle_core::{DType, Device, Tensor};
use magcache_core::{Error, Result};
use std::path::Path;

/// `FluxPipeline` refuses a larger `max_sequence_length`.
pub const FLUX_MAX_SEQUENCE_LENGTH: usize = 512;

/// Everything one prompt went through (for tests and traces).
pub struct FluxPromptEncoding {
    /// CLIP ids, padded to `model_max_length`.
    pub clip_tokens: TokenizedPrompt,
    /// T5 ids, padded to `max_sequence_length` (the mask is recorded, not used).
    pub t5_tokens: TokenizedPrompt,
    /// `[1, 77, D_clip]` after `final_layer_norm`.
    pub clip_last_hidden_state: Tensor,
    /// The position `pooler_output` was taken from.
    pub clip_pooled_position: usize,
    /// `[1, D_clip]`: CLIP's `pooler_output` (the transformer's `pooled_projections`).
    pub pooled_prompt_embeds: Tensor,
    /// `[1, L, D_t5]`: T5's `last_hidden_state`, all rows (the transformer's
    /// `encoder_hidden_states`).
    pub prompt_embeds: Tensor,
}

/// Both tokenizers and both text encoders of a FLUX.1 pipeline folder.
pub struct FluxTextEncoders {
    clip_tokenizer: ClipTokenizer,
    t5_tokenizer: WanTokenizer,
    clip: Option<ClipTextEncoder>,
    t5: Option<Umt5Encoder>,
}

/// The tokens of `prompt` that FLUX.1's two encoders cut, `(clip, clip's length, t5)`: past CLIP's
/// `model_max_length` (77 released) and past `max_sequence_length` for T5, counting each one's special
/// tokens as the pipeline's tokenizer calls do. `FluxPipeline` warns about both (quoting the cut
/// text); the tokenizers of pipeline folder `root` alone are read.
pub fn truncated_tokens(
    root: &Path,
    prompt: &str,
    max_sequence_length: usize,
) -> Result<(usize, usize, usize)> {
    let clip = ClipTokenizer::load(&root.join("tokenizer"))?;
    let t5 = WanTokenizer::load(&root.join("tokenizer_2"))?;
    let clip_len = clip.encode_unpadded(prompt)?.ids.len();
    let t5_len = t5.encode_unpadded(prompt, true)?.ids.len();
    Ok((
        clip_len.saturating_sub(clip.max_length()),
        clip.max_length(),
        t5_len.saturating_sub(max_sequence_length),
    ))
}

impl FluxTextEncoders {
    /// Loads the four folders: `tokenizer` (CLIP: `vocab.json` + `merges.txt` +
    /// `tokenizer_config.json`), `tokenizer_2` (T5: `tokenizer.json`), `text_encoder` (CLIP:
    /// `config.json` + weights) and `text_encoder_2` (T5: `config.json` + weights). Weights are a
    /// single `model.safetensors` or shards with `model.safetensors.index.json`. Both encoders keep
    /// their weights in `dtype` on `device`; outputs are f32.
    pub fn load(
        tokenizer: &Path,
        tokenizer_2: &Path,
        text_encoder: &Path,
        text_encoder_2: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::load_with(
            tokenizer,
            tokenizer_2,
            text_encoder,
            text_encoder_2,
            device,
            dtype,
            false,
        )
    }

    /// [`FluxTextEncoders::load`], the T5 encoder `streamed` or not ([`Umt5Encoder::load_with`]).
    pub fn load_with(
        tokenizer: &Path,
        tokenizer_2: &Path,
        text_encoder: &Path,
        text_encoder_2: &Path,
        device: &Device,
        dtype: DType,
        streamed: bool,
    ) -> Result<Self> {
        let clip_tokenizer = ClipTokenizer::load(tokenizer)?;
        let t5_tokenizer = WanTokenizer::load(tokenizer_2)?;
        let clip = ClipTextEncoder::load(text_encoder, device, dtype)?;
        if clip_tokenizer.max_length() > clip.config.max_position_embeddings {
            return Err(Error::config(
                tokenizer
                    .join("tokenizer_config.json")
                    .display()
                    .to_string(),
                "model_max_length",
                format!(
                    "{} exceeds the CLIP text encoder's max_position_embeddings {} ({})",
                    clip_tokenizer.max_length(),
                    clip.config.max_position_embeddings,
                    text_encoder.join("config.json").display()
                ),
            ));
        }
        let t5 = Umt5Encoder::load_with(text_encoder_2, device, dtype, streamed)?;
        Ok(FluxTextEncoders {
            clip_tokenizer,
            t5_tokenizer,
            clip: Some(clip),
            t5: Some(t5),
        })
    }

    /// [`FluxTextEncoders::load`] on `ROOT/{tokenizer, tokenizer_2, text_encoder, text_encoder_2}`
    /// of a diffusers FLUX.1 folder.
    pub fn load_pipeline(root: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_pipeline_with(root, device, dtype, false)
    }

    /// [`FluxTextEncoders::load_pipeline`], the T5 encoder `streamed` or not
    /// ([`Umt5Encoder::load_with`]; CLIP is small and always held).
    pub fn load_pipeline_with(
        root: &Path,
        device: &Device,
        dtype: DType,
        streamed: bool,
    ) -> Result<Self> {
        Self::load_with(
            &root.join("tokenizer"),
            &root.join("tokenizer_2"),
            &root.join("text_encoder"),
            &root.join("text_encoder_2"),
            device,
            dtype,
            streamed,
        )
    }

    pub fn clip_tokenizer(&self) -> &ClipTokenizer {
        &self.clip_tokenizer
    }

    pub fn t5_tokenizer(&self) -> &WanTokenizer {
        &self.t5_tokenizer
    }

    /// The CLIP encoder, `None` after [`FluxTextEncoders::release_encoders`].
    pub fn clip(&self) -> Option<&ClipTextEncoder> {
        self.clip.as_ref()
    }

    /// The T5 encoder, `None` after [`FluxTextEncoders::release_encoders`].
    pub fn t5(&self) -> Option<&Umt5Encoder> {
        self.t5.as_ref()
    }

    /// CLIP's hidden size (the transformer's `pooled_projection_dim`), `None` once released.
    pub fn clip_hidden_size(&self) -> Option<usize> {
        self.clip.as_ref().map(|c| c.config.hidden_size)
    }

    /// T5's `d_model` (the transformer's `joint_attention_dim`), `None` once released.
    pub fn t5_d_model(&self) -> Option<usize> {
        self.t5.as_ref().map(|t| t.config.d_model)
    }

    /// Frees both encoders' weights (keeping the tokenizers), e.g. once the prompts are encoded and
    /// before the transformer loads. Later encode calls fail with a clear error.
    pub fn release_encoders(&mut self) {
        self.clip = None;
        self.t5 = None;
    }

    /// `(prompt_embeds [1, L, D_t5], pooled_prompt_embeds [1, D_clip])`, both f32, for
    /// `FluxPipeline(prompt=prompt, max_sequence_length=L)` (`prompt_2` = `prompt`).
    pub fn encode(&self, prompt: &str, max_sequence_length: usize) -> Result<(Tensor, Tensor)> {
        let e = self.encode_detailed(prompt, None, max_sequence_length)?;
        Ok((e.prompt_embeds, e.pooled_prompt_embeds))
    }

    /// [`FluxTextEncoders::encode`] with its intermediates; `prompt_2` (T5's prompt) defaults to
    /// `prompt` as in the pipeline.
    pub fn encode_detailed(
        &self,
        prompt: &str,
        prompt_2: Option<&str>,
        max_sequence_length: usize,
    ) -> Result<FluxPromptEncoding> {
        if max_sequence_length == 0 || max_sequence_length > FLUX_MAX_SEQUENCE_LENGTH {
            return Err(Error::msg(format!(
                "max_sequence_length must be between 1 and {FLUX_MAX_SEQUENCE_LENGTH} (as FluxPipeline requires), got {max_sequence_length}"
            )));
        }
        let released = || {
            Error::msg(
                "FLUX text encoders: the CLIP/T5 weights were released; load them again to encode prompts",
            )
        };
        let clip = self.clip.as_ref().ok_or_else(released)?;
        let t5 = self.t5.as_ref().ok_or_else(released)?;

        let clip_tokens = self.clip_tokenizer.encode(prompt)?;
        let vocab = clip.config.vocab_size;
        clip_tokens.check_vocab(vocab, self.clip_tokenizer.file(), "CLIP text encoder")?;
        let n = clip_tokens.ids.len();
        let ids = Tensor::from_slice(&clip_tokens.ids, (1, n), clip.device())?;
        let (clip_last_hidden_state, pooled_prompt_embeds) = clip.forward(&ids)?;
        let clip_pooled_position = clip.pooled_position(&clip_tokens.ids);

        let t5_tokens = self
            .t5_tokenizer
            .encode(prompt_2.unwrap_or(prompt), max_sequence_length)?;
        let vocab = t5.config.vocab_size;
        t5_tokens.check_vocab(vocab, self.t5_tokenizer.file(), "T5 text encoder")?;
        let ids = Tensor::from_slice(&t5_tokens.ids, (1, max_sequence_length), t5.device())?;
        let prompt_embeds = t5.forward_unmasked(&ids)?;
        Ok(FluxPromptEncoding {
            clip_tokens,
            t5_tokens,
            clip_last_hidden_state,
            clip_pooled_position,
            pooled_prompt_embeds,
            prompt_embeds,
        })
    }
}
