//! The interface the runner drives: one family's denoising pipeline, built from a run file by the
//! family's registered build function ([`crate::runtime::registry::ModelFamily`]).

use crate::cache::CacheHandle;
use crate::denoise::Observer;
use crate::error::Result;
use crate::model::ModelInfo;
use crate::scope::GenerationPlan;
use candle_core::Tensor;

/// A runnable denoising pipeline of one family.
pub trait Pipeline {
    fn family(&self) -> &str;
    /// One line describing the model (architecture, sizes, where the weights came from).
    fn describe(&self) -> String;
    /// Scopes and step counts of a generation with the current sampling settings.
    fn plan(&self) -> GenerationPlan;
    /// Family, variant and published calibration data, for strategies.
    fn model_info(&self) -> ModelInfo;
    /// Attaches a cache to every expert (replacing any previous one); `None` removes it.
    fn set_cache(&mut self, cache: Option<CacheHandle>) -> Result<()>;
    /// The final latents as 2-D image planes `[N, H, W]` (every sample, channel and frame), for image
    /// metrics. This is the named "latents to pixels" stage: for models whose latents are the pixels
    /// (the digits model) the planes are the picture; a VAE decoder would take its place.
    fn to_planes(&self, latents: &Tensor) -> Result<Tensor>;
    /// What building the pipeline found that the user should know (checkpoint tensors the model
    /// never used, settings the family ignores). The pipeline also passes them to the observer at the
    /// start of every generation, so a runner that only observes generations sees them too.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
    /// Runs the whole loop and returns the final latents. With a cache attached, the pipeline starts a
    /// new cache generation first (warnings go to the observer). NaN or infinite values in a call's
    /// output or a step's latents end the generation with an error ([`Denoiser`](crate::denoise::Denoiser) checks them).
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
    fn stages(&self) -> Vec<crate::runtime::progress::StageTime> {
        Vec::new()
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
