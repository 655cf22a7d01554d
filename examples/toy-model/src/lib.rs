//! A model crate outside the library, as a user would write one: a small diffusion transformer
//! (residual MLP blocks with timestep modulation, classifier-free guidance, flow-matching Euler)
//! that depends only on `magcache-core` and gets every registered cache strategy.
//!
//! `docs/adding-a-model.md` walks through this file; the lines marked `// cache` are all the cache
//! plumbing the model needs beyond being a model.

use magcache_core::candle_core::{Device, Tensor, D};
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::registry::ModelFamily;
use magcache_core::{
    BlockMetadata, Branch, CacheHandle, CallCx, Denoiser, Error, GenerationPlan, Indicator,
    ModelInfo, Observer, PerBlock, Pipeline, Result, RunPlan, StepsSpec, Streams,
};
use std::path::Path;

/// Sizes of the toy model.
#[derive(Clone, Debug, PartialEq)]
pub struct ToyConfig {
    /// Features of an input token.
    pub channels: usize,
    pub dim: usize,
    pub layers: usize,
    pub seed: u64,
}

/// One residual MLP block: `h + W2 gelu(W1 (norm(h) (1 + scale) + shift))`, with `(shift, scale)`
/// projected from the timestep embedding.
struct Block {
    w1: Tensor,
    w2: Tensor,
    modulation: Tensor,
}

/// The transformer: token embedding, timestep (+ class) embedding, blocks, output projection.
pub struct ToyModel {
    pub cfg: ToyConfig,
    w_in: Tensor,
    w_t: Tensor,
    class: Tensor,
    blocks: Vec<Block>,
    w_out: Tensor,
}

/// `n` standard normal numbers, deterministic on every machine (a 64-bit LCG and Box-Muller).
pub fn gaussian(seed: &mut u64, n: usize) -> Vec<f32> {
    let mut next = || {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (next(), next());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// Seeded weights `N(0, 1/fan_in)`.
fn weights(seed: &mut u64, shape: (usize, usize)) -> Result<Tensor> {
    let v = gaussian(seed, shape.0 * shape.1);
    Ok((Tensor::from_vec(v, shape, &Device::Cpu)? / (shape.0 as f64).sqrt())?)
}

fn norm(x: &Tensor) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let x = x.broadcast_sub(&mean)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(var + 1e-6)?.sqrt()?)?)
}

/// `x [.., n] @ w [n, m]` for a batch of token rows.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_matmul(w)?)
}

impl Block {
    fn forward(&self, h: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let m = linear(temb, &self.modulation)?; // [B, 1, 2 dim]
        let d = h.dim(D::Minus1)?;
        let (shift, scale) = (m.narrow(D::Minus1, 0, d)?, m.narrow(D::Minus1, d, d)?);
        let x = norm(h)?
            .broadcast_mul(&(scale + 1.0)?)?
            .broadcast_add(&shift)?;
        Ok((h + linear(&linear(&x, &self.w1)?.gelu()?, &self.w2)?)?)
    }
}

