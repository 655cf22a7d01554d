//! The Wan tokenizer (`T5TokenizerFast` over the pipeline folder's `tokenizer/tokenizer.json`) as
//! `WanPipeline._get_t5_prompt_embeds` calls it: `padding="max_length", max_length=L,
//! truncation=True, add_special_tokens=True`. Normalisation, pre-tokenisation, the Unigram model
//! and the post-processor (`</s>`) all come from the `tokenizers` crate reading `tokenizer.json`.

use magcache_core::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::{PaddingDirection, PostProcessor, Tokenizer, TruncationDirection};

/// One prompt through the tokenizer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Token ids, `max_len` of them when padded.
    pub ids: Vec<u32>,
    /// 1 for real tokens (the pieces and `</s>`), 0 for padding.
    pub attention_mask: Vec<u32>,
    /// The token strings (`▁A`, `</s>`, `<pad>`, ...).
    pub tokens: Vec<String>,
    /// Number of mask ones (what the pipeline calls `seq_lens`).
    pub seq_len: usize,
}

impl TokenizedPrompt {
    /// Refuses a token id past the text encoder's vocabulary (`vocab` rows, `encoder` as messages
    /// name it), naming the tokenizer's file (`tokenizer`): the tokenizer gave an id the encoder
    /// has no embedding for, so the two do not belong together.
    pub fn check_vocab(&self, vocab: usize, tokenizer: &str, encoder: &str) -> Result<()> {
        match self.ids.iter().position(|&i| i as usize >= vocab) {
            None => Ok(()),
            Some(at) => Err(Error::config(
                tokenizer,
                "(vocabulary)",
                format!(
                    "gave token id {} (`{}`), past the {encoder}'s vocabulary of {vocab} (its config.json vocab_size): the tokenizer and the text encoder do not belong together",
                    self.ids[at],
                    self.tokens.get(at).map(String::as_str).unwrap_or("?")
                ),
            )),
        }
    }
}

/// `tokenizer_class` values of a T5 tokenizer (Wan's `tokenizer/`, FLUX's `tokenizer_2/`).
pub const T5_TOKENIZERS: &[&str] = &[
    "T5Tokenizer",
    "T5TokenizerFast",
    "TokenizersBackend",
    "PreTrainedTokenizerFast",
];

/// Reads `DIR/tokenizer_config.json`: the JSON and its shown path, `None` when absent. Present in
/// any form (a FIFO, a folder, a dangling link) it is read through the regular-file check, which
/// refuses what is not a file, rather than passed over; it must be a JSON object.
pub(crate) fn read_tokenizer_config(dir: &Path) -> Result<Option<(serde_json::Value, String)>> {
    let cfg = dir.join("tokenizer_config.json");
    if cfg.symlink_metadata().is_err() {
        return Ok(None);
    }
    let shown = cfg.display().to_string();
    let text = magcache_core::error::read_text(&cfg)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(&shown, "(document)", format!("invalid JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::config(&shown, "(document)", "is not a JSON object"));
    }
    Ok(Some((v, shown)))
}

/// Refuses a `tokenizer_config.json` whose `tokenizer_class` is not one of `allowed` (a tokenizer of
/// another model: its ids would mean nothing to the encoder); an absent class is accepted.
pub fn check_tokenizer_class(
    config: &serde_json::Value,
    file: &str,
    allowed: &[&str],
    what: &str,
) -> Result<()> {
    match config.get("tokenizer_class") {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::String(c)) if allowed.contains(&c.as_str()) => Ok(()),
        Some(c) => Err(Error::config(
            file,
            "tokenizer_class",
            format!(
                "{c} is not {what} tokenizer, which this encoder needs (expected one of {})",
                allowed.join(", ")
            ),
        )),
    }
}

/// `tokenizer.json` of a pipeline's `tokenizer/` folder.
pub struct WanTokenizer {
    tokenizer: Tokenizer,
    file: String,
    pad_id: u32,
    pad_token: String,
    /// Special tokens the post-processor adds to one sequence (`</s>`: 1).
    added: usize,
}

