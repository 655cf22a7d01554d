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
mod tiling;
mod trace;

pub use crate::footprint::gemm_slabs;
pub use config::WanVaeConfig;
pub use footprint::DecodeBytes;
pub use tiling::VaeTiling;
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
    /// Spatial tiling for inputs larger than one tile (diffusers' `enable_tiling`); `None`: off.
    tiling: Option<VaeTiling>,
}

impl WanVae {
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Turns spatial tiling on (diffusers' `enable_tiling(...)`) or off; the sizes are checked
    /// against this VAE's pixels per latent.
    pub fn set_tiling(&mut self, tiling: Option<VaeTiling>) -> Result<()> {
        if let Some(t) = &tiling {
            t.check(
                self.config.spatial_scale(),
                &format!("Wan VAE ({}) tiling", self.origin),
            )?;
        }
        self.tiling = tiling;
        Ok(())
    }

    /// The tiling in use, if any.
    pub fn tiling(&self) -> Option<VaeTiling> {
        self.tiling
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
        trace: Option<&mut VaeTrace>,
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
        let h = match self.tiling.filter(|t| {
            trace.is_none()
                && (x.dim(4).is_ok_and(|w| w > t.tile_sample_min_width)
                    || x.dim(3).is_ok_and(|h| h > t.tile_sample_min_height))
        }) {
            Some(t) => self.encode_tiled(&x, t)?,
            None => self.encode_all(&x, trace, true)?,
        };
        let z = self.config.z_dim;
        let to_bcfhw =
            |t: Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 1, 3, 4))?.contiguous()?) };
        let mean = to_bcfhw(h.narrow(2, 0, z)?)?;
        let logvar = to_bcfhw(h.narrow(2, z, z)?.clamp(-30f32, 20f32)?)?;
        Ok((mean, logvar))
    }

    /// The encoder over `[B, F, C, H, W]` (patchified) frames with a fresh feature cache: frame 0,
    /// then chunks of 4, each through `quant_conv` (a 1x1x1 convolution), joined over time.
    fn encode_all(
        &self,
        x: &Tensor,
        mut trace: Option<&mut VaeTrace>,
        progress: bool,
    ) -> Result<Tensor> {
        let frames = x.dim(1)?;
        let chunks = 1 + (frames - 1) / 4;
        let mut cache = FeatCache::new(self.encoder.slots);
        let mut outs = Vec::with_capacity(chunks);
        for i in 0..chunks {
            let (start, len) = if i == 0 { (0, 1) } else { (1 + 4 * (i - 1), 4) };
            let chunk = x.narrow(1, start, len)?;
            let enc = self
                .encoder
                .forward(&chunk, &mut cache, trace.as_deref_mut())?;
            outs.push(self.quant_conv.forward(&enc, &mut cache)?);
            if progress {
                magcache_core::runtime::progress::tick("encode: frame chunk", i + 1, chunks);
            }
            // A cancelled job (a served request) stops within one chunk of the conditioning.
            magcache_core::cancel::check()?;
        }
        Ok(Tensor::cat(&outs, 1)?)
    }

    /// diffusers' `tiled_encode` of `[B, F, C, H, W]` (patchified) frames: tiles in the
    /// patchified sample space, blended in latent space; `[B, F', 2 z, H / r, W / r]`.
    fn encode_tiled(&self, x: &Tensor, t: VaeTiling) -> Result<Tensor> {
        let r = (self.config.spatial_scale() / self.config.patch_size.max(1)).max(1);
        let (_, _, _, h, w) = x.dims5()?;
        let grid = t.grid(1, r);
        let tiles = grid.count(h, w);
        let mut n = 0;
        let strips = crate::vae_tiles::run(
            &grid,
            (h, w),
            (h / r, w / r),
            |i, th, j, tw| {
                n += 1;
                let tile = x.narrow(3, i, th)?.narrow(4, j, tw)?;
                let enc = self.encode_all(&tile, None, false)?;
                magcache_core::runtime::progress::tick("encode: tile", n, tiles);
                Ok(enc)
            },
            Ok,
        )?;
        Ok(Tensor::cat(&strips, 3)?)
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
    /// (checked finite, unpatchified and clamped: `[B, C, f, H, W]` in [-1, 1]): the decoded video is
    /// held once as `map`'s pieces, then once more by the caller's concatenation along the frames,
    /// never as unmapped copies. With tiling on and latents larger than one tile, the tiles' rows
    /// are decoded one after another and `map` gets the whole video once (one piece).
    fn decode_chunks(
        &self,
        z: &Tensor,
        trace: Option<&mut VaeTrace>,
        map: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        let z = self.prepare(z, "latents", self.config.z_dim, "[B, z, F, h, w] latents")?;
        if let Some(t) = self.tiled_decode(&z, trace.is_some()) {
            let video = self.decode_tiled(&z, t)?;
            return Ok(vec![map(&video)?.contiguous()?]);
        }
        let frames = z.dim(1)?;
        let mut outs = Vec::with_capacity(frames);
        let p = self.config.patch_size;
        self.decode_frames(&z, trace, &mut |out, i| {
            let video = unpatchify(&out.permute((0, 2, 1, 3, 4))?, p)?.clamp(-1f32, 1f32)?;
            outs.push(map(&video)?.contiguous()?);
            magcache_core::runtime::progress::tick("decode: latent frame", i + 1, frames);
            magcache_core::cancel::check()
        })?;
        Ok(outs)
    }

    /// The tiling to decode `[B, F, z, h, w]` latents with: diffusers tiles when either side is larger
    /// than one tile (a trace always runs untiled).
    fn tiled_decode(&self, z: &Tensor, traced: bool) -> Option<VaeTiling> {
        let t = self.tiling?;
        let ss = self.config.spatial_scale().max(1);
        let (h, w) = (z.dim(3).ok()?, z.dim(4).ok()?);
        (!traced && (w > t.tile_sample_min_width / ss || h > t.tile_sample_min_height / ss))
            .then_some(t)
    }

    /// Runs the decoder over `[B, F, z, h, w]` latents one latent frame at a time with a fresh
    /// feature cache, handing `each` the raw decoder output of frame `i` (`[B, f, C, H, W]`, checked
    /// finite, before unpatchify and clamp).
    fn decode_frames(
        &self,
        z: &Tensor,
        mut trace: Option<&mut VaeTrace>,
        each: &mut dyn FnMut(Tensor, usize) -> Result<()>,
    ) -> Result<()> {
        let mut cache = FeatCache::new(self.decoder.slots);
        let x = self.post_quant_conv.forward(z, &mut cache)?;
        record(&mut trace, "post_quant_conv", &x);
        for i in 0..x.dim(1)? {
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
            each(out, i)?;
        }
        Ok(())
    }

    /// diffusers' `tiled_decode` of `[B, F, z, h, w]` latents: `[B, C, F', H, W]` in [-1, 1].
    fn decode_tiled(&self, z: &Tensor, t: VaeTiling) -> Result<Tensor> {
        let ss = self.config.spatial_scale().max(1);
        let p = self.config.patch_size.max(1);
        let (_, frames, _, h, w) = z.dims5()?;
        // Blended in the decoder's output space (patchified positions for the Wan2.2 VAE).
        let grid = t.grid(ss, p);
        let total = grid.count(h, w) * frames;
        let mut done = 0;
        let strips = crate::vae_tiles::run(
            &grid,
            (h, w),
            (h * ss / p, w * ss / p),
            |i, th, j, tw| {
                let tile = z.narrow(3, i, th)?.narrow(4, j, tw)?;
                let mut pieces = Vec::with_capacity(frames);
                self.decode_frames(&tile, None, &mut |out, _| {
                    pieces.push(out);
                    done += 1;
                    magcache_core::runtime::progress::tick("decode: tile frame", done, total);
                    magcache_core::cancel::check()
                })?;
                Ok(Tensor::cat(&pieces, 1)?)
            },
            |s| Ok(unpatchify(&s.permute((0, 2, 1, 3, 4))?, p)?.clamp(-1f32, 1f32)?),
        )?;
        Ok(Tensor::cat(&strips, 3)?)
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
