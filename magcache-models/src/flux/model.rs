//! `FluxTransformer2DModel` (FLUX.1) in candle, f32: double-stream blocks (joint attention over
//! `[text, image]`), single-stream blocks, one cache chain over both lists.

use super::blocks::{lin, modulate, modulated_input, AnyBlock, BlockArgs};
use super::config::FluxConfig;
use crate::nn::{timestep_embedding, LayerNorm, Linear};
use crate::weights::WeightStore;
use candle_core::{Device, Tensor};
use magcache_core::{
    BlockChain, BlockMetadata, CallCx, Error, HookRegistry, Indicator, Result, ScopeKey, Streams,
};
use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

/// Double-stream block: updates the image (hidden) and text (encoder) streams, each with its own
/// weights (`BlockArgs` holds what it reads besides them).
pub const FLUX_DOUBLE: BlockMetadata = BlockMetadata {
    kind: "flux.double",
    joint: true,
};
/// Single-stream block: the two streams concatenated (text first), split again on the way out.
pub const FLUX_SINGLE: BlockMetadata = BlockMetadata {
    kind: "flux.single",
    joint: true,
};

/// The diffusers-named tensors outside the blocks (embeddings, head) and their shapes, as
/// `assemble` reads them (recorded, so the names are written once).
pub fn top_tensors(c: &FluxConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let w = WeightStore::recording();
    FluxModel::assemble(c.clone(), &w, Blocks::Resident(Vec::new()))?;
    w.recorded()
}

/// The diffusers-named tensors of chain block `i` (double blocks first, then single blocks) and
/// their shapes, in the order the block's `load` reads them: recorded by running the loader on a
/// recording store, so names and shapes are written once.
pub fn block_tensors(c: &FluxConfig, i: usize) -> Result<Vec<(String, Vec<usize>)>> {
    let w = WeightStore::recording();
    AnyBlock::load(&w, i, c, &Device::Cpu)?;
    w.recorded()
}

/// Where the blocks' weights are.
enum Blocks {
    /// Built once, held, in chain order.
    Resident(Vec<AnyBlock>),
    /// Read from the (memory-mapped) checkpoint each time a block runs (`offload = "stream"`).
    Streamed(Arc<WeightStore>),
}

/// The FLUX transformer with its hook registry (chain: double blocks, then single blocks).
pub struct FluxModel {
    pub cfg: FluxConfig,
    x_emb: Linear,
    ctx_emb: Linear,
    t1: Linear,
    t2: Linear,
    g: Option<(Linear, Linear)>,
    p1: Linear,
    p2: Linear,
    blocks: Blocks,
    /// Streamed: the first double block's `norm1` (its modulation linear), held so that the
    /// modulated-input indicator reads no block on the calls a cache reuses.
    first_norm1: Option<(Linear, LayerNorm)>,
    /// The device the weights are handed out on.
    device: Device,
    norm_out: Linear,
    ln_out: LayerNorm,
    proj_out: Linear,
    pub hooks: HookRegistry,
}

/// Intermediates of one forward, for parity tests: each block's two outputs in chain order.
#[derive(Debug, Default)]
pub struct FluxTrace {
    pub blocks: Vec<(Tensor, Tensor)>,
}

impl FluxModel {
    /// Builds the model from diffusers-named tensors, every block loaded and held.
    pub fn from_weights(cfg: FluxConfig, w: &WeightStore) -> Result<Self> {
        let dev = w.placement().device.clone();
        let blocks = (0..cfg.num_layers + cfg.num_single_layers)
            .map(|i| AnyBlock::load(w, i, &cfg, &dev))
            .collect::<Result<Vec<_>>>()?;
        Self::assemble(cfg, w, Blocks::Resident(blocks))
    }

    /// Builds the model with its blocks streamed from `w` (a checkpoint's memory-mapped store): the
    /// embeddings and the head are loaded now, each block's tensors only checked (present, right
    /// shape) and read when the block runs.
    pub fn streamed(cfg: FluxConfig, w: Arc<WeightStore>) -> Result<Self> {
        for i in 0..cfg.num_layers + cfg.num_single_layers {
            for (name, shape) in block_tensors(&cfg, i)? {
                w.expect(&name, &shape)?;
            }
        }
        let store = w.clone();
        Self::assemble(cfg, &store, Blocks::Streamed(w))
    }

    /// Whether block weights are read from the checkpoint as blocks run.
    pub fn is_streamed(&self) -> bool {
        matches!(self.blocks, Blocks::Streamed(_))
    }

