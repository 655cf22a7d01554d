//! Loading Wan checkpoints: the diffusers layout (`config.json` + `diffusion_pytorch_model*.safetensors`)
//! and the original Wan layout (`blocks.N.self_attn.q`, `head.head`, ...), detected from the keys.

use super::config::WanConfig;
use magcache_core::{Error, Result};
use magcache_layers::weights::WeightStore;
use std::path::{Path, PathBuf};

/// Key layouts a Wan checkpoint may come in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WanLayout {
    Diffusers,
    Original,
}

/// Detects the layout from the tensor names.
pub fn detect_layout(store: &WeightStore) -> Result<WanLayout> {
    let names: Vec<&str> = store.keys().map(String::as_str).collect();
    layout_of(&names).ok_or_else(|| {
        Error::weights(
            &store.origin,
            "(layout)",
            "neither diffusers (`condition_embedder.*`, `blocks.N.attn1.*`) nor original Wan (`time_embedding.*`, `blocks.N.self_attn.*`) tensor names",
        )
    })
}

/// The layout of these tensor names, if they have one.
fn layout_of(names: &[&str]) -> Option<WanLayout> {
    let has = |p: &str| {
        names
            .iter()
            .any(|k| k.starts_with(p) || k.contains(&format!(".{p}")))
    };
    if has("condition_embedder.") || names.iter().any(|k| k.contains(".attn1.")) {
        Some(WanLayout::Diffusers)
    } else if has("time_embedding.") || names.iter().any(|k| k.contains(".self_attn.")) {
        Some(WanLayout::Original)
    } else {
        None
    }
}

/// Original Wan name -> diffusers name.
pub fn original_to_diffusers(k: &str) -> String {
    let k = k.strip_prefix("model.diffusion_model.").unwrap_or(k);
    let top = [
        (
            "time_embedding.0.",
            "condition_embedder.time_embedder.linear_1.",
        ),
        (
            "time_embedding.2.",
            "condition_embedder.time_embedder.linear_2.",
        ),
        ("time_projection.1.", "condition_embedder.time_proj."),
        (
            "text_embedding.0.",
            "condition_embedder.text_embedder.linear_1.",
        ),
        (
            "text_embedding.2.",
            "condition_embedder.text_embedder.linear_2.",
        ),
        ("head.head.", "proj_out."),
        // Wan2.1 I2V's image embedder (`MLPProj`: LayerNorm, Linear, GELU, Linear, LayerNorm).
        (
            "img_emb.proj.0.",
            "condition_embedder.image_embedder.norm1.",
        ),
        (
            "img_emb.proj.1.",
            "condition_embedder.image_embedder.ff.net.0.proj.",
        ),
        (
            "img_emb.proj.3.",
            "condition_embedder.image_embedder.ff.net.2.",
        ),
        (
            "img_emb.proj.4.",
            "condition_embedder.image_embedder.norm2.",
        ),
    ];
    for (a, b) in top {
        if let Some(rest) = k.strip_prefix(a) {
            return format!("{b}{rest}");
        }
    }
    if k == "head.modulation" {
        return "scale_shift_table".into();
    }
    if let Some(rest) = k.strip_prefix("blocks.") {
        if let Some((idx, tail)) = rest.split_once('.') {
            let mapped = match tail {
                "modulation" => "scale_shift_table".to_string(),
                // The original norm3 is the cross-attention norm (diffusers norm2).
                t if t.starts_with("norm3.") => format!("norm2.{}", &t[6..]),
                t if t.starts_with("norm2.") => format!("norm3.{}", &t[6..]),
                t if t.starts_with("ffn.0.") => format!("ffn.net.0.proj.{}", &t[6..]),
                t if t.starts_with("ffn.2.") => format!("ffn.net.2.{}", &t[6..]),
                t => {
                    let (attn, rest) = if let Some(r) = t.strip_prefix("self_attn.") {
                        ("attn1", r)
                    } else if let Some(r) = t.strip_prefix("cross_attn.") {
                        ("attn2", r)
                    } else {
                        return format!("blocks.{idx}.{t}");
                    };
                    let rest = match rest.split_once('.') {
                        Some(("q", r)) => format!("to_q.{r}"),
                        Some(("k", r)) => format!("to_k.{r}"),
                        Some(("v", r)) => format!("to_v.{r}"),
                        Some(("o", r)) => format!("to_out.0.{r}"),
                        Some(("k_img", r)) => format!("add_k_proj.{r}"),
                        Some(("v_img", r)) => format!("add_v_proj.{r}"),
                        Some(("norm_k_img", r)) => format!("norm_added_k.{r}"),
                        _ => rest.to_string(),
                    };
                    format!("{attn}.{rest}")
                }
            };
            return format!("blocks.{idx}.{mapped}");
        }
    }
    k.to_string()
}

