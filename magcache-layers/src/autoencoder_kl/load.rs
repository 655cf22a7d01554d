//! Loading the FLUX VAE: finding its config and weights, building it from diffusers-named tensors,
//! and refusing a checkpoint the config does not describe.

use super::config::FluxVaeConfig;
use super::layers::{AttnBlock, Conv, MidBlock, Norm, ResBlock};
use super::layout::{detect_layout, normalize_attention, rename_bfl, VaeLayout};
use super::FluxVae;
use crate::nn::Linear;
use crate::vae_common::{check_dtype, locate, runnable_conv_weight};
use crate::weights::WeightStore;
use candle_core::{DType, Device};
use magcache_core::{Error, Placement, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// GroupNorm epsilon of every norm in diffusers' `Encoder` / `Decoder` (and BFL's `Normalize`).
const NORM_EPS: f64 = 1e-6;

pub(super) struct Builder<'a> {
    pub(super) store: &'a WeightStore,
}

impl Builder<'_> {
    /// A convolution: weight in the run's dtype (f32 for bf16 on the CPU), bias in f32.
    pub(super) fn conv(
        &self,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        pad: usize,
    ) -> Result<Conv> {
        let w = runnable_conv_weight(
            self.store
                .get_weight(&format!("{name}.weight"), &[cout, cin, k, k])?,
        )?;
        let b = self
            .store
            .get_shape(&format!("{name}.bias"), &[cout])?
            .reshape((1, cout, 1, 1))?;
        Ok(Conv {
            w,
            b,
            pad,
            stride: 1,
        })
    }

    pub(super) fn norm(&self, name: &str, c: usize, groups: usize) -> Result<Norm> {
        let w = self.store.get_shape(&format!("{name}.weight"), &[c])?;
        let b = self.store.get_shape(&format!("{name}.bias"), &[c])?;
        Ok(Norm(candle_nn::GroupNorm::new(w, b, c, groups, NORM_EPS)?))
    }

    pub(super) fn linear(&self, name: &str, c: usize) -> Result<Linear> {
        let w = self.store.get_weight(&format!("{name}.weight"), &[c, c])?;
        let b = self.store.get_shape(&format!("{name}.bias"), &[c])?;
        Linear::new(w, Some(b))
    }

    pub(super) fn resnet(&self, name: &str, cin: usize, cout: usize, g: usize) -> Result<ResBlock> {
        Ok(ResBlock {
            norm1: self.norm(&format!("{name}.norm1"), cin, g)?,
            conv1: self.conv(&format!("{name}.conv1"), cin, cout, 3, 1)?,
            norm2: self.norm(&format!("{name}.norm2"), cout, g)?,
            conv2: self.conv(&format!("{name}.conv2"), cout, cout, 3, 1)?,
            shortcut: (cin != cout)
                .then(|| self.conv(&format!("{name}.conv_shortcut"), cin, cout, 1, 0))
                .transpose()?,
        })
    }

    pub(super) fn mid(&self, name: &str, c: usize, cfg: &FluxVaeConfig) -> Result<MidBlock> {
        let g = cfg.norm_num_groups;
        let attn = if cfg.mid_block_add_attention {
            let a = format!("{name}.attentions.0");
            Some(AttnBlock {
                norm: self.norm(&format!("{a}.group_norm"), c, g)?,
                q: self.linear(&format!("{a}.to_q"), c)?,
                k: self.linear(&format!("{a}.to_k"), c)?,
                v: self.linear(&format!("{a}.to_v"), c)?,
                out: self.linear(&format!("{a}.to_out.0"), c)?,
            })
        } else {
            None
        };
        Ok(MidBlock {
            res0: self.resnet(&format!("{name}.resnets.0"), c, c, g)?,
            attn,
            res1: self.resnet(&format!("{name}.resnets.1"), c, c, g)?,
        })
    }
}

/// Where a VAE path's config and weights are: `(config.json if any, weights path)`; a folder
/// without `config.json` (in it or in its `vae/`) may hold BFL's `ae.safetensors`.
fn vae_paths(path: &Path) -> Result<(Option<PathBuf>, PathBuf)> {
    if let Some(files) = locate(path)? {
        return Ok((files.config, files.weights));
    }
    let ae = path.join("ae.safetensors");
    if ae.is_file() {
        return Ok((None, ae));
    }
    Err(Error::weights(
        path.display().to_string(),
        "(file)",
        "no AutoencoderKL config.json here or in vae/, and no BFL ae.safetensors (give the pipeline's vae/ folder or ae.safetensors)",
    ))
}

