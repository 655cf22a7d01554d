//! The `qwen-image` family: a run file resolved once into a [`QwenImageRun`] (pipeline folder,
//! transformer folder or preset; every size, the schedule's shift, guidance, placement) before
//! anything loads.

use super::config::QwenImageConfig;
use magcache_core::runtime::config::RunConfig;
use magcache_core::{Error, Indicator, ModelInfo, Result};
use magcache_layers::autoencoder_kl_wan::WanVaeConfig;
use magcache_layers::config_util::{find_preset, resolve, text_len, PipelineKind};
use magcache_layers::footprint::{sz, Sz};
use magcache_layers::inputs::{packed_drawn_shape, InputFile};
use magcache_layers::run_basics::{
    ImageRun, ImageSizes, ImageSource, RunAt, RunBasics, IMAGE_PIPELINE_PARTS,
};
use magcache_layers::scheduler::{FlowSchedule, FluxShift};
use magcache_text::qwen3::Qwen3Config;
use magcache_text::qwenimage::QWENIMAGE_MAX_LEN;
use std::path::Path;

/// `QwenImagePipeline`'s defaults: 1024 x 1024 (its default follows the transformer's sample
/// size), 512 text rows, `true_cfg_scale` 4.0.
pub const DEFAULT_SIZE: usize = 1024;
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;
pub const DEFAULT_TRUE_CFG: f64 = 4.0;

/// Presets at released sizes (seeded random weights; `plan`, memory and speed figures).
pub const QWENIMAGE_PRESETS: &[&str] = &["qwen-image"];

/// What a released `QwenImagePipeline` folder's configs say.
pub(super) struct QwenImageFolder {
    pub(super) text: Qwen3Config,
    pub(super) vae: Box<WanVaeConfig>,
}

/// Where a run's parts come from: a pipeline folder, a transformer folder or a preset.
pub(super) type Source = ImageSource<QwenImageFolder, &'static str>;

/// A qwen-image run file resolved before anything loads.
pub struct QwenImageRun {
    pub(super) base: ImageRun<QwenImageFolder, &'static str, QwenImageConfig>,
    /// The patch grid `(h', w')`.
    pub(super) grid: (usize, usize),
    pub(super) prompt: Option<(String, Option<String>)>,
}

/// What a Qwen-Image pipeline folder holds.
const PIPELINE: PipelineKind<'static> = PipelineKind {
    parts: IMAGE_PIPELINE_PARTS,
    class_prefix: "QwenImage",
    label: "Qwen-Image",
    example: "QwenImagePipeline",
};

/// The released scheduler's shift (what runs without a pipeline folder sample with).
fn released_shift() -> FluxShift {
    FluxShift {
        dynamic: true,
        base_shift: 0.5,
        max_shift: 0.9,
        base_seq: 256.0,
        max_seq: 8192.0,
        shift: 1.0,
        shift_terminal: Some(0.02),
    }
}

