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
    if !v.is_object() {
        return Err(Error::weights(
            file,
            "__metadata__.lora_adapter_metadata",
            format!("must be a JSON object, got {v}"),
        ));
    }
    check_kind(file, &v)?;
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

/// Refuses what the merge cannot honour (DoRA) and a rank of the wrong type.
fn check_kind(file: &str, v: &serde_json::Value) -> Result<()> {
    let key = |k: &str| format!("__metadata__.lora_adapter_metadata.{k}");
    // DoRA adds a magnitude vector the merge of a low-rank pair does not apply.
    match v.get("transformer.use_dora") {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {}
        Some(serde_json::Value::Bool(true)) => {
            return Err(Error::weights(
                file,
                key("transformer.use_dora"),
                "a DoRA adapter: its magnitude vectors are not supported (merging only the low-rank pairs would change the model differently than the adapter does)",
            ))
        }
        Some(other) => {
            return Err(Error::weights(
                file,
                key("transformer.use_dora"),
                format!("must be true or false, got {other}"),
            ))
        }
    }
    // The rank itself comes from the tensors; a rank of the wrong type is still a broken file.
    if let Some(r) = v.get("transformer.r").filter(|r| !r.is_null()) {
        if r.as_u64().is_none_or(|r| r == 0) {
            return Err(Error::weights(
                file,
                key("transformer.r"),
                format!("must be a positive integer (the rank), got {r}"),
            ));
        }
    }
    Ok(())
}

impl PeftMeta {
    /// Refuses an `alpha_pattern` entry that names no module of the adapter (`modules`): its alpha
    /// would silently not apply.
    pub(super) fn check_patterns<'a>(
        &self,
        file: &str,
        modules: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<()> {
        for k in self.alpha_pattern.keys() {
            let suffix = format!(".{k}");
            if !modules
                .clone()
                .any(|m| m == k.as_str() || m.ends_with(&suffix))
            {
                return Err(Error::weights(
                    file,
                    format!("__metadata__.lora_adapter_metadata.transformer.alpha_pattern.{k}"),
                    "names no module of the adapter: its alpha would apply to nothing",
                ));
            }
        }
        Ok(())
    }
}
