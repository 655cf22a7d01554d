//! Merging model configs: a base, the fields of a `config.json`, then `[model.overrides]`.

use magcache_core::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

/// `base` with the fields of `obj` (keys starting with `_` are metadata and skipped), then
/// `overrides`, applied. The config's fields are those `base` serializes (every field, written
/// once in its struct); an unknown key in `obj` or in the
/// overrides is an error naming `file` and the key (`model.overrides.KEY` for overrides). `class` names
/// the model class in messages.
pub fn merge_config<T: Serialize + DeserializeOwned>(
    base: &T,
    obj: &Map<String, Value>,
    overrides: &Map<String, Value>,
    file: &str,
    class: &str,
) -> Result<T> {
    let mut merged =
        serde_json::to_value(base).map_err(|e| Error::msg(format!("{class} config: {e}")))?;
    let m = merged
        .as_object_mut()
        .ok_or_else(|| Error::msg(format!("{class} config is not an object")))?;
    let names: Vec<String> = m.keys().cloned().collect();
    let fields: Vec<&str> = names.iter().map(String::as_str).collect();
    for (k, v) in obj {
        if k.starts_with('_') {
            continue;
        }
        if !fields.contains(&k.as_str()) {
            return Err(Error::config(
                file,
                k,
                format!("unknown {class} config field"),
            ));
        }
        m.insert(k.clone(), v.clone());
    }
    for (k, v) in overrides {
        if !fields.contains(&k.as_str()) {
            return Err(Error::config(
                file,
                format!("model.overrides.{k}"),
                format!("not a {class} config field (known: {})", fields.join(", ")),
            ));
        }
        m.insert(k.clone(), v.clone());
    }
    serde_json::from_value(merged).map_err(|e| Error::config(file, "model config", e.to_string()))
}

/// The checkpoint-or-architecture choice every family here needs: exactly one of `weights` and
/// `preset`.
pub fn require_weights_or_preset(cfg: &magcache_core::RunConfig, file: &str) -> Result<()> {
    match cfg.model.weights {
        Some(_) => Ok(()),
        None => preset_name(cfg, file).map(|_| ()),
    }
}

/// The preset of a run without `weights`; an error naming `model.weights` when there is none.
pub fn preset_name<'a>(cfg: &'a magcache_core::RunConfig, file: &str) -> Result<&'a str> {
    cfg.model.preset.as_deref().ok_or_else(|| {
        Error::config(
            file,
            "model.weights",
            "give `weights` (a checkpoint) or `preset` (a named architecture)",
        )
    })
}

/// The fields of a config as a JSON map (the base that `[model.overrides]` are merged into). `class`
/// names the model class in messages.
pub fn to_map<T: Serialize>(cfg: &T, class: &str) -> Result<Map<String, Value>> {
    match serde_json::to_value(cfg) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::msg(format!("{class} config is not an object"))),
        Err(e) => Err(Error::msg(format!("{class} config: {e}"))),
    }
}

/// Converts a `[model.overrides]` TOML table to JSON.
pub fn overrides_json(
    cfg: &magcache_core::RunConfig,
) -> serde_json::Map<String, serde_json::Value> {
    match &cfg.model.overrides {
        Some(t) => serde_json::to_value(t)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default(),
        None => serde_json::Map::new(),
    }
}

