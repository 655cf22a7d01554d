//! The `flux2` family: presets, the footprint, building a pipeline or a plan from a run file,
//! preset export, and the registrations.

use super::config::{Flux2Config, FLUX2_CLASS};
use super::pipeline::Flux2Inputs;
use super::prompted::{self, image_ids, text_ids};
use candle_core::Tensor;
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::guard::Footprint;
use magcache_core::{Error, Indicator, ModelInfo, Result};
use magcache_layers::config_util::ModelConfig;
use magcache_layers::config_util::{overrides_json, resolve, to_map};
use magcache_layers::dit::PackedInputs;
use magcache_layers::footprint::{add_plan, attention_bytes, sz, weights_bytes, Sz};
use magcache_layers::inputs::InputFile;
use magcache_layers::random::randn_for;
use std::path::Path;

pub struct Flux2Preset {
    pub name: &'static str,
    pub config: fn() -> Flux2Config,
    /// Step-distilled (one call per step) or base (classifier-free guidance).
    pub distilled: bool,
}

fn klein_4b() -> Flux2Config {
    Flux2Config::default()
}
/// FLUX.2-dev (32B): 8 double and 48 single blocks of width 6144, Mistral-3 text (3 x 5120),
/// embedded guidance.
fn dev() -> Flux2Config {
    Flux2Config {
        num_layers: 8,
        num_single_layers: 48,
        num_attention_heads: 48,
        joint_attention_dim: 15360,
        guidance_embeds: true,
        ..Flux2Config::default()
    }
}

pub const FLUX2_PRESETS: &[Flux2Preset] = &[
    Flux2Preset {
        name: "flux2-klein-4b",
        config: klein_4b,
        distilled: true,
    },
    Flux2Preset {
        name: "flux2-klein-base-4b",
        config: klein_4b,
        distilled: false,
    },
    Flux2Preset {
        name: "flux2-dev",
        config: dev,
        distilled: true,
    },
];

pub(super) fn preset(cfg: &RunConfig, file: &str) -> Result<&'static Flux2Preset> {
    let name = magcache_layers::config_util::preset_name(cfg, file)?;
    FLUX2_PRESETS
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| {
            let known: Vec<&str> = FLUX2_PRESETS.iter().map(|p| p.name).collect();
            Error::config(
                file,
                "model.preset",
                format!(
                    "unknown preset `{name}` for family `flux2` (known: {})",
                    known.join(", ")
                ),
            )
        })
}

pub(super) fn preset_config(p: &Flux2Preset, cfg: &RunConfig, file: &str) -> Result<Flux2Config> {
    let base = to_map(&(p.config)(), FLUX2_CLASS)?;
    Flux2Config::from_map(Flux2Config::default(), &base, file, &overrides_json(cfg))
}

/// What strategies may know of a FLUX.2 run: no published curves or coefficients yet (MagCache
/// takes `mag_ratios` or a calibration profile, TeaCache `coefficients`), and TeaCache's indicator,
/// the first double block's modulated input, as on FLUX.1.
pub fn flux2_info(variant: Option<&str>) -> ModelInfo {
    let mut info = ModelInfo {
        family: "flux2".into(),
        variant: variant.map(String::from),
        indicators: vec![Indicator::TimestepEmbedding, Indicator::ModulatedInput],
        ..Default::default()
    };
    if let Ok(t) =
        crate::published::teacache(None, Indicator::ModulatedInput, Indicator::ModulatedInput)
    {
        info.published.insert("teacache".into(), t);
    }
    info
}