    fn assemble(cfg: FluxConfig, w: &WeightStore, blocks: Blocks) -> Result<Self> {
        let dev = w.placement().device.clone();
        let d = cfg.inner_dim();
        let tt = "time_text_embed";
        let g = if cfg.guidance_embeds {
            Some((
                lin(w, &format!("{tt}.guidance_embedder.linear_1"), d, 256)?,
                lin(w, &format!("{tt}.guidance_embedder.linear_2"), d, d)?,
            ))
        } else {
            None
        };
        let mut metas = vec![FLUX_DOUBLE; cfg.num_layers];
        metas.extend(vec![FLUX_SINGLE; cfg.num_single_layers]);
        let first_norm1 = match blocks {
            Blocks::Streamed(_) if cfg.num_layers > 0 => Some((
                lin(w, "transformer_blocks.0.norm1.linear", 6 * d, d)?,
                LayerNorm::new(d, 1e-6, None, &dev)?,
            )),
            _ => None,
        };
        Ok(FluxModel {
            x_emb: lin(w, "x_embedder", d, cfg.in_channels)?,
            ctx_emb: lin(w, "context_embedder", d, cfg.joint_attention_dim)?,
            t1: lin(w, &format!("{tt}.timestep_embedder.linear_1"), d, 256)?,
            t2: lin(w, &format!("{tt}.timestep_embedder.linear_2"), d, d)?,
            g,
            p1: lin(
                w,
                &format!("{tt}.text_embedder.linear_1"),
                d,
                cfg.pooled_projection_dim,
            )?,
            p2: lin(w, &format!("{tt}.text_embedder.linear_2"), d, d)?,
            blocks,
            first_norm1,
            device: dev.clone(),
            norm_out: lin(w, "norm_out.linear", 2 * d, d)?,
            ln_out: LayerNorm::new(d, 1e-6, None, &dev)?,
            proj_out: lin(w, "proj_out", cfg.out_channels(), d)?,
            hooks: HookRegistry::new(metas),
            cfg,
        })
    }

    /// Rotary tables `[S, head_dim/2]` from position ids `[S, n_axes]`.
    pub fn rope(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (s, n) = ids.dims2()?;
        if n != self.cfg.axes_dims_rope.len() {
            return Err(Error::msg(format!(
                "position ids have {n} axes, the model has {}",
                self.cfg.axes_dims_rope.len()
            )));
        }
        let dev = ids.device().clone();
        let ids = ids.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        let half: usize = self.cfg.axes_dims_rope.iter().sum::<usize>() / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(s * half), Vec::with_capacity(s * half));
        for row in &ids {
            for (axis, &dim) in self.cfg.axes_dims_rope.iter().enumerate() {
                let pos = row[axis] as f64;
                for j in 0..dim / 2 {
                    let f = 1.0 / 10000f64.powf((2 * j) as f64 / dim as f64);
                    cos.push((pos * f).cos() as f32);
                    sin.push((pos * f).sin() as f32);
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (s, half), &dev)?,
            Tensor::from_vec(sin, (s, half), &dev)?,
        ))
    }

    /// Time (+ guidance) + pooled-text conditioning `[B, d]`. `t` and `guidance` are on the 0..1 scale:
    /// the model multiplies them by 1000 itself.
    pub fn temb(&self, t: &Tensor, guidance: Option<&Tensor>, pooled: &Tensor) -> Result<Tensor> {
        let te = timestep_embedding(&(t * 1000.0)?, 256)?;
        let mut emb = self.t2.forward(&self.t1.forward(&te)?.silu()?)?;
        if let Some((g1, g2)) = &self.g {
            let g = guidance.ok_or_else(|| {
                Error::msg("this FLUX model embeds guidance: a guidance value is required")
            })?;
            let ge = timestep_embedding(&(g * 1000.0)?, 256)?;
            emb = (emb + g2.forward(&g1.forward(&ge)?.silu()?)?)?;
        }
        let p = self.p2.forward(&self.p1.forward(pooled)?.silu()?)?;
        Ok((emb + p)?)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        pooled: &Tensor,
        t: &Tensor,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        guidance: Option<&Tensor>,
        cx: &CallCx<'_>,
    ) -> Result<Tensor> {
        self.forward_traced(x, ctx, pooled, t, img_ids, txt_ids, guidance, cx, None)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn forward_traced(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        pooled: &Tensor,
        t: &Tensor,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        guidance: Option<&Tensor>,
        cx: &CallCx<'_>,
        trace: Option<&mut FluxTrace>,
    ) -> Result<Tensor> {
        let h = self.x_emb.forward(x)?;
        let temb = self.temb(t, guidance, pooled)?;
        let e = self.ctx_emb.forward(ctx)?;
        let (cos, sin) = self.rope(&Tensor::cat(&[txt_ids, img_ids], 0)?)?;
        let chain = FluxChain {
            model: self,
            scope: cx.scope,
            hidden_in: h.clone(),
            temb: temb.clone(),
            cos,
            sin,
            trace: RefCell::new(trace),
        };
        let h = cx.run_chain(&chain, Streams::joint(h, e))?.hidden;
        // AdaLayerNormContinuous: (scale, shift) in that order.
        let m = self.norm_out.forward(&temb.silu()?)?;
        let d = self.cfg.inner_dim();
        let scale = m.narrow(1, 0, d)?.unsqueeze(1)?;
        let shift = m.narrow(1, d, d)?.unsqueeze(1)?;
        let y = modulate(&self.ln_out.forward(&h)?, &shift, &scale)?;
        self.proj_out.forward(&y)
    }
}