/// A loaded checkpoint: its config and diffusers-named tensors.
pub struct LoadedWan {
    pub config: WanConfig,
    pub store: WeightStore,
    pub layout: WanLayout,
}

/// Finds the config.json of a weights path: `explicit`, else `config.json` in the folder or beside the
/// file.
fn config_path(weights: &Path, explicit: Option<&Path>) -> Result<PathBuf> {
    // The weights themselves first: a missing path or a symlink loop is said as such, not as a
    // missing config.json.
    if let Some(why) = magcache_core::error::not_found(weights) {
        return Err(Error::weights(weights.display().to_string(), "(file)", why));
    }
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let dir = if weights.is_dir() {
        weights.to_path_buf()
    } else {
        weights.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let c = dir.join("config.json");
    // A dangling link (a hub snapshot whose blob is missing) is returned: reading it says so.
    if c.is_file() || c.is_symlink() {
        Ok(c)
    } else {
        Err(Error::weights(
            weights.display().to_string(),
            "(file)",
            "no config.json beside the weights; add one or set `config = \"...\"` in [model]",
        ))
    }
}

/// Reads the config of a Wan checkpoint (and applies overrides) without touching the weights.
pub fn read_wan_config(
    weights: &Path,
    config: Option<&Path>,
    overrides: &serde_json::Map<String, serde_json::Value>,
    cfg_file: &str,
) -> Result<WanConfig> {
    if config.is_none() && magcache_layers::weights::gguf::is_gguf(weights) {
        // A GGUF file has no config: inferred from the header's shapes.
        let header = magcache_layers::weights::gguf::gguf_header(weights)?;
        magcache_layers::weights::gguf::check_architecture(
            weights,
            header.architecture.as_deref(),
            "wan",
            "wan2.1/wan2.2",
        )?;
        let shown = weights.display().to_string();
        // Original names (city96's files) are renamed; diffusers names (an export's) are kept:
        // the renaming swaps `norm2` and `norm3`, so it must not run on names that are already
        // diffusers'.
        let names: Vec<&str> = header.tensors.iter().map(|(k, _)| k.as_str()).collect();
        let diffusers = layout_of(&names) == Some(WanLayout::Diffusers);
        let shapes = header
            .tensors
            .into_iter()
            .map(|(k, s)| match diffusers {
                true => (k, s),
                false => (original_to_diffusers(&k), s),
            })
            .collect();
        if let Some(text) = &header.config {
            // Written by `magcache export --gguf`: the exported model's own config.
            let embedded = format!("{shown} ({})", magcache_layers::weights::gguf::CONFIG_KEY);
            let base = config_text(text, &embedded)?;
            embedded_fits(&base, &shapes, &embedded)?;
            return overridden(base, overrides, cfg_file);
        }
        let obj = infer_wan_config(&shapes, &shown, overrides)?;
        // The inferred sizes checked as the file's (a zero dimension in its header is the file's
        // fault, not the run file's), then the run file's overrides over them.
        let inferred = format!("{shown} (config inferred from its tensors' shapes)");
        WanConfig::from_map(obj.clone(), &inferred, &Default::default())?;
        return WanConfig::from_map(obj, cfg_file, overrides);
    }
    let cpath = config_path(weights, config)?;
    let cshown = cpath.display().to_string();
    let text = magcache_core::error::read_text(std::path::Path::new(&cpath))?;
    overridden(config_text(&text, &cshown)?, overrides, cfg_file)
}

/// A `config.json`'s text (`shown` names where it came from in errors).
fn config_text(text: &str, shown: &str) -> Result<WanConfig> {
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::config(shown, "(document)", format!("invalid JSON: {e}")))?;
    WanConfig::from_json(&json, shown)
}

/// `base` with the run file's `overrides` (errors name `cfg_file`).
fn overridden(
    base: WanConfig,
    overrides: &serde_json::Map<String, serde_json::Value>,
    cfg_file: &str,
) -> Result<WanConfig> {
    if overrides.is_empty() {
        return Ok(base);
    }
    let obj = magcache_layers::config_util::to_map(&base, "WanTransformer3DModel")?;
    WanConfig::from_map(obj, cfg_file, overrides)
}

/// The number of blocks of diffusers-named `shapes` (those before the first missing one).
fn block_count(shapes: &std::collections::HashMap<String, Vec<usize>>) -> usize {
    (0..)
        .take_while(|i| shapes.contains_key(&format!("blocks.{i}.attn1.to_q.weight")))
        .count()
}