/// Parameters of a FLUX.2 transformer (no biases).
pub fn flux2_params(c: &Flux2Config) -> Sz {
    let d = sz(c.inner_dim());
    let (tc, mlp) = (sz(c.timestep_guidance_channels), sz(c.mlp_hidden()));
    let hd = sz(c.attention_head_dim);
    let embed = if c.guidance_embeds { sz(2) } else { sz(1) };
    let top = d * sz(c.in_channels)
        + d * sz(c.joint_attention_dim)
        + embed * (d * tc + d * d)
        + d * d * sz(6 + 6 + 3 + 2)
        + d * sz(c.out_channels());
    let double = d * d * sz(8) + (mlp * sz(3) * d) * sz(2) + hd * sz(4);
    let single = d * (d * sz(3) + mlp * sz(2)) + d * (d + mlp) + hd * sz(2);
    top + sz(c.num_layers) * double + sz(c.num_single_layers) * single
}

/// What a FLUX.2 run holds: the transformer (or, streamed, the rest and two blocks), the plan, and
/// the activations of one call on `(batch, image tokens, text tokens)`.
pub(super) fn footprint(
    cfg: &RunConfig,
    c: &Flux2Config,
    knob: String,
    dims: Option<(usize, usize, usize)>,
) -> Footprint {
    let mut fp = Footprint::default();
    let streamed = magcache_core::runtime::placement::parse_offload(&cfg.model.offload, "")
        .is_ok_and(|o| o == magcache_core::Offload::Stream);
    if streamed {
        let two = c.num_layers.min(2);
        let held = flux2_params(&Flux2Config {
            num_layers: two,
            num_single_layers: 2 - two,
            ..c.clone()
        });
        fp.add_streamed(
            "streamed weights (embeddings, head, two blocks)",
            knob,
            weights_bytes(held, &cfg.model.dtype).0,
        );
    } else {
        fp.add(
            "weights",
            knob,
            weights_bytes(flux2_params(c), &cfg.model.dtype).0,
        );
    }
    add_plan(&mut fp, cfg.sampling.steps, 2);
    if let Some((b, s, l)) = dims {
        let d = sz(c.inner_dim());
        let joint = s.saturating_add(l);
        let per_token = (sz(12) * d + sz(c.mlp_hidden()) * sz(6)) * sz(4);
        let acts = sz(b) * sz(joint) * per_token
            + attention_bytes(&cfg.model.device, b, c.num_attention_heads, joint, joint)
            + sz(b) * sz(s) * sz(c.in_channels) * sz(8) * sz(4);
        fp.add("activations", "inputs.height/width", acts.0);
        fp.add(
            "cache",
            "inputs.height/width",
            (sz(3) * sz(b) * sz(joint) * d * sz(4)).0,
        );
    }
    fp
}

/// The inputs of a run without `[prompt]`: `[inputs] file` (`latents_init` [B, seq, C],
/// `prompt_embeds` [B, L, joint], `img_ids` [seq, 4], optional `negative_prompt_embeds`), or seeded
/// random ones (`latent_shape` = [B, C/4, H, W] unpacked latents, `text_len` rows).
pub(super) fn plain_inputs(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    c: &Flux2Config,
    cfg_on: bool,
) -> Result<Flux2Inputs> {
    let joint = c.joint_attention_dim;
    if let Some(f) = &cfg.inputs.file {
        let inp = InputFile::load(&resolve(base, f))?;
        let lat = inp.get("latents_init", 3, "[B, seq, C] packed latents")?;
        let (b, seq, ch) = lat.dims3()?;
        if ch != c.in_channels {
            return Err(Error::inputs(
                &inp.path,
                "latents_init",
                format!("has {ch} channels; the model takes {}", c.in_channels),
            ));
        }
        let emb = |name: &str| -> Result<Tensor> {
            let t = inp.get(name, 3, &format!("[B, L, {joint}] text embeddings"))?;
            if t.dim(0)? != b || t.dim(2)? != joint {
                return Err(Error::inputs(
                    &inp.path,
                    name,
                    format!("has shape {:?}; expected [{b}, L, {joint}]", t.dims()),
                ));
            }
            Ok(t)
        };
        let ctx = emb("prompt_embeds")?;
        let neg_ctx = if cfg_on && inp.has("negative_prompt_embeds") {
            Some(emb("negative_prompt_embeds")?)
        } else {
            None
        };
        let img_ids = inp.get("img_ids", 2, "[seq, 4] position ids")?;
        if img_ids.dims() != [seq, 4] {
            return Err(Error::inputs(
                &inp.path,
                "img_ids",
                format!("has shape {:?}; expected [{seq}, 4]", img_ids.dims()),
            ));
        }
        let txt_ids = text_ids(ctx.dim(1)?)?;
        let packed = PackedInputs {
            latents: lat,
            ctx,
            img_ids,
            txt_ids,
        };
        return Ok(Flux2Inputs { packed, neg_ctx });
    }
    let (seed, shape) = magcache_layers::inputs::drawn(cfg, &[1, c.in_channels / 4, 128, 128]);
    let (b, h, w) =
        magcache_layers::inputs::packed_drawn_shape(&shape, c.in_channels, "FLUX.2", file)?;
    let (h2, w2) = (h / 2, w / 2);
    let l = cfg.inputs.text_len.unwrap_or(512);
    let text = |k: u64| {
        randn_for(
            file,
            "inputs.text_len",
            seed.wrapping_add(k),
            &[b, l, joint],
        )
    };
    Ok(Flux2Inputs {
        packed: PackedInputs {
            latents: randn_for(
                file,
                "inputs.latent_shape",
                seed.wrapping_add(1),
                &[b, h2.saturating_mul(w2), c.in_channels],
            )?,
            ctx: text(2)?,
            img_ids: image_ids(h2, w2)?,
            txt_ids: text_ids(l)?,
        },
        neg_ctx: if cfg_on { Some(text(3)?) } else { None },
    })
}

