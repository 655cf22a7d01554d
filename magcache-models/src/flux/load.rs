//! Loading FLUX checkpoints: the diffusers layout and the original BFL single-file layout
//! (`double_blocks.N.img_attn.qkv`, fused projections), detected from the keys.

use super::config::FluxConfig;
use candle_core::Tensor;
use magcache_core::{Error, Result};
use magcache_layers::config_util::ModelConfig;
use magcache_layers::weights::WeightStore;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FluxLayout {
    Diffusers,
    Bfl,
}

pub fn detect_layout(store: &WeightStore) -> Result<FluxLayout> {
    if store
        .keys()
        .any(|k| k.starts_with("transformer_blocks.") || k.starts_with("x_embedder."))
    {
        Ok(FluxLayout::Diffusers)
    } else if store
        .keys()
        .any(|k| k.starts_with("double_blocks.") || k.starts_with("img_in."))
    {
        Ok(FluxLayout::Bfl)
    } else {
        Err(Error::weights(
            &store.origin,
            "(layout)",
            "neither diffusers (`transformer_blocks.*`, `x_embedder.*`) nor BFL (`double_blocks.*`, `img_in.*`) FLUX tensor names",
        ))
    }
}

/// BFL module -> diffusers module, outside the blocks.
const TOP_NAMES: &[(&str, &str)] = &[
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    (
        "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_1",
    ),
    (
        "time_in.out_layer",
        "time_text_embed.timestep_embedder.linear_2",
    ),
    (
        "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_1",
    ),
    (
        "guidance_in.out_layer",
        "time_text_embed.guidance_embedder.linear_2",
    ),
    (
        "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_1",
    ),
    (
        "vector_in.out_layer",
        "time_text_embed.text_embedder.linear_2",
    ),
    ("final_layer.linear", "proj_out"),
];

/// Inside double block N (`double_blocks.N.` -> `transformer_blocks.N.`), besides the fused `qkv`.
const DOUBLE_NAMES: &[(&str, &str)] = &[
    ("img_mod.lin", "norm1.linear"),
    ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
    ("txt_mlp.2", "ff_context.net.2"),
];

/// Inside single block N (`single_blocks.N.` -> `single_transformer_blocks.N.`), besides the fused
/// `linear1`.
const SINGLE_NAMES: &[(&str, &str)] = &[("modulation.lin", "norm.linear"), ("linear2", "proj_out")];

/// The query/key norms (BFL `…norm.query_norm.scale` -> diffusers `…norm_q.weight`).
const DOUBLE_NORMS: &[(&str, &str)] = &[
    ("img_attn.norm.query_norm", "attn.norm_q"),
    ("img_attn.norm.key_norm", "attn.norm_k"),
    ("txt_attn.norm.query_norm", "attn.norm_added_q"),
    ("txt_attn.norm.key_norm", "attn.norm_added_k"),
];
const SINGLE_NORMS: &[(&str, &str)] = &[
    ("norm.query_norm", "attn.norm_q"),
    ("norm.key_norm", "attn.norm_k"),
];

/// BFL module names for LoRA adapters (kohya, ComfyUI): the renames of [`bfl_to_diffusers`], fused
/// modules split by rows. `d` is the inner dimension, `mlp` the single blocks' MLP width.
pub struct FluxLoraNames {
    pub d: usize,
    pub mlp: usize,
}

impl magcache_layers::lora::LoraNames for FluxLoraNames {
    fn family(&self) -> &str {
        "FLUX"
    }

    fn compounds(&self) -> &[&'static str] {
        &[
            "double_blocks",
            "single_blocks",
            "img_attn",
            "txt_attn",
            "img_mlp",
            "txt_mlp",
            "img_mod",
            "txt_mod",
            "img_in",
            "txt_in",
            "time_in",
            "vector_in",
            "guidance_in",
            "in_layer",
            "out_layer",
            "final_layer",
            "adaLN_modulation",
            "query_norm",
            "key_norm",
        ]
    }