impl ToyModel {
    pub fn new(cfg: ToyConfig) -> Result<Self> {
        let (c, d) = (cfg.channels, cfg.dim);
        let mut s = cfg.seed;
        let blocks = (0..cfg.layers)
            .map(|_| {
                Ok(Block {
                    w1: weights(&mut s, (d, 2 * d))?,
                    w2: weights(&mut s, (2 * d, d))?,
                    modulation: (weights(&mut s, (d, 2 * d))? * 0.1)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ToyModel {
            w_in: weights(&mut s, (c, d))?,
            w_t: weights(&mut s, (32, d))?,
            class: weights(&mut s, (1, d))?,
            blocks,
            w_out: (weights(&mut s, (d, c))? * 0.5)?,
            cfg,
        })
    }

    /// Timestep `t` (0..1000) `[B]` and branch -> embedding `[B, 1, dim]`.
    fn embed_time(&self, t: &Tensor, branch: Branch) -> Result<Tensor> {
        let freqs: Vec<f32> = (0..16).map(|i| (-(i as f32) * 0.5).exp()).collect();
        let freqs = Tensor::from_vec(freqs, (1, 16), t.device())?;
        let arg = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
        let e = Tensor::cat(&[arg.cos()?, arg.sin()?], 1)?;
        let mut temb = linear(&e, &self.w_t)?.silu()?;
        if branch == Branch::Cond {
            temb = temb.broadcast_add(&self.class)?;
        }
        Ok(temb.unsqueeze(1)?)
    }

    /// Velocity prediction: `x [B, S, channels]`, `t [B]` -> `[B, S, channels]`.
    pub fn forward(&self, x: &Tensor, t: &Tensor, cx: &CallCx<'_>) -> Result<Tensor> {
        let temb = self.embed_time(t, cx.scope.branch)?;
        let h = linear(x, &self.w_in)?;
        let block = |i: usize, x: Streams| match self.blocks.get(i) {
            Some(b) => Ok(Streams::hidden(b.forward(&x.hidden, &temb)?)),
            None => Err(Error::msg(format!("toy: no block {i}"))),
        };
        let latents = || Ok(x.unsqueeze(1)?.unsqueeze(3)?); // [B, F = 1, h = S, w = 1, C]
        let chain = PerBlock::new(self.blocks.len(), block) // cache
            .with_indicator(Indicator::TimestepEmbedding, &temb) // cache
            .with_indicator_fn(Indicator::InputLatents, latents); // cache
        let h = cx.run_chain(&chain, Streams::hidden(h))?.hidden; // cache
        linear(&norm(&h)?, &self.w_out)
    }
}

/// Flow-matching Euler with classifier-free guidance: `steps` sigmas from 1 to 0.
pub struct ToyPipeline {
    pub model: ToyModel,
    pub steps: usize,
    pub guidance: f64,
    pub latents: Tensor,
    cache: Option<CacheHandle>, // cache
}

impl ToyPipeline {
    pub fn new(model: ToyModel, steps: usize, guidance: f64, latents: Tensor) -> Self {
        ToyPipeline {
            model,
            steps,
            guidance,
            latents,
            cache: None,
        }
    }

    /// Sigmas from 1 to 0: `steps + 1` values.
    fn sigmas(&self) -> Vec<f64> {
        sigmas(self.steps)
    }
}

fn sigmas(steps: usize) -> Vec<f64> {
    (0..=steps).map(|i| 1.0 - i as f64 / steps as f64).collect()
}

/// Classifier-free guidance calls the uncond branch too when the scale is above 1.
fn branches(guidance: f64) -> &'static [Branch] {
    if guidance > 1.0 {
        &[Branch::Cond, Branch::Uncond]
    } else {
        &[Branch::Cond]
    }
}

/// The scopes and steps of a generation: the steps' sigmas, one expert, the CFG branches.
pub fn toy_plan(steps: usize, guidance: f64) -> GenerationPlan {
    let sigmas = sigmas(steps);
    let sigmas = sigmas.get(..steps).unwrap_or_default(); // the last sigma (0) is no call
    let spec = StepsSpec::new("toy", "flow-euler", sigmas, branches(guidance)); // cache
    GenerationPlan::from_steps(&spec) // cache
}

impl Pipeline for ToyPipeline {
    fn family(&self) -> &str {
        "toy"
    }
    fn describe(&self) -> String {
        let c = &self.model.cfg;
        format!("toy residual MLP: {} blocks, dim {}", c.layers, c.dim)
    }
    fn plan(&self) -> GenerationPlan {
        toy_plan(self.steps, self.guidance)
    }
    fn model_info(&self) -> ModelInfo {
        toy_info()
    }
    fn set_cache(&mut self, cache: Option<CacheHandle>) -> Result<()> {
        self.cache = cache; // cache
        Ok(())
    }
    fn to_planes(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(latents.clone())
    }
    fn generate(&mut self, obs: &mut dyn Observer) -> Result<Tensor> {
        let mut den = Denoiser::start(&self.plan(), self.cache.as_ref(), obs)?; // cache
        let mut x = self.latents.clone();
        let b = x.dim(0)?;
        for (i, pair) in self.sigmas().windows(2).enumerate() {
            let &[s, s_next] = pair else { continue };
            let t = Tensor::from_vec(vec![(s * 1000.0) as f32; b], b, x.device())?;
            let mut v = Vec::new();
            for &branch in branches(self.guidance) {
                let forward = |cx: &CallCx<'_>| self.model.forward(&x, &t, cx); // cache
                v.push(den.call(i, 0, branch, s * 1000.0, forward)?); // cache
            }
            let pred = match v.as_slice() {
                [c, u] => (u + ((c - u)? * self.guidance)?)?,
                [c] => c.clone(),
                _ => return Err(Error::msg("toy: one or two branches per step")),
            };
            x = (&x + (pred * (s_next - s))?)?;
            den.step_done(i, &x)?; // cache
        }
        Ok(x)
    }
}

/// The toy model of a run file: sizes from `[model.overrides]` (`dim`, `layers`, `channels`),
/// latents from `[inputs] latent_shape = [B, S, channels]`, seeded.
fn config_of(cfg: &RunConfig, file: &str) -> Result<(ToyConfig, Vec<usize>)> {
    let get = |k: &str, d: usize| -> Result<usize> {
        match cfg.model.overrides.as_ref().and_then(|o| o.get(k)) {
            None => Ok(d),
            Some(v) => v
                .as_integer()
                .filter(|&n| (1..=4096).contains(&n))
                .map(|n| n as usize)
                .ok_or_else(|| {
                    Error::config(file, format!("model.overrides.{k}"), "must be 1..=4096")
                }),
        }
    };
    let toy = ToyConfig {
        channels: get("channels", 4)?,
        dim: get("dim", 32)?,
        layers: get("layers", 4)?,
        seed: cfg.model.seed,
    };
    let shape = cfg
        .inputs
        .latent_shape
        .clone()
        .unwrap_or_else(|| vec![1, 16, toy.channels]);
    if shape.len() != 3 || shape.get(2) != Some(&toy.channels) {
        return Err(Error::config(
            file,
            "inputs.latent_shape",
            format!("must be [batch, tokens, {}], got {shape:?}", toy.channels),
        ));
    }
    Ok((toy, shape))
}

fn build(cfg: &RunConfig, file: &str, _base: &Path) -> Result<Box<dyn Pipeline>> {
    let (toy, shape) = config_of(cfg, file)?;
    let mut seed = cfg.inputs.seed.unwrap_or(cfg.model.seed) ^ 0x5eed;
    let n = shape.iter().product();
    let latents = Tensor::from_vec(gaussian(&mut seed, n), shape, &Device::Cpu)?;
    let guidance = cfg.sampling.guidance_scale.unwrap_or(1.0);
    Ok(Box::new(ToyPipeline::new(
        ToyModel::new(toy)?,
        cfg.sampling.steps,
        guidance,
        latents,
    )))
}

fn plan(cfg: &RunConfig, file: &str, _base: &Path) -> Result<RunPlan> {
    config_of(cfg, file)?;
    let guidance = cfg.sampling.guidance_scale.unwrap_or(1.0);
    Ok(RunPlan::new(
        toy_plan(cfg.sampling.steps, guidance),
        toy_info(),
    ))
}

/// What strategies may know of the toy: its family and the indicators its chain offers.
fn toy_info() -> ModelInfo {
    let indicators = vec![Indicator::TimestepEmbedding, Indicator::InputLatents]; // cache
    ModelInfo {
        family: "toy".into(),
        indicators,
        ..Default::default()
    }
}

/// The one block kind of the toy's chain (for general per-block hooks).
pub const TOY_BLOCK: BlockMetadata = BlockMetadata {
    kind: "toy.block",
    joint: false,
};

magcache_core::inventory::submit! {
    ModelFamily {
        name: "toy",
        description: "example model crate outside the library (examples/toy-model)",
        blocks: &[TOY_BLOCK],
        presets: &[],
        published: &[],
        keys: &[],
        streams: false, // the runner refuses `offload = "stream"` for it
        build,
        plan,
        estimate: None, // or Some(fn): each stage's size-guard estimate
    }
}

/// Call from a binary or test that reaches the toy only through the registry: it keeps the linker
/// from dropping this crate and its `inventory` registration.
#[inline(never)]
pub fn link() {
    std::hint::black_box(TOY_BLOCK);
}