/// Resolves a path of the run file against its folder.
pub fn resolve(base: &std::path::Path, p: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// What sets a model's number of blocks, for messages: `model.overrides.KEY = N` when the run file
/// overrides it, else `KEY = N in the model config`.
pub fn depth_key(overrides: &Map<String, Value>, key: &str, n: usize) -> String {
    if overrides.contains_key(key) {
        format!("model.overrides.{key} = {n}")
    } else {
        format!("{key} = {n} in the model config")
    }
}

/// [`depth_key`] for a double- then single-stream checkpoint (FLUX.1, FLUX.2): tensors under
/// `single_transformer_blocks` are counted by `num_single_layers`, the rest by `num_layers`.
pub fn double_single_depth(
    overrides: &Map<String, Value>,
    prefix: &str,
    (n_double, n_single): (usize, usize),
) -> String {
    match prefix {
        "single_transformer_blocks" => depth_key(overrides, "num_single_layers", n_single),
        _ => depth_key(overrides, "num_layers", n_double),
    }
}

/// Refuses the core keys of a run that cannot apply to it, naming the key: random-input keys beside
/// an inputs file, `model.config` without weights, the strategy's own
/// ([`magcache_core::StrategyConfig::check_experts`]). `family` is the family's name and `experts`
/// its number of transformer models. Reads nothing: families call it before any weights load.
pub fn check_applicable(
    cfg: &magcache_core::RunConfig,
    file: &str,
    family: &str,
    experts: usize,
) -> Result<()> {
    let i = &cfg.inputs;
    if let Some(f) = &i.file {
        let drawn = "is for seeded random inputs; the inputs file";
        if i.latent_shape.is_some() {
            return Err(Error::config(
                file,
                "inputs.latent_shape",
                format!("{drawn} `{f}` gives the latents (`latents_init`): remove one of the two"),
            ));
        }
        if i.text_len.is_some() {
            return Err(Error::config(
                file,
                "inputs.text_len",
                format!("{drawn} `{f}` gives the text embeddings: remove one of the two"),
            ));
        }
        if i.seed.is_some() {
            return Err(Error::config(
                file,
                "inputs.seed",
                format!("{drawn} `{f}` is used as it is, nothing is drawn: remove one of the two"),
            ));
        }
    }
    if cfg.model.config.is_some() && cfg.model.weights.is_none() {
        return Err(Error::config(
            file,
            "model.config",
            "is the config.json of a weights file; a preset has its own architecture (change it with [model.overrides])",
        ));
    }
    cfg.strategy().check_experts(file, family, experts)
}

/// What a family's prompted run needs of a pipeline folder: its sub-folders, and a `_class_name`
/// starting with `class_prefix` (`example` names such pipelines in the error).
pub struct PipelineKind<'a> {
    pub parts: &'a [&'a str],
    pub class_prefix: &'a str,
    /// The family as messages name it (`FLUX`, `Wan`).
    pub label: &'a str,
    pub example: &'a str,
}

/// A diffusers pipeline folder as released: `model.weights` names one folder whose
/// `model_index.json` is read and names a pipeline of `kind`, and which has every sub-folder of
/// `kind`. Returns the folder and the pipeline's class. Errors name `model.weights` or the index
/// file and key. Used by prompted runs of every family.
pub fn pipeline_folder(
    cfg: &magcache_core::RunConfig,
    file: &str,
    base: &std::path::Path,
    kind: &PipelineKind<'_>,
) -> Result<(std::path::PathBuf, String)> {
    let parts = kind.parts;
    let Some(magcache_core::runtime::config::WeightsSpec::One(w)) = &cfg.model.weights else {
        return Err(Error::config(
            file,
            "model.weights",
            format!(
                "a prompted run takes one diffusers pipeline folder (model_index.json beside {}/, scheduler/)",
                parts.join("/, ")
            ),
        ));
    };
    let root = resolve(base, w);
    let index = root.join("model_index.json");
    let shown = index.display().to_string();
    if let Some(why) = magcache_core::error::not_a_file(&index) {
        return Err(Error::config(
            file,
            "model.weights",
            format!("a prompted run needs a diffusers pipeline folder; {shown} {why}"),
        ));
    }
    let text = magcache_core::error::read_text(&index)?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(&shown, "(document)", format!("invalid JSON: {e}")))?;
    for sub in parts {
        if !root.join(sub).is_dir() {
            return Err(Error::config(
                file,
                "model.weights",
                format!("the pipeline folder {} has no `{sub}/`", root.display()),
            ));
        }
    }
    // Each component the run loads, when the index names it, must be declared `[library, class]`:
    // one it marks absent (null) is one diffusers would not load.
    for sub in parts.iter().copied().chain(["scheduler"]) {
        if v.get(sub).is_some() && component(&v, &shown, sub)?.is_none() {
            return Err(Error::config(
                &shown,
                sub,
                format!(
                    "declares no `{sub}` component ([library, class]), which the pipeline needs"
                ),
            ));
        }
    }
    let class = pipeline_class(&v).to_string();
    if !class.starts_with(kind.class_prefix) {
        return Err(Error::config(
            &shown,
            "_class_name",
            format!(
                "`{class}` is not a {} pipeline ({}); check model.family",
                kind.label, kind.example
            ),
        ));
    }
    Ok((root, class))
}

