//! An adapter's `lora_adapter_metadata` (diffusers/PEFT): every value checked for its type.

use magcache_core::{Error, Result};
use std::collections::BTreeMap;

/// diffusers' `lora_adapter_metadata` (the `transformer.` entries).
#[derive(Default)]
pub(super) struct PeftMeta {
    pub(super) alpha: Option<f64>,
    pub(super) alpha_pattern: BTreeMap<String, f64>,
    pub(super) rslora: bool,
    /// `transformer.r` and `transformer.rank_pattern`: the ranks PEFT builds the layers with.
    pub(super) r: Option<u64>,
    pub(super) rank_pattern: BTreeMap<String, u64>,
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
    let r = v.get("transformer.r").and_then(serde_json::Value::as_u64);
    let rank_pattern = match v.get("transformer.rank_pattern") {
        None | Some(serde_json::Value::Null) => Default::default(),
        Some(serde_json::Value::Object(o)) => o
            .iter()
            .map(|(k, r)| match r.as_u64().filter(|r| *r > 0) {
                Some(r) => Ok((k.clone(), r)),
                None => Err(Error::weights(
                    file,
                    key(&format!("transformer.rank_pattern.{k}")),
                    format!("must be a positive integer (the rank), got {r}"),
                )),
            })
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(Error::weights(
                file,
                key("transformer.rank_pattern"),
                format!("must be a table of module names to ranks, got {other}"),
            ))
        }
    };
    Ok(PeftMeta {
        alpha,
        alpha_pattern,
        rslora,
        r,
        rank_pattern,
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
    /// The adapter's modules against the metadata: its patterns name modules of the adapter, and
    /// the ranks it states are the tensors' ([`PeftMeta::check_patterns`],
    /// [`PeftMeta::check_ranks`]).
    pub(super) fn check_modules(
        &self,
        file: &str,
        modules: &BTreeMap<String, super::Parts>,
    ) -> Result<()> {
        self.check_patterns(file, modules.keys().map(String::as_str))?;
        self.check_ranks(
            file,
            modules.iter().filter_map(|(m, p)| {
                let (k, d) = p.down.as_ref()?;
                Some((
                    m.as_str(),
                    k.as_str(),
                    d.dims().first().copied().unwrap_or(0),
                ))
            }),
        )
    }

    /// Refuses a rank the metadata states (`transformer.rank_pattern`'s for the module, else
    /// `transformer.r`) that a module's tensors do not have (`ranks`: module, its down matrix's key
    /// and rows): PEFT builds its layers from the metadata and would refuse such a file, and a
    /// merge that went by the tensors would apply what the file does not say.
    fn check_ranks<'a>(
        &self,
        file: &str,
        ranks: impl Iterator<Item = (&'a str, &'a str, usize)>,
    ) -> Result<()> {
        let key = |k: &str| format!("__metadata__.lora_adapter_metadata.transformer.{k}");
        let mut used = std::collections::BTreeSet::new();
        for (module, down, r) in ranks {
            let pattern = self
                .rank_pattern
                .iter()
                .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")));
            let (said, from) = match (pattern, self.r) {
                (Some((k, r)), _) => {
                    used.insert(k.as_str());
                    (*r, key(&format!("rank_pattern.{k}")))
                }
                (None, Some(r)) => (r, key("r")),
                (None, None) => continue,
            };
            if said != r as u64 {
                return Err(Error::weights(
                    file,
                    from,
                    format!("says rank {said}, but `{down}` has rank {r}: the metadata does not describe these tensors (PEFT would refuse the file)"),
                ));
            }
        }
        if let Some(k) = self
            .rank_pattern
            .keys()
            .find(|k| !used.contains(k.as_str()))
        {
            return Err(Error::weights(
                file,
                key(&format!("rank_pattern.{k}")),
                "names no module of the adapter",
            ));
        }
        Ok(())
    }

    /// Refuses an `alpha_pattern` entry that names no module of the adapter (`modules`): its alpha
    /// would silently not apply.
    fn check_patterns<'a>(
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
