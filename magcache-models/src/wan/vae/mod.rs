//! The Wan video VAE (diffusers `AutoencoderKLWan`, the Wan2.1 architecture that the Wan2.1 T2V/I2V
//! and Wan2.2 A14B pipelines share): causal 3-D convolutions over `[B, C, F, H, W]` videos, 8x spatial
//! and 4x temporal compression in the released configs.
//!
//! candle has no 3-D convolution. A causal conv3d with `kt` time taps is run as a sum of 2-D
//! convolutions: output frame `j` adds the conv2d of each of its `kt` input frames with that tap's
//! `[O, C, kh, kw]` slice of the weight (frames of the causal zero padding are skipped, cached
//! frames read in place). Internally activations are laid out `[B, F, C, H, W]` so that a frame is
//! a slice, never a permute.
//!
//! Time is processed in chunks as diffusers does (encode: frame 0, then 4 frames at a time; decode:
//! one latent frame at a time) with a per-convolution feature cache holding the last two input
//! frames of the previous chunk, and the result equals diffusers' (a causal pass with 2 zero frames
//! in front, except at the temporal resamplers, whose first-chunk rules are reproduced exactly).
//! Memory is bounded by one frame, not by the video: past the decoder's last temporal upsampler
//! (and before the encoder's first temporal downsampler) every layer is causal in time, so those
//! stages, the widest ones, run one frame at a time (bit-identical to the whole chunk). What stays
//! is the feature cache (two frames per causal convolution) and the decoded video itself. Norms,
//! attention and activations run in f32; convolution weights in the run's dtype.
//!
//! The Wan2.2 VAE (TI2V-5B: `is_residual`, `patch_size` 2, z_dim 48, 16x spatial) is the same
//! machinery with residual down/up blocks whose shortcuts average (`AvgDown3D`) or duplicate
//! (`DupUp3D`) the block's input, a decoder whose upsamplers keep the width, and 2x2 pixels folded
//! into channels before the encoder and unfolded after the decoder.

mod config;
mod decoder;
mod encoder;
mod footprint;
mod layers;
mod load;
mod trace;

pub use config::WanVaeConfig;
pub use footprint::DecodeBytes;
pub use trace::VaeTrace;

use crate::vae_common::{check_input, to_pixels_channels_last};
use candle_core::{DType, Device, Tensor};
use decoder::Decoder;
use encoder::Encoder;
use layers::{patchify, unpatchify, Conv, FeatCache};
use magcache_core::Result;
use trace::record;

/// The Wan2.1 video VAE (`AutoencoderKLWan`).
pub struct WanVae {
    pub config: WanVaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv,
    post_quant_conv: Conv,
    /// `[1, z, 1, 1, 1]` f32.
    mean: Tensor,
    /// `1 / latents_std`, `[1, z, 1, 1, 1]` f32 (the pipeline multiplies / divides by this).
    inv_std: Tensor,
    device: Device,
    /// What the VAE was loaded from (for messages).
    pub origin: String,
}

impl WanVae {
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Checks a `[B, channels, F, H, W]` input and returns it as f32 `[B, F, C, H, W]` on the device.
    fn prepare(&self, x: &Tensor, what: &str, channels: usize, layout: &str) -> Result<Tensor> {
        let vae = format!("Wan VAE ({})", self.origin);
        check_input(x, 5, channels, &vae, what, layout)?;
        Ok(x.to_device(&self.device)?
            .to_dtype(DType::F32)?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?)
    }

    /// The posterior's `(mean, logvar)` of a video `[B, in_channels, F, H, W]` in [-1, 1], each
    /// `[B, z_dim, 1 + (F-1)/4, H/8, W/8]` (released factors); logvar clamped to [-30, 20]. As in
    /// diffusers, frame 0 is encoded alone and then chunks of 4 frames; frames past the last full
    /// chunk (when `F - 1` is not a multiple of 4) are not used.
    pub fn encode_moments(&self, video: &Tensor) -> Result<(Tensor, Tensor)> {
        self.encode_moments_traced(video, None)
    }