/// A component entry of a pipeline's `model_index.json` (`file` as messages show it): `[library,
/// class]`, or `None` for a component the pipeline does not have (absent, `null`, `[null, null]`).
/// Anything else (a bare string, a one-sided pair) is an error naming the key: diffusers would
/// load nothing, or something else, for it.
pub fn component(index: &Value, file: &str, key: &str) -> Result<Option<(String, String)>> {
    match index.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) if a.len() == 2 && a.iter().all(Value::is_null) => Ok(None),
        Some(Value::Array(a)) => match a.as_slice() {
            [Value::String(l), Value::String(c)] if !l.is_empty() && !c.is_empty() => {
                Ok(Some((l.clone(), c.clone())))
            }
            _ => Err(Error::config(
                file,
                key,
                format!(
                    "{}: expected [library, class] or [null, null]",
                    Value::Array(a.clone())
                ),
            )),
        },
        Some(other) => Err(Error::config(
            file,
            key,
            format!("{other}: expected [library, class] or [null, null]"),
        )),
    }
}

/// `_class_name` of a pipeline's `model_index.json` (empty when absent).
pub fn pipeline_class(index: &Value) -> &str {
    index
        .get("_class_name")
        .and_then(|c| c.as_str())
        .unwrap_or("")
}

/// Heads and head size of a model `inner` wide whose config is inferred from its tensors: every
/// released Wan and FLUX model's head size 128 unless `[model.overrides]` sets `attention_head_dim`,
/// and as many heads as fill the width unless it sets `num_attention_heads` (applied after).
pub fn inferred_heads(inner: usize, overrides: &Map<String, Value>) -> (usize, usize) {
    let head = overrides
        .get("attention_head_dim")
        .and_then(|v| v.as_u64())
        .map(|h| h as usize)
        .filter(|h| *h > 0)
        .unwrap_or(128);
    ((inner / head).max(1), head)
}

/// A transformer config read from a diffusers `config.json`: its class, its fields and its own
/// checks; reading, merging over a base, `[model.overrides]` and the class check are shared.
pub trait ModelConfig: Serialize + DeserializeOwned + Default {
    /// The diffusers class (`_class_name`).
    const CLASS: &'static str;
    /// What it is, for messages (`a FLUX.2 transformer`).
    const KIND: &'static str;

    /// Its own consistency checks, naming `file` and the key.
    fn check(&self, file: &str) -> Result<()>;

    /// `base` with the fields of `obj` (keys starting with `_` are metadata), then the overrides,
    /// checked.
    fn from_map(
        base: Self,
        obj: &Map<String, Value>,
        file: &str,
        overrides: &Map<String, Value>,
    ) -> Result<Self> {
        if let Some(c) = obj.get("_class_name").and_then(|v| v.as_str()) {
            if c != Self::CLASS {
                return Err(Error::config(
                    file,
                    "_class_name",
                    format!("`{c}` is not {} (expected {})", Self::KIND, Self::CLASS),
                ));
            }
        }
        let cfg = merge_config(&base, obj, overrides, file, Self::CLASS)?;
        cfg.check(file)?;
        Ok(cfg)
    }

    /// Reads a `config.json` over the default; errors name the file and key.
    fn read(path: &std::path::Path, overrides: &Map<String, Value>) -> Result<Self> {
        let (v, shown) = read_json(path)?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::config(&shown, "(document)", "expected a JSON object"))?;
        Self::from_map(Self::default(), obj, &shown, overrides)
    }
}

/// `config_util::positive` over fields of a config named once each: `positive_fields!(file, cfg, a b c)`
/// checks `cfg.a`, `cfg.b`, `cfg.c` and names the first that is 0.
#[macro_export]
macro_rules! positive_fields {
    ($file:expr, $cfg:expr, $($field:ident)+) => {
        $crate::config_util::positive($file, &[$((stringify!($field), $cfg.$field)),+])
    };
}

/// Reads and parses the JSON document at `path` (read through the regular-file check and recorded
/// as an input: [`magcache_core::error::read_text`]); returns it with the path as errors show it.
pub fn read_json(path: &std::path::Path) -> Result<(Value, String)> {
    let shown = path.display().to_string();
    let text = magcache_core::error::read_text(path)?;
    let v = serde_json::from_str(&text)
        .map_err(|e| Error::config(&shown, "(document)", format!("invalid JSON: {e}")))?;
    Ok((v, shown))
}

/// `path` where it is a file, else `path/config.json` (a model folder given for its config).
pub fn config_json_in(path: &std::path::Path) -> std::path::PathBuf {
    if path.is_file() {
        path.to_path_buf()
    } else {
        path.join("config.json")
    }
}

