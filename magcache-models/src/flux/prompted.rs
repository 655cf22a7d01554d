//! Prompted FLUX.1 runs (`[prompt]`): from a diffusers pipeline folder as released (`model_index.json`
//! beside `tokenizer/`, `tokenizer_2/`, `text_encoder/`, `text_encoder_2/`, `transformer/`, `vae/`,
//! `scheduler/`), CLIP and T5 encode the prompt (both freed before the transformer loads), the packed
//! latents are drawn or read, and AutoencoderKL decodes, as diffusers' `FluxPipeline` does.

use super::inputs::FluxInputs;
use candle_core::{DType, Device, Tensor};
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::progress::{Stage, StageTime};
use magcache_core::{Error, Result};
use magcache_layers::autoencoder_kl::{FluxVae, FluxVaeConfig};
use magcache_layers::config_util::check_width;
use magcache_layers::packed_picture::PackedPicture;
use magcache_layers::run_basics::{text_stage, RunAt};
use magcache_layers::weights::warm;
use magcache_text::flux::FluxTextEncoders;
use std::path::{Path, PathBuf};

/// `FluxPipeline`'s defaults: 1024 x 1024 (`default_sample_size` 128 x the VAE's 8), 512 T5 tokens.
pub(crate) const DEFAULT_SIZE: usize = 1024;
pub(crate) const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;

/// What a prompted run carries from building to decoding.
pub struct Prompted {
    /// The pipeline folder, the picture's size, placement and `[vae]` tiling.
    pub picture: PackedPicture,
    /// T5's `[1, L, joint_attention_dim]`.
    pub prompt_embeds: Tensor,
    /// CLIP's pooled `[1, pooled_projection_dim]`.
    pub pooled_prompt_embeds: Tensor,
    pub stages: Vec<StageTime>,
    /// What the encoders cut of the prompt, as the pipeline warns.
    pub warnings: Vec<String>,
}

/// The pipeline folder of a prompted run: `model.weights`, a folder with `model_index.json` naming
/// a FLUX pipeline and the parts it needs.
pub fn pipeline_root(cfg: &RunConfig, file: &str, base: &Path) -> Result<PathBuf> {
    let kind = magcache_layers::config_util::PipelineKind {
        parts: &[
            "tokenizer",
            "tokenizer_2",
            "text_encoder",
            "text_encoder_2",
            "transformer",
            "vae",
        ],
        class_prefix: "Flux",
        label: "FLUX",
        example: "FluxPipeline",
    };
    let (root, _) = magcache_layers::config_util::pipeline_folder(cfg, file, base, &kind)?;
    Ok(root)
}

/// `(height, width)` in pixels, checked: multiples of the VAE factor times the 2x2 packing.
pub fn image_size(cfg: &RunConfig, file: &str, root: &Path) -> Result<(usize, usize, usize)> {
    let vae = FluxVaeConfig::read(&root.join("vae").join("config.json"))?;
    let f = vae.vae_scale_factor();
    let unit = f.saturating_mul(2);
    let height = cfg.inputs.height.unwrap_or(DEFAULT_SIZE);
    let width = cfg.inputs.width.unwrap_or(DEFAULT_SIZE);
    for (key, v) in [("inputs.height", height), ("inputs.width", width)] {
        if unit == 0 || v == 0 || !v.is_multiple_of(unit) {
            return Err(Error::config(
                file,
                key,
                format!("{v} must be a positive multiple of {unit} (the VAE's {f}x downsampling times FLUX's 2x2 packing)"),
            ));
        }
    }
    Ok((height, width, f))
}

/// The size guard's estimate of the text stage: the T5 encoder (one layer at a time with
/// `offload = "stream"`, which streams it too) and CLIP, loaded together, in the run's dtype, with
/// their activations at `prompt.max_sequence_length`.
pub fn text_footprint(
    cfg: &RunConfig,
    file: &str,
    root: &Path,
) -> Result<magcache_core::runtime::guard::Footprint> {
    let (max_len, dtype, streamed) = text_stage(cfg, file, DEFAULT_MAX_SEQUENCE_LENGTH)?;
    let bytes = dtype.size_in_bytes();
    let t5_cfg = root.join("text_encoder_2").join("config.json");
    let mut fp = magcache_text::Umt5Config::load(&root.join("text_encoder_2"))?.footprint(
        max_len,
        bytes,
        &t5_cfg.display().to_string(),
        streamed,
    );
    let clip_cfg = root.join("text_encoder").join("config.json");
    fp.parts.extend(
        magcache_text::ClipTextModelConfig::load(&root.join("text_encoder"))?
            .footprint(bytes, &clip_cfg.display().to_string())
            .parts,
    );
    Ok(fp)
}

