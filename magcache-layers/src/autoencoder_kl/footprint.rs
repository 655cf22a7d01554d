//! What a FLUX (AutoencoderKL) decode holds, from its config alone (the size guard's decode part).
//! The sizes follow the decoder as [`super::decoder`] runs it: the mid block's attention over the
//! latent positions (scores bounded by [`ATTENTION_SCORE_BUDGET`]), then each up block's residual
//! blocks and nearest-2x upsampler, widest where the channels are many and the resolution full.

use super::config::FluxVaeConfig;
use crate::footprint::{sz, Sz};
use crate::nn::{ATTENTION_SCORE_BUDGET, IM2COL_BUDGET};

impl FluxVaeConfig {
    /// The parameters of the whole VAE (encoder and decoder are loaded together): about twice the
    /// decoder's convolutions.
    pub fn params(&self) -> Sz {
        let conv = |i: usize, o: usize, k: usize| sz(i) * sz(o) * sz(k) * sz(k) + sz(o);
        let rev: Vec<usize> = self.block_out_channels.iter().rev().copied().collect();
        let Some(&first) = rev.first() else {
            return sz(0);
        };
        let mut p = conv(self.latent_channels, first, 3) + sz(8) * conv(first, first, 3);
        // The mid attention: four linears.
        p = p + sz(4) * (sz(first) * sz(first) + sz(first));
        let mut cin = first;
        for (i, &c) in rev.iter().enumerate() {
            for j in 0..=self.layers_per_block {
                let ci = if j == 0 { cin } else { c };
                p = p + conv(ci, c, 3) + conv(c, c, 3);
                if ci != c {
                    p = p + conv(ci, c, 1);
                }
            }
            if i + 1 < rev.len() {
                p = p + conv(c, c, 3);
            }
            cin = c;
        }
        p = p + conv(cin, self.out_channels, 3);
        sz(2) * p
    }

    /// The decode's working set for latents `h` x `w` (one image), in bytes (f32 activations): the
    /// largest of every residual block's live tensors (its input, kept for the sum; the group norm's
    /// centred copy and square; the normalised input and its SiLU; the shortcut and the
    /// convolution's output, at the block's resolution) and every upsampler's (its input, the 2x
    /// copy, the convolution's output), one im2col band, and off the CPU (`cpu` false) the
    /// attention's scores (on the CPU the fused attention holds none; measured by
    /// `tests/tests/flux_vae_memory.rs`), and 16 MB for small buffers.
    pub fn decode_working_bytes(&self, h: usize, w: usize, cpu: bool) -> Sz {
        let f32b = sz(4);
        let rev: Vec<usize> = self.block_out_channels.iter().rev().copied().collect();
        let Some(&first) = rev.first() else {
            return sz(0);
        };
        let px = |level: usize| {
            sz(h) * sz(w) * sz(1usize << level.min(30)) * sz(1usize << level.min(30))
        };
        let tokens = px(0);
        let scores = (tokens * tokens * f32b).min(ATTENTION_SCORE_BUDGET as u64);
        let mut widest = (sz(4) * sz(first) + sz(2) * sz(first)) * px(0);
        // The largest convolution input (channels x pixels): its im2col band is 9x that.
        let mut conv_in = sz(first) * px(0);
        let mut cin = first;
        for (i, &c) in rev.iter().enumerate() {
            let block = (sz(4) * sz(cin) + sz(3) * sz(c)) * px(i);
            widest = widest.max(block);
            conv_in = conv_in.max(sz(cin) * px(i));
            if i + 1 < rev.len() {
                widest = widest.max(sz(c) * px(i) + sz(2) * sz(c) * px(i + 1));
                conv_in = conv_in.max(sz(c) * px(i + 1));
            }
            cin = c;
        }
        let small = sz(16 << 20);
        let im2col = (conv_in * sz(9) * f32b).min(IM2COL_BUDGET as u64);
        if cpu {
            // The CPU's row convolution keeps a band under one output image (at least 1 MB).
            let band = (conv_in * f32b).max(sz(1 << 20));
            let band = match (band.0, im2col.0) {
                (Some(a), Some(b)) => Sz(Some(a.min(b))),
                _ => im2col,
            };
            // gemm's per-thread scratch: a CPU's, as in the Wan VAE's decode.
            return widest * f32b + band + crate::footprint::gemm_slabs() + small;
        }
        widest * f32b + im2col + scores + small
    }

    /// The decoded image of latents `h` x `w` as the pipeline holds it: the decoder's output and
    /// its copies while mapped to `[0, 1]` pixels (four).
    pub fn decode_image_bytes(&self, h: usize, w: usize) -> Sz {
        let f = self.vae_scale_factor();
        sz(4) * sz(h) * sz(w) * sz(f) * sz(f) * sz(self.out_channels) * sz(4)
    }
}
