//! Prompted Wan runs (`[prompt]`): from a diffusers pipeline folder as released (`model_index.json`
//! beside `tokenizer/`, `text_encoder/`, `transformer/` (+ `transformer_2/`), `vae/`, `scheduler/`),
//! the prompts are encoded by UMT5 (freed before the transformer loads), the latents drawn or read,
//! and the final latents decoded by the Wan VAE, as diffusers' `WanPipeline` does. Image-to-video
//! folders (`WanImageToVideoPipeline`, and TI2V-5B's `expand_timesteps`) add the image stage of
//! [`super::i2v`] between the text encoder and the transformers.

use super::i2v::{ImageCondition, PipelineIndex};
use super::inputs::WanInputs;
use super::keys::WanKeys;
use super::model::WanModel;
use candle_core::Tensor;
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::progress::{Stage, StageTime};
use magcache_core::{Error, Placement, Result};
use magcache_layers::autoencoder_kl_wan::{WanVae, WanVaeConfig};
use magcache_layers::config_util::resolve;
use magcache_layers::inputs::InputFile;
use magcache_layers::stage::decode_stage;
use magcache_layers::weights::warm;
use magcache_text::WanTextEncoder;
use std::path::{Path, PathBuf};

/// The pipeline's defaults (`WanPipeline.__call__`).
pub(crate) const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;

/// What a prompted run carries from building to decoding.
pub struct Prompted {
    pub root: PathBuf,
    pub prompt_embeds: Tensor,
    /// With classifier-free guidance.
    pub negative_prompt_embeds: Option<Tensor>,
    /// Image runs with a CLIP image encoder (Wan2.1 I2V): `[1, tokens, hidden]`.
    pub image_embeds: Option<Tensor>,
    /// Image runs: the encoded first frame as the transformer's calls take it.
    pub image: Option<ImageCondition>,
    pub placement: Placement,
    pub stages: Vec<StageTime>,
    /// `[vae] tiling` (checked against the folder's VAE).
    pub vae_tiling: Option<magcache_layers::autoencoder_kl_wan::VaeTiling>,
}

/// The pipeline folder of a prompted run: `model.weights`, a folder with `model_index.json` naming
/// a Wan pipeline, and what its index says. An image-to-video folder needs `[inputs] image` (TI2V's
/// `expand_timesteps` folder runs text-to-video without one); a text-to-video folder takes none.
pub fn pipeline_root(
    cfg: &RunConfig,
    keys: &WanKeys,
    file: &str,
    base: &Path,
) -> Result<(PathBuf, PipelineIndex)> {
    let kind = magcache_layers::config_util::PipelineKind {
        parts: &["tokenizer", "text_encoder", "transformer", "vae"],
        class_prefix: "Wan",
        label: "Wan",
        example: "WanPipeline, ...",
    };
    let (root, _) = magcache_layers::config_util::pipeline_folder(cfg, file, base, &kind)?;
    let index = PipelineIndex::read(&root)?;
    let image = &keys.inputs.image;
    let shown = root.join("model_index.json").display().to_string();
    match (&image, index.is_image_to_video() || index.expand_timesteps) {
        (Some(_), false) => {
            return Err(Error::config(
                file,
                "inputs.image",
                format!(
                    "the pipeline folder is text-to-video (`{}` in {shown}, no expand_timesteps): it takes no image",
                    index.class
                ),
            ))
        }
        (None, true) if !index.expand_timesteps => {
            return Err(Error::config(
                file,
                "inputs.image",
                format!(
                    "missing: `{}` ({shown}) is an image-to-video pipeline; give the first frame (PNG or JPEG)",
                    index.class
                ),
            ))
        }
        _ => {}
    }
    Ok((root, index))
}

/// The image stage of an image run (a no-op without `[inputs] image`): CLIP embeddings when
/// `clip_needed` (the transformer has `image_dim`), and the VAE-encoded condition.
pub fn encode_image(
    (cfg, keys, file): (&RunConfig, &WanKeys, &str),
    base: &Path,
    index: &PipelineIndex,
    clip_needed: bool,
    p: &mut Prompted,
) -> Result<()> {
    let Some(img) = super::i2v::read_image(keys, file, base)? else {
        return Ok(());
    };
    let e = super::i2v::encode_image(
        (cfg, keys, file),
        (&p.root, index),
        &img,
        clip_needed,
        &p.placement,
        p.vae_tiling,
    )?;
    p.image_embeds = e.image_embeds;
    p.image = Some(e.condition);
    p.stages.extend(e.stages);
    Ok(())
}

