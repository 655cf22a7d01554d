//! Image-to-video Wan runs (`[inputs] image`): what the pipeline folder's `model_index.json` says
//! (`boundary_ratio`, `expand_timesteps`, the image encoder), and the image stage that runs after
//! the text encoder and before the transformers load: CLIP image embeddings (Wan2.1 I2V) and the
//! VAE-encoded condition, as diffusers' `WanImageToVideoPipeline` builds them.
//!
//! - Wan2.1 I2V / Wan2.2 I2V-A14B: `video = [image, zeros x (num_frames - 1)]` in [-1, 1] -> VAE
//!   posterior mean -> `(mean - latents_mean) / latents_std` `[1, z, F, h, w]`; the mask `[1, 4, F,
//!   h, w]` (the VAE's temporal factor of channels) is 1 on latent frame 0; the condition is
//!   `[mask ; latent]` along the channels, concatenated to the latents at every call.
//! - Wan2.2 TI2V-5B (`expand_timesteps`): the normalised latent of the image alone `[1, z, 1, h, w]`
//!   replaces latent frame 0 at every call (timestep 0 on its tokens) and in the result.

use super::image_encoder::{ClipImageProcessor, ClipVisionConfig, ClipVisionEncoder};
use super::keys::WanKeys;
use candle_core::{DType, Tensor};
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::guard::Footprint;
use magcache_core::runtime::progress::{Stage, StageTime};
use magcache_core::{Error, Placement, Result};
use magcache_layers::autoencoder_kl_wan::{WanVae, WanVaeConfig};
use magcache_layers::config_util::{component, resolve};
use magcache_layers::footprint::{sz, Sz};
use magcache_layers::picture::{load_rgb8, resize, Filter, Rgb8};
use serde_json::Value;
use std::path::Path;

/// What a Wan pipeline folder's `model_index.json` says about image conditioning.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineIndex {
    /// `_class_name` (`WanPipeline`, `WanImageToVideoPipeline`, ...).
    pub class: String,
    /// The expert boundary (Wan2.2 A14B); absent or null: none.
    pub boundary_ratio: Option<f64>,
    /// One timestep per token, the first latent frame the image (Wan2.2 TI2V-5B); default false.
    pub expand_timesteps: bool,
    /// `image_encoder` names a component (Wan2.1 I2V's CLIP).
    pub image_encoder: bool,
}

impl PipelineIndex {
    /// Reads `root/model_index.json`; errors name the file and the key. A speech-to-video folder
    /// (Wan2.2 S2V-14B) is refused here.
    pub fn read(root: &Path) -> Result<PipelineIndex> {
        let path = root.join("model_index.json");
        let shown = path.display().to_string();
        let text = magcache_core::error::read_text(&path)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&shown, "(document)", format!("invalid JSON: {e}")))?;
        let class = magcache_layers::config_util::pipeline_class(&v).to_string();
        let names = |k: &str| component(&v, &shown, k).map(|c| c.is_some());
        let mut audio = None;
        for k in ["audio_encoder", "audio_processor"] {
            if names(k)? {
                audio = audio.or(Some(k));
            }
        }
        if class.contains("SpeechToVideo") || class.contains("S2V") || audio.is_some() {
            let key = match audio {
                Some(k) if !class.contains("SpeechToVideo") && !class.contains("S2V") => k,
                _ => "_class_name",
            };
            return Err(Error::config(
                &shown,
                key,
                format!("`{class}` is a speech-to-video pipeline (Wan2.2 S2V-14B: wav2vec2 audio conditioning), which is not supported; text-to-video and image-to-video Wan folders are"),
            ));
        }
        // The tokenizer this runner implements for Wan folders is T5's (a SentencePiece unigram
        // model in `tokenizer.json`); another class named here would tokenize differently.
        if let Some(Value::Array(a)) = v.get("tokenizer") {
            let tok = a.get(1).and_then(|c| c.as_str()).unwrap_or("");
            if !matches!(tok, "T5TokenizerFast" | "T5Tokenizer") {
                return Err(Error::config(
                    &shown,
                    "tokenizer",
                    format!("`{tok}` is not a tokenizer class this runner implements for Wan folders (T5TokenizerFast, T5Tokenizer)"),
                ));
            }
        }
        let boundary_ratio =
            match v.get("boundary_ratio") {
                None | Some(Value::Null) => None,
                Some(b) => Some(b.as_f64().filter(|b| (0.0..=1.0).contains(b)).ok_or_else(
                    || {
                        Error::config(
                            &shown,
                            "boundary_ratio",
                            format!("{b}: expected a number in [0, 1] or null"),
                        )
                    },
                )?),
            };
        let expand_timesteps = match v.get("expand_timesteps") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(o) => {
                return Err(Error::config(
                    &shown,
                    "expand_timesteps",
                    format!("{o}: expected true or false"),
                ))
            }
        };
        Ok(PipelineIndex {
            image_encoder: names("image_encoder")?,
            class,
            boundary_ratio,
            expand_timesteps,
        })
    }

    /// An image-to-video class (`WanImageToVideoPipeline`).
    pub fn is_image_to_video(&self) -> bool {
        self.class.contains("ImageToVideo")
    }
}

