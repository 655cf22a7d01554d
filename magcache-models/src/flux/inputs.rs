//! The inputs of a FLUX run: packed latents, text embeddings and position ids, from a file or drawn
//! from a seed.

use super::config::FluxConfig;
use candle_core::{Device, Tensor};
use magcache_core::runtime::config::RunConfig;
use magcache_core::{Error, Result};
use magcache_layers::config_util::resolve;
use magcache_layers::dit::PackedInputs;
use magcache_layers::inputs::InputFile;
use magcache_layers::random::randn_for;

use std::path::Path;

impl FluxInputs {
    /// The inputs on `dev`.
    pub fn to_device(self, dev: &Device) -> Result<Self> {
        Ok(FluxInputs {
            packed: self.packed.to_device(dev)?,
            pooled: self.pooled.to_device(dev)?,
        })
    }
}

/// Conditioning of a FLUX generation (packed latents).
pub struct FluxInputs {
    /// Packed latents, T5 text and position ids (`[seq, 3]`, `[L, 3]`).
    pub packed: PackedInputs,
    /// `[B, pooled_projection_dim]` CLIP's pooled text.
    pub pooled: Tensor,
}

/// Position ids of a packed `h x w` image grid: `[0, row, col]`.
pub fn image_ids(h: usize, w: usize) -> Result<Tensor> {
    let n = h
        .checked_mul(w)
        .and_then(|n| n.checked_mul(3))
        .ok_or_else(|| Error::msg(format!("image grid {h}x{w} is too large")))?;
    let mut v = Vec::with_capacity(n);
    for r in 0..h {
        for c in 0..w {
            v.extend_from_slice(&[0.0f32, r as f32, c as f32]);
        }
    }
    Ok(Tensor::from_vec(v, (h * w, 3), &Device::Cpu)?)
}

/// The inputs of an `[inputs] file`: `latents_init` (packed), `encoder_hidden_states`,
/// `pooled_projections` and the position ids, each checked against the model's sizes.
fn read_inputs(inp: &InputFile, c: &FluxConfig) -> Result<FluxInputs> {
    let ch = Some(c.in_channels);
    let what = format!("[B, seq, {}] packed latents", c.in_channels);
    let lat = inp.get_shaped("latents_init", &what, &[None, None, ch])?;
    let (b, seq, _) = lat.dims3()?;
    let joint = c.joint_attention_dim;
    let what = format!("[B, L, {joint}]");
    let ctx = inp.get_shaped(
        "encoder_hidden_states",
        &what,
        &[Some(b), None, Some(joint)],
    )?;
    let pooled_dim = c.pooled_projection_dim;
    let what = format!("[B, {pooled_dim}]");
    let pooled = inp.get_shaped("pooled_projections", &what, &[Some(b), Some(pooled_dim)])?;
    let n_axes = c.axes_dims_rope.len();
    let ids = |name: &str, n: usize| {
        let what = format!("[{n}, {n_axes}] position ids");
        inp.get_shaped(name, &what, &[Some(n), Some(n_axes)])
    };
    let (img_ids, txt_ids) = (ids("img_ids", seq)?, ids("txt_ids", ctx.dim(1)?)?);
    let packed = PackedInputs {
        latents: lat,
        ctx,
        img_ids,
        txt_ids,
    };
    Ok(FluxInputs { packed, pooled })
}

/// Reads or draws the inputs of a FLUX.1 run (`[inputs] file`, or seeded random inputs of
/// `latent_shape` and `text_len`).
pub(super) fn build_inputs(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    c: &FluxConfig,
) -> Result<FluxInputs> {
    if let Some(f) = &cfg.inputs.file {
        return read_inputs(&InputFile::load(&resolve(base, f))?, c);
    }
    // Random inputs: latent_shape = [B, C, H, W] of unpacked latents (C * 4 = in_channels), packed 2x2.
    let (seed, shape) = magcache_layers::inputs::drawn(cfg, &[1, c.in_channels / 4, 64, 64]);
    let (b, h, w) =
        magcache_layers::inputs::packed_drawn_shape(&shape, c.in_channels, "FLUX", file)?;
    let (h, w) = (h / 2, w / 2);
    let seq = h.checked_mul(w).ok_or_else(|| {
        Error::config(
            file,
            "inputs.latent_shape",
            format!("{shape:?} is too large"),
        )
    })?;
    let l = cfg.inputs.text_len.unwrap_or(64);
    Ok(FluxInputs {
        packed: PackedInputs {
            latents: randn_for(
                file,
                "inputs.latent_shape",
                seed.wrapping_add(1),
                &[b, seq, c.in_channels],
            )?,
            ctx: randn_for(
                file,
                "inputs.text_len",
                seed.wrapping_add(2),
                &[b, l, c.joint_attention_dim],
            )?,
            img_ids: image_ids(h, w)?,
            txt_ids: Tensor::zeros(
                (l, c.axes_dims_rope.len()),
                candle_core::DType::F32,
                &Device::Cpu,
            )?,
        },
        pooled: randn_for(
            file,
            "inputs.latent_shape",
            seed.wrapping_add(3),
            &[b, c.pooled_projection_dim],
        )?,
    })
}