    /// [`WanVae::encode_moments`], recording intermediates into `trace`.
    pub fn encode_moments_traced(
        &self,
        video: &Tensor,
        mut trace: Option<&mut VaeTrace>,
    ) -> Result<(Tensor, Tensor)> {
        let (pix_in, _) = self.config.pixel_channels();
        let p = self.config.patch_size;
        let (_, _, _, vh, vw) = video.dims5()?;
        if !vh.is_multiple_of(p) || !vw.is_multiple_of(p) {
            return Err(magcache_core::Error::msg(format!(
                "Wan VAE ({}): the video's {vh}x{vw} pixels are not a multiple of patch_size {p}",
                self.origin
            )));
        }
        let video = if p > 1 && video.dim(1)? == pix_in {
            patchify(&video.to_dtype(DType::F32)?, p)?
        } else {
            video.clone()
        };
        let x = self.prepare(
            &video,
            "video",
            self.config.in_channels,
            "[B, C, F, H, W] video",
        )?;
        let frames = x.dim(1)?;
        let chunks = 1 + (frames - 1) / 4;
        let mut cache = FeatCache::new(self.encoder.slots);
        let mut outs = Vec::with_capacity(chunks);
        for i in 0..chunks {
            let (start, len) = if i == 0 { (0, 1) } else { (1 + 4 * (i - 1), 4) };
            let chunk = x.narrow(1, start, len)?;
            outs.push(
                self.encoder
                    .forward(&chunk, &mut cache, trace.as_deref_mut())?,
            );
            magcache_core::runtime::progress::tick("encode: frame chunk", i + 1, chunks);
        }
        let enc = Tensor::cat(&outs, 1)?;
        let h = self.quant_conv.forward(&enc, &mut cache)?;
        let z = self.config.z_dim;
        let to_bcfhw =
            |t: Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 1, 3, 4))?.contiguous()?) };
        let mean = to_bcfhw(h.narrow(2, 0, z)?)?;
        let logvar = to_bcfhw(h.narrow(2, z, z)?.clamp(-30f32, 20f32)?)?;
        Ok((mean, logvar))
    }

    /// The posterior mean (`latent_dist.mode()`) of a video `[B, 3, F, H, W]` in [-1, 1]: VAE-space
    /// latents `[B, z_dim, 1 + (F-1)/4, H/8, W/8]`, not normalised.
    pub fn encode_mean(&self, video: &Tensor) -> Result<Tensor> {
        Ok(self.encode_moments(video)?.0)
    }

    /// The posterior mean normalised as the image-to-video pipelines condition on it:
    /// `(mean - latents_mean) * (1 / latents_std)`.
    pub fn encode_normalized(&self, video: &Tensor) -> Result<Tensor> {
        self.normalize_latents(&self.encode_mean(video)?)
    }

    /// VAE-space latents `[B, z, F, h, w]` -> the transformer's space: `(z - mean) * (1 / std)`.
    pub fn normalize_latents(&self, z: &Tensor) -> Result<Tensor> {
        let z = self.prepare(z, "latents", self.config.z_dim, "[B, z, F, h, w] latents")?;
        let z = z.permute((0, 2, 1, 3, 4))?;
        Ok(z.broadcast_sub(&self.mean)?
            .broadcast_mul(&self.inv_std)?
            .contiguous()?)
    }

    /// The transformer's latents `[B, z, F, h, w]` -> VAE space, as the pipeline writes it:
    /// `latents / (1 / std) + mean`.
    pub fn denormalize_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let l = self.prepare(
            latents,
            "latents",
            self.config.z_dim,
            "[B, z, F, h, w] latents",
        )?;
        let l = l.permute((0, 2, 1, 3, 4))?;
        Ok(l.broadcast_div(&self.inv_std)?
            .broadcast_add(&self.mean)?
            .contiguous()?)
    }

    /// `vae.decode(z).sample`: VAE-space latents `[B, z_dim, F, h, w]` -> video
    /// `[B, out_channels, 1 + 4(F-1), 8h, 8w]` (released factors) clamped to [-1, 1]. Decodes one
    /// latent frame at a time with the causal feature cache.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_traced(z, None)
    }

    /// [`WanVae::decode`], recording intermediates into `trace`.
    pub fn decode_traced(&self, z: &Tensor, trace: Option<&mut VaeTrace>) -> Result<Tensor> {
        let chunks = self.decode_chunks(z, trace, |x| Ok(x.clone()))?;
        Ok(Tensor::cat(&chunks, 2)?)
    }

    /// Decodes `z` one latent frame at a time, handing each chunk of frames to `map` as it comes
    /// (checked finite, unpatchified and clamped: `[B, C, f, H, W]` in [-1, 1]): the decoded video is held once as `map`'s pieces,
    /// then once more by the caller's concatenation, never as unmapped copies.
    fn decode_chunks(
        &self,
        z: &Tensor,
        mut trace: Option<&mut VaeTrace>,
        map: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        let z = self.prepare(z, "latents", self.config.z_dim, "[B, z, F, h, w] latents")?;
        let mut cache = FeatCache::new(self.decoder.slots);
        let x = self.post_quant_conv.forward(&z, &mut cache)?;
        record(&mut trace, "post_quant_conv", &x);
        let frames = x.dim(1)?;
        let mut outs = Vec::with_capacity(frames);
        for i in 0..frames {
            let chunk = x.narrow(1, i, 1)?;
            let out = self
                .decoder
                .forward(&chunk, &mut cache, i == 0, trace.as_deref_mut())?;
            // Checked before the clamp, which would turn an overflow (inf) into plausible pixels.
            magcache_core::finite::ensure_finite(
                &out,
                "the VAE decode",
                &format!("the decoder output of {}", self.origin),
                "the VAE's weights overflow on these latents; check the vae/ checkpoint",
            )?;
            let video = unpatchify(&out.permute((0, 2, 1, 3, 4))?, self.config.patch_size)?
                .clamp(-1f32, 1f32)?;
            outs.push(map(&video)?.contiguous()?);
            magcache_core::runtime::progress::tick("decode: latent frame", i + 1, frames);
        }
        Ok(outs)
    }

    /// What the pipeline returns with `output_type="np"`: the transformer's (normalised) latents
    /// `[B, z_dim, F, h, w]` de-normalised, decoded, mapped from [-1, 1] to [0, 1] pixels and laid out
    /// `[B, F', H, W, out_channels]` (f32, F' = 1 + 4(F-1), H = 8h, W = 8w for the released VAE).
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z = self.denormalize_latents(latents)?;
        // Each chunk mapped to pixels as it comes (`[B, f, H, W, C]`), then joined once.
        let chunks = self.decode_chunks(&z, None, to_pixels_channels_last)?;
        Ok(Tensor::cat(&chunks, 1)?)
    }
}