/// How the encoded image enters the transformer's calls.
#[derive(Clone, Debug)]
pub enum ImageCondition {
    /// `[B, 4 + z, F, h, w]` (mask, then latent) concatenated to the latents along the channels.
    Concat(Tensor),
    /// `[B, z, 1, h, w]`: latent frame 0 (TI2V, `expand_timesteps`).
    FirstFrame(Tensor),
}

impl ImageCondition {
    /// The tensor a run's `--out` holds as `condition`.
    pub fn tensor(&self) -> &Tensor {
        match self {
            ImageCondition::Concat(t) | ImageCondition::FirstFrame(t) => t,
        }
    }
}

/// What the image stage gives the run.
pub struct EncodedImage {
    /// `hidden_states[-2]` of the CLIP image encoder `[1, tokens, hidden]` (Wan2.1 I2V).
    pub image_embeds: Option<Tensor>,
    pub condition: ImageCondition,
    pub stages: Vec<StageTime>,
}

/// The size of a prompted run's video: `(height, width, num_frames)` with the pipeline's defaults.
pub fn video_size(cfg: &RunConfig, keys: &WanKeys) -> (usize, usize, usize) {
    (
        cfg.inputs.height.unwrap_or(super::keys::DEFAULT_HEIGHT),
        cfg.inputs.width.unwrap_or(super::keys::DEFAULT_WIDTH),
        keys.inputs
            .num_frames
            .unwrap_or(super::keys::DEFAULT_FRAMES),
    )
}

/// The size guard of the image stage: the CLIP encoder (weights and activations) when it runs, and
/// the VAE encode (its weights, the conditioning video, one chunk's activations).
pub fn image_stage_footprint(
    root: &Path,
    vae: &WanVaeConfig,
    clip: Option<&ClipVisionConfig>,
    size: (usize, usize, usize),
    expand_timesteps: bool,
    dtype: &str,
    tiling: Option<magcache_layers::autoencoder_kl_wan::VaeTiling>,
) -> Footprint {
    let mut fp = Footprint::default();
    let dbytes = sz(magcache_layers::footprint::dtype_bytes(dtype));
    let f32b = sz(4);
    if let Some(c) = clip {
        let d = sz(c.hidden_size);
        let t = sz(c.tokens());
        let acts = t * (d * sz(8) + sz(c.intermediate_size) * sz(2))
            + sz(c.num_attention_heads) * t * t * sz(2);
        fp.add(
            "image encoder weights",
            format!(
                "{}: num_hidden_layers, hidden_size, intermediate_size",
                root.join("image_encoder").join("config.json").display()
            ),
            (Sz(Some(c.params_used())) * dbytes).0,
        );
        fp.add(
            "image encoder activations",
            "image_encoder/config.json: image_size",
            (acts * f32b).0,
        );
    }
    let (h, w, f) = size;
    let frames = if expand_timesteps { 1 } else { f };
    let vae_files: u64 = std::fs::read_dir(root.join("vae"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .sum()
        })
        .unwrap_or(0);
    fp.add("VAE weights (encode)", "vae/", Some(vae_files));
    let video = sz(3) * sz(frames) * sz(h) * sz(w) * f32b;
    // Tiled (diffusers' rule: a side larger than one tile, in patchified pixels), a chunk covers
    // one tile.
    let p = vae.patch_size.max(1);
    let (ch, cw) = match tiling {
        Some(t) if h / p > t.tile_sample_min_height || w / p > t.tile_sample_min_width => (
            h.min(t.tile_sample_min_height * p),
            w.min(t.tile_sample_min_width * p),
        ),
        _ => (h, w),
    };
    // One chunk: 4 frames (plus the 2 cached) at full resolution, base_dim wide, a few live copies.
    let chunk = sz(6) * sz(ch) * sz(cw) * sz(vae.base_dim.max(1)) * sz(6) * f32b;
    fp.add(
        "VAE encode of the image (video and one chunk)",
        if tiling.is_some() {
            "inputs.height/width/num_frames"
        } else {
            "vae.tiling"
        },
        (video + chunk).0,
    );
    if tiling.is_none() {
        fp.advise("set `tiling = true` in [vae] (the encode then works on 256x256 tiles) or make inputs.height/width/num_frames smaller");
    }
    fp
}