/// The positive integer `key` of the config object `v` (read from `file`); `default` where the key
/// is absent or null, else an error saying that `what` (e.g. "the CLIP text encoder config") needs
/// it. Errors name the file and the key.
pub fn positive_json(
    v: &Value,
    file: &str,
    key: &str,
    default: Option<usize>,
    what: &str,
) -> Result<usize> {
    match v.get(key) {
        None | Some(Value::Null) => {
            default.ok_or_else(|| Error::config(file, key, format!("missing ({what} needs it)")))
        }
        Some(x) => x
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                Error::config(file, key, format!("expected a positive integer, got {x}"))
            }),
    }
}

/// The first of `(key, value)` that is 0, as an error naming `file` and the key.
pub fn positive(file: &str, fields: &[(&str, usize)]) -> Result<()> {
    match fields.iter().find(|(_, v)| *v == 0) {
        Some((k, _)) => Err(Error::config(file, *k, "must be at least 1")),
        None => Ok(()),
    }
}

/// Where a run of an image family that reads released pipeline folders takes its model from.
pub enum RunSource {
    /// A pipeline folder of the one supported class (`[prompt]` runs).
    Pipeline(std::path::PathBuf),
    /// A transformer folder (`config.json` and weights; `transformer/` of a pipeline folder taken
    /// when given the folder) for runs without `[prompt]`.
    Transformer(std::path::PathBuf),
    /// A preset, by name (`model.preset`).
    Preset(String),
}

/// The run's [`RunSource`]: one weights path (a GGUF file is refused, naming `model.weights`), a
/// pipeline folder of `kind` whose `_class_name` is exactly `class` for prompted runs, or a preset.
pub fn run_source(
    cfg: &magcache_core::RunConfig,
    file: &str,
    base: &std::path::Path,
    kind: &PipelineKind<'_>,
    class: &str,
) -> Result<RunSource> {
    use magcache_core::runtime::config::WeightsSpec;
    require_weights_or_preset(cfg, file)?;
    let w = match &cfg.model.weights {
        None => return Ok(RunSource::Preset(preset_name(cfg, file)?.to_string())),
        Some(WeightsSpec::Many(_)) => {
            return Err(Error::config(
                file,
                "model.weights",
                format!("{} takes one folder", kind.label),
            ))
        }
        Some(WeightsSpec::One(w)) => w,
    };
    if crate::weights::gguf::is_gguf(&resolve(base, w)) {
        return Err(Error::config(
            file,
            "model.weights",
            format!("`{w}` is a GGUF file: {} runs read diffusers folders (a pipeline folder, or a transformer folder without [prompt]); GGUF checkpoints are not read for it yet", kind.label),
        ));
    }
    if cfg.prompt.is_none() {
        return Ok(RunSource::Transformer(transformer_dir(&resolve(base, w))));
    }
    let (root, found) = pipeline_folder(cfg, file, base, kind)?;
    if found != class {
        return Err(Error::config(
            root.join("model_index.json").display().to_string(),
            "_class_name",
            format!("`{found}` is not supported (only {class})"),
        ));
    }
    Ok(RunSource::Pipeline(root))
}

/// `transformer/` of a diffusers pipeline folder, else the path as given (a transformer folder or
/// file).
pub fn transformer_dir(path: &std::path::Path) -> std::path::PathBuf {
    let t = path.join("transformer");
    if t.is_dir() {
        t
    } else {
        path.to_path_buf()
    }
}

/// The warning of pipelines that round a picture size down to a multiple of `unit` (twice the VAE's
/// factor) rather than refuse it; `None` when both sides are multiples.
pub fn rounded_size_warning(
    file: &str,
    height: usize,
    width: usize,
    unit: usize,
) -> Option<String> {
    let off = |v: usize| unit > 0 && !v.is_multiple_of(unit);
    (off(height) || off(width)).then(|| {
        format!(
            "{file}: inputs.height/width {height}x{width} are not multiples of {unit}: the picture is {}x{} (rounded down, as the pipeline does)",
            height / unit * unit,
            width / unit * unit
        )
    })
}

