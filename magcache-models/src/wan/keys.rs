//! The run-file keys the Wan families add to core's: Wan2.2's second expert (`boundary_ratio`,
//! `guidance_scale_2`), the sampler (`scheduler`, `scheduler_config`), a video's `num_frames` and
//! class conditioning (`classes`), an image-to-video run's first frame (`image`), the VAE's
//! spatial tiling (`[vae] tiling` and tile sizes). Declared once
//! here as typed structs; the registrations list them ([`WAN_KEYS`]) so that the runner refuses
//! keys no family owns, and the family reads them with [`WanKeys::read`].

use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::keys::{fields_of, FamilyKeys};
use magcache_core::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// A Wan run's own keys, by table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct WanKeys {
    pub sampling: WanSamplingKeys,
    pub inputs: WanInputKeys,
    pub vae: WanVaeKeys,
}

/// Wan's `[vae]` table: spatial tiling of the VAE decode (and of an image run's encode), as
/// diffusers' `vae.enable_tiling(...)`; the sizes are pixels, diffusers' defaults when absent.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct WanVaeKeys {
    /// Cut frames larger than one tile into overlapping tiles (bounded memory at large sizes, small
    /// seams: see docs/benchmarks.md); default false, as diffusers.
    pub tiling: Option<bool>,
    /// Tile height in pixels (default 256).
    pub tile_sample_min_height: Option<usize>,
    /// Tile width in pixels (default 256).
    pub tile_sample_min_width: Option<usize>,
    /// A tile every this many pixels down (default 192: 64 pixels blended).
    pub tile_sample_stride_height: Option<usize>,
    /// A tile every this many pixels across (default 192).
    pub tile_sample_stride_width: Option<usize>,
}

impl WanVaeKeys {
    /// The tiling these keys ask for, checked against a VAE of `spatial_scale` pixels per latent;
    /// `None` when `tiling` is not true (tile sizes without `tiling = true` are an error: they would
    /// do nothing).
    pub fn tiling(
        &self,
        file: &str,
        spatial_scale: usize,
    ) -> Result<Option<magcache_layers::autoencoder_kl_wan::VaeTiling>> {
        let d = magcache_layers::autoencoder_kl_wan::VaeTiling::default();
        let sizes = [
            self.tile_sample_min_height,
            self.tile_sample_min_width,
            self.tile_sample_stride_height,
            self.tile_sample_stride_width,
        ];
        if self.tiling != Some(true) {
            if sizes.iter().any(Option::is_some) {
                return Err(Error::config(
                    file,
                    "vae.tiling",
                    "tile sizes are given but tiling is off: add `tiling = true` to [vae]",
                ));
            }
            return Ok(None);
        }
        let t = magcache_layers::autoencoder_kl_wan::VaeTiling {
            tile_sample_min_height: self
                .tile_sample_min_height
                .unwrap_or(d.tile_sample_min_height),
            tile_sample_min_width: self
                .tile_sample_min_width
                .unwrap_or(d.tile_sample_min_width),
            tile_sample_stride_height: self
                .tile_sample_stride_height
                .unwrap_or(d.tile_sample_stride_height),
            tile_sample_stride_width: self
                .tile_sample_stride_width
                .unwrap_or(d.tile_sample_stride_width),
        };
        t.check(spatial_scale, &format!("{file}: vae"))?;
        Ok(Some(t))
    }
}

/// Wan's keys of `[sampling]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct WanSamplingKeys {
    /// Guidance of the low-noise expert (wan2.2 A14B); default: `guidance_scale`.
    pub guidance_scale_2: Option<f64>,
    /// Where the high-noise expert hands over to the low-noise one (fraction of the training
    /// timesteps; wan2.2 A14B); default: the pipeline folder's `model_index.json`, else the preset's.
    pub boundary_ratio: Option<f64>,
    /// `"euler"` or `"unipc"`; absent: UniPC when the weights lie in a diffusers pipeline folder
    /// whose `scheduler/scheduler_config.json` is UniPC (or `scheduler_config` is given), else Euler.
    pub scheduler: Option<String>,
    /// A diffusers `UniPCMultistepScheduler` `scheduler_config.json` to sample with.
    pub scheduler_config: Option<String>,
}

/// Wan's keys of `[inputs]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct WanInputKeys {
    /// Prompted runs: frames of the video (`1 + 4k`; default 81).
    pub num_frames: Option<usize>,
    /// Class-conditioned models: rows of `class_embeddings.safetensors` beside the weights.
    pub classes: Option<Vec<usize>>,
    /// Image-to-video prompted runs: the first frame (PNG or JPEG).
    pub image: Option<String>,
}

/// The tables and keys [`WanKeys`] adds, for the family registrations.
pub const WAN_KEYS: &[FamilyKeys] = &[
    FamilyKeys {
        table: "sampling",
        keys: fields_of::<WanSamplingKeys>,
        paths: &["scheduler_config"],
    },
    FamilyKeys {
        table: "inputs",
        keys: fields_of::<WanInputKeys>,
        paths: &["image"],
    },
    FamilyKeys {
        table: "vae",
        keys: fields_of::<WanVaeKeys>,
        paths: &[],
    },
];

