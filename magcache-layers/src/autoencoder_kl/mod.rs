//! FLUX.1's image VAE: diffusers `AutoencoderKL` (the `vae/` folder of a FLUX.1 pipeline: 16 latent
//! channels, `scaling_factor` 0.3611, `shift_factor` 0.1159, no `quant_conv` / `post_quant_conv`), any
//! size read from its `config.json`; BFL's single-file `ae.safetensors` layout is read too (renamed to
//! the diffusers names on load).
//!
//! Encoder: `conv_in`, one `DownEncoderBlock2D` per `block_out_channels` entry (`layers_per_block`
//! ResNet blocks, a stride-2 downsampler after all but the last, zero-padded one row/column at the
//! bottom/right), a mid block (ResNet, single-head self-attention, ResNet), GroupNorm, SiLU and
//! `conv_out` to `2 * latent_channels` (mean, logvar). Decoder: the mirror image with
//! `layers_per_block + 1` ResNet blocks per `UpDecoderBlock2D` and nearest 2x upsampling + conv.
//! GroupNorms use `norm_num_groups` and eps 1e-6; norms, attention and activations run in f32,
//! convolution weights in the run's dtype (bf16 on the CPU, where candle's conv2d has no bf16 kernel,
//! runs the bf16-rounded weights in f32). Every convolution goes through
//! [`crate::nn::conv2d_bounded`], so a 1024x1024 decode builds no im2col matrix over 256 MB, the
//! mid-block attention is query-chunked ([`crate::nn::attention`]) and batch items are decoded one at
//! a time.
//!
//! Not candle-transformers' `stable_diffusion::vae::AutoEncoderKL`, although it reads these diffusers
//! names with the quant convs optional: its posterior keeps the mean private (only `sample()`), so no
//! encode mean; it loads through `VarBuilder` (one dtype for every tensor, so no f32 norms beside
//! bf16 convolutions and no bf16 conv on the CPU; errors that name neither file nor tensor); it always
//! builds the mid-block attention (`mid_block_add_attention` ignored); and its convolutions and
//! attention are single calls whose im2col and score matrices grow with the image (GBs at 1024x1024).
//! Its `flux::autoencoder::AutoEncoder` reads BFL's `ae.safetensors` but hard-codes 32 groups and
//! samples in `encode`; here that layout is renamed to the diffusers one and runs through the same
//! module. (candle-transformers is also not a dependency of this workspace.)

mod config;
mod decoder;
mod encoder;
mod footprint;
mod layers;
mod layout;
mod load;
mod packing;
mod tiling;

pub use config::FluxVaeConfig;
pub use layout::{detect_layout, VaeLayout};
pub use packing::{pack_latents, packed_to_planes, to_pixels, unpack_latents};
pub use tiling::{add_decode_parts, run_tiling, FluxTiling, FluxVaeKeys, FLUX_VAE_KEYS};

use crate::vae_common::check_input;
use candle_core::{DType, Device, Tensor};
use decoder::Decoder;
use encoder::Encoder;
use layers::Conv;
use magcache_core::{Error, Result};

/// FLUX.1's image VAE (diffusers `AutoencoderKL`).
pub struct FluxVae {
    pub config: FluxVaeConfig,
    pub layout: VaeLayout,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv>,
    post_quant_conv: Option<Conv>,
    device: Device,
    /// What the VAE was loaded from (for messages).
    pub origin: String,
    /// Checkpoint tensors the VAE did not use (outside the encoder and decoder), for the report.
    pub warnings: Vec<String>,
    /// Spatial tiling for inputs larger than one tile (diffusers' `enable_tiling()`); `None`: off.
    tiling: Option<FluxTiling>,
}