    fn original(&self, module: &str) -> Option<Vec<magcache_layers::lora::Target>> {
        use magcache_layers::lora::Target;
        let d = self.d;
        let split = |prefix: &str, names: &[&str], sizes: &[usize]| -> Vec<Target> {
            let mut off = 0;
            names
                .iter()
                .zip(sizes)
                .map(|(n, r)| {
                    let t = Target {
                        module: format!("{prefix}.{n}"),
                        rows: vec![(off, *r)],
                    };
                    off += r;
                    t
                })
                .collect()
        };
        if let Some((_, b)) = TOP_NAMES.iter().find(|(a, _)| *a == module) {
            return Some(vec![Target::whole(*b)]);
        }
        if module == "final_layer.adaLN_modulation.1" {
            // BFL (shift, scale) rows; diffusers' AdaLayerNormContinuous (scale, shift).
            return Some(vec![Target {
                module: "norm_out.linear".into(),
                rows: vec![(d, d), (0, d)],
            }]);
        }
        let (kind, rest) = module.split_once('.')?;
        let (idx, inner) = rest.split_once('.')?;
        idx.parse::<usize>().ok()?;
        match kind {
            "double_blocks" => {
                let t = format!("transformer_blocks.{idx}");
                match inner {
                    "img_attn.qkv" => Some(split(
                        &format!("{t}.attn"),
                        &["to_q", "to_k", "to_v"],
                        &[d, d, d],
                    )),
                    "txt_attn.qkv" => Some(split(
                        &format!("{t}.attn"),
                        &["add_q_proj", "add_k_proj", "add_v_proj"],
                        &[d, d, d],
                    )),
                    _ => DOUBLE_NAMES
                        .iter()
                        .chain(DOUBLE_NORMS)
                        .find(|(a, _)| *a == inner)
                        .map(|(_, b)| vec![Target::whole(format!("{t}.{b}"))]),
                }
            }
            "single_blocks" => {
                let t = format!("single_transformer_blocks.{idx}");
                match inner {
                    "linear1" => Some(split(
                        &t,
                        &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
                        &[d, d, d, self.mlp],
                    )),
                    _ => SINGLE_NAMES
                        .iter()
                        .chain(SINGLE_NORMS)
                        .find(|(a, _)| *a == inner)
                        .map(|(_, b)| vec![Target::whole(format!("{t}.{b}"))]),
                }
            }
            _ => None,
        }
    }
}