/// Encodes the prompt with CLIP (pooled) and T5; both encoders are dropped before this returns.
pub fn encode(cfg: &RunConfig, file: &str, root: &Path) -> Result<Prompted> {
    let Some(p) = &cfg.prompt else {
        return Err(Error::msg("internal: a prompted FLUX run without [prompt]"));
    };
    if p.negative.is_some() {
        return Err(Error::config(
            file,
            "prompt.negative",
            "FLUX.1 has no negative prompt (embedded guidance, one call per step)",
        ));
    }
    let picture = PackedPicture::read((cfg, file), root, image_size(cfg, file, root)?)?;
    let max_len = p.max_sequence_length.unwrap_or(DEFAULT_MAX_SEQUENCE_LENGTH);
    // The size guard for the text stage (loaded, used and freed before the transformer).
    text_footprint(cfg, file, root)?.check(file)?;
    let streamed = magcache_core::runtime::placement::parse_offload(&cfg.model.offload, file)?
        == magcache_core::Offload::Stream;
    let stage = Stage::begin("encode text");
    let (dev, dt) = (&picture.placement.device, picture.placement.dtype);
    let key = format!("flux {:?}", (root, dt, dev, streamed, max_len, &p.text));
    let [prompt_embeds, pooled_prompt_embeds] = warm::prompt_n(key, || {
        let enc = FluxTextEncoders::load_pipeline_with(root, dev, dt, streamed)?;
        let (t5, clip) = enc.encode(&p.text, max_len)?;
        Ok([t5, clip])
    })?;
    let check = magcache_layers::stage::check_stage;
    let te2 = root.join("text_encoder_2").display().to_string();
    check(
        &prompt_embeds,
        "the text encoder",
        &format!("prompt_embeds (T5, from {te2})"),
    )?;
    let te = root.join("text_encoder").display().to_string();
    check(
        &pooled_prompt_embeds,
        "the text encoder",
        &format!("pooled_prompt_embeds (CLIP, from {te})"),
    )?;
    let (clip_cut, clip_len, t5_cut) =
        magcache_text::flux::truncated_tokens(root, &p.text, max_len)?;
    let mut warnings = Vec::new();
    if clip_cut > 0 {
        warnings.push(format!(
            "{file}: prompt.text: CLIP reads the first {clip_len} tokens; the last {clip_cut} are cut for its pooled embedding, as FluxPipeline warns"
        ));
    }
    if t5_cut > 0 {
        warnings.push(format!(
            "{file}: prompt.text: T5 reads max_sequence_length = {max_len} tokens; the last {t5_cut} are cut, as FluxPipeline warns{}",
            if max_len < 512 { " (raise prompt.max_sequence_length, up to 512)" } else { "" }
        ));
    }
    Ok(Prompted {
        picture,
        prompt_embeds,
        pooled_prompt_embeds,
        stages: vec![stage.end()],
        warnings,
    })
}

/// Packed image tokens of a prompted run (for `mu` and planning).
pub fn image_seq_len(cfg: &RunConfig, file: &str, root: &Path) -> Result<usize> {
    let (height, width, f) = image_size(cfg, file, root)?;
    Ok((height / (2 * f)).saturating_mul(width / (2 * f)))
}

/// The inputs of a prompted run: `latents_init` (packed) from `[inputs] file` or seeded random
/// latents of the image's size, packed 2x2; the encoded prompt; text ids zero, image ids `(0, r, c)`.
pub fn inputs(at: RunAt<'_>, c: &super::config::FluxConfig, p: &Prompted) -> Result<FluxInputs> {
    let file = at.1;
    let d = p.prompt_embeds.dim(2)?;
    let joint = ("joint_attention_dim", c.joint_attention_dim);
    check_width(file, "the T5 encoder", d, joint.0, joint.1)?;
    let pd = p.pooled_prompt_embeds.dim(1)?;
    let pooled = ("pooled_projection_dim", c.pooled_projection_dim);
    check_width(file, "CLIP (pooled)", pd, pooled.0, pooled.1)?;
    let n_axes = c.axes_dims_rope.len();
    let ids = |(h2, w2), l| -> Result<(Tensor, Tensor)> {
        let txt = Tensor::zeros((l, n_axes), DType::F32, &Device::Cpu)?;
        Ok((super::inputs::image_ids(h2, w2)?, txt))
    };
    let packed = p.picture.inputs(at, c.in_channels, &p.prompt_embeds, ids)?;
    let pooled = p
        .pooled_prompt_embeds
        .to_device(&p.picture.placement.device)?;
    Ok(FluxInputs { packed, pooled })
}

/// Decodes the final packed latents with the folder's VAE: `decoded` pixels `[B, H, W, 3]` in
/// [0, 1], and the embeddings the transformer received.
pub fn finish(
    p: &Prompted,
    latents: &Tensor,
    stages: &mut Vec<StageTime>,
) -> Result<magcache_core::Decoded> {
    let pixels = p.picture.decode::<FluxVae>(latents, stages)?;
    let pooled = p.pooled_prompt_embeds.clone();
    let inputs = vec![
        ("prompt_embeds".to_string(), p.prompt_embeds.clone()),
        ("pooled_prompt_embeds".to_string(), pooled),
    ];
    Ok(magcache_core::Decoded { pixels, inputs })
}