impl WanTokenizer {
    /// Loads `DIR/tokenizer.json` (or the file itself when `path` is a file). The pad token is
    /// `pad_token` of `DIR/tokenizer_config.json` when that file exists, else `<pad>`.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_as(path, T5_TOKENIZERS, "a T5 (SentencePiece Unigram)", "<pad>")
    }

    /// [`WanTokenizer::load`] for a tokenizer whose `tokenizer_class` is one of `allowed` (`what`
    /// names the kind in the error), padding with `pad_token` unless `tokenizer_config.json` names
    /// one.
    pub fn load_as(path: &Path, allowed: &[&str], what: &str, default_pad: &str) -> Result<Self> {
        let (file, dir): (PathBuf, Option<&Path>) = if path.is_file() {
            (path.to_path_buf(), path.parent())
        } else {
            (path.join("tokenizer.json"), Some(path))
        };
        let shown = file.display().to_string();
        if let Some(why) = magcache_core::error::not_a_file(&file) {
            return Err(Error::io(&shown, format!("tokenizer file {why}")));
        }
        magcache_core::files::record_read(&file);
        // The pipeline's own truncation/padding are applied per call (`encode`).
        let tokenizer = Tokenizer::from_file(&file)
            .map_err(|e| Error::config(&shown, "(tokenizer)", format!("cannot load: {e}")))?;

        let mut pad_token = default_pad.to_string();
        if let Some((v, cshown)) = dir.map(read_tokenizer_config).transpose()?.flatten() {
            check_tokenizer_class(&v, &cshown, allowed, what)?;
            match v.get("pad_token") {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::String(s)) => pad_token = s.clone(),
                // Older configs store an AddedToken object.
                Some(o) => match o.get("content").and_then(|c| c.as_str()) {
                    Some(s) => pad_token = s.to_string(),
                    None => {
                        return Err(Error::config(
                            &cshown,
                            "pad_token",
                            "expected a string or an object with `content`",
                        ))
                    }
                },
            }
        }
        Self::from_tokenizer(tokenizer, &shown, &pad_token)
    }

    /// Wraps an assembled tokenizer (e.g. the CLIP one built from `vocab.json` + `merges.txt`):
    /// `encode` pads with `pad_token` and truncates as for `tokenizer.json`. `file` names the
    /// tokenizer in messages. The tokenizer's own truncation and padding are switched off.
    pub fn from_tokenizer(mut tokenizer: Tokenizer, file: &str, pad_token: &str) -> Result<Self> {
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::config(file, "truncation", e.to_string()))?;
        tokenizer.with_padding(None);
        let pad_id = tokenizer.token_to_id(pad_token).ok_or_else(|| {
            Error::config(
                file,
                "added_tokens",
                format!("the pad token `{pad_token}` is not in the vocabulary"),
            )
        })?;
        let added = tokenizer
            .get_post_processor()
            .map(|p| p.added_tokens(false))
            .unwrap_or(0);
        Ok(WanTokenizer {
            tokenizer,
            file: file.to_string(),
            pad_id,
            pad_token: pad_token.to_string(),
            added,
        })
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Special tokens the post-processor adds to one sequence.
    pub fn added_tokens(&self) -> usize {
        self.added
    }

    /// The file it was loaded from (for messages).
    pub fn file(&self) -> &str {
        &self.file
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The raw tokenizer call, no padding or truncation: `tokenizer(text, add_special_tokens=...)`.
    pub fn encode_unpadded(&self, text: &str, add_special_tokens: bool) -> Result<TokenizedPrompt> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(e))?;
        Ok(self.to_prompt(&enc))
    }

    /// The pipeline's call: special tokens added, truncated to `max_len` tokens (the pieces cut to
    /// `max_len` minus the special tokens, so a truncated row still ends in `</s>`), right-padded
    /// with the pad id (mask 0) to exactly `max_len`.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<TokenizedPrompt> {
        if max_len == 0 || max_len < self.added {
            return Err(Error::config(
                &self.file,
                "max_sequence_length",
                format!(
                    "must be at least 1 and hold the {} special token(s) the tokenizer adds; got {max_len}",
                    self.added
                ),
            ));
        }
        // What `Tokenizer::encode` does with truncation and padding configured, without mutating
        // the tokenizer: pieces, truncation (leaving room for the special tokens), post-processing,
        // padding.
        let mut enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| self.err(e))?;
        enc.truncate(max_len - self.added, 0, TruncationDirection::Right);
        let mut enc = self
            .tokenizer
            .post_process(enc, None, true)
            .map_err(|e| self.err(e))?;
        enc.pad(
            max_len,
            self.pad_id,
            0,
            &self.pad_token,
            PaddingDirection::Right,
        );
        let out = self.to_prompt(&enc);
        if out.ids.len() != max_len {
            return Err(Error::msg(format!(
                "{}: tokenizer produced {} tokens for max_sequence_length {max_len}",
                self.file,
                out.ids.len()
            )));
        }
        Ok(out)
    }

    fn err(&self, e: tokenizers::Error) -> Error {
        Error::msg(format!("{}: tokenizing failed: {e}", self.file))
    }

    /// Tokens as transformers' `convert_ids_to_tokens` names them: the vocabulary entry of each id
    /// (`<unk>` for unknown characters, where the encoding keeps the original text).
    fn to_prompt(&self, enc: &tokenizers::Encoding) -> TokenizedPrompt {
        let attention_mask = enc.get_attention_mask().to_vec();
        let tokens = enc
            .get_ids()
            .iter()
            .zip(enc.get_tokens())
            .map(|(&id, t)| self.tokenizer.id_to_token(id).unwrap_or_else(|| t.clone()))
            .collect();
        TokenizedPrompt {
            ids: enc.get_ids().to_vec(),
            seq_len: attention_mask.iter().filter(|&&m| m != 0).count(),
            attention_mask,
            tokens,
        }
    }
}

#[cfg(test)]
mod vocab_tests {
    use super::TokenizedPrompt;

    #[test]
    fn an_id_past_the_encoders_vocabulary_names_the_tokenizer() {
        let t = TokenizedPrompt {
            ids: vec![5, 393, 1],
            attention_mask: vec![1, 1, 1],
            tokens: vec!["▁a".into(), "fox".into(), "</s>".into()],
            seq_len: 3,
        };
        assert!(t.check_vocab(394, "tok.json", "UMT5 text encoder").is_ok());
        let e = t
            .check_vocab(393, "tok.json", "UMT5 text encoder")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with("tok.json") && e.contains("393 (`fox`)") && e.contains("vocab_size"),
            "{e}"
        );
    }
}