impl QwenImageRun {
    /// Reads the run file's keys and the folder's configs (never a weight) and fixes every size.
    pub(super) fn read(cfg: &RunConfig, file: &str, base: &Path) -> Result<Self> {
        magcache_layers::config_util::check_applicable(cfg, file, "qwen-image", 1)?;
        let (source, transformer, shift) = Self::source((cfg, file, base))?;
        let mut run = RunBasics::read(cfg, file, base, "qwen-image")?;
        let warnings = &mut run.warnings;
        if let Some(s) = cfg.sampling.shift {
            warnings.push(format!(
                "{file}: sampling.shift = {s} is not used by qwen-image: its schedule's mu comes from the image length and the scheduler config"
            ));
        }
        let prompt = cfg
            .prompt
            .as_ref()
            .map(|p| (p.text.clone(), p.negative.clone()));
        let scale = cfg.sampling.guidance_scale.unwrap_or(DEFAULT_TRUE_CFG);
        let has_negative = match &source {
            Source::Folder(..) => prompt.as_ref().is_some_and(|p| p.1.is_some()),
            // Seeded or file captions: CFG follows the scale alone.
            _ => true,
        };
        let cfg_scale = (scale > 1.0 && has_negative).then_some(scale);
        if prompt.as_ref().is_some_and(|p| p.1.is_none())
            && scale > 1.0
            && cfg.sampling.guidance_scale.is_some()
        {
            warnings.push(format!(
                "{file}: sampling.guidance_scale = {scale} needs a negative prompt for true CFG (prompt.negative; \"\" or \" \" will do): running without CFG, as the pipeline does"
            ));
        }
        if prompt.as_ref().is_some_and(|p| p.1.is_some()) && scale <= 1.0 {
            warnings.push(format!(
                "{file}: prompt.negative is not used: sampling.guidance_scale = {scale} runs no true CFG (it needs more than 1), as the pipeline warns"
            ));
        }
        if let Source::Folder(_, QwenImageFolder { vae, .. }) = &source {
            let (h, w) = (
                cfg.inputs.height.unwrap_or(DEFAULT_SIZE),
                cfg.inputs.width.unwrap_or(DEFAULT_SIZE),
            );
            let unit = vae.spatial_scale() * 2;
            warnings.extend(magcache_layers::config_util::rounded_size_warning(
                file, h, w, unit,
            ));
        }
        let (grid, sizes) = Self::sizes((cfg, file, base), &source, &transformer)?;
        let base = ImageRun::new(run, (source, transformer, shift), sizes, cfg_scale);
        Ok(QwenImageRun { base, grid, prompt })
    }

    /// Where the parts come from, the transformer's config and the schedule's shift.
    fn source(at: RunAt<'_>) -> Result<(Source, QwenImageConfig, FluxShift)> {
        let (_, file, _) = at;
        let folder = |root: &Path| -> Result<QwenImageFolder> {
            let text = Qwen3Config::load(&root.join("text_encoder"))?;
            let vae = Box::new(WanVaeConfig::read(&root.join("vae").join("config.json"))?);
            Ok(QwenImageFolder { text, vae })
        };
        let preset =
            |name: &str| find_preset(QWENIMAGE_PRESETS, |p| *p, name, ("qwen-image", file));
        let (source, t, shift) =
            Source::resolve(at, (&PIPELINE, "QwenImagePipeline"), folder, |name| {
                preset(name).copied()
            })?;
        Ok((source, t, shift.unwrap_or_else(released_shift)))
    }

    /// `((h', w'), batch, latents file, text rows)`.
    #[allow(clippy::type_complexity)]
    fn sizes(
        (cfg, file, base): RunAt<'_>,
        source: &Source,
        t: &QwenImageConfig,
    ) -> Result<((usize, usize), ImageSizes)> {
        let text_len = text_len(cfg, DEFAULT_MAX_SEQUENCE_LENGTH);
        if text_len == 0 || (cfg.prompt.is_some() && text_len > QWENIMAGE_MAX_LEN) {
            return Err(Error::config(
                file,
                "prompt.max_sequence_length",
                format!("{text_len} must be 1 to {QWENIMAGE_MAX_LEN}"),
            ));
        }
        let c4 = t.in_channels;
        let grid = match source {
            Source::Folder(_, QwenImageFolder { vae, .. }) => {
                let unit = vae.spatial_scale().saturating_mul(2);
                let (height, width) = (
                    cfg.inputs.height.unwrap_or(DEFAULT_SIZE),
                    cfg.inputs.width.unwrap_or(DEFAULT_SIZE),
                );
                for (key, v) in [("inputs.height", height), ("inputs.width", width)] {
                    if unit == 0 || v < unit {
                        return Err(Error::config(file, key, format!("{v} must be at least {unit} (the VAE's downsampling times the 2x2 packing)")));
                    }
                }
                if 4 * vae.z_dim != c4 {
                    return Err(Error::config(
                        format!("{file} (model.weights: vae/config.json)"),
                        "z_dim",
                        format!(
                            "the VAE's z_dim {} packs to {} channels; the transformer takes {c4}",
                            vae.z_dim,
                            4 * vae.z_dim
                        ),
                    ));
                }
                Some((height / unit, width / unit))
            }
            _ => None,
        };
        if let Some(f) = &cfg.inputs.file {
            let path = resolve(base, f);
            let l = InputFile::load(&path)?.get("latents_init", 3, "[B, seq, C] packed latents")?;
            let (b, seq, ch) = l.dims3()?;
            // Without a pipeline folder the grid only shapes RoPE: `inputs.height`/`width` when
            // given (pixels, as for prompted runs), else the most square one.
            let given = cfg
                .inputs
                .height
                .zip(cfg.inputs.width)
                .map(|(h, w)| (h / 16, w / 16));
            let g = grid.or(given).unwrap_or_else(|| square_grid(seq));
            if ch != c4 || seq != g.0 * g.1 || b == 0 {
                return Err(Error::inputs(
                    path.display().to_string(),
                    "latents_init",
                    format!(
                        "has shape {:?}; the run takes [B, {}, {c4}]",
                        l.dims(),
                        g.0 * g.1
                    ),
                ));
            }
            return Ok((g, (b, Some(path), text_len)));
        }
        if let Some(g) = grid {
            return Ok((g, (1, None, text_len)));
        }
        let (_, shape) = magcache_layers::inputs::drawn(cfg, &[1, c4 / 4, 128, 128]);
        let (b, h, w) = packed_drawn_shape(&shape, c4, "Qwen-Image", file)?;
        Ok(((h / 2, w / 2), (b, None, text_len)))
    }

