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
    /// The decoded video as pixels held while decoding: twice untiled (the per-chunk pieces and
    /// their concatenation), once tiled (the joined rows of tiles so far).
    pub video: Sz,
    /// Tiled decodes: two rows of decoded tiles (the row above, kept for blending, and the one being
    /// decoded) and the tile being decoded (its frames and their join); 0 untiled.
    pub tiles: Sz,
    /// Tiled decodes: the rows' join into the video (two copies of it), which comes after the
    /// tiles' caches and working sets are freed, so it is a peak of its own; 0 untiled.
    pub join: Sz,
}

impl DecodeBytes {
    /// What the decoding of the frames (tiles) holds besides the weights, before any join.
    pub fn decoding(&self) -> Sz {
        self.cache + self.working + self.video + self.tiles
    }

    /// What the decode holds besides its weights: the larger of the decoding and the join.
    pub fn activations(&self) -> Sz {
        self.decoding().max(self.join)
    }

    pub fn total(&self) -> Sz {
        self.weights + self.activations()
    }
}

impl WanVaeConfig {
    /// What decoding latents of `frames` x `h` x `w` holds with `tiling` (diffusers' rule: tiled
    /// when either side is larger than one tile): the cache and working set of one tile, the tiles
    /// held for blending, and the rows of the video joined so far; or, later, the video's join.
    /// `row_conv`: the convolutions run as [`crate::nn`]'s CPU row convolution (f32 on the CPU),
    /// whose im2col band is at most one output image.
    pub fn decode_bytes_tiled(
        &self,
        frames: usize,
        h: usize,
        w: usize,
        weight_bytes: usize,
        tiling: Option<super::VaeTiling>,
        row_conv: bool,
    ) -> DecodeBytes {
        let full = self.decode_bytes(frames, h, w, weight_bytes, row_conv);
        let ss = self.spatial_scale().max(1);
        let Some(t) = tiling else {
            return full;
        };
        let (th, tw) = (t.tile_sample_min_height / ss, t.tile_sample_min_width / ss);
        if h <= th && w <= tw {
            return full;
        }
        let tile = self.decode_bytes(frames, h.min(th), w.min(tw), weight_bytes, row_conv);
        let cols = w.div_ceil((t.tile_sample_stride_width / ss).max(1));
        // `*.video` are two copies of the frames. While a row is decoded the row above is held for
        // blending, the row's own tiles so far, the tile being decoded twice (its frames and their
        // join) and the strips joined so far (at most the video once); the strips' join into the
        // video comes after the last tile is freed (measured at 480x832x81: 2.25 GB, this 2.57 GB).
        let half = |s: Sz| Sz(s.0.map(|x| x / 2));
        DecodeBytes {
            cache: tile.cache,
            working: tile.working,
            video: half(full.video),
            tiles: half(tile.video) * sz(2 * cols + 1),
            join: full.video,
            ..full
        }
    }

    /// What decoding latents of `frames` x `h` x `w` (latent sizes) holds at its peak (`row_conv`
    /// as in [`Self::decode_bytes_tiled`]).
    pub fn decode_bytes(
        &self,
        frames: usize,
        h: usize,
        w: usize,
        weight_bytes: usize,
        row_conv: bool,
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
        // The largest output image of one convolution (the row convolution's band is at most that).
        let mut widest_conv = sz(self.out_channels) * px(stages - 1);
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
            widest_conv = widest_conv.max(sz(out) * px(i));
            if i + 1 != stages {
                // The resampler: nearest 2x (its input at the next resolution), a 3x3 conv to half
                // the channels, and on temporal stages a cached time conv doubling the channels.
                widest_in = widest_in.max(sz(out) * px(i + 1));
                let half = if self.is_residual { out } else { out / 2 };
                params = params + conv(out, half, 9);
                widest_conv = widest_conv.max(sz(half) * px(i + 1));
                let temporal = self.temperal_downsample.iter().rev().nth(i).copied() == Some(true);
                if temporal {
                    widest_conv = widest_conv.max(sz(2 * out) * px(i));
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
        // One convolution's im2col band: under the budget, and with the row convolution under its
        // output image too (at least 1 MB). Counted twice: the `gemm` crate packs (a block of) it
        // into a buffer of its own for the product (the tiny decode of `wan_vae_memory.rs` fell
        // 2.2 MB short with the band counted once).
        let mut band = (widest_in * sz(9) * f32b).min(IM2COL_BUDGET as u64);
        if row_conv {
            let out = (widest_conv * f32b).max(sz(1usize << 20));
            band = Sz(band.0.zip(out.0).map(|(b, o)| b.min(o)));
        }
        DecodeBytes {
            // The encoder is about the decoder's size: counted as one more decoder.
            weights: sz(2) * params * sz(weight_bytes),
            // Two frames per convolution from the second latent frame on (one before).
            cache: sz(frames.clamp(1, 2)) * cached * f32b,
            working: sz(3) * widest_in * f32b
                + sz(2) * band
                + crate::footprint::gemm_slabs()
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
            join: sz(0),
        }
    }
}