/// A GGUF file's embedded config against its own tensors: the width and the number of blocks (the
/// rest is checked tensor by tensor as the weights load), so that a disagreement names the
/// metadata, not a shape the user has no config.json for.
fn embedded_fits(
    c: &WanConfig,
    shapes: &std::collections::HashMap<String, Vec<usize>>,
    embedded: &str,
) -> Result<()> {
    let width = shapes
        .get("patch_embedding.weight")
        .and_then(|s| s.first().copied());
    let blocks = block_count(shapes);
    let dim = c.num_attention_heads * c.attention_head_dim;
    if width != Some(dim) {
        return Err(Error::config(
            embedded,
            "num_attention_heads",
            format!(
                "{} x attention_head_dim {} = {dim}, but the file's patch_embedding.weight is {width:?} wide",
                c.num_attention_heads, c.attention_head_dim
            ),
        ));
    }
    if blocks != c.num_layers {
        return Err(Error::config(
            embedded,
            "num_layers",
            format!("{}, but the file holds {blocks} blocks", c.num_layers),
        ));
    }
    Ok(())
}

/// The first tensor of Wan2.1 I2V's image embedder, `[image_dim]`.
const IMAGE_EMBEDDER_NORM: &str = "condition_embedder.image_embedder.norm1.weight";

/// Loads a Wan checkpoint from a diffusers folder, a file, or a sharded index.
pub fn load_wan(
    weights: &Path,
    config: Option<&Path>,
    overrides: &serde_json::Map<String, serde_json::Value>,
    cfg_file: &str,
) -> Result<LoadedWan> {
    if magcache_layers::weights::gguf::is_gguf(weights) {
        return load_wan_gguf(weights, config, overrides, cfg_file);
    }
    let config = read_wan_config(weights, config, overrides, cfg_file)?;
    let mut store = WeightStore::load_checkpoint(weights)?;
    let layout = detect_layout(&store)?;
    let mut config = config;
    if layout == WanLayout::Original {
        store.rename(original_to_diffusers)?;
        // The original config says `model_type: "i2v"` for Wan2.1 I2V (CLIP image attention) and
        // Wan2.2 I2V alike (none): the checkpoint's `img_emb` tells them apart.
        if config.image_dim.is_none() {
            if let Some(s) = store.shape(IMAGE_EMBEDDER_NORM) {
                config.image_dim = s.first().copied();
                config.added_kv_proj_dim = Some(config.inner_dim());
                config.check(cfg_file)?;
            }
        }
    }
    Ok(LoadedWan {
        config,
        store,
        layout,
    })
}

/// Original Wan module names for LoRA adapters (`blocks.N.self_attn.q`, `head.head`, ...), mapped
/// as [`original_to_diffusers`] maps checkpoint tensors.
pub struct WanLoraNames;

impl magcache_layers::lora::LoraNames for WanLoraNames {
    fn family(&self) -> &str {
        "Wan"
    }

    fn compounds(&self) -> &[&'static str] {
        &[
            "self_attn",
            "cross_attn",
            "norm_q",
            "norm_k",
            "norm_k_img",
            "k_img",
            "v_img",
            "time_embedding",
            "text_embedding",
            "time_projection",
            "patch_embedding",
            "img_emb",
        ]
    }

    fn original(&self, module: &str) -> Option<Vec<magcache_layers::lora::Target>> {
        let mapped = original_to_diffusers(&format!("{module}.weight"));
        let m = mapped.strip_suffix(".weight")?;
        Some(vec![magcache_layers::lora::Target::whole(m)])
    }
}

/// A GGUF file (city96's layout: original names, no config.json): the architecture comes from
/// `config` when given, else from the tensors' shapes ([`infer_wan_config`]); `overrides` win.
fn load_wan_gguf(
    weights: &Path,
    config: Option<&Path>,
    overrides: &serde_json::Map<String, serde_json::Value>,
    cfg_file: &str,
) -> Result<LoadedWan> {
    let (mut store, arch) = WeightStore::load_gguf(weights)?;
    magcache_layers::weights::gguf::check_architecture(
        weights,
        arch.as_deref(),
        "wan",
        "wan2.1/wan2.2",
    )?;
    let layout = detect_layout(&store)?;
    if layout == WanLayout::Original {
        store.rename(original_to_diffusers)?;
    }
    // A given config.json, else the one `magcache export --gguf` embeds, else the shapes'.
    let config = read_wan_config(weights, config, overrides, cfg_file)?;
    Ok(LoadedWan {
        config,
        store,
        layout,
    })
}

