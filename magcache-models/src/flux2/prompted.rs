//! Prompted FLUX.2 klein runs (`[prompt]`): from a `Flux2KleinPipeline` folder as released
//! (`model_index.json` beside `tokenizer/`, `text_encoder/` (Qwen3), `transformer/`, `vae/`,
//! `scheduler/`), the Qwen3 encoder embeds the prompt (and the negative prompt with CFG; freed
//! before the transformer loads), the packed latents are drawn or read, and `AutoencoderKLFlux2`
//! decodes, as diffusers' pipeline does.

use super::inputs::Flux2Inputs;
use super::vae::{Flux2Vae, Flux2VaeConfig};
use candle_core::{Device, Tensor};
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::progress::{Stage, StageTime};
use magcache_core::{Error, Result};
use magcache_layers::config_util::check_width;
use magcache_layers::packed_picture::PackedPicture;
use magcache_layers::run_basics::RunAt;
use magcache_layers::weights::warm;
use magcache_text::qwen3::Qwen3Config;
use magcache_text::qwen_chat::{QwenChatEncoder, FLUX2_CHAT, FLUX2_TEXT_LAYERS};
use std::path::{Path, PathBuf};

/// `Flux2KleinPipeline`'s defaults: 1024 x 1024, 512 text tokens, guidance 4.0 (base folders).
pub const DEFAULT_SIZE: usize = 1024;
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;
pub const DEFAULT_GUIDANCE: f64 = 4.0;

/// What a prompted run carries from building to decoding.
pub struct Prompted {
    /// The pipeline folder, the picture's size, placement and `[vae]` tiling.
    pub picture: PackedPicture,
    pub prompt_embeds: Tensor,
    /// With classifier-free guidance.
    pub negative_prompt_embeds: Option<Tensor>,
    pub stages: Vec<StageTime>,
    /// The chat template the prompt was rendered with, in words, naming its file.
    pub template: String,
}

/// The pipeline folder of a prompted run and whether it is step-distilled (`is_distilled` in
/// `model_index.json`; absent = false).
pub fn pipeline_root(cfg: &RunConfig, file: &str, base: &Path) -> Result<(PathBuf, bool)> {
    let kind = magcache_layers::config_util::PipelineKind {
        parts: &["tokenizer", "text_encoder", "transformer", "vae"],
        class_prefix: "Flux2",
        label: "FLUX.2",
        example: "Flux2KleinPipeline",
    };
    let (root, class) = magcache_layers::config_util::pipeline_folder(cfg, file, base, &kind)?;
    let index = root.join("model_index.json");
    let shown = index.display().to_string();
    if class != "Flux2KleinPipeline" {
        return Err(Error::config(
            &shown,
            "_class_name",
            format!("`{class}` is not supported (only Flux2KleinPipeline: the Qwen3 text encoder)"),
        ));
    }
    let v: serde_json::Value = serde_json::from_str(&magcache_core::error::read_text(&index)?)
        .map_err(|e| Error::config(&shown, "(document)", format!("invalid JSON: {e}")))?;
    let distilled = match v.get("is_distilled") {
        None | Some(serde_json::Value::Null) => false,
        Some(b) => b.as_bool().ok_or_else(|| {
            Error::config(
                &shown,
                "is_distilled",
                format!("expected true or false, got {b}"),
            )
        })?,
    };
    Ok((root, distilled))
}

/// `(height, width, vae factor)`, checked: at least one 2x2 patch of latents. As the pipeline does,
/// a size that is not a multiple of `2 * factor` is rounded down to one (the latent grid is
/// `2 * (height // (2 * factor))`; the picture is that grid times the factor): see [`size_warning`].
pub fn image_size(cfg: &RunConfig, file: &str, root: &Path) -> Result<(usize, usize, usize)> {
    let vae = Flux2VaeConfig::read(&root.join("vae").join("config.json"))?;
    let f = vae.vae_scale_factor();
    let unit = f.saturating_mul(2);
    let height = cfg.inputs.height.unwrap_or(DEFAULT_SIZE);
    let width = cfg.inputs.width.unwrap_or(DEFAULT_SIZE);
    for (key, v) in [("inputs.height", height), ("inputs.width", width)] {
        if unit == 0 || v < unit {
            return Err(Error::config(
                file,
                key,
                format!("{v} must be at least {unit} (the VAE's {f}x downsampling times the 2x2 packing)"),
            ));
        }
    }
    Ok((height, width, f))
}

/// The warning `Flux2KleinPipeline` gives for a size that is not a multiple of `2 * factor`: the
/// picture is rounded down.
pub fn size_warning(cfg: &RunConfig, file: &str, root: &Path) -> Result<Option<String>> {
    let (height, width, f) = image_size(cfg, file, root)?;
    Ok(magcache_layers::config_util::rounded_size_warning(
        file,
        height,
        width,
        2 * f,
    ))
}

/// Packed image tokens of a prompted run (for `mu` and planning).
pub fn image_seq_len(cfg: &RunConfig, file: &str, root: &Path) -> Result<usize> {
    let (height, width, f) = image_size(cfg, file, root)?;
    Ok((height / (2 * f)).saturating_mul(width / (2 * f)))
}

/// Whether the run uses classifier-free guidance: a base folder and `guidance_scale > 1`.
pub fn uses_cfg(cfg: &RunConfig, distilled: bool) -> bool {
    !distilled && cfg.sampling.guidance_scale.unwrap_or(DEFAULT_GUIDANCE) > 1.0
}