impl FluxChain<'_> {
    /// Block `i` through the hook registry on `(hidden, encoder)`, then traced.
    fn run_one(&self, i: usize, blk: &AnyBlock, he: (Tensor, Tensor)) -> Result<(Tensor, Tensor)> {
        let m = self.model;
        let (h, e) = he;
        let args = BlockArgs {
            temb: &self.temb,
            cos: &self.cos,
            sin: &self.sin,
        };
        let out = m
            .hooks
            .run_block(self.scope, i, Streams::joint(h, e), &|s: Streams| {
                let e = s
                    .encoder
                    .as_ref()
                    .ok_or_else(|| Error::msg(format!("flux block {i}: no encoder stream")))?;
                let (h, e) = blk.forward(&s.hidden, e, &args)?;
                Ok(Streams::joint(h, e))
            })?;
        let h = out.hidden;
        let e = out
            .encoder
            .ok_or_else(|| Error::msg(format!("flux block {i} returned no encoder stream")))?;
        if let Some(tr) = self.trace.borrow_mut().as_deref_mut() {
            tr.blocks.push((e.clone(), h.clone()));
        }
        Ok((h, e))
    }
}

/// One call's block chain: double blocks then single blocks, both streams flowing between them.
struct FluxChain<'a> {
    model: &'a FluxModel,
    scope: ScopeKey,
    /// The image stream entering the chain.
    hidden_in: Tensor,
    temb: Tensor,
    cos: Tensor,
    sin: Tensor,
    trace: RefCell<Option<&'a mut FluxTrace>>,
}

impl BlockChain for FluxChain<'_> {
    fn num_blocks(&self) -> usize {
        self.model.cfg.num_layers + self.model.cfg.num_single_layers
    }

    fn run(&self, blocks: Range<usize>, x: Streams) -> Result<Streams> {
        let n = self.num_blocks();
        if blocks.end > n {
            return Err(Error::msg(format!(
                "flux: blocks {blocks:?} asked of a model with {n}"
            )));
        }
        let e = x
            .encoder
            .ok_or_else(|| Error::msg("flux: the block chain needs the encoder stream"))?;
        let mut he = (x.hidden, e);
        match &self.model.blocks {
            Blocks::Resident(v) => {
                for i in blocks {
                    he = self.run_one(i, &v[i], he)?;
                }
            }
            Blocks::Streamed(w) => {
                let (cfg, dev) = (&self.model.cfg, &self.model.device);
                crate::weights::run_streamed(
                    "flux",
                    blocks,
                    |i| AnyBlock::load(w, i, cfg, dev),
                    |i, blk| {
                        he = self.run_one(i, blk, he.clone())?;
                        Ok(())
                    },
                )?;
            }
        }
        Ok(Streams::joint(he.0, he.1))
    }

    fn indicator(&self, kind: Indicator) -> Result<Option<Tensor>> {
        match kind {
            Indicator::TimestepEmbedding => Ok(Some(self.temb.clone())),
            Indicator::TimestepModulation => Ok(None),
            // Computed only when a strategy asks: the first double block's norm1 on the image stream
            // entering the chain (streamed: from the held copy of that norm1).
            Indicator::ModulatedInput => {
                let m = self.model;
                match (&m.blocks, &m.first_norm1) {
                    (Blocks::Resident(v), _) => match v.first() {
                        Some(AnyBlock::Double(b)) => {
                            b.norm1_out(&self.hidden_in, &self.temb).map(Some)
                        }
                        _ => Ok(None),
                    },
                    (Blocks::Streamed(_), Some((norm1, ln))) => {
                        modulated_input(norm1, ln, &self.hidden_in, &self.temb).map(Some)
                    }
                    (Blocks::Streamed(_), None) => Ok(None),
                }
            }
            // diffusers' SeaCache has no FLUX adapter; the packed tokens are not offered.
            Indicator::InputLatents => Ok(None),
        }
    }
}
