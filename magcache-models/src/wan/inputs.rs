//! The inputs of a Wan run: latents and text embeddings from a file, or drawn from a seed, or class
//! conditioning beside the weights; checked against the model.

use super::config::WanConfig;
use super::model::WanModel;
use candle_core::Tensor;
use magcache_core::runtime::config::RunConfig;
use magcache_core::{Error, Result};
use magcache_layers::config_util::resolve;
use magcache_layers::inputs::InputFile;
use magcache_layers::random::randn_for;
use std::path::Path;

impl WanInputs {
    /// The inputs on `dev`.
    pub fn to_device(self, dev: &candle_core::Device) -> Result<Self> {
        let mv = |t: Option<Tensor>| t.map(|t| t.to_device(dev)).transpose();
        Ok(WanInputs {
            latents: self.latents.to_device(dev)?,
            cond: self.cond.to_device(dev)?,
            uncond: mv(self.uncond)?,
            condition: mv(self.condition)?,
            first_frame: mv(self.first_frame)?,
            image: mv(self.image)?,
        })
    }
}

/// Conditioning of a Wan generation.
pub struct WanInputs {
    /// `[B, C, F, H, W]`
    pub latents: Tensor,
    /// `[B, L, text_dim]`
    pub cond: Tensor,
    /// `[B, L', text_dim]`; required when guidance is on.
    pub uncond: Option<Tensor>,
    /// Image-conditioned experts (Wan2.2 I2V): `[B, in - out, F, H, W]` concatenated to the latents
    /// along the channels at every call.
    pub condition: Option<Tensor>,
    /// Wan2.2 TI2V: the first latent frame is the conditioning image, kept clean (per-token timesteps
    /// with t = 0 on its tokens).
    pub first_frame: Option<Tensor>,
    /// Image-attention models (Wan2.1 I2V): the CLIP image tokens `[B, N, image_dim]`.
    pub image: Option<Tensor>,
}

/// Reads or draws the inputs of a Wan run and checks them against the model; `classes` (`[inputs]
/// classes`) are rows of `class_embeddings.safetensors` in `weights_dir`.
pub fn build_inputs(
    (cfg, file, base): (&RunConfig, &str, &Path),
    model: &WanModel,
    weights_dir: Option<&Path>,
    classes: Option<&[usize]>,
) -> Result<WanInputs> {
    let c = &model.cfg;
    let extra = c.in_channels.saturating_sub(c.out_channels);
    let latent_cfg = c.latents_config();
    if let Some(f) = &cfg.inputs.file {
        let guided = cfg.sampling.guidance_scale.unwrap_or(5.0) > 1.0;
        return read_inputs(&InputFile::load(&resolve(base, f))?, c, &latent_cfg, guided);
    }
    let (seed, shape) =
        magcache_layers::inputs::drawn(cfg, &[1, latent_cfg.in_channels, 3, 24, 40]);
    if let Some(msg) = latent_cfg.latent_shape_error(&shape) {
        return Err(Error::config(file, "inputs.latent_shape", msg));
    }
    let latents = randn_for(file, "inputs.latent_shape", seed.wrapping_add(1), &shape)?;
    let condition = if extra > 0 {
        Some(randn_for(
            file,
            "inputs.latent_shape",
            seed.wrapping_add(4),
            &[shape[0], extra, shape[2], shape[3], shape[4]],
        )?)
    } else {
        None
    };
    let (cond, uncond) = match classes {
        Some(classes) => class_conditioning(file, weights_dir, classes, shape[0])?,
        None => {
            let l = cfg.inputs.text_len.unwrap_or(64);
            (
                randn_for(
                    file,
                    "inputs.text_len",
                    seed.wrapping_add(2),
                    &[shape[0], l, c.text_dim],
                )?,
                randn_for(
                    file,
                    "inputs.text_len",
                    seed.wrapping_add(3),
                    &[shape[0], l, c.text_dim],
                )?,
            )
        }
    };
    Ok(WanInputs {
        latents,
        cond,
        uncond: Some(uncond),
        condition,
        first_frame: None,
        // Image-attention models: 257 CLIP tokens (ViT-H/14 at 224 px), as the released pipeline.
        image: c
            .image_dim
            .map(|d| {
                randn_for(
                    file,
                    "inputs.latent_shape",
                    seed.wrapping_add(5),
                    &[shape[0], 257, d],
                )
            })
            .transpose()?,
    })
}