impl FluxVae {
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Turns spatial tiling on (diffusers' `enable_tiling()`, with `tile_sample_min_size` as given;
    /// [`FluxTiling::of_config`] is diffusers' default) or off; the size is checked against this
    /// VAE.
    pub fn set_tiling(&mut self, tiling: Option<FluxTiling>) -> Result<()> {
        if let Some(t) = &tiling {
            t.check(&self.config, &format!("FLUX VAE ({}) tiling", self.origin))?;
        }
        self.tiling = tiling;
        Ok(())
    }

    /// The tiling in use, if any.
    pub fn tiling(&self) -> Option<FluxTiling> {
        self.tiling
    }

    /// Pixels per latent along each side (8 for FLUX.1).
    pub fn vae_scale_factor(&self) -> usize {
        self.config.vae_scale_factor()
    }

    /// Checks a `[B, channels, H, W]` input (non-empty, finite) and returns it f32 on the device.
    fn prepare(&self, x: &Tensor, what: &str, channels: usize, layout: &str) -> Result<Tensor> {
        let vae = format!("FLUX VAE ({})", self.origin);
        check_input(x, 4, channels, &vae, what, layout)?;
        let x = x.to_device(&self.device)?.to_dtype(DType::F32)?;
        if !magcache_core::finite::all_finite(&x)? {
            return Err(Error::msg(format!(
                "FLUX VAE ({}): {what} holds non-finite values: {}",
                self.origin,
                magcache_core::finite::describe_non_finite(&x)?
            )));
        }
        Ok(x)
    }

    /// Runs `f` on each batch item (bounds activation memory to one image) and concatenates.
    fn per_item(
        &self,
        x: &Tensor,
        what: &str,
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let parts = (0..x.dim(0)?)
            .map(|i| f(&x.narrow(0, i, 1)?))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| Error::msg(format!("FLUX VAE ({}): {what}: {e}", self.origin)))?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The posterior's `(mean, logvar)` of an image `[B, in_channels, H, W]` in [-1, 1], each
    /// `[B, latent_channels, H/8, W/8]` (rounded down; factor 8 for FLUX.1); logvar clamped to
    /// [-30, 20].
    pub fn encode_moments(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = self.prepare(
            image,
            "image",
            self.config.in_channels,
            "[B, C, H, W] image in [-1, 1]",
        )?;
        // Each downsampler halves (rounding down) a side that must be at least 2: a side needs
        // `vae_scale_factor` pixels.
        let (_, _, ih, iw) = x.dims4()?;
        let min = self.vae_scale_factor();
        if ih < min || iw < min {
            return Err(Error::msg(format!(
                "FLUX VAE ({}): image is {ih}x{iw} pixels; encoding needs at least {min}x{min}",
                self.origin
            )));
        }
        let encode = |x: &Tensor| {
            let h = self.encoder.forward(x)?;
            match &self.quant_conv {
                Some(q) => q.forward(&h),
                None => Ok(h),
            }
        };
        let h = self.per_item(&x, "encode", |x| match self.tiling {
            Some(t) if t.tiles_pixels(ih, iw) => {
                tiling::run_tiles(&t.encode_grid(&self.config), x, "encode: tile", encode)
            }
            _ => encode(x),
        })?;
        let z = self.config.latent_channels;
        let mean = h.narrow(1, 0, z)?.contiguous()?;
        let logvar = h.narrow(1, z, z)?.clamp(-30f32, 20f32)?.contiguous()?;
        Ok((mean, logvar))
    }

    /// `vae.encode(x).latent_dist.mean` of an image `[B, 3, H, W]` in [-1, 1]: VAE-space latents
    /// `[B, latent_channels, H/8, W/8]`, not normalised.
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        Ok(self.encode_moments(image)?.0)
    }

    /// The posterior mean in the transformer's space: `(mean - shift_factor) * scaling_factor`
    /// (what FLUX image-to-image pipelines pack and noise).
    pub fn encode_normalized(&self, image: &Tensor) -> Result<Tensor> {
        self.normalize_latents(&self.encode_mean(image)?)
    }

    /// VAE-space latents `[B, C, h, w]` -> the transformer's space: `(z - shift) * scale`.
    pub fn normalize_latents(&self, z: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let z = self.prepare(z, "latents", c.latent_channels, "[B, C, h, w] latents")?;
        Ok(((z - c.shift_factor)? * c.scaling_factor)?)
    }

    /// The transformer's (unpacked) latents `[B, C, h, w]` -> VAE space, as FluxPipeline writes it:
    /// `latents / scaling_factor + shift_factor`.
    pub fn denormalize_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let l = self.prepare(
            latents,
            "latents",
            c.latent_channels,
            "[B, C, h, w] latents",
        )?;
        Ok(((l / c.scaling_factor)? + c.shift_factor)?)
    }

    /// `vae.decode(z).sample`: VAE-space latents `[B, latent_channels, h, w]` -> `[B, out_channels,
    /// 8h, 8w]` (factor 8 for FLUX.1), roughly in [-1, 1], not clamped.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = self.prepare(
            z,
            "latents",
            self.config.latent_channels,
            "[B, C, h, w] VAE-space latents",
        )?;
        let decode = |z: &Tensor| {
            let z = match &self.post_quant_conv {
                Some(p) => p.forward(z)?,
                None => z.clone(),
            };
            self.decoder.forward(&z)
        };
        let (_, _, h, w) = z.dims4()?;
        self.per_item(&z, "decode", |z| match self.tiling {
            // Tiles of latents, blended in pixels, the kept parts joined uncut (as diffusers).
            Some(t) if t.tiles_latents(&self.config, h, w) => {
                tiling::run_tiles(&t.decode_grid(&self.config), z, "decode: tile", decode)
            }
            _ => decode(z),
        })
    }

    /// The transformer's unpacked latents `[B, C, h, w]` -> the pipeline's `output_type="np"` image
    /// `[B, 8h, 8w, out_channels]` in [0, 1] (de-normalise, decode, `x * 0.5 + 0.5`, clamp).
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        to_pixels(&self.decode(&self.denormalize_latents(latents)?)?)
    }

    /// The transformer's packed latents after the denoising loop, `[B, (h/2)(w/2), 4C]` for a
    /// `height x width` image -> the pipeline's `output_type="np"` image `[B, H, W, out_channels]` in
    /// [0, 1] (`H = 2 * (height / 16) * 8` for FLUX.1: `height` rounded down to a multiple of 16).
    pub fn decode_packed(&self, packed: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let latents = unpack_latents(packed, height, width, self.vae_scale_factor())
            .map_err(|e| Error::msg(format!("FLUX VAE ({}): {e}", self.origin)))?;
        self.decode_latents(&latents)
    }
}
