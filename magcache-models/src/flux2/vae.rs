//! FLUX.2's image VAE, diffusers `AutoencoderKLFlux2`: the `AutoencoderKL` encoder/decoder of
//! [`magcache_layers::autoencoder_kl`] (32 latent channels, `quant_conv` / `post_quant_conv`) plus a latent batch
//! norm `bn` over the 2x2-patchified latents (`4 * latent_channels` channels, no affine) that
//! replaces `scaling_factor` / `shift_factor`. The pipeline de-normalises the transformer's packed
//! latents with it, `z * sqrt(running_var + batch_norm_eps) + running_mean` per packed channel,
//! unpatchifies them and decodes.

use candle_core::{DType, Device, Tensor};
use magcache_core::{Error, Placement, Result};
use magcache_layers::autoencoder_kl::{
    to_pixels, unpack_latents, FluxTiling, FluxVae, FluxVaeConfig,
};
use magcache_layers::config_util::read_json;
use magcache_layers::vae_common::check_dtype;
use magcache_layers::weights::WeightStore;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The diffusers class of the VAE.
pub const FLUX2_VAE_CLASS: &str = "AutoencoderKLFlux2";

/// The config of an `AutoencoderKLFlux2` folder: the `AutoencoderKL` part and the batch norm's eps.
#[derive(Clone, Debug, PartialEq)]
pub struct Flux2VaeConfig {
    pub base: FluxVaeConfig,
    pub batch_norm_eps: f64,
}

impl Flux2VaeConfig {
    /// Reads `vae/config.json`; errors name the file and the key.
    pub fn read(path: &Path) -> Result<Self> {
        let (json, shown) = read_json(path)?;
        Self::from_json(&json, &shown)
    }

    pub fn from_json(json: &Value, file: &str) -> Result<Self> {
        let obj = json
            .as_object()
            .ok_or_else(|| Error::config(file, "(document)", "expected a JSON object"))?;
        if let Some(c) = obj.get("_class_name").and_then(|v| v.as_str()) {
            if c != FLUX2_VAE_CLASS {
                return Err(Error::config(
                    file,
                    "_class_name",
                    format!("`{c}` is not FLUX.2's VAE (expected {FLUX2_VAE_CLASS})"),
                ));
            }
        }
        if let Some(p) = obj.get("patch_size").filter(|p| !p.is_null()) {
            if p.as_array()
                .map(|a| a.iter().map(|x| x.as_u64()).collect::<Vec<_>>())
                != Some(vec![Some(2), Some(2)])
            {
                return Err(Error::config(
                    file,
                    "patch_size",
                    format!("{p} is not supported (only [2, 2], as the pipeline packs)"),
                ));
            }
        }
        if let Some(d) = obj
            .get("decoder_block_out_channels")
            .filter(|d| !d.is_null())
        {
            if Some(d) != obj.get("block_out_channels") {
                return Err(Error::config(
                    file,
                    "decoder_block_out_channels",
                    format!("{d} is not supported (the decoder mirrors block_out_channels)"),
                ));
            }
        }
        let batch_norm_eps = match obj.get("batch_norm_eps") {
            None | Some(Value::Null) => 1e-4,
            Some(v) => v
                .as_f64()
                .filter(|e| e.is_finite() && *e >= 0.0)
                .ok_or_else(|| {
                    Error::config(
                        file,
                        "batch_norm_eps",
                        format!("expected a non-negative number, got {v}"),
                    )
                })?,
        };
        // The AutoencoderKL fields, read by the FLUX.1 VAE's config reader.
        let mut rest = obj.clone();
        rest.remove("_class_name");
        let base = FluxVaeConfig::from_json(&Value::Object(rest), file)?;
        Ok(Flux2VaeConfig {
            base,
            batch_norm_eps,
        })
    }

    /// Pixels per latent along each side (8 for FLUX.2).
    pub fn vae_scale_factor(&self) -> usize {
        self.base.vae_scale_factor()
    }
}

/// FLUX.2's VAE with the latent batch-norm statistics.
pub struct Flux2Vae {
    pub config: Flux2VaeConfig,
    vae: FluxVae,
    /// `running_mean` `[4C]` and `sqrt(running_var + eps)` `[4C]`, f32.
    mean: Tensor,
    std: Tensor,
    pub origin: String,
    /// Checkpoint tensors it did not use, for the report.
    pub warnings: Vec<String>,
}

