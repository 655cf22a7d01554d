//! Building the Wan VAE: from a diffusers checkpoint or seeded random weights, layer by layer.

use super::config::WanVaeConfig;
use super::layers::{AttnBlock, Conv, MidBlock, Norm, ResBlock};
use super::WanVae;
use crate::nn::Linear;
use crate::random::{sub_seed, uniform};
use crate::vae_common::{check_dtype, locate, runnable_conv_weight};
use crate::weights::WeightStore;
use candle_core::{DType, Device, Tensor};
use magcache_core::{Error, Placement, Result};
use std::path::Path;

/// Where the builder takes its tensors from: a checkpoint, or seeded random init (presets, tests).
pub(super) enum Source<'a> {
    Store(&'a WeightStore),
    Random {
        seed: u64,
        device: Device,
        dtype: DType,
    },
}

pub(super) struct Builder<'a> {
    pub(super) src: Source<'a>,
    pub(super) slots: usize,
}

impl Builder<'_> {
    pub(super) fn next_slot(&mut self) -> usize {
        self.slots += 1;
        self.slots - 1
    }

    /// A convolution weight in the run's dtype.
    pub(super) fn weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match &self.src {
            Source::Store(s) => s.get_weight(name, shape),
            Source::Random {
                seed,
                device,
                dtype,
            } => {
                let fan_in: usize = shape.iter().skip(1).product();
                let a = (3.0 / fan_in.max(1) as f32).sqrt();
                Ok(uniform(sub_seed(*seed, name), shape, a)?
                    .to_dtype(*dtype)?
                    .to_device(device)?)
            }
        }
    }

    /// A bias or norm scale in f32 (random init: scales `1 + U(-0.1, 0.1)`, biases `U(-0.05, 0.05)`).
    pub(super) fn param(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match &self.src {
            Source::Store(s) => s.get_shape(name, shape),
            Source::Random { seed, device, .. } => {
                let s = sub_seed(*seed, name);
                let t = if name.ends_with(".gamma") {
                    (uniform(s, shape, 0.1)? + 1.0)?
                } else {
                    uniform(s, shape, 0.05)?
                };
                Ok(t.to_device(device)?)
            }
        }
    }

    /// A convolution weight as the convolution runs it: in the run's dtype, except bf16 on the CPU,
    /// where candle's conv2d has no bf16 kernel; there the bf16-rounded weight runs in f32.
    pub(super) fn conv_weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        runnable_conv_weight(self.weight(name, shape)?)
    }

    pub(super) fn bias(&self, name: &str, o: usize) -> Result<Tensor> {
        Ok(self
            .param(&format!("{name}.bias"), &[o])?
            .reshape((1, o, 1, 1))?)
    }

    /// `WanCausalConv3d(cin, cout, (kt, k, k), padding=(pt, p, p), stride=(st, 1, 1))`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv3d(
        &mut self,
        name: &str,
        cin: usize,
        cout: usize,
        kt: usize,
        k: usize,
        pt: usize,
        p: usize,
        stride_t: usize,
    ) -> Result<Conv> {
        let w = self.conv_weight(&format!("{name}.weight"), &[cout, cin, kt, k, k])?;
        let taps = (0..kt)
            .map(|t| Ok(w.narrow(2, t, 1)?.squeeze(2)?.contiguous()?))
            .collect::<Result<Vec<_>>>()?;
        let time_pad = 2 * pt;
        let slot = (time_pad > 0).then(|| self.next_slot());
        Ok(Conv {
            taps,
            b: self.bias(name, cout)?,
            stride_t,
            pad_hw: p,
            stride_hw: 1,
            time_pad,
            slot,
        })
    }

    /// The usual `3x3x3` causal conv with padding 1.
    pub(super) fn conv333(&mut self, name: &str, cin: usize, cout: usize) -> Result<Conv> {
        self.conv3d(name, cin, cout, 3, 3, 1, 1, 1)
    }

    /// A per-frame `nn.Conv2d(cin, cout, k, padding, stride)`.
    pub(super) fn conv2d(
        &mut self,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        pad: usize,
        stride: usize,
    ) -> Result<Conv> {
        let w = self.conv_weight(&format!("{name}.weight"), &[cout, cin, k, k])?;
        Ok(Conv {
            taps: vec![w],
            b: self.bias(name, cout)?,
            stride_t: 1,
            pad_hw: pad,
            stride_hw: stride,
            time_pad: 0,
            slot: None,
        })
    }

    pub(super) fn norm(&self, name: &str, c: usize, images: bool) -> Result<Norm> {
        let shape: &[usize] = if images { &[c, 1, 1] } else { &[c, 1, 1, 1] };
        let g = self
            .param(&format!("{name}.gamma"), shape)?
            .reshape((1, 1, c, 1, 1))?;
        Ok(Norm {
            gamma: g,
            scale: (c as f64).sqrt(),
        })
    }

    pub(super) fn linear1x1(&self, name: &str, cin: usize, cout: usize) -> Result<Linear> {
        let w = self
            .weight(&format!("{name}.weight"), &[cout, cin, 1, 1])?
            .reshape((cout, cin))?;
        let b = self.param(&format!("{name}.bias"), &[cout])?;
        Linear::new(w, Some(b))
    }

    pub(super) fn res(&mut self, name: &str, cin: usize, cout: usize) -> Result<ResBlock> {
        let shortcut = if cin != cout {
            Some(self.conv3d(&format!("{name}.conv_shortcut"), cin, cout, 1, 1, 0, 0, 1)?)
        } else {
            None
        };
        Ok(ResBlock {
            norm1: self.norm(&format!("{name}.norm1"), cin, false)?,
            conv1: self.conv333(&format!("{name}.conv1"), cin, cout)?,
            norm2: self.norm(&format!("{name}.norm2"), cout, false)?,
            conv2: self.conv333(&format!("{name}.conv2"), cout, cout)?,
            shortcut,
        })
    }

    pub(super) fn attn(&self, name: &str, c: usize) -> Result<AttnBlock> {
        Ok(AttnBlock {
            norm: self.norm(&format!("{name}.norm"), c, true)?,
            to_qkv: self.linear1x1(&format!("{name}.to_qkv"), c, 3 * c)?,
            proj: self.linear1x1(&format!("{name}.proj"), c, c)?,
        })
    }

    pub(super) fn mid(&mut self, name: &str, c: usize) -> Result<MidBlock> {
        Ok(MidBlock {
            res0: self.res(&format!("{name}.resnets.0"), c, c)?,
            attn: self.attn(&format!("{name}.attentions.0"), c)?,
            res1: self.res(&format!("{name}.resnets.1"), c, c)?,
        })
    }
}