/// The size guard's estimate of the text stage: the UMT5 encoder's weights in the run's dtype (the
/// embedding and two layers when `offload = "stream"`, which streams it too) and its activations at
/// `prompt.max_sequence_length`.
pub fn text_footprint(
    cfg: &RunConfig,
    file: &str,
    root: &Path,
) -> Result<magcache_core::runtime::guard::Footprint> {
    let (max_len, dtype, streamed) =
        magcache_layers::run_basics::text_stage(cfg, file, DEFAULT_MAX_SEQUENCE_LENGTH)?;
    let te_cfg = root.join("text_encoder").join("config.json");
    Ok(
        magcache_text::Umt5Config::load(&root.join("text_encoder"))?.footprint(
            max_len,
            dtype.size_in_bytes(),
            &te_cfg.display().to_string(),
            streamed,
        ),
    )
}

/// Encodes the prompt (and, with guidance, the negative prompt) with the folder's tokenizer and
/// UMT5 encoder; the encoder is dropped before this returns (the size guard checked the stage's
/// [`text_footprint`] before the run began).
pub fn encode(
    (cfg, keys, file): (&RunConfig, &WanKeys, &str),
    root: &Path,
    guidance: bool,
) -> Result<Prompted> {
    // An image conditions the run: `WanImageToVideoPipeline`, whose prompt cleaning runs ftfy.
    let ftfy = keys.inputs.image.is_some();
    let Some(p) = &cfg.prompt else {
        return Err(Error::msg("internal: a prompted Wan run without [prompt]"));
    };
    let placement = cfg.model.placement(file)?;
    let max_len = p.max_sequence_length.unwrap_or(DEFAULT_MAX_SEQUENCE_LENGTH);
    let vae_tiling = super::keys::vae_tiling(keys, file, root)?;
    let streamed = magcache_core::runtime::placement::parse_offload(&cfg.model.offload, file)?
        == magcache_core::Offload::Stream;
    let stage = Stage::begin("encode text");
    let (dev, dt) = (&placement.device, placement.dtype);
    let neg = guidance.then(|| p.negative.as_deref().unwrap_or(""));
    let key = format!(
        "wan {:?}",
        (root, dt, dev, streamed, max_len, &p.text, neg, ftfy)
    );
    let ((prompt_embeds, negative_prompt_embeds), _) = warm::prompt_pair(key, || {
        let enc = WanTextEncoder::load_pipeline_with(root, dev, dt, streamed)?.with_ftfy(ftfy);
        let (pos, _) = enc.encode(&p.text, max_len)?;
        let neg = neg.map(|n| enc.encode(n, max_len)).transpose()?;
        Ok(((pos, neg.map(|n| n.0)), String::new()))
    })?;
    let (te, neg) = (root.join("text_encoder"), negative_prompt_embeds.as_ref());
    magcache_layers::stage::check_embeds(&prompt_embeds, neg, "UMT5", &te)?;
    Ok(Prompted {
        root: root.to_path_buf(),
        prompt_embeds,
        negative_prompt_embeds,
        image_embeds: None,
        image: None,
        placement,
        stages: vec![stage.end()],
        vae_tiling,
    })
}

/// The latents' shape `[1, z_dim, F, h, w]` of a prompted run's video (height, width and frames,
/// the pipeline's defaults where absent) through the VAE's factors; the sizes checked against the
/// VAE's and the transformer's grids.
pub(super) fn latent_shape(
    (cfg, keys, file): (&RunConfig, &WanKeys, &str),
    c: &super::config::WanConfig,
    vae_cfg: &WanVaeConfig,
) -> Result<([usize; 5], (usize, usize, usize))> {
    let (ss, ts) = (vae_cfg.spatial_scale(), vae_cfg.temporal_scale());
    let (height, width, frames) = super::i2v::video_size(cfg, keys);
    let unit = ss.saturating_mul(c.patch_size[1].max(c.patch_size[2]));
    for (key, v) in [("inputs.height", height), ("inputs.width", width)] {
        if unit == 0 || v % unit != 0 {
            return Err(Error::config(
                file,
                key,
                format!("{v} must be a multiple of {unit} (the VAE's {ss}x downsampling times the transformer's patch)"),
            ));
        }
    }
    if ts == 0 || frames == 0 || !(frames - 1).is_multiple_of(ts) {
        return Err(Error::config(
            file,
            "inputs.num_frames",
            format!("{frames} must be 1 + {ts}k (the VAE compresses {ts} frames into one latent frame after the first)"),
        ));
    }
    let lat_frames = (frames - 1) / ts + 1;
    let shape = [1, vae_cfg.z_dim, lat_frames, height / ss, width / ss];
    Ok((shape, (height, width, frames)))
}