/// Encodes the prompt (and the negative prompt, `""` by default, with CFG); the encoder is
/// dropped before this returns.
pub fn encode(cfg: &RunConfig, file: &str, root: &Path, cfg_on: bool) -> Result<Prompted> {
    let Some(p) = &cfg.prompt else {
        return Err(Error::msg(
            "internal: a prompted FLUX.2 run without [prompt]",
        ));
    };
    let picture = PackedPicture::read((cfg, file), root, image_size(cfg, file, root)?)?;
    let max_len = p.max_sequence_length.unwrap_or(DEFAULT_MAX_SEQUENCE_LENGTH);
    if max_len == 0 {
        return Err(Error::config(
            file,
            "prompt.max_sequence_length",
            "must be at least 1",
        ));
    }
    let te = root.join("text_encoder");
    let te_cfg = te.join("config.json").display().to_string();
    let last = FLUX2_TEXT_LAYERS.iter().copied().max().unwrap_or(0);
    Qwen3Config::load(&te)?
        .footprint(
            last,
            max_len,
            picture.placement.dtype.size_in_bytes(),
            &te_cfg,
        )
        .check(file)?;
    let stage = Stage::begin("encode text");
    let (dev, dt) = (&picture.placement.device, picture.placement.dtype);
    let neg = cfg_on.then(|| p.negative.as_deref().unwrap_or(""));
    let key = format!("flux2 {:?}", (root, dt, dev, max_len, &p.text, neg));
    let ((prompt_embeds, negative_prompt_embeds), template) = warm::prompt_pair(key, || {
        let enc = QwenChatEncoder::load_pipeline(root, FLUX2_CHAT, dev, dt)?;
        let template = format!(
            "Qwen3 ChatML, one user message, thinking off (the template of {})",
            enc.template_source()
        );
        let pos = enc.encode(&p.text, max_len)?.prompt_embeds;
        let neg = neg.map(|n| enc.encode(n, max_len)).transpose()?;
        Ok(((pos, neg.map(|n| n.prompt_embeds)), template))
    })?;
    let neg = negative_prompt_embeds.as_ref();
    magcache_layers::stage::check_embeds(&prompt_embeds, neg, "Qwen3", &te)?;
    Ok(Prompted {
        picture,
        prompt_embeds,
        negative_prompt_embeds,
        stages: vec![stage.end()],
        template,
    })
}

/// Image position ids `[h2 * w2, 4]` = `(0, r, c, 0)` in row-major order.
pub fn image_ids(h2: usize, w2: usize) -> Result<Tensor> {
    let mut v = Vec::with_capacity(h2 * w2 * 4);
    for r in 0..h2 {
        for c in 0..w2 {
            v.extend([0f32, r as f32, c as f32, 0f32]);
        }
    }
    Ok(Tensor::from_vec(v, (h2 * w2, 4), &Device::Cpu)?)
}

/// Text position ids `[L, 4]` = `(0, 0, 0, l)`.
pub fn text_ids(l: usize) -> Result<Tensor> {
    let v: Vec<f32> = (0..l).flat_map(|i| [0f32, 0.0, 0.0, i as f32]).collect();
    Ok(Tensor::from_vec(v, (l, 4), &Device::Cpu)?)
}

/// The inputs of a prompted run: `latents_init` (packed) from `[inputs] file` or seeded random
/// latents of the image's size; the encoded prompt(s); the position ids.
pub fn inputs(at: RunAt<'_>, c: &super::config::Flux2Config, p: &Prompted) -> Result<Flux2Inputs> {
    let file = at.1;
    let d = p.prompt_embeds.dim(2)?;
    let what = "the text encoder (3 layers x hidden)";
    check_width(file, what, d, "joint_attention_dim", c.joint_attention_dim)?;
    if c.axes_dims_rope.len() != 4 {
        return Err(Error::config(
            file,
            "model.weights",
            format!(
                "the transformer has {} RoPE axes; FLUX.2's position ids have 4",
                c.axes_dims_rope.len()
            ),
        ));
    }
    let ids = |(h2, w2), l| Ok((image_ids(h2, w2)?, text_ids(l)?));
    let packed = p.picture.inputs(at, c.in_channels, &p.prompt_embeds, ids)?;
    let dev = &p.picture.placement.device;
    let neg_ctx = p.negative_prompt_embeds.as_ref().map(|n| n.to_device(dev));
    Ok(Flux2Inputs {
        packed,
        neg_ctx: neg_ctx.transpose()?,
    })
}

/// Decodes the final packed latents with the folder's VAE: `decoded` `[B, H, W, 3]` in [0, 1], and
/// the embeddings the transformer received.
pub fn finish(
    p: &Prompted,
    latents: &Tensor,
    stages: &mut Vec<StageTime>,
) -> Result<magcache_core::Decoded> {
    let pixels = p.picture.decode::<Flux2Vae>(latents, stages)?;
    let mut inputs = vec![("prompt_embeds".to_string(), p.prompt_embeds.clone())];
    if let Some(n) = &p.negative_prompt_embeds {
        inputs.push(("negative_prompt_embeds".to_string(), n.clone()));
    }
    Ok(magcache_core::Decoded { pixels, inputs })
}
