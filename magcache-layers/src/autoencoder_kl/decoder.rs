//! The FLUX VAE's decoder: its structure, forward pass and construction.

use super::config::FluxVaeConfig;
use super::layers::{Conv, MidBlock, Norm, Stage};
use super::load::Builder;
use candle_core::Tensor;
use magcache_core::Result;

pub(super) struct Decoder {
    pub(super) conv_in: Conv,
    pub(super) mid: MidBlock,
    pub(super) up: Vec<Stage>,
    pub(super) norm_out: Norm,
    pub(super) conv_out: Conv,
}

impl Decoder {
    pub(super) fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid.forward(&x)?;
        // A server's cancelled job stops here, between blocks (`magcache_core::cancel`).
        for s in &self.up {
            for r in &s.resnets {
                magcache_core::cancel::check()?;
                x = r.forward(&x)?;
            }
            if let Some(u) = &s.resample {
                let (_, _, h, w) = x.dims4()?;
                x = u.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&x)?.silu()?)
    }
}

impl Builder<'_> {
    pub(super) fn decoder(&self, cfg: &FluxVaeConfig) -> Result<Decoder> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let n = rev.len();
        let conv_in = self.conv("decoder.conv_in", cfg.latent_channels, rev[0], 3, 1)?;
        let mid = self.mid("decoder.mid_block", rev[0], cfg)?;
        let mut up = Vec::with_capacity(n);
        let mut cin = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    self.resnet(&format!("{p}.resnets.{j}"), c, cout, g)
                })
                .collect::<Result<Vec<_>>>()?;
            let resample = (i + 1 < n)
                .then(|| self.conv(&format!("{p}.upsamplers.0.conv"), cout, cout, 3, 1))
                .transpose()?;
            up.push(Stage { resnets, resample });
            cin = cout;
        }
        let first = rev[n - 1];
        Ok(Decoder {
            conv_in,
            mid,
            up,
            norm_out: self.norm("decoder.conv_norm_out", first, g)?,
            conv_out: self.conv("decoder.conv_out", first, cfg.out_channels, 3, 1)?,
        })
    }
}