    pub(super) fn image_tokens(&self) -> usize {
        self.grid.0 * self.grid.1
    }

    pub fn schedule(&self) -> Result<FlowSchedule> {
        if let (Some(t), true) = (self.base.shift.shift_terminal, self.base.run.steps < 2) {
            // diffusers stretches `1 - sigma` so the last sigma is `shift_terminal`: a single step's
            // only sigma is 1, and the stretch divides by zero (NaN latents).
            return Err(Error::config(
                &self.base.run.file,
                "sampling.steps",
                format!(
                    "{} is too few: the scheduler's shift_terminal ({t}) needs at least 2 steps",
                    self.base.run.steps
                ),
            ));
        }
        self.base
            .schedule(self.image_tokens(), "inputs.height/width")
    }

    pub(super) fn variant(&self) -> Option<&'static str> {
        self.base.source.preset()
    }
}

/// The patch grid of a square-ish token count read from an inputs file without a pipeline folder:
/// the most square `h' x w'` with `h' <= w'` (the grid only shapes RoPE).
fn square_grid(seq: usize) -> (usize, usize) {
    let mut h = (seq as f64).sqrt() as usize;
    while h > 1 && !seq.is_multiple_of(h) {
        h -= 1;
    }
    let h = h.max(1);
    (h, seq / h)
}

/// What strategies may know of a Qwen-Image run: no published curves yet; the timestep embedding
/// and the first block's modulated image input as indicators.
pub fn qwenimage_info(variant: Option<&str>) -> ModelInfo {
    ModelInfo {
        family: "qwen-image".into(),
        variant: variant.map(String::from),
        indicators: vec![Indicator::TimestepEmbedding, Indicator::ModulatedInput],
        ..Default::default()
    }
}

/// Parameters of a Qwen-Image transformer (every linear layer has a bias).
pub fn qwenimage_params(c: &QwenImageConfig) -> Sz {
    let (d, j, hd) = (
        sz(c.inner_dim()),
        sz(c.joint_attention_dim),
        sz(c.attention_head_dim),
    );
    let lin = |o: Sz, i: Sz| o * i + o;
    let block = lin(sz(6) * d, d) * sz(2)
        + lin(d, d) * sz(8)
        + hd * sz(4)
        + (lin(sz(4) * d, d) + lin(d, sz(4) * d)) * sz(2);
    let top = lin(d, sz(c.in_channels))
        + j
        + lin(d, j)
        + lin(d, sz(256))
        + lin(d, d)
        + lin(sz(2) * d, d)
        + lin(sz(c.out_tokens()), d);
    top + sz(c.num_layers) * block
}
