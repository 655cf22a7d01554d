//! The Wan VAE's encoder: its structure, one chunk's forward pass and its construction.

use super::config::WanVaeConfig;
use super::layers::{AttnBlock, AvgDown, Conv, FeatCache, MidBlock, Norm, ResBlock, Resample};
use super::load::Builder;
use super::trace::{record, VaeTrace};
use candle_core::Tensor;
use magcache_core::{Error, Result};

pub(super) enum DownLayer {
    Res(ResBlock),
    Attn(AttnBlock),
    Resample(Resample),
    /// The Wan2.2 VAE's `WanResidualDownBlock`: residual blocks and the resampler, plus the
    /// block's input through [`AvgDown`].
    ResidualDown {
        resnets: Vec<ResBlock>,
        down: Option<Resample>,
        shortcut: AvgDown,
    },
}

pub(super) struct Encoder {
    pub(super) conv_in: Conv,
    pub(super) layers: Vec<DownLayer>,
    pub(super) mid: MidBlock,
    pub(super) norm_out: Norm,
    pub(super) conv_out: Conv,
    pub(super) slots: usize,
}

impl Encoder {
    pub(super) fn forward(
        &self,
        x: &Tensor,
        cache: &mut FeatCache,
        mut trace: Option<&mut VaeTrace>,
    ) -> Result<Tensor> {
        // Up to the first temporal downsampler every layer is causal in time, so that part runs one
        // input frame at a time (the same frames as the whole chunk at once, with the full-
        // resolution stages holding one frame instead of four). With a `trace`, the chunk runs whole.
        let streamed = if trace.is_some() {
            0
        } else {
            self.layers
                .iter()
                .position(DownLayer::is_temporal)
                .unwrap_or(self.layers.len())
        };
        let head = |mut y: Tensor, cache: &mut FeatCache| -> Result<Tensor> {
            y = self.conv_in.forward(&y, cache)?;
            for l in &self.layers[..streamed] {
                y = l.forward(&y, cache)?;
            }
            Ok(y)
        };
        let mut x = if streamed == 0 {
            self.conv_in.forward(x, cache)?
        } else {
            let frames = (0..x.dim(1)?)
                .map(|f| head(x.narrow(1, f, 1)?, cache))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&frames, 1)?
        };
        for l in &self.layers[streamed..] {
            x = l.forward(&x, cache)?;
        }
        let x = self.mid.forward(&x, cache)?;
        record(&mut trace, "encoder.mid_block", &x);
        let x = self.norm_out.forward(&x)?.silu()?;
        let x = self.conv_out.forward(&x, cache)?;
        record(&mut trace, "encoder", &x);
        Ok(x)
    }
}

impl DownLayer {
    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        match self {
            DownLayer::Res(r) => r.forward(x, cache),
            DownLayer::Attn(a) => a.forward(x),
            DownLayer::Resample(r) => r.forward(x, cache),
            DownLayer::ResidualDown {
                resnets,
                down,
                shortcut,
            } => {
                let mut y = x.clone();
                for r in resnets {
                    y = r.forward(&y, cache)?;
                }
                if let Some(d) = down {
                    y = d.forward(&y, cache)?;
                }
                Ok((y + shortcut.forward(x)?)?)
            }
        }
    }

    /// Whether the layer mixes frames other than causally (a temporal downsampler, or a residual
    /// block holding one or averaging frames in its shortcut).
    fn is_temporal(&self) -> bool {
        match self {
            DownLayer::Resample(Resample::Down3d { .. }) => true,
            DownLayer::ResidualDown { down, shortcut, .. } => {
                matches!(down, Some(Resample::Down3d { .. })) || shortcut.ft > 1
            }
            _ => false,
        }
    }
}