/// The config is read off block 0: every block must hold the same tensors (a block 0 without
/// `attn1.norm_q.weight` would drop the other blocks' norms), and no block may sit past a gap.
fn same_block_tensors(
    shapes: &std::collections::HashMap<String, Vec<usize>>,
    num_layers: usize,
    origin: &str,
) -> Result<()> {
    let mut per_block: Vec<std::collections::BTreeSet<&str>> = vec![Default::default(); num_layers];
    for k in shapes.keys() {
        let Some((i, rest)) = k
            .strip_prefix("blocks.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest)))
        else {
            continue;
        };
        match per_block.get_mut(i) {
            Some(set) => {
                set.insert(rest);
            }
            None => {
                return Err(Error::weights(
                    origin,
                    k,
                    format!("is past block {num_layers}, which has no attn1.to_q.weight: the blocks are not numbered 0..N"),
                ))
            }
        }
    }
    let Some(first) = per_block.first() else {
        return Ok(());
    };
    for (i, set) in per_block.iter().enumerate().skip(1) {
        if let Some(extra) = set.symmetric_difference(first).next() {
            let (has, lacks) = if set.contains(extra) { (i, 0) } else { (0, i) };
            return Err(Error::weights(
                origin,
                format!("blocks.{has}.{extra}"),
                format!("block {has} has it and block {lacks} does not: every block must hold the same tensors"),
            ));
        }
    }
    Ok(())
}

/// The config of diffusers-named Wan tensors, from their shapes (as diffusers' `from_single_file`
/// infers a released config): width, channels and patch from `patch_embedding.weight`, `text_dim`,
/// `freq_dim`, `ffn_dim`, the number of blocks, `cross_attn_norm` and `qk_norm` from what is
/// present; every released model's constants for the rest (head size 128, or the overridden one,
/// with `inner_dim / head` heads; eps 1e-6). Diffusers `config.json` keys.
pub fn infer_wan_config(
    shapes: &std::collections::HashMap<String, Vec<usize>>,
    origin: &str,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let dims = |k: &str| -> Result<Vec<usize>> {
        shapes
            .get(k)
            .cloned()
            .ok_or_else(|| Error::weights(origin, k, "missing: the config is inferred from it"))
    };
    let pe = dims("patch_embedding.weight")?;
    let [d, cin, pt, ph, pw] = pe.as_slice() else {
        return Err(Error::weights(
            origin,
            "patch_embedding.weight",
            format!("has shape {pe:?}; expected [dim, in_channels, pt, ph, pw]"),
        ));
    };
    let rows = |k: &str| -> Result<usize> { Ok(dims(k)?.first().copied().unwrap_or(0)) };
    let cols = |k: &str| -> Result<usize> { Ok(dims(k)?.get(1).copied().unwrap_or(0)) };
    let patch = pt * ph * pw;
    let (heads, head) = magcache_layers::config_util::inferred_heads(*d, overrides);
    if heads * head != *d {
        return Err(Error::weights(
            origin,
            "patch_embedding.weight",
            format!("gives the width {d}, not a multiple of the head size {head} a file without a config is read with (every released Wan's): set [model.overrides] attention_head_dim and num_attention_heads (a config.json beside it, or `config = \"...\"`, gives them too)"),
        ));
    }
    let num_layers = block_count(shapes);
    same_block_tensors(shapes, num_layers, origin)?;
    let v = serde_json::json!({
        "patch_size": [pt, ph, pw],
        "in_channels": cin,
        "out_channels": rows("proj_out.weight")? / patch.max(1),
        "text_dim": cols("condition_embedder.text_embedder.linear_1.weight")?,
        "freq_dim": cols("condition_embedder.time_embedder.linear_1.weight")?,
        "ffn_dim": rows("blocks.0.ffn.net.0.proj.weight")?,
        "num_layers": num_layers,
        "cross_attn_norm": shapes.contains_key("blocks.0.norm2.weight"),
        "qk_norm": shapes
            .contains_key("blocks.0.attn1.norm_q.weight")
            .then_some("rms_norm_across_heads"),
        "eps": 1e-6,
        "attention_head_dim": head,
        "num_attention_heads": heads,
    });
    let mut m = v.as_object().cloned().unwrap_or_default();
    if let Some(s) = shapes.get(IMAGE_EMBEDDER_NORM) {
        m.insert("image_dim".into(), s.first().copied().unwrap_or(0).into());
        m.insert("added_kv_proj_dim".into(), (*d).into());
    }
    Ok(m)
}
