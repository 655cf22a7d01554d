//! What a Wan VAE decode holds, from its config alone (the size guard's decode stage). The sizes
//! follow the decoder as [`super::decoder`] builds and runs it: the feature cache keeps the last
//! two input frames of every causal convolution at that convolution's resolution and width, and
//! past the last temporal upsampler one output frame is worked on at a time. The Wan2.2 VAE's
//! residual shortcuts (duplicated inputs) are counted within the working set's margin.

use super::config::WanVaeConfig;
use crate::footprint::{sz, Sz};
use crate::nn::{ATTENTION_SCORE_BUDGET, IM2COL_BUDGET};

/// The parts of a decode of `[1, z, frames, h, w]` latents, in bytes (f32 activations).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeBytes {
    /// The VAE's weights (encoder and decoder are loaded together) in `weight_bytes` per value.
    pub weights: Sz,
    /// The feature cache: two frames of every causal convolution's input (one when decoding a
    /// single latent frame).
    pub cache: Sz,
    /// One frame's working set at the widest stage: the upsampled input of a resampler three times
    /// (measured: twice fell 4% short of a 480x832 decode), its
    /// convolution's im2col band, three output frames, the mid block's attention scores.
    pub working: Sz,
    /// The decoded video as pixels, twice (the per-chunk pieces and their concatenation).
    pub video: Sz,
    /// Tiled decodes: two rows of decoded tiles (the row above, kept for blending, and the one being
    /// decoded) and one tile's frames twice (pieces and their join); 0 untiled.
    pub tiles: Sz,
}

impl DecodeBytes {
    pub fn total(&self) -> Sz {
        self.weights + self.cache + self.working + self.video + self.tiles
    }
}

impl WanVaeConfig {
    /// What decoding latents of `frames` x `h` x `w` holds with `tiling` (diffusers' rule: tiled
    /// when either side is larger than one tile): the cache and working set of one tile, the tiles
    /// held for blending, and the whole video.
    pub fn decode_bytes_tiled(
        &self,
        frames: usize,
        h: usize,
        w: usize,
        weight_bytes: usize,
        tiling: Option<super::VaeTiling>,
    ) -> DecodeBytes {
        let full = self.decode_bytes(frames, h, w, weight_bytes);
        let ss = self.spatial_scale().max(1);
        let Some(t) = tiling else {
            return full;
        };
        let (th, tw) = (t.tile_sample_min_height / ss, t.tile_sample_min_width / ss);
        if h <= th && w <= tw {
            return full;
        }
        let tile = self.decode_bytes(frames, h.min(th), w.min(tw), weight_bytes);
        let cols = w.div_ceil((t.tile_sample_stride_width / ss).max(1));
        // `tile.video` is one tile's frames twice: two rows of `cols` tiles and the tile being
        // decoded (pieces and join).
        DecodeBytes {
            cache: tile.cache,
            working: tile.working,
            tiles: tile.video * sz(cols + 1),
            ..full
        }
    }

    /// What decoding latents of `frames` x `h` x `w` (latent sizes) holds at its peak.
    pub fn decode_bytes(
        &self,
        frames: usize,
        h: usize,
        w: usize,
        weight_bytes: usize,
    ) -> DecodeBytes {
        let d = self.decoder_base_dim;
        let stages = self.dim_mult.len();
        let last = self.dim_mult.last().copied().unwrap_or(1);
        let dims: Vec<usize> = std::iter::once(last)
            .chain(self.dim_mult.iter().rev().copied())
            .map(|m| d * m)
            .collect();
        let px = |s: usize| sz(h) * sz(w) * sz(1usize << s.min(30)) * sz(1usize << s.min(30));
        let conv = |i: usize, o: usize, k: usize| sz(i) * sz(o) * sz(k) + sz(o);
        // Cached convolution inputs (channels x pixels), and the decoder's parameters.
        let mut cached = sz(self.z_dim) * px(0) + sz(4) * sz(dims[0]) * px(0);
        let mut params = conv(self.z_dim, dims[0], 27)
            + sz(4) * conv(dims[0], dims[0], 27)
            + sz(4) * sz(dims[0]) * sz(dims[0]);
        let (mut widest_in, mut widest_out) = (sz(0), sz(0));
        let mut out = dims[0];
        for i in 0..stages {
            // Wan2.1's upsamplers halve the width; the Wan2.2 VAE's keep it.
            let mut in_dim = if i > 0 && !self.is_residual {
                dims[i] / 2
            } else {
                dims[i]
            };
            out = dims[i + 1];
            for _ in 0..=self.num_res_blocks {
                cached = cached + (sz(in_dim) + sz(out)) * px(i);
                params = params + conv(in_dim, out, 27) + conv(out, out, 27);
                if in_dim != out {
                    params = params + conv(in_dim, out, 1);
                }
                in_dim = out;
            }
            widest_out = widest_out.max(sz(out) * px(i));
            if i + 1 != stages {
                // The resampler: nearest 2x (its input at the next resolution), a 3x3 conv to half
                // the channels, and on temporal stages a cached time conv doubling the channels.
                widest_in = widest_in.max(sz(out) * px(i + 1));
                let half = if self.is_residual { out } else { out / 2 };
                params = params + conv(out, half, 9);
                let temporal = self.temperal_downsample.iter().rev().nth(i).copied() == Some(true);
                if temporal {
                    cached = cached + sz(out) * px(i);
                    params = params + conv(out, 2 * out, 3);
                }
            }
        }
        cached = cached + sz(out) * px(stages - 1);
        params = params + conv(out, self.out_channels, 27);
        let f32b = sz(4);
        let scores = (px(0) * px(0) * f32b).min(ATTENTION_SCORE_BUDGET as u64);
        let video_frames = sz(1 + frames.saturating_sub(1) * self.temporal_scale());
        DecodeBytes {
            // The encoder is about the decoder's size: counted as one more decoder.
            weights: sz(2) * params * sz(weight_bytes),
            // Two frames per convolution from the second latent frame on (one before).
            cache: sz(frames.clamp(1, 2)) * cached * f32b,
            working: sz(3) * widest_in * f32b
                + (widest_in * sz(9) * f32b).min(IM2COL_BUDGET as u64)
                + sz(3) * widest_out * f32b
                + scores,
            // The decoder's last stage, unpatchified (`patch_size` x `patch_size` pixels per position).
            video: sz(2)
                * video_frames
                * px(stages - 1)
                * sz(self.patch_size.max(1))
                * sz(self.patch_size.max(1))
                * sz(self.out_channels)
                * f32b,
            tiles: sz(0),
        }
    }
}