/// `(batch, image tokens, text tokens)` a run will see, from the run file and headers only.
pub(super) fn run_dims(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    c: &Flux2Config,
) -> Option<(usize, usize, usize)> {
    let l = cfg
        .prompt
        .as_ref()
        .map(|p| {
            p.max_sequence_length
                .unwrap_or(prompted::DEFAULT_MAX_SEQUENCE_LENGTH)
        })
        .or(cfg.inputs.text_len)
        .unwrap_or(512);
    if cfg.prompt.is_some() {
        let (root, _) = prompted::pipeline_root(cfg, file, base).ok()?;
        return Some((1, prompted::image_seq_len(cfg, file, &root).ok()?, l));
    }
    match &cfg.inputs.file {
        Some(f) => {
            let s = magcache_layers::footprint::safetensors_shapes(&resolve(base, f))?;
            match (
                s.get("latents_init")?.as_slice(),
                s.get("prompt_embeds")?.as_slice(),
            ) {
                (&[b, seq, _], &[_, l, _]) => Some((b, seq, l)),
                _ => None,
            }
        }
        None => {
            let (_, shape) = magcache_layers::inputs::drawn(cfg, &[1, c.in_channels / 4, 128, 128]);
            match shape.as_slice() {
                &[b, _, h, w] => Some((b, (h / 2).saturating_mul(w / 2), l)),
                _ => None,
            }
        }
    }
}

/// The run's description, saying which chat template rendered the prompt (checked when the text
/// encoder loaded).
pub(super) fn with_template(desc: String, prompted: Option<&prompted::Prompted>) -> String {
    match prompted {
        Some(p) => format!("{desc}; prompt rendered as {}", p.template),
        None => desc,
    }
}

/// Whether the run's folder is distilled (prompted: `model_index.json`; presets: the preset; a
/// transformer folder without a pipeline: distilled unless the inputs give negative embeddings).
pub(super) fn distilled(cfg: &RunConfig, file: &str, base: &Path) -> Result<bool> {
    if cfg.prompt.is_some() {
        return Ok(prompted::pipeline_root(cfg, file, base)?.1);
    }
    if cfg.model.weights.is_none() {
        return Ok(preset(cfg, file)?.distilled);
    }
    Ok(match &cfg.inputs.file {
        Some(f) => !InputFile::load(&resolve(base, f))?.has("negative_prompt_embeds"),
        None => true,
    })
}