impl Builder<'_> {
    pub(super) fn encoder(&mut self, cfg: &WanVaeConfig) -> Result<Encoder> {
        let dims: Vec<usize> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|m| cfg.base_dim * m)
            .collect();
        let conv_in = self.conv333("encoder.conv_in", cfg.in_channels, dims[0])?;
        let stages = cfg.dim_mult.len();
        if cfg.is_residual {
            return self.residual_encoder(cfg, &dims, conv_in);
        }
        let mut layers = Vec::new();
        let mut scale = 1.0f64;
        let mut out_dim = dims[0];
        for i in 0..stages {
            let mut in_dim = dims[i];
            out_dim = dims[i + 1];
            for _ in 0..cfg.num_res_blocks {
                let name = format!("encoder.down_blocks.{}", layers.len());
                layers.push(DownLayer::Res(self.res(&name, in_dim, out_dim)?));
                if cfg.attn_scales.contains(&scale) {
                    let name = format!("encoder.down_blocks.{}", layers.len());
                    layers.push(DownLayer::Attn(self.attn(&name, out_dim)?));
                }
                in_dim = out_dim;
            }
            if i + 1 != stages {
                let name = format!("encoder.down_blocks.{}", layers.len());
                let temporal = cfg.temperal_downsample.get(i).copied().ok_or_else(|| {
                    Error::msg(format!("Wan VAE config: temperal_downsample[{i}] missing"))
                })?;
                let r = self.downsampler(&name, out_dim, temporal)?;
                layers.push(DownLayer::Resample(r));
                scale /= 2.0;
            }
        }
        self.encoder_tail(cfg, out_dim, conv_in, layers)
    }

    /// `WanResample` in `downsample2d` / `downsample3d` mode (`name.resample.1`, `name.time_conv`).
    fn downsampler(&mut self, name: &str, dim: usize, temporal: bool) -> Result<Resample> {
        let conv = self.conv2d(&format!("{name}.resample.1"), dim, dim, 3, 0, 2)?;
        Ok(if temporal {
            let time_conv = self.conv3d(&format!("{name}.time_conv"), dim, dim, 3, 1, 0, 0, 2)?;
            Resample::Down3d {
                conv,
                time_conv,
                slot: self.next_slot(),
            }
        } else {
            Resample::Down2d { conv }
        })
    }

    /// The mid block and the head after the down layers.
    fn encoder_tail(
        &mut self,
        cfg: &WanVaeConfig,
        out_dim: usize,
        conv_in: Conv,
        layers: Vec<DownLayer>,
    ) -> Result<Encoder> {
        let mid = self.mid("encoder.mid_block", out_dim)?;
        let norm_out = self.norm("encoder.norm_out", out_dim, false)?;
        let conv_out = self.conv333("encoder.conv_out", out_dim, 2 * cfg.z_dim)?;
        Ok(Encoder {
            conv_in,
            layers,
            mid,
            norm_out,
            conv_out,
            slots: self.slots,
        })
    }

    /// The Wan2.2 VAE's encoder: one `WanResidualDownBlock` per stage (no attention; the last stage
    /// does not downsample), each with an [`AvgDown`] shortcut.
    fn residual_encoder(
        &mut self,
        cfg: &WanVaeConfig,
        dims: &[usize],
        conv_in: Conv,
    ) -> Result<Encoder> {
        let stages = cfg.dim_mult.len();
        let mut layers = Vec::new();
        for i in 0..stages {
            let (in_dim, out_dim) = (dims[i], dims[i + 1]);
            let name = format!("encoder.down_blocks.{i}");
            let down_flag = i + 1 != stages;
            let temporal = down_flag
                && cfg.temperal_downsample.get(i).copied().ok_or_else(|| {
                    Error::msg(format!("Wan VAE config: temperal_downsample[{i}] missing"))
                })?;
            let (ft, fs) = (if temporal { 2 } else { 1 }, if down_flag { 2 } else { 1 });
            let factor = ft * fs * fs;
            if !(in_dim * factor).is_multiple_of(out_dim) {
                return Err(Error::msg(format!(
                    "Wan VAE config: down block {i} cannot average {in_dim} x {factor} channels into {out_dim}"
                )));
            }
            let mut resnets = Vec::new();
            let mut cin = in_dim;
            for j in 0..cfg.num_res_blocks {
                resnets.push(self.res(&format!("{name}.resnets.{j}"), cin, out_dim)?);
                cin = out_dim;
            }
            let down = if down_flag {
                Some(self.downsampler(&format!("{name}.downsampler"), out_dim, temporal)?)
            } else {
                None
            };
            layers.push(DownLayer::ResidualDown {
                resnets,
                down,
                shortcut: AvgDown {
                    ft,
                    fs,
                    out: out_dim,
                    group: in_dim * factor / out_dim,
                },
            });
        }
        self.encoder_tail(cfg, dims[stages], conv_in, layers)
    }
}