impl WanVae {
    /// Loads a diffusers VAE folder (`config.json` + `diffusion_pytorch_model.safetensors` or a
    /// sharded `*.safetensors.index.json`), a pipeline folder (its `vae/`), its `config.json`, or a
    /// weights file with `config.json` beside it. Convolution weights are used in `dtype` (f32, f16
    /// or bf16) on `device`; norms, attention and activations run in f32.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<WanVae> {
        check_dtype(dtype, "Wan VAE")?;
        let files = locate(path)?.ok_or_else(|| {
            Error::weights(
                path.display().to_string(),
                "(file)",
                "no AutoencoderKLWan config.json here or in vae/ (give the pipeline's vae/ folder)",
            )
        })?;
        let weights = files.weights;
        let cfg_path = files.config.ok_or_else(|| {
            Error::weights(
                weights.display().to_string(),
                "(file)",
                "no config.json beside the VAE weights",
            )
        })?;
        let config = WanVaeConfig::read(&cfg_path)?;
        let mut store = WeightStore::load_checkpoint(&weights)?;
        store.set_placement(Placement {
            device: device.clone(),
            dtype,
            ..Default::default()
        });
        WanVae::from_store(config, &store)
    }

    /// Builds the VAE from diffusers-named tensors (the store's placement gives device and dtype).
    pub fn from_store(config: WanVaeConfig, store: &WeightStore) -> Result<WanVae> {
        if store
            .keys()
            .any(|k| k.starts_with("encoder.downsamples.") || k.starts_with("decoder.upsamples."))
        {
            return Err(Error::weights(
                &store.origin,
                "encoder.downsamples.*",
                "original Wan VAE layout (Wan2.1_VAE.pth); use the diffusers `vae/` folder (AutoencoderKLWan)",
            ));
        }
        let device = store.placement().device.clone();
        WanVae::build(config, || Source::Store(store), device, &store.origin)
    }

    /// A VAE of this config with seeded random weights (convolutions uniform with std
    /// `1/sqrt(fan_in)` in `dtype`; norm scales near 1, small biases), for presets and tests.
    pub fn random(
        config: WanVaeConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<WanVae> {
        let src = || Source::Random {
            seed,
            device: device.clone(),
            dtype,
        };
        WanVae::build(config, src, device.clone(), "(random init)")
    }

    pub(super) fn build<'a>(
        config: WanVaeConfig,
        src: impl Fn() -> Source<'a>,
        device: Device,
        origin: &str,
    ) -> Result<WanVae> {
        config.validate(origin)?;
        let z = config.z_dim;
        let mut enc_b = Builder {
            src: src(),
            slots: 0,
        };
        let encoder = enc_b.encoder(&config)?;
        let quant_conv = enc_b.conv3d("quant_conv", 2 * z, 2 * z, 1, 1, 0, 0, 1)?;
        let mut dec_b = Builder {
            src: src(),
            slots: 0,
        };
        let post_quant_conv = dec_b.conv3d("post_quant_conv", z, z, 1, 1, 0, 0, 1)?;
        let decoder = dec_b.decoder(&config)?;
        let mean: Vec<f32> = config.latents_mean.iter().map(|&v| v as f32).collect();
        let inv_std: Vec<f32> = config
            .latents_std
            .iter()
            .map(|&v| 1.0 / (v as f32))
            .collect();
        Ok(WanVae {
            mean: Tensor::from_vec(mean, (1, z, 1, 1, 1), &device)?,
            inv_std: Tensor::from_vec(inv_std, (1, z, 1, 1, 1), &device)?,
            config,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            device,
            origin: origin.to_string(),
            tiling: None,
        })
    }
}