/// The checks of a FLUX-style transformer's config (FLUX.1, FLUX.2): `patch_size` 1 (the pipeline
/// packs 2x2 latents itself) and RoPE axes (`axes_dims_rope`) each even and summing to
/// `attention_head_dim`.
pub fn check_packed_rope(
    file: &str,
    patch_size: usize,
    axes: &[usize],
    head_dim: usize,
) -> Result<()> {
    if patch_size != 1 {
        return Err(Error::config(
            file,
            "patch_size",
            "only patch_size 1 (the pipeline packs 2x2 latents itself) is supported",
        ));
    }
    if axes.iter().sum::<usize>() != head_dim || axes.iter().any(|d| !d.is_multiple_of(2)) {
        return Err(Error::config(
            file,
            "axes_dims_rope",
            format!("{axes:?} must be even and sum to attention_head_dim {head_dim}"),
        ));
    }
    Ok(())
}

/// `model.weights` of a one-model family: the path, `None` for a preset, an error naming the key
/// for a list.
pub fn single_weights<'a>(
    cfg: &'a magcache_core::RunConfig,
    file: &str,
    family: &str,
) -> Result<Option<&'a str>> {
    use magcache_core::runtime::config::WeightsSpec;
    match &cfg.model.weights {
        Some(WeightsSpec::One(w)) => Ok(Some(w)),
        Some(WeightsSpec::Many(_)) => Err(Error::config(
            file,
            "model.weights",
            format!("{family} takes one weights path"),
        )),
        None => Ok(None),
    }
}

/// Refuses a text encoder whose embeddings (`what`, `got` wide) do not fit the transformer's
/// `key` (`want`): an error naming `model.weights`.
pub fn check_width(file: &str, what: &str, got: usize, key: &str, want: usize) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(Error::config(
        file,
        "model.weights",
        format!("{what} gives {got}-wide embeddings but the transformer's {key} is {want}"),
    ))
}

/// The preset `name` of `family` among `presets` (`name_of` gives each one's name), or the error
/// naming `model.preset` with the known names.
pub fn find_preset<'a, P>(
    presets: &'a [P],
    name_of: fn(&P) -> &str,
    name: &str,
    (family, file): (&str, &str),
) -> Result<&'a P> {
    presets.iter().find(|p| name_of(p) == name).ok_or_else(|| {
        let known: Vec<&str> = presets.iter().map(name_of).collect();
        Error::config(
            file,
            "model.preset",
            format!(
                "unknown preset `{name}` for family `{family}` (known: {})",
                known.join(", ")
            ),
        )
    })
}

/// A preset's transformer config: `base` as if read from a `config.json`, with the run's
/// `[model.overrides]`, checked.
pub fn preset_config<C: ModelConfig>(
    base: C,
    file: &str,
    overrides: &Map<String, Value>,
) -> Result<C> {
    let map = to_map(&base, C::CLASS)?;
    C::from_map(C::default(), &map, file, overrides)
}

/// The text rows of an image run: `prompt.max_sequence_length` for prompted runs, else
/// `inputs.text_len`, else `default`.
pub fn text_len(cfg: &magcache_core::RunConfig, default: usize) -> usize {
    match &cfg.prompt {
        Some(p) => p.max_sequence_length.unwrap_or(default),
        None => cfg.inputs.text_len.unwrap_or(default),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positive_json_reads_defaults_and_names_the_key() -> Result<()> {
        let v: Value = serde_json::json!({"a": 3, "b": 0, "c": "x", "d": null, "e": -2});
        let what = "the test config";
        assert_eq!(positive_json(&v, "f.json", "a", None, what)?, 3);
        assert_eq!(positive_json(&v, "f.json", "d", Some(7), what)?, 7);
        assert_eq!(positive_json(&v, "f.json", "z", Some(5), what)?, 5);
        for (key, says) in [
            ("b", "expected a positive integer, got 0"),
            ("c", "expected a positive integer, got \"x\""),
            ("e", "expected a positive integer, got -2"),
            ("z", "missing (the test config needs it)"),
        ] {
            let e = positive_json(&v, "f.json", key, None, what)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains("f.json") && e.contains(key) && e.contains(says),
                "{e}"
            );
        }
        Ok(())
    }

    #[test]
    fn read_json_names_the_file_of_a_bad_document() {
        let dir = std::env::temp_dir().join(format!("magcache-read-json-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let f = dir.join("config.json");
        let _ = std::fs::write(&f, "{ not json");
        assert_eq!(config_json_in(&dir), f);
        assert_eq!(config_json_in(&f), f);
        let e = read_json(&config_json_in(&dir))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            e.contains("config.json") && e.contains("invalid JSON"),
            "{e}"
        );
    }
}
