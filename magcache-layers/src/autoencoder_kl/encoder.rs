//! The FLUX VAE's encoder: its structure, forward pass and construction.

use super::config::FluxVaeConfig;
use super::layers::{Conv, MidBlock, Norm, Stage};
use super::load::Builder;
use candle_core::Tensor;
use magcache_core::Result;

pub(super) struct Encoder {
    pub(super) conv_in: Conv,
    pub(super) down: Vec<Stage>,
    pub(super) mid: MidBlock,
    pub(super) norm_out: Norm,
    pub(super) conv_out: Conv,
}

impl Encoder {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for s in &self.down {
            for r in &s.resnets {
                x = r.forward(&x)?;
            }
            if let Some(d) = &s.resample {
                x = d.forward(&x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        let x = self.mid.forward(&x)?;
        self.conv_out.forward(&self.norm_out.forward(&x)?.silu()?)
    }
}

impl Builder<'_> {
    pub(super) fn encoder(&self, cfg: &FluxVaeConfig) -> Result<Encoder> {
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let n = boc.len();
        let conv_in = self.conv("encoder.conv_in", cfg.in_channels, boc[0], 3, 1)?;
        let mut down = Vec::with_capacity(n);
        let mut cin = boc[0];
        for (i, &cout) in boc.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    self.resnet(&format!("{p}.resnets.{j}"), c, cout, g)
                })
                .collect::<Result<Vec<_>>>()?;
            let resample = if i + 1 < n {
                let mut c = self.conv(&format!("{p}.downsamplers.0.conv"), cout, cout, 3, 0)?;
                c.stride = 2;
                Some(c)
            } else {
                None
            };
            down.push(Stage { resnets, resample });
            cin = cout;
        }
        let last = boc[n - 1];
        Ok(Encoder {
            conv_in,
            down,
            mid: self.mid("encoder.mid_block", last, cfg)?,
            norm_out: self.norm("encoder.conv_norm_out", last, g)?,
            conv_out: self.conv("encoder.conv_out", last, 2 * cfg.latent_channels, 3, 1)?,
        })
    }
}
