//! The `z-image` family: a run file resolved once into a [`ZImageRun`] (pipeline folder or preset,
//! every size, schedule, guidance, placement) before anything loads; building is then the three
//! stages in turn (encode text, load the transformer, and the decode `finish` runs).

use super::config::ZImageConfig;
use magcache_core::runtime::config::RunConfig;
use magcache_core::{Error, Indicator, ModelInfo, Result};
use magcache_layers::autoencoder_kl::{FluxTiling, FluxVaeConfig};
use magcache_layers::config_util::{find_preset, resolve, text_len, PipelineKind};
use magcache_layers::footprint::{sz, Sz};
use magcache_layers::inputs::{packed_drawn_shape, InputFile};
use magcache_layers::run_basics::{
    ImageRun, ImageSizes, ImageSource, RunAt, RunBasics, IMAGE_PIPELINE_PARTS,
};
use magcache_layers::scheduler::FluxShift;
use magcache_text::qwen3::Qwen3Config;
use std::path::Path;

/// `ZImagePipeline`'s defaults: 1024 x 1024, 512 text tokens, guidance 5.0.
pub const DEFAULT_SIZE: usize = 1024;
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;
pub const DEFAULT_GUIDANCE: f64 = 5.0;

/// Presets at released sizes (seeded random weights; `plan`, memory and speed figures).
pub struct ZImagePreset {
    pub name: &'static str,
    /// Runs without classifier-free guidance by default (Turbo: 8 distilled steps).
    pub distilled: bool,
}

pub const ZIMAGE_PRESETS: &[ZImagePreset] = &[
    ZImagePreset {
        name: "z-image-turbo",
        distilled: true,
    },
    ZImagePreset {
        name: "z-image",
        distilled: false,
    },
];

/// What a released `ZImagePipeline` folder's configs say (and the run's `[vae]` tiling).
pub(super) struct ZImageFolder {
    pub(super) text: Qwen3Config,
    pub(super) vae: Box<FluxVaeConfig>,
    pub(super) tiling: Option<FluxTiling>,
}

/// Where a run's parts come from: a pipeline folder, a transformer folder (`config.json` and
/// weights, e.g. a preset written by `magcache export`) or a preset.
pub(super) type Source = ImageSource<ZImageFolder, &'static ZImagePreset>;

/// A z-image run file resolved before anything loads.
pub struct ZImageRun {
    pub(super) base: ImageRun<ZImageFolder, &'static ZImagePreset, ZImageConfig>,
    /// Latent grid `(h, w)` (even).
    pub(super) lat: (usize, usize),
    pub(super) prompt: Option<(String, String)>,
}

/// What a Z-Image pipeline folder holds.
const PIPELINE: PipelineKind<'static> = PipelineKind {
    parts: IMAGE_PIPELINE_PARTS,
    class_prefix: "ZImage",
    label: "Z-Image",
    example: "ZImagePipeline",
};

impl ZImageRun {
    /// Reads the run file's keys and the folder's configs (never a weight), checks them, and fixes
    /// every size the run will have.
    pub(super) fn read(cfg: &RunConfig, file: &str, base: &Path) -> Result<Self> {
        magcache_layers::config_util::check_applicable(cfg, file, "z-image", 1)?;
        let mut run = RunBasics::read(cfg, file, base, "z-image")?;
        let warnings = &mut run.warnings;
        let (source, transformer, shift, distilled) = Self::source((cfg, file, base))?;
        if let Some(s) = cfg.sampling.shift {
            warnings.push(format!(
                "{file}: sampling.shift = {s} is not used by z-image: the shift comes from the pipeline's scheduler_config.json"
            ));
        }
        let guidance =
            cfg.sampling
                .guidance_scale
                .unwrap_or(if distilled { 0.0 } else { DEFAULT_GUIDANCE });
        let cfg_scale = (guidance > 0.0).then_some(guidance);
        let prompt = cfg
            .prompt
            .as_ref()
            .map(|p| (p.text.clone(), p.negative.clone().unwrap_or_default()));
        if let (Some(p), None) = (&cfg.prompt, cfg_scale) {
            if p.negative.as_deref().is_some_and(|n| !n.is_empty()) {
                warnings.push(format!(
                    "{file}: prompt.negative is not used: guidance_scale is 0 (no classifier-free guidance)"
                ));
            }
        }
        let (lat, sizes) = Self::sizes((cfg, file, base), &source, &transformer)?;
        let base = ImageRun::new(run, (source, transformer, shift), sizes, cfg_scale);
        Ok(ZImageRun { base, lat, prompt })
    }

    /// Where the parts come from, the transformer's config, the scheduler's shift, and whether the
    /// run defaults to no CFG.
    fn source(at: RunAt<'_>) -> Result<(Source, ZImageConfig, FluxShift, bool)> {
        let (cfg, file, _) = at;
        let static3 = FluxShift {
            dynamic: false,
            shift: 3.0,
            ..FluxShift::default()
        };
        let folder = |root: &Path| -> Result<ZImageFolder> {
            let text = Qwen3Config::load(&root.join("text_encoder"))?;
            let vae = Box::new(FluxVaeConfig::read(&root.join("vae").join("config.json"))?);
            let tiling = magcache_layers::autoencoder_kl::run_tiling(cfg, file, root)?;
            Ok(ZImageFolder { text, vae, tiling })
        };
        let preset = |name: &str| find_preset(ZIMAGE_PRESETS, |p| p.name, name, ("z-image", file));
        let (source, t, shift) =
            Source::resolve(at, (&PIPELINE, "ZImagePipeline"), folder, preset)?;
        // A transformer folder without its pipeline: distilled defaults (no CFG) as a preset's.
        let distilled = match &source {
            Source::Folder(..) => false,
            Source::Transformer(_) => true,
            Source::Preset(p) => p.distilled,
        };
        Ok((source, t, shift.unwrap_or(static3), distilled))
    }

