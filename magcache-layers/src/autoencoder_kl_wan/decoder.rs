//! The Wan VAE's decoder: its structure, one latent frame's forward pass and its construction.

use super::config::WanVaeConfig;
use super::layers::{Conv, DupUp, FeatCache, MidBlock, Norm, ResBlock, Resample};
use super::load::Builder;
use super::trace::{record, VaeTrace};
use candle_core::Tensor;
use magcache_core::{Error, Result};

pub(super) struct UpBlock {
    pub(super) resnets: Vec<ResBlock>,
    pub(super) upsampler: Option<Resample>,
    /// The Wan2.2 VAE's `WanResidualUpBlock`: the block's input through [`DupUp`] is added.
    pub(super) shortcut: Option<DupUp>,
}

pub(super) struct Decoder {
    pub(super) conv_in: Conv,
    pub(super) mid: MidBlock,
    pub(super) up: Vec<UpBlock>,
    pub(super) norm_out: Norm,
    pub(super) conv_out: Conv,
    pub(super) slots: usize,
}

impl Decoder {
    /// One latent frame's chunk -> its video frames; `first_chunk` for frame 0 (the Wan2.2
    /// residual shortcuts keep one frame of it).
    ///
    /// After the last temporal upsampler every layer is causal in time (per-frame norms, attention,
    /// resamplers and shortcuts; causal convolutions with their cache), so the rest of the decoder
    /// runs one output frame at a time and gives the same frames as the whole chunk at once: the
    /// widest stages (full resolution) hold one frame instead of four. With a `trace`, the chunk
    /// runs whole (the trace records whole-chunk intermediates).
    pub(super) fn forward(
        &self,
        x: &Tensor,
        cache: &mut FeatCache,
        first_chunk: bool,
        mut trace: Option<&mut VaeTrace>,
    ) -> Result<Tensor> {
        let x = self.conv_in.forward(x, cache)?;
        record(&mut trace, "decoder.conv_in", &x);
        let mut x = self.mid.forward(&x, cache)?;
        record(&mut trace, "decoder.mid_block", &x);
        let streamed = if trace.is_some() {
            self.up.len()
        } else {
            self.up
                .iter()
                .rposition(|b| matches!(b.upsampler, Some(Resample::Up3d { .. })))
                .map_or(0, |i| i + 1)
        };
        for (i, blk) in self.up[..streamed].iter().enumerate() {
            x = blk.forward(&x, cache, first_chunk)?;
            if trace.is_some() {
                record(&mut trace, &format!("decoder.up_blocks.{i}"), &x);
            }
        }
        let tail = |mut y: Tensor, cache: &mut FeatCache| -> Result<Tensor> {
            for blk in &self.up[streamed..] {
                y = blk.forward(&y, cache, first_chunk)?;
            }
            let y = self.norm_out.forward(&y)?.silu()?;
            self.conv_out.forward(&y, cache)
        };
        let x = if trace.is_some() {
            tail(x, cache)?
        } else {
            let frames = (0..x.dim(1)?)
                .map(|f| tail(x.narrow(1, f, 1)?, cache))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&frames, 1)?
        };
        record(&mut trace, "decoder", &x);
        Ok(x)
    }
}

impl UpBlock {
    fn forward(&self, x: &Tensor, cache: &mut FeatCache, first_chunk: bool) -> Result<Tensor> {
        let mut y = x.clone();
        for r in &self.resnets {
            y = r.forward(&y, cache)?;
        }
        if let Some(u) = &self.upsampler {
            y = u.forward(&y, cache)?;
        }
        match &self.shortcut {
            Some(s) => Ok((y + s.forward(x, first_chunk)?)?),
            None => Ok(y),
        }
    }
}

impl Builder<'_> {
    pub(super) fn decoder(&mut self, cfg: &WanVaeConfig) -> Result<Decoder> {
        let d = cfg.decoder_base_dim;
        let stages = cfg.dim_mult.len();
        let dims: Vec<usize> = std::iter::once(cfg.dim_mult[stages - 1])
            .chain(cfg.dim_mult.iter().rev().copied())
            .map(|m| d * m)
            .collect();
        let conv_in = self.conv333("decoder.conv_in", cfg.z_dim, dims[0])?;
        let mid = self.mid("decoder.mid_block", dims[0])?;
        let mut up = Vec::new();
        let mut out_dim = dims[0];
        let residual = cfg.is_residual;
        for i in 0..stages {
            // Every upsampler halves the channels (Wan2.1), so each stage after the first starts at
            // half width; the Wan2.2 VAE's upsamplers keep them.
            let mut in_dim = if i > 0 && !residual {
                dims[i] / 2
            } else {
                dims[i]
            };
            let block_in = in_dim;
            out_dim = dims[i + 1];
            let mut resnets = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                resnets.push(self.res(
                    &format!("decoder.up_blocks.{i}.resnets.{j}"),
                    in_dim,
                    out_dim,
                )?);
                in_dim = out_dim;
            }
            let (upsampler, temporal_up) = if i + 1 != stages {
                let (u, t) = self.upsampler(cfg, i, out_dim)?;
                (Some(u), t)
            } else {
                (None, false)
            };
            let shortcut = if residual && upsampler.is_some() {
                let (ft, fs) = (if temporal_up { 2 } else { 1 }, 2);
                let factor = ft * fs * fs;
                if !(out_dim * factor).is_multiple_of(block_in) {
                    return Err(Error::msg(format!(
                        "Wan VAE config: up block {i} cannot spread {block_in} channels over {out_dim} x {factor}"
                    )));
                }
                Some(DupUp {
                    ft,
                    fs,
                    out: out_dim,
                    repeats: out_dim * factor / block_in,
                })
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                upsampler,
                shortcut,
            });
        }
        let norm_out = self.norm("decoder.norm_out", out_dim, false)?;
        let conv_out = self.conv333("decoder.conv_out", out_dim, cfg.out_channels)?;
        Ok(Decoder {
            conv_in,
            mid,
            up,
            norm_out,
            conv_out,
            slots: self.slots,
        })
    }

    /// The upsampler of up block `i` (not the last) and whether it also upsamples in time.
    fn upsampler(
        &mut self,
        cfg: &WanVaeConfig,
        i: usize,
        out_dim: usize,
    ) -> Result<(Resample, bool)> {
        let residual = cfg.is_residual;
        let name = if residual {
            format!("decoder.up_blocks.{i}.upsampler")
        } else {
            format!("decoder.up_blocks.{i}.upsamplers.0")
        };
        let conv_out = if residual { out_dim } else { out_dim / 2 };
        let conv = self.conv2d(&format!("{name}.resample.1"), out_dim, conv_out, 3, 1, 1)?;
        // temperal_upsample = temperal_downsample reversed.
        let temporal = cfg
            .temperal_downsample
            .iter()
            .rev()
            .nth(i)
            .copied()
            .ok_or_else(|| {
                Error::msg(format!(
                    "Wan VAE config: temperal_downsample entry for up block {i} missing"
                ))
            })?;
        let resample = if temporal {
            let time_conv = self.conv3d(
                &format!("{name}.time_conv"),
                out_dim,
                2 * out_dim,
                3,
                1,
                1,
                0,
                1,
            )?;
            // The time conv's own cache slot doubles as the "first chunk seen" marker.
            let slot = time_conv
                .slot
                .ok_or_else(|| Error::msg("Wan VAE: upsample time_conv without cache slot"))?;
            Resample::Up3d {
                conv,
                time_conv,
                slot,
            }
        } else {
            Resample::Up2d { conv }
        };
        Ok((resample, temporal))
    }
}