/// The inputs of an `[inputs] file`: `latents_init`, `cond` (and `uncond` when `guided`), and as
/// the model takes them `condition` (image-conditioned experts), `image_latents` (TI2V) and
/// `image_embeds` (image attention), each checked against the model's sizes.
fn read_inputs(
    inp: &InputFile,
    c: &WanConfig,
    latent_cfg: &WanConfig,
    guided: bool,
) -> Result<WanInputs> {
    let what = format!("[B, {}, F, H, W] latents", c.in_channels);
    let lat = inp.get("latents_init", 5, &what)?;
    if let Some(msg) = latent_cfg.latent_shape_error(lat.dims()) {
        return Err(Error::inputs(&inp.path, "latents_init", msg));
    }
    let ld: Vec<Option<usize>> = lat.dims().iter().map(|&d| Some(d)).collect();
    let (b, text_dim) = (ld[0], Some(c.text_dim));
    let text = |name: &str| {
        let what = format!("[B, L, {}] text embeddings", c.text_dim);
        inp.get_shaped(name, &what, &[b, None, text_dim])
    };
    let cond = text("cond")?;
    let uncond = inp.has("uncond").then(|| text("uncond")).transpose()?;
    if uncond.is_none() && guided {
        return Err(Error::inputs(&inp.path, "uncond", "missing: classifier-free guidance (guidance_scale > 1) needs the unconditional embeddings"));
    }
    let extra = c.in_channels.saturating_sub(c.out_channels);
    let condition = (extra > 0)
        .then(|| {
            let what = format!("[B, {extra}, F, H, W] image condition (mask + image latents)");
            inp.get_shaped("condition", &what, &[b, Some(extra), ld[2], ld[3], ld[4]])
        })
        .transpose()?;
    let first_frame = inp
        .has("image_latents")
        .then(|| {
            let what = "[B, C, 1, H, W] latents of the conditioning image";
            inp.get_shaped("image_latents", what, &[b, ld[1], Some(1), ld[3], ld[4]])
        })
        .transpose()?;
    let image = c
        .image_dim
        .map(|d| {
            let what = format!("[B, N, {d}] CLIP image tokens");
            inp.get_shaped("image_embeds", &what, &[b, None, Some(d)])
        })
        .transpose()?;
    Ok(WanInputs {
        latents: lat,
        cond,
        uncond,
        condition,
        first_frame,
        image,
    })
}

/// Class conditioning from `class_embeddings.safetensors` beside the weights: rows `classes` for the
/// cond branch, the last row (the null class) for the uncond branch.
fn class_conditioning(
    file: &str,
    weights_dir: Option<&Path>,
    classes: &[usize],
    batch: usize,
) -> Result<(Tensor, Tensor)> {
    let dir = weights_dir.ok_or_else(|| {
        Error::config(
            file,
            "inputs.classes",
            "class conditioning needs `weights` (class_embeddings.safetensors beside them)",
        )
    })?;
    let path = dir.join("class_embeddings.safetensors");
    let inp = InputFile::load(&path)?;
    let table = inp.get("class_embeddings", 3, "[classes + 1, L, text_dim]")?;
    let rows = table.dim(0)?;
    if rows < 2 {
        return Err(Error::inputs(
            &inp.path,
            "class_embeddings",
            format!("has {rows} row(s); expected at least 2 (one per class, then the null class)"),
        ));
    }
    if classes.len() != batch {
        return Err(Error::config(
            file,
            "inputs.classes",
            format!(
                "{} classes for a batch of {batch}: give one class per sample",
                classes.len()
            ),
        ));
    }
    if let Some(&bad) = classes.iter().find(|&&c| c + 1 >= rows) {
        return Err(Error::config(
            file,
            "inputs.classes",
            format!("class {bad} is out of range (0..{})", rows - 2),
        ));
    }
    let idx = Tensor::from_vec(
        classes.iter().map(|&c| c as u32).collect::<Vec<_>>(),
        classes.len(),
        &candle_core::Device::Cpu,
    )?;
    let cond = table.index_select(&idx, 0)?;
    let null = table.narrow(0, rows - 1, 1)?;
    let uncond = null.repeat((batch, 1, 1))?;
    Ok((cond, uncond))
}