    /// `((h, w), batch, latents file, caption rows)` from the run file (and the latents file's header).
    #[allow(clippy::type_complexity)]
    fn sizes(
        (cfg, file, base): RunAt<'_>,
        source: &Source,
        t: &ZImageConfig,
    ) -> Result<((usize, usize), ImageSizes)> {
        let c = t.in_channels;
        let text_len = text_len(cfg, DEFAULT_MAX_SEQUENCE_LENGTH);
        if text_len == 0 {
            let key = if cfg.prompt.is_some() {
                "prompt.max_sequence_length"
            } else {
                "inputs.text_len"
            };
            return Err(Error::config(file, key, "must be at least 1"));
        }
        if let Source::Folder(root, ZImageFolder { vae, .. }) = source {
            let unit = vae.vae_scale_factor().saturating_mul(2);
            if vae.latent_channels != c {
                return Err(Error::config(
                    root.join("vae").join("config.json").display().to_string(),
                    "latent_channels",
                    format!(
                        "{} but the transformer takes {c} in_channels",
                        vae.latent_channels
                    ),
                ));
            }
            let height = cfg.inputs.height.unwrap_or(DEFAULT_SIZE);
            let width = cfg.inputs.width.unwrap_or(DEFAULT_SIZE);
            for (key, v) in [("inputs.height", height), ("inputs.width", width)] {
                if unit == 0 || v < unit || !v.is_multiple_of(unit) {
                    return Err(Error::config(file, key, format!("{v} must be a positive multiple of {unit} (the VAE's downsampling times the 2x2 patches), as ZImagePipeline requires")));
                }
            }
            let lat = (2 * (height / unit), 2 * (width / unit));
            return match &cfg.inputs.file {
                Some(f) => {
                    let path = resolve(base, f);
                    let inp = InputFile::load(&path)?;
                    let l = inp.get("latents_init", 4, "[B, C, h, w] latents")?;
                    let (b, lc, lh, lw) = l.dims4()?;
                    if (lc, lh, lw) != (c, lat.0, lat.1) || b == 0 {
                        return Err(Error::inputs(&inp.path, "latents_init", format!(
                            "has shape {:?}; height {height} and width {width} give [B, {c}, {}, {}]",
                            l.dims(), lat.0, lat.1
                        )));
                    }
                    Ok((lat, (b, Some(path), text_len)))
                }
                None => Ok((lat, (1, None, text_len))),
            };
        }
        if let Some(f) = &cfg.inputs.file {
            let path = resolve(base, f);
            let l = InputFile::load(&path)?.get("latents_init", 4, "[B, C, h, w] latents")?;
            return match l.dims4()? {
                (b, lc, h, w)
                    if lc == c && b > 0 && h >= 2 && w >= 2 && h % 2 == 0 && w % 2 == 0 =>
                {
                    Ok(((h, w), (b, Some(path), text_len)))
                }
                _ => Err(Error::inputs(
                    path.display().to_string(),
                    "latents_init",
                    format!(
                        "has shape {:?}; expected [B, {c}, h, w] with even h and w",
                        l.dims()
                    ),
                )),
            };
        }
        let (_, shape) = magcache_layers::inputs::drawn(cfg, &[1, c, 128, 128]);
        let (b, h, w) = packed_drawn_shape(&shape, c.saturating_mul(4), "Z-Image", file)?;
        Ok(((h, w), (b, None, text_len)))
    }

    pub(super) fn image_tokens(&self) -> usize {
        (self.lat.0 / 2) * (self.lat.1 / 2)
    }

    pub fn schedule(&self) -> Result<magcache_layers::scheduler::FlowSchedule> {
        self.base.schedule(self.image_tokens(), "scheduler shift")
    }

    pub(super) fn variant(&self) -> Option<&'static str> {
        self.base.source.preset().map(|p| p.name)
    }
}

/// What strategies may know of a Z-Image run: no published curves yet (MagCache takes
/// `mag_ratios` or a calibration profile); the timestep conditioning as an indicator.
pub fn zimage_info(variant: Option<&str>) -> ModelInfo {
    ModelInfo {
        family: "z-image".into(),
        variant: variant.map(String::from),
        indicators: vec![Indicator::TimestepEmbedding],
        ..Default::default()
    }
}

/// Parameters of a Z-Image transformer.
pub fn zimage_params(c: &ZImageConfig) -> Sz {
    let (d, a, f, hd) = (
        sz(c.dim),
        sz(c.adaln_dim()),
        sz(c.ffn_hidden()),
        sz(c.head_dim()),
    );
    let pc = sz(c.patch_channels());
    let block = d * d * sz(4) + d * f * sz(3) + d * sz(4) + hd * sz(2);
    let modulation = a * d * sz(4) + d * sz(4);
    let top = sz(256) * sz(1024)
        + sz(1024)
        + sz(1024) * a
        + a
        + pc * d
        + d
        + sz(c.cap_feat_dim) * (d + sz(1))
        + d
        + d * sz(2)
        + a * d
        + d
        + d * pc
        + pc;
    top + sz(c.n_refiner_layers) * (block * sz(2) + modulation)
        + sz(c.n_layers) * (block + modulation)
}