/// Reads `[inputs] image` (relative to the run file) as 8-bit RGB.
pub fn read_image(keys: &WanKeys, file: &str, base: &Path) -> Result<Option<Rgb8>> {
    match &keys.inputs.image {
        None => Ok(None),
        Some(p) => Ok(Some(load_rgb8(&resolve(base, p), file, "inputs.image")?)),
    }
}

/// CLIP vision `hidden_states[-2]` of the original picture (the folder's `image_processor/` and
/// `image_encoder/`), the encoder freed before this returns.
fn clip_embeds(
    root: &Path,
    img: &Rgb8,
    placement: &Placement,
    stages: &mut Vec<StageTime>,
) -> Result<Tensor> {
    let stage = Stage::begin("encode image (CLIP)");
    let proc_path = root
        .join("image_processor")
        .join("preprocessor_config.json");
    let processor = ClipImageProcessor::read(&proc_path)?;
    let px = processor.pixel_values(img, &placement.device, &proc_path.display().to_string())?;
    let enc = ClipVisionEncoder::load(&root.join("image_encoder"), placement)?;
    let e = enc.hidden_states_penultimate(&px)?;
    drop(enc);
    let shown = root.join("image_encoder").display().to_string();
    let what = format!("image_embeds (from {shown})");
    magcache_layers::stage::check_stage(&e, "the image encoder", &what)?;
    stages.push(stage.end());
    Ok(e)
}

/// Runs the image stage: CLIP (when `clip_needed`) on the original picture, then the VAE encode of
/// the picture resized to `width x height` (PIL LANCZOS when its size differs), in the `tiling`
/// of `[vae]`.
pub fn encode_image(
    (cfg, keys, file): (&RunConfig, &WanKeys, &str),
    (root, index): (&Path, &PipelineIndex),
    img: &Rgb8,
    clip_needed: bool,
    placement: &Placement,
    tiling: Option<magcache_layers::autoencoder_kl_wan::VaeTiling>,
) -> Result<EncodedImage> {
    let (height, width, frames) = video_size(cfg, keys);
    let vae_cfg = WanVaeConfig::read(&root.join("vae").join("config.json"))?;
    let clip_cfg = if clip_needed {
        if !root.join("image_encoder").is_dir() || !root.join("image_processor").is_dir() {
            return Err(Error::config(
                file,
                "model.weights",
                format!(
                    "the transformer has image attention (image_dim, Wan2.1 I2V) but the pipeline folder {} has no image_encoder/ and image_processor/",
                    root.display()
                ),
            ));
        }
        Some(ClipVisionConfig::read(
            &root.join("image_encoder").join("config.json"),
        )?)
    } else {
        None
    };
    image_stage_footprint(
        root,
        &vae_cfg,
        clip_cfg.as_ref(),
        (height, width, frames),
        index.expand_timesteps,
        &cfg.model.dtype,
        tiling,
    )
    .check(file)?;
    let mut stages = Vec::new();
    let image_embeds = match &clip_cfg {
        Some(_) => Some(clip_embeds(root, img, placement, &mut stages)?),
        None => None,
    };
    let stage = Stage::begin("encode image (VAE)");
    let mut vae = WanVae::load(&root.join("vae"), &placement.device, placement.dtype)?;
    vae.set_tiling(tiling)?;
    let pic = resize(img, width, height, Filter::Lanczos)?;
    let x = pic.to_vae_tensor(&placement.device)?.unsqueeze(2)?; // [1, 3, 1, H, W]
    let condition = if index.expand_timesteps {
        ImageCondition::FirstFrame(vae.encode_normalized(&x)?)
    } else {
        let video = if frames > 1 {
            let zeros = Tensor::zeros(
                (1, 3, frames - 1, height, width),
                DType::F32,
                &placement.device,
            )?;
            Tensor::cat(&[&x, &zeros], 2)?
        } else {
            x
        };
        let latent = vae.encode_normalized(&video)?;
        let (b, _, f, h, w) = latent.dims5()?;
        let ts = vae.config.temporal_scale();
        let ones = Tensor::ones((b, ts, 1, h, w), DType::F32, latent.device())?;
        let mask = if f > 1 {
            Tensor::cat(
                &[
                    &ones,
                    &Tensor::zeros((b, ts, f - 1, h, w), DType::F32, latent.device())?,
                ],
                2,
            )?
        } else {
            ones
        };
        ImageCondition::Concat(Tensor::cat(&[&mask, &latent], 1)?)
    };
    drop(vae);
    magcache_layers::stage::check_stage(
        condition.tensor(),
        "the VAE encode",
        &format!("the image condition (from {})", root.join("vae").display()),
    )?;
    stages.push(stage.end());
    Ok(EncodedImage {
        image_embeds,
        condition,
        stages,
    })
}