impl FluxVae {
    /// Loads a diffusers VAE folder (`config.json` + `diffusion_pytorch_model.safetensors` or a
    /// sharded `*.safetensors.index.json`), a pipeline folder (its `vae/`, else its BFL
    /// `ae.safetensors`), a weights file with `config.json` beside it, or BFL's single-file
    /// `ae.safetensors` (layout detected by tensor names; its sizes come from a beside
    /// `AutoencoderKL` `config.json` if there is one, else from the tensors with BFL's FLUX.1 groups
    /// and scale/shift). Convolution and attention weights are used in `dtype` (f32, f16 or bf16;
    /// f16 runs in f32 when the config has `force_upcast`, as diffusers pipelines do) on `device`;
    /// norms and activations in f32.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<FluxVae> {
        check_dtype(dtype, "FLUX VAE")?;
        let (cfg_path, weights) = vae_paths(path)?;
        let mut store = WeightStore::load_checkpoint(&weights)?;
        let layout = detect_layout(&store)?;
        if layout == VaeLayout::Bfl {
            rename_bfl(&mut store)?;
        }
        normalize_attention(&mut store)?;
        let config = match (&cfg_path, layout) {
            (Some(c), _) => FluxVaeConfig::read(c)?,
            (None, VaeLayout::Bfl) => FluxVaeConfig::from_bfl_tensors(&store)?,
            (None, VaeLayout::Diffusers) => {
                return Err(Error::weights(
                    weights.display().to_string(),
                    "(file)",
                    "no config.json beside these diffusers AutoencoderKL weights (give the vae/ folder)",
                ))
            }
        };
        let dtype = if dtype == DType::F16 && config.force_upcast {
            DType::F32
        } else {
            dtype
        };
        store.set_placement(Placement {
            device: device.clone(),
            dtype,
            ..Default::default()
        });
        let mut vae = FluxVae::from_store(config, &store)?;
        vae.layout = layout;
        let cfg_name = cfg_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("{} (inferred sizes)", store.origin));
        vae.check_unused(&store, &cfg_name)?;
        Ok(vae)
    }

    /// Builds the VAE from diffusers-named tensors (the store's placement gives device and dtype).
    pub fn from_store(config: FluxVaeConfig, store: &WeightStore) -> Result<FluxVae> {
        config.validate(&store.origin)?;
        let b = Builder { store };
        let encoder = b.encoder(&config)?;
        let decoder = b.decoder(&config)?;
        let z2 = 2 * config.latent_channels;
        let z = config.latent_channels;
        let quant_conv = config
            .use_quant_conv
            .then(|| b.conv("quant_conv", z2, z2, 1, 0))
            .transpose()?;
        let post_quant_conv = config
            .use_post_quant_conv
            .then(|| b.conv("post_quant_conv", z, z, 1, 0))
            .transpose()?;
        Ok(FluxVae {
            config,
            layout: VaeLayout::Diffusers,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            device: store.placement().device.clone(),
            origin: store.origin.clone(),
            warnings: Vec::new(),
            tiling: None,
        })
    }

    /// Tensors the model did not use: an error when they belong to the encoder, decoder or quant
    /// convs (the config builds a smaller VAE than the checkpoint: it would decode wrongly), a
    /// warning otherwise.
    pub fn check_unused(&mut self, store: &WeightStore, cfg_name: &str) -> Result<()> {
        let unused = store.unused();
        let structural: BTreeSet<&String> = unused
            .iter()
            .filter(|k| {
                ["encoder.", "decoder.", "quant_conv.", "post_quant_conv."]
                    .iter()
                    .any(|p| k.starts_with(p))
            })
            .collect();
        if let Some(first) = structural.iter().next() {
            return Err(Error::weights(
                store.file_of(first),
                first.as_str(),
                format!(
                    "is not used by the VAE that {cfg_name} describes ({} such tensor(s)): the config (layers_per_block, block_out_channels, use_quant_conv, use_post_quant_conv, mid_block_add_attention) does not match the checkpoint",
                    structural.len()
                ),
            ));
        }
        if let Some(w) = store.check_unused(cfg_name, |_| "its config".to_string())? {
            self.warnings.push(w);
        }
        Ok(())
    }
}