/// Renames and splits BFL tensors into diffusers names, in place. `d` is the inner dimension.
pub fn bfl_to_diffusers(store: &mut WeightStore) -> Result<()> {
    let origin = store.origin.clone();
    let missing = |k: &str| Error::weights(&origin, k, "missing from the BFL checkpoint");
    let d = store
        .shape("img_in.weight")
        .and_then(|s| s.first().copied())
        .ok_or_else(|| missing("img_in.weight"))?;
    let mut simple: Vec<(String, String)> = TOP_NAMES
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    for i in 0..magcache_layers::weights::count_blocks(store, "double_blocks.") {
        for (a, c) in DOUBLE_NAMES {
            simple.push((
                format!("double_blocks.{i}.{a}"),
                format!("transformer_blocks.{i}.{c}"),
            ));
        }
    }
    for i in 0..magcache_layers::weights::count_blocks(store, "single_blocks.") {
        for (a, c) in SINGLE_NAMES {
            simple.push((
                format!("single_blocks.{i}.{a}"),
                format!("single_transformer_blocks.{i}.{c}"),
            ));
        }
    }
    for (a, b) in simple {
        for suffix in ["weight", "bias"] {
            store.move_key(&format!("{a}.{suffix}"), &format!("{b}.{suffix}"));
        }
    }
    let norm = |s: &mut WeightStore, from: &str, to: &str| -> Result<()> {
        if s.move_key(from, to) {
            Ok(())
        } else {
            Err(missing(from))
        }
    };
    for i in 0..magcache_layers::weights::count_blocks(store, "double_blocks.") {
        let (b, t) = (
            format!("double_blocks.{i}"),
            format!("transformer_blocks.{i}.attn"),
        );
        for (stream, names) in [
            ("img", ["to_q", "to_k", "to_v"]),
            ("txt", ["add_q_proj", "add_k_proj", "add_v_proj"]),
        ] {
            for suffix in ["weight", "bias"] {
                let name = format!("{b}.{stream}_attn.qkv.{suffix}");
                if !store.contains(&name) {
                    return Err(missing(&name));
                }
                let parts: Vec<(String, usize)> = names
                    .iter()
                    .map(|n| (format!("{t}.{n}.{suffix}"), d))
                    .collect();
                store.split_rows(&name, &parts)?;
            }
        }
        let block = format!("transformer_blocks.{i}");
        for (a, c) in DOUBLE_NORMS {
            norm(
                store,
                &format!("{b}.{a}.scale"),
                &format!("{block}.{c}.weight"),
            )?;
        }
    }
    for i in 0..magcache_layers::weights::count_blocks(store, "single_blocks.") {
        let (b, t) = (
            format!("single_blocks.{i}"),
            format!("single_transformer_blocks.{i}"),
        );
        for suffix in ["weight", "bias"] {
            let name = format!("{b}.linear1.{suffix}");
            let rows = store
                .shape(&name)
                .and_then(|s| s.first().copied())
                .ok_or_else(|| missing(&name))?;
            let mlp = rows.checked_sub(3 * d).ok_or_else(|| {
                Error::weights(
                    &origin,
                    &name,
                    format!("has {rows} rows; expected 3 x {d} (q, k, v) plus the MLP rows"),
                )
            })?;
            let parts: Vec<(String, usize)> = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                .iter()
                .zip([d, d, d, mlp])
                .map(|(n, r)| (format!("{t}.{n}.{suffix}"), r))
                .collect();
            store.split_rows(&name, &parts)?;
        }
        for (a, c) in SINGLE_NORMS {
            norm(store, &format!("{b}.{a}.scale"), &format!("{t}.{c}.weight"))?;
        }
    }
    final_modulation(store, d)
}

/// BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous is (scale, shift).
fn final_modulation(store: &mut WeightStore, d: usize) -> Result<()> {
    let origin = store.origin.clone();
    for suffix in ["weight", "bias"] {
        let name = format!("final_layer.adaLN_modulation.1.{suffix}");
        let (shift, scale) = (format!("{name}.shift"), format!("{name}.scale"));
        if !store.contains(&name) {
            return Err(Error::weights(
                &origin,
                &name,
                "missing from the BFL checkpoint",
            ));
        }
        store.split_rows(&name, &[(shift.clone(), d), (scale.clone(), d)])?;
        let (Some(shift), Some(scale)) = (store.take(&shift)?, store.take(&scale)?) else {
            return Err(Error::weights(&origin, &name, "expected (shift, scale)"));
        };
        store.insert(
            &format!("norm_out.linear.{suffix}"),
            Tensor::cat(&[&scale, &shift], 0)?,
        );
    }
    Ok(())
}

