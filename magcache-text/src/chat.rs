//! The chat templates of Qwen text encoders (FLUX.2 \[klein\], Z-Image): which template a tokenizer
//! folder carries, checked to be one this runner renders without running Jinja, and its rendering of
//! the pipelines' one call (one user message, the generation prompt, thinking on or off).

use magcache_core::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Qwen3's `enable_thinking` as the pipeline passes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thinking {
    /// `enable_thinking=False` (FLUX.2 \[klein\]): the template writes an empty think block.
    Off,
    /// `enable_thinking=True` (Z-Image): no think block.
    On,
}

/// The chat template's rendering of one user message with the generation prompt (Qwen3's
/// template): `<|im_start|>user\n{P}<|im_end|>\n<|im_start|>assistant\n`, then the empty think
/// block when thinking is off.
pub fn chat_prompt(prompt: &str, thinking: Thinking) -> String {
    let think = match thinking {
        Thinking::Off => "<think>\n\n</think>\n\n",
        Thinking::On => "",
    };
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{think}")
}

/// The tokenizer folder's chat template (`chat_template.jinja`, which transformers prefers, else
/// `tokenizer_config.json`'s `chat_template`), checked to be one this runner renders: ChatML
/// (`<|im_start|>ROLE\n...<|im_end|>\n`) with a generation prompt and Qwen3's `enable_thinking`
/// switch writing the empty think block, as Qwen3's own template and FLUX.2 \[klein\]'s folders do
/// (with thinking on, a plain ChatML template renders the same and is taken too).
/// The runner renders it for the pipeline's one call (one user message, generation prompt,
/// thinking as `thinking`: [`chat_prompt`]) rather than running Jinja, so any other template (another
/// chat format, no thinking switch, none at all) is refused naming the file: it would render
/// differently. Returns where the template came from, for the run's description.
pub fn check_chat_template(tokenizer: &Path, thinking: Thinking) -> Result<String> {
    let jinja = tokenizer.join("chat_template.jinja");
    let config = tokenizer.join("tokenizer_config.json");
    let (template, from) = if jinja.exists() || jinja.is_symlink() {
        (
            magcache_core::error::read_text(&jinja)?,
            jinja.display().to_string(),
        )
    } else {
        let shown = config.display().to_string();
        let v: Value = serde_json::from_str(&magcache_core::error::read_text(&config)?)
            .map_err(|e| Error::config(&shown, "(document)", format!("invalid JSON: {e}")))?;
        let t = match v.get("chat_template") {
            Some(Value::String(t)) => t.clone(),
            // A list of named templates: the `default` one is what the pipeline's call uses.
            Some(Value::Array(list)) => list
                .iter()
                .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|e| e.get("template").and_then(Value::as_str))
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::config(&shown, "chat_template", "no template named `default`")
                })?,
            _ => {
                return Err(Error::config(
                    &shown,
                    "chat_template",
                    format!(
                        "no chat template here nor in {}: the pipeline renders the prompt with it",
                        jinja.display()
                    ),
                ))
            }
        };
        (t, format!("{shown} (chat_template)"))
    };
    let squashed: String = template.chars().filter(|c| !c.is_whitespace()).collect();
    let needs: [(&str, &str); 5] = [
        (
            "'<|im_start|>'+message.role",
            "ChatML turns (`'<|im_start|>' + message.role`)",
        ),
        ("<|im_end|>", "ChatML turns (`<|im_end|>`)"),
        ("add_generation_prompt", "a generation prompt"),
        ("<|im_start|>assistant\\n", "the assistant turn it opens"),
        ("enable_thinking", "Qwen3's `enable_thinking` switch"),
    ];
    let think = squashed.contains("<think>\\n\\n</think>\\n\\n");
    let mut needs = needs.to_vec();
    if thinking == Thinking::On && !think {
        // Thinking on renders no think block: a plain ChatML template renders the same.
        needs.retain(|(n, _)| *n != "enable_thinking");
    }
    if let Some((_, what)) = needs.iter().find(|(n, _)| {
        let n: String = n.chars().filter(|c| !c.is_whitespace()).collect();
        !squashed.contains(&n) && !squashed.contains(&n.replace("message.role", "message['role']"))
    }) {
        return Err(Error::config(
            &from,
            "chat_template",
            format!("has no {what}: not a template this runner renders (ChatML with Qwen3's enable_thinking switch, as FLUX.2 [klein] and Z-Image ship)"),
        ));
    }
    if thinking == Thinking::Off && !think {
        return Err(Error::config(
            &from,
            "chat_template",
            "writes no empty think block (`<think>\\n\\n</think>\\n\\n`) when thinking is off: not a template this runner renders (Qwen3's)",
        ));
    }
    Ok(from)
}