impl WanKeys {
    /// Reads and range-checks a run's Wan keys; errors name the file, line and key.
    pub fn read(cfg: &RunConfig, file: &str) -> Result<WanKeys> {
        let k: WanKeys = cfg.family_keys(file)?;
        if let Some(g) = k.sampling.guidance_scale_2 {
            if !g.is_finite() {
                return Err(Error::config(
                    file,
                    "sampling.guidance_scale_2",
                    format!("must be finite, got {g}"),
                ));
            }
        }
        if let Some(b) = k.sampling.boundary_ratio {
            if !(0.0..=1.0).contains(&b) {
                return Err(Error::config(
                    file,
                    "sampling.boundary_ratio",
                    format!("must lie in [0, 1], got {b}"),
                ));
            }
        }
        if k.vae.tiling.is_some() && cfg.prompt.is_none() {
            return Err(Error::config(
                file,
                "vae.tiling",
                "applies only to prompted runs (a `[prompt]` table and a pipeline folder: they decode with the VAE)",
            ));
        }
        let i = &k.inputs;
        if cfg.prompt.is_some() {
            if i.classes.is_some() {
                return Err(Error::config(
                    file,
                    "inputs.classes",
                    "does not apply to a prompted run (`[prompt]`): the text comes from the prompt",
                ));
            }
            if i.num_frames == Some(0) {
                return Err(Error::config(
                    file,
                    "inputs.num_frames",
                    "must be at least 1",
                ));
            }
        } else if i.image.is_some() {
            return Err(Error::config(
                file,
                "inputs.image",
                "applies only to prompted runs (a `[prompt]` table and a pipeline folder as weights)",
            ));
        } else if i.num_frames.is_some() {
            return Err(Error::config(
                file,
                "inputs.num_frames",
                "applies only to prompted runs (a `[prompt]` table); without one the size is inputs.latent_shape or the inputs file's",
            ));
        }
        Ok(k)
    }

    /// Refuses the keys that cannot apply to a `family` run of `experts` transformer models (the
    /// second expert's keys on one model) and class conditioning where it cannot apply. Reads
    /// nothing: called before any weights load.
    pub fn check_applicable(
        &self,
        cfg: &RunConfig,
        file: &str,
        family: &str,
        experts: usize,
    ) -> Result<()> {
        let s = &self.sampling;
        if experts < 2 {
            let what = if family == "wan2.2" {
                "a single-model wan2.2 (TI2V)".to_string()
            } else {
                format!("{family} (one model)")
            };
            if s.boundary_ratio.is_some() {
                return Err(Error::config(
                    file,
                    "sampling.boundary_ratio",
                    format!("{what} has no expert boundary: `boundary_ratio` splits the steps between wan2.2's two experts (A14B)"),
                ));
            }
            if s.guidance_scale_2.is_some() {
                return Err(Error::config(
                    file,
                    "sampling.guidance_scale_2",
                    format!("{what} has no second expert: `guidance_scale_2` is the guidance of wan2.2's low-noise expert (A14B); use `guidance_scale`"),
                ));
            }
        }
        let i = &cfg.inputs;
        if self.inputs.classes.is_some() {
            if let Some(f) = &i.file {
                return Err(Error::config(
                    file,
                    "inputs.classes",
                    format!("class conditioning and the inputs file `{f}` (its own text embeddings) cannot both apply: remove one of the two"),
                ));
            }
            if cfg.model.weights.is_none() {
                return Err(Error::config(
                    file,
                    "inputs.classes",
                    "class conditioning needs `weights` (class_embeddings.safetensors beside them); a preset has no class table",
                ));
            }
            if i.text_len.is_some() {
                return Err(Error::config(
                    file,
                    "inputs.text_len",
                    "the class embeddings give the text length: remove `text_len` or `classes`",
                ));
            }
        }
        magcache_layers::config_util::check_applicable(cfg, file, family, experts)
    }
}

/// The size of a prompted run without `[inputs] height`, `width` or `num_frames` (the released
/// pipelines' defaults).
pub(crate) const DEFAULT_HEIGHT: usize = 480;
pub(crate) const DEFAULT_WIDTH: usize = 832;
pub(crate) const DEFAULT_FRAMES: usize = 81;

/// `[vae] tiling` of a run over the pipeline folder `root`, checked against its VAE's scale.
pub fn vae_tiling(
    keys: &WanKeys,
    file: &str,
    root: &Path,
) -> Result<Option<magcache_layers::autoencoder_kl_wan::VaeTiling>> {
    if keys.vae.tiling != Some(true) {
        return keys.vae.tiling(file, 1);
    }
    let vae_cfg = magcache_layers::autoencoder_kl_wan::WanVaeConfig::read(
        &root.join("vae").join("config.json"),
    )?;
    keys.vae.tiling(file, vae_cfg.spatial_scale())
}