/// Infers a config from BFL tensors (head dim 128 and rope axes (16, 56, 56) unless overridden).
pub fn infer_bfl_config(
    store: &WeightStore,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> Result<FluxConfig> {
    let dims = |k: &str| -> Result<Vec<usize>> {
        store
            .shape(k)
            .ok_or_else(|| Error::weights(&store.origin, k, "missing from the BFL checkpoint"))
    };
    let (d, cin) = match dims("img_in.weight")?.as_slice() {
        [d, c] => (*d, *c),
        other => {
            return Err(Error::weights(
                &store.origin,
                "img_in.weight",
                format!("has shape {other:?}; expected [dim, in_channels]"),
            ))
        }
    };
    let (heads, hd) = magcache_layers::config_util::inferred_heads(d, overrides);
    Ok(FluxConfig {
        in_channels: cin,
        num_layers: magcache_layers::weights::count_blocks(store, "double_blocks."),
        num_single_layers: magcache_layers::weights::count_blocks(store, "single_blocks."),
        attention_head_dim: hd,
        num_attention_heads: heads,
        joint_attention_dim: dims("txt_in.weight")?.get(1).copied().unwrap_or(0),
        pooled_projection_dim: dims("vector_in.in_layer.weight")?
            .get(1)
            .copied()
            .unwrap_or(0),
        guidance_embeds: store.contains("guidance_in.in_layer.weight"),
        ..FluxConfig::default()
    })
}

pub struct LoadedFlux {
    pub config: FluxConfig,
    pub store: WeightStore,
    pub layout: FluxLayout,
}

/// Loads a FLUX checkpoint: a diffusers folder or file (with `config.json` beside it or given), or a
/// BFL single file (config inferred, `config.json` or overrides taking precedence).
pub fn load_flux(
    weights: &Path,
    config: Option<&Path>,
    overrides: &serde_json::Map<String, serde_json::Value>,
    cfg_file: &str,
) -> Result<LoadedFlux> {
    let gguf = magcache_layers::weights::gguf::is_gguf(weights);
    let mut store = if gguf {
        let (store, arch) = WeightStore::load_gguf(weights)?;
        magcache_layers::weights::gguf::check_architecture(
            weights,
            arch.as_deref(),
            "flux",
            "flux",
        )?;
        store
    } else {
        WeightStore::load_checkpoint(weights)?
    };
    let layout = detect_layout(&store)?;
    let dir = if weights.is_dir() {
        weights.to_path_buf()
    } else {
        weights.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    // A GGUF file's folder is a downloads folder: its config.json is read only when named.
    let cpath = config.map(Path::to_path_buf).or_else(|| {
        // A dangling link (a hub snapshot whose blob is missing) is read, and its error
        // says so, rather than taken for no config.json.
        Some(dir.join("config.json")).filter(|p| !gguf && (p.is_file() || p.is_symlink()))
    });
    let (base, obj, shown) = match &cpath {
        Some(p) => {
            let shown = p.display().to_string();
            let text = magcache_core::error::read_text(std::path::Path::new(p))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::config(&shown, "(document)", format!("invalid JSON: {e}")))?;
            let obj = v.as_object().cloned().ok_or_else(|| {
                Error::config(&shown, "(document)", "config.json is not a JSON object")
            })?;
            (FluxConfig::default(), obj, shown)
        }
        None if layout == FluxLayout::Bfl => (
            infer_bfl_config(&store, overrides)?,
            serde_json::Map::new(),
            weights.display().to_string(),
        ),
        None => {
            return Err(Error::weights(
                weights.display().to_string(),
                "(file)",
                "no config.json beside the weights; add one or set `config = \"...\"` in [model]",
            ))
        }
    };
    let mut config = if obj.is_empty() {
        // Inferred: the overrides complete it (e.g. rope axes for a small head).
        FluxConfig::from_map(base, &obj, cfg_file, overrides)?
    } else {
        FluxConfig::from_map(base, &obj, &shown, &serde_json::Map::new())?
    };
    if !overrides.is_empty() && cpath.is_some() {
        let cur = magcache_layers::config_util::to_map(&config, "FluxTransformer2DModel")?;
        config = FluxConfig::from_map(FluxConfig::default(), &cur, cfg_file, overrides)?;
    }
    if layout == FluxLayout::Bfl {
        bfl_to_diffusers(&mut store)?;
    }
    Ok(LoadedFlux {
        config,
        store,
        layout,
    })
}