/// `(config.json, weights folder or file)` of a VAE path: a `vae/` folder or a pipeline folder.
fn vae_paths(path: &Path) -> Result<(PathBuf, PathBuf)> {
    for dir in [path.to_path_buf(), path.join("vae")] {
        let cfg = dir.join("config.json");
        if cfg.is_file() {
            return Ok((cfg, dir));
        }
    }
    Err(Error::weights(
        path.display().to_string(),
        "(file)",
        "no AutoencoderKLFlux2 config.json here or in vae/ (give the pipeline's vae/ folder)",
    ))
}

impl Flux2Vae {
    /// Loads a `vae/` folder (or a pipeline folder): `config.json` + weights (single file or
    /// sharded index). Convolution and attention weights in `dtype` (f16 runs in f32 with
    /// `force_upcast`), norms and the batch-norm statistics in f32.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        check_dtype(dtype, "FLUX.2 VAE")?;
        let (cfg_path, weights) = vae_paths(path)?;
        let config = Flux2VaeConfig::read(&cfg_path)?;
        let mut store = WeightStore::load_checkpoint(&weights)?;
        let dtype = if dtype == DType::F16 && config.base.force_upcast {
            DType::F32
        } else {
            dtype
        };
        store.set_placement(Placement {
            device: device.clone(),
            dtype,
            ..Default::default()
        });
        let c4 = 4 * config.base.latent_channels;
        let mean = store.get_shape("bn.running_mean", &[c4])?;
        let var = store.get_shape("bn.running_var", &[c4])?;
        let std = (var + config.batch_norm_eps)?.sqrt()?;
        let mut vae = FluxVae::from_store(config.base.clone(), &store)?;
        // `bn.num_batches_tracked` (a training counter) is the one tensor left: a warning at most.
        vae.check_unused(&store, &cfg_path.display().to_string())?;
        Ok(Flux2Vae {
            config,
            warnings: std::mem::take(&mut vae.warnings),
            origin: store.origin.clone(),
            vae,
            mean,
            std,
        })
    }

    pub fn vae_scale_factor(&self) -> usize {
        self.config.vae_scale_factor()
    }

    /// The transformer's packed latents `[B, seq, 4C]` -> VAE space (still packed):
    /// `z * sqrt(running_var + eps) + running_mean` per channel.
    pub fn denormalize_packed(&self, packed: &Tensor) -> Result<Tensor> {
        let c4 = self.mean.dim(0)?;
        match packed.dims() {
            &[_, _, c] if c == c4 => {}
            d => {
                return Err(Error::msg(format!(
                    "FLUX.2 VAE ({}): packed latents have shape {d:?}; expected [B, seq, {c4}]",
                    self.origin
                )))
            }
        }
        let p = packed.to_device(self.vae.device())?.to_dtype(DType::F32)?;
        Ok(p.broadcast_mul(&self.std)?.broadcast_add(&self.mean)?)
    }

    /// The packed latents after the denoising loop, for a `height x width` image -> the pipeline's
    /// `output_type="np"` image `[B, H, W, 3]` in [0, 1]: de-normalise, unpatchify, decode, clamp.
    pub fn decode_packed(&self, packed: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let z = unpack_latents(
            &self.denormalize_packed(packed)?,
            height,
            width,
            self.vae_scale_factor(),
        )
        .map_err(|e| Error::msg(format!("FLUX.2 VAE ({}): {e}", self.origin)))?;
        to_pixels(&self.vae.decode(&z)?)
    }

    /// `vae.decode(z)` of VAE-space latents `[B, C, h, w]` -> `[B, 3, 8h, 8w]`, not clamped.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.vae.decode(z)
    }

    /// `vae.encode(x).latent_dist`'s `(mean, logvar)` of an image `[B, 3, H, W]` in [-1, 1], VAE
    /// space (before patchifying and the batch-norm statistics).
    pub fn encode_moments(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        self.vae.encode_moments(image)
    }

    /// Spatial tiling as diffusers' `AutoencoderKLFlux2.enable_tiling()` (the same as FLUX.1's:
    /// [`FluxTiling`], whose default is this config's `sample_size`); `None`: off.
    pub fn set_tiling(&mut self, tiling: Option<FluxTiling>) -> Result<()> {
        self.vae.set_tiling(tiling)
    }

    /// The tiling in use, if any.
    pub fn tiling(&self) -> Option<FluxTiling> {
        self.vae.tiling()
    }
}

impl magcache_layers::packed_picture::PackedDecoder for Flux2Vae {
    fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Flux2Vae::load(dir, device, dtype)
    }
    fn set_tiling(&mut self, tiling: Option<FluxTiling>) -> Result<()> {
        Flux2Vae::set_tiling(self, tiling)
    }
    fn decode_packed(&self, packed: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        Flux2Vae::decode_packed(self, packed, height, width)
    }
}
