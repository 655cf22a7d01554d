//! The interface the runner drives: one family's denoising pipeline, built from a run file by the
//! family's registered build function ([`crate::runtime::registry::ModelFamily`]).

use crate::cache::CacheHandle;
use crate::denoise::{Denoiser, Observer};
use crate::error::{Error, Result};
use crate::model::ModelInfo;
use crate::runtime::progress::StageTime;
use crate::scope::GenerationPlan;
use candle_core::Tensor;

/// What every pipeline reports besides its loop, kept in one place: a family that holds one and
/// returns it from [`Pipeline::common`] / [`Pipeline::common_mut`] gets `family`, `describe`,
/// `model_info`, `set_cache`, `warnings` and `stages` from it.
#[derive(Default)]
pub struct PipelineCommon {
    /// One line describing the model (architecture, sizes, where the weights came from).
    pub description: String,
    /// Family (the pipeline's name), variant and published calibration data, for strategies.
    pub info: ModelInfo,
    /// What building found that the user should know.
    pub warnings: Vec<String>,
    /// The stages outside the denoising loop, as they ran.
    pub stages: Vec<StageTime>,
    /// The cache attached to every expert.
    pub cache: Option<CacheHandle>,
}

impl PipelineCommon {
    /// A pipeline's description, model info and build warnings; no stages yet, no cache.
    pub fn new(description: String, info: ModelInfo, warnings: Vec<String>) -> Self {
        PipelineCommon {
            description,
            info,
            warnings,
            ..Default::default()
        }
    }

    /// Starts a generation on `plan`: the build's warnings to the observer, then a [`Denoiser`]
    /// with the attached cache.
    pub fn start<'a>(
        &'a self,
        plan: &GenerationPlan,
        obs: &'a mut dyn Observer,
    ) -> Result<Denoiser<'a>> {
        for w in &self.warnings {
            obs.warning(w);
        }
        Denoiser::start(plan, self.cache.as_ref(), obs)
    }
}

/// A runnable denoising pipeline of one family.
pub trait Pipeline {
    /// The reporting state the default methods read; `None`: the family implements them itself.
    fn common(&self) -> Option<&PipelineCommon> {
        None
    }
    fn common_mut(&mut self) -> Option<&mut PipelineCommon> {
        None
    }
    fn family(&self) -> &str {
        self.common().map_or("", |c| c.info.family.as_str())
    }
    /// One line describing the model (architecture, sizes, where the weights came from).
    fn describe(&self) -> String {
        self.common()
            .map(|c| c.description.clone())
            .unwrap_or_default()
    }
    /// Scopes and step counts of a generation with the current sampling settings.
    fn plan(&self) -> GenerationPlan;
    /// Family, variant and published calibration data, for strategies.
    fn model_info(&self) -> ModelInfo {
        self.common().map(|c| c.info.clone()).unwrap_or_default()
    }
    /// Attaches a cache to every expert (replacing any previous one); `None` removes it.
    fn set_cache(&mut self, cache: Option<CacheHandle>) -> Result<()> {
        match self.common_mut() {
            Some(c) => {
                c.cache = cache;
                Ok(())
            }
            None => Err(Error::msg(format!(
                "{}: this pipeline takes no cache",
                self.family()
            ))),
        }
    }
    /// The final latents as 2-D image planes `[N, H, W]` (every sample, channel and frame), for image
    /// metrics. This is the named "latents to pixels" stage: for models whose latents are the pixels
    /// (the digits model) the planes are the picture; a VAE decoder would take its place.
    fn to_planes(&self, latents: &Tensor) -> Result<Tensor>;
    /// What building the pipeline found that the user should know (checkpoint tensors the model
    /// never used, settings the family ignores). The pipeline also passes them to the observer at the
    /// start of every generation, so a runner that only observes generations sees them too.
    fn warnings(&self) -> Vec<String> {
        self.common()
            .map(|c| c.warnings.clone())
            .unwrap_or_default()
    }
    /// Runs the whole loop and returns the final latents. With a cache attached, the pipeline starts a
    /// new cache generation first (warnings go to the observer). NaN or infinite values in a call's
    /// output or a step's latents end the generation with an error ([`Denoiser`] checks them).
    fn generate(&mut self, obs: &mut dyn Observer) -> Result<Tensor>;
    /// After [`Pipeline::generate`]: a prompted run's decode stage, the pixels of `latents` and
    /// what the transformer was given ([`Decoded`]). `None` for runs without a `[prompt]`.
    fn finish(&mut self, _latents: &Tensor) -> Result<Option<Decoded>> {
        Ok(None)
    }
    /// After the last [`Pipeline::generate`] and before [`Pipeline::finish`]: frees the transformer
    /// weights, so that decoding does not hold them (a 14B model's 28 GB in bf16). A later
    /// `generate` is then an error. Default: nothing to free.
    fn release_models(&mut self) {}
    /// Frames per second the family's videos are shown at (the frame rate its reference pipeline
    /// exports them with), for `--video`; `None` for image families.
    fn frame_rate(&self) -> Option<u32> {
        None
    }
    /// The hook registries of the model's block chains, one per expert (index = expert), for the
    /// per-block hooks the runner attaches (`magcache calibrate --blocks`). Empty: the family
    /// offers none.
    fn hook_registries(&mut self) -> Vec<&mut crate::hooks::HookRegistry> {
        Vec::new()
    }
    /// Wall time and peak memory of the stages outside the denoising loop (encoding the text,
    /// decoding), in the order they ran.
    fn stages(&self) -> Vec<StageTime> {
        self.common().map(|c| c.stages.clone()).unwrap_or_default()
    }
}

/// What a prompted run's decode stage gives beside the final latents.
#[derive(Clone, Debug)]
pub struct Decoded {
    /// The decoded pixels, in [-1, 1]: `[B, C, F, H, W]` (video) or `[B, C, H, W]` (image).
    pub pixels: Tensor,
    /// What the transformer was given, under the names the contract gives them (`prompt_embeds`,
    /// `negative_prompt_embeds`, `pooled_prompt_embeds`, `image_embeds`, `condition`).
    pub inputs: Vec<(String, Tensor)>,
}

impl Decoded {
    /// Every tensor under the name `run --out` writes it with: `decoded` (the pixels) first.
    pub fn named(&self) -> Vec<(&str, &Tensor)> {
        std::iter::once(("decoded", &self.pixels))
            .chain(self.inputs.iter().map(|(k, t)| (k.as_str(), t)))
            .collect()
    }
}