/// The VAE's latent channels against the transformer's in/out channels (`extra`: the image
/// condition's channels of an image-to-video run).
fn check_channels(
    file: &str,
    c: &super::config::WanConfig,
    z_dim: usize,
    extra: usize,
) -> Result<()> {
    if z_dim == c.out_channels && c.in_channels == c.out_channels + extra {
        return Ok(());
    }
    let what = if extra > 0 {
        format!("image-to-video needs in = out + {extra} (the mask and image latent channels)")
    } else if c.in_channels > c.out_channels {
        "this transformer takes image-conditioned input (in > out channels): give `[inputs] image`"
            .to_string()
    } else {
        "text-to-video needs them equal".to_string()
    };
    Err(Error::config(
        file,
        "model.weights",
        format!(
            "the VAE's z_dim {z_dim} does not match the transformer's in/out channels {}/{} ({what})",
            c.in_channels, c.out_channels
        ),
    ))
}

/// The inputs of a prompted run: `latents_init` from `[inputs] file` or seeded random latents of the
/// size `height x width x num_frames` gives through the VAE's scale factors, checked against the
/// transformer; the encoded prompts as conditioning.
pub fn inputs(
    (cfg, keys, file): (&RunConfig, &WanKeys, &str),
    base: &Path,
    model: &WanModel,
    p: &Prompted,
) -> Result<WanInputs> {
    let vae_cfg = WanVaeConfig::read(&p.root.join("vae").join("config.json"))?;
    let c = &model.cfg;
    let (shape, (height, width, frames)) = latent_shape((cfg, keys, file), c, &vae_cfg)?;
    let extra = match &p.image {
        Some(ImageCondition::Concat(t)) => t.dim(1)?,
        _ => 0,
    };
    check_channels(file, c, vae_cfg.z_dim, extra)?;
    if model.takes_image() != p.image_embeds.is_some() {
        return Err(Error::config(
            file,
            "inputs.image",
            "the transformer's image attention (image_dim) needs the image's CLIP embeddings (give `[inputs] image`)",
        ));
    }
    let dev = &p.placement.device;
    let latents = match &cfg.inputs.file {
        Some(f) => {
            let inp = InputFile::load(&resolve(base, f))?;
            let l = inp.get("latents_init", 5, "[B, C, F, h, w]")?;
            if l.dims() != shape {
                return Err(Error::inputs(
                    &inp.path,
                    "latents_init",
                    format!(
                        "has shape {:?}; height {height}, width {width}, num_frames {frames} give {shape:?}",
                        l.dims()
                    ),
                ));
            }
            l
        }
        None => magcache_layers::random::randn_for(
            file,
            "inputs.height/width/num_frames",
            cfg.inputs.seed.unwrap_or(cfg.model.seed),
            &shape,
        )?,
    };
    let text_dim = p.prompt_embeds.dim(2)?;
    let what = "the text encoder";
    magcache_layers::config_util::check_width(file, what, text_dim, "text_dim", c.text_dim)?;
    let (condition, first_frame) = match &p.image {
        Some(ImageCondition::Concat(t)) => (Some(t.clone()), None),
        Some(ImageCondition::FirstFrame(t)) => (None, Some(t.clone())),
        None => (None, None),
    };
    for (name, t) in [("condition", &condition), ("first_frame", &first_frame)] {
        if let Some(t) = t {
            let (_, _, f, h, w) = t.dims5()?;
            let want_f = if name == "first_frame" { 1 } else { shape[2] };
            if (f, h, w) != (want_f, shape[3], shape[4]) {
                return Err(Error::msg(format!(
                    "internal: the image condition has shape {:?} for latents {shape:?}",
                    t.dims()
                )));
            }
        }
    }
    WanInputs {
        latents,
        cond: p.prompt_embeds.clone(),
        uncond: p.negative_prompt_embeds.clone(),
        condition,
        first_frame,
        image: p.image_embeds.clone(),
    }
    .to_device(dev)
}

/// Decodes the final latents with the folder's VAE: `decoded` pixels `[B, F, H, W, 3]` in [0, 1] and
/// the embeddings the transformer received.
pub fn finish(p: &mut Prompted, latents: &Tensor) -> Result<magcache_core::Decoded> {
    let decoded = decode_stage(&mut p.stages, &p.root.join("vae"), |dir| {
        let mut vae = WanVae::load(dir, &p.placement.device, p.placement.dtype)?;
        vae.set_tiling(p.vae_tiling)?;
        vae.decode_latents(latents)
    })?;
    let mut inputs = vec![("prompt_embeds".to_string(), p.prompt_embeds.clone())];
    if let Some(n) = &p.negative_prompt_embeds {
        inputs.push(("negative_prompt_embeds".to_string(), n.clone()));
    }
    if let Some(e) = &p.image_embeds {
        inputs.push(("image_embeds".to_string(), e.clone()));
    }
    if let Some(c) = &p.image {
        inputs.push(("condition".to_string(), c.tensor().clone()));
    }
    Ok(magcache_core::Decoded {
        pixels: decoded,
        inputs,
    })
}
