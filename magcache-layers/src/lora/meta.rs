//! An adapter's `lora_adapter_metadata` (diffusers/PEFT): every value checked for its type.

use magcache_core::{Error, Result};
use std::collections::BTreeMap;

/// diffusers' `lora_adapter_metadata` (the `transformer.` entries).
#[derive(Default)]
pub(super) struct PeftMeta {
    pub(super) alpha: Option<f64>,
    pub(super) alpha_pattern: BTreeMap<String, f64>,
    pub(super) rslora: bool,
}

/// diffusers' `lora_adapter_metadata` header entry (a JSON string), when there is one.
pub(super) fn peft_meta(
    file: &str,
    header: Option<&std::collections::HashMap<String, String>>,
) -> Result<PeftMeta> {
    let Some(text) = header.and_then(|h| h.get("lora_adapter_metadata")) else {
        return Ok(PeftMeta::default());
    };
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        Error::weights(
            file,
            "__metadata__.lora_adapter_metadata",
            format!("invalid JSON: {e}"),
        )
    })?;
    let key = |k: &str| format!("__metadata__.lora_adapter_metadata.{k}");
    // A value of the wrong type changes the merge silently if ignored: an error naming the key.
    let number = |k: &str, a: &serde_json::Value| -> Result<f64> {
        match a.as_f64() {
            Some(x) if x.is_finite() => Ok(x),
            _ => Err(Error::weights(
                file,
                key(k),
                format!("must be a finite number, got {a}"),
            )),
        }
    };
    let alpha_pattern = match v.get("transformer.alpha_pattern") {
        None | Some(serde_json::Value::Null) => Default::default(),
        Some(serde_json::Value::Object(o)) => o
            .iter()
            .map(|(k, a)| {
                Ok((
                    k.clone(),
                    number(&format!("transformer.alpha_pattern.{k}"), a)?,
                ))
            })
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(Error::weights(
                file,
                key("transformer.alpha_pattern"),
                format!("must be a table of module names to numbers, got {other}"),
            ))
        }
    };
    let alpha = match v.get("transformer.lora_alpha") {
        None | Some(serde_json::Value::Null) => None,
        Some(a) => Some(number("transformer.lora_alpha", a)?),
    };
    let rslora = match v.get("transformer.use_rslora") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(other) => {
            return Err(Error::weights(
                file,
                key("transformer.use_rslora"),
                format!("must be true or false, got {other}"),
            ))
        }
    };
    Ok(PeftMeta {
        alpha,
        alpha_pattern,
        rslora,
    })
}
