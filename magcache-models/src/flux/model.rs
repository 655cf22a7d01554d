//! `FluxTransformer2DModel` (FLUX.1) in candle, f32: double-stream blocks (joint attention over
//! `[text, image]`), single-stream blocks, one cache chain over both lists.

use super::blocks::{lin, modulated_input, AnyBlock, BlockArgs};
use super::config::FluxConfig;
use candle_core::{Device, Tensor};
use magcache_core::{BlockMetadata, CallCx, Error, Indicator, ModelBlocks, Result, Streams};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::mmdit::double_then_single;
use magcache_layers::nn::modulate;
use magcache_layers::nn::{timestep_embedding, LayerNorm, Linear};
use magcache_layers::weights::WeightStore;

/// Double-stream block: updates the image (hidden) and text (encoder) streams, each with its own
/// weights (`BlockArgs` holds what it reads besides them).
pub const FLUX_DOUBLE: BlockMetadata = BlockMetadata::joint("flux.double");
/// Single-stream block: the two streams concatenated (text first), split again on the way out.
pub const FLUX_SINGLE: BlockMetadata = BlockMetadata::joint("flux.single");

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
    /// The chain (double blocks, then single blocks), held or streamed, and its hooks.
    pub(crate) blocks: ModelBlocks<AnyBlock>,
    /// Streamed: the first double block's `norm1` (its modulation linear), held so that the
    /// modulated-input indicator reads no block on the calls a cache reuses.
    first_norm1: Option<(Linear, LayerNorm)>,
    norm_out: Linear,
    ln_out: LayerNorm,
    proj_out: Linear,
}

/// Intermediates of one forward, for parity tests: each block's two outputs in chain order.
#[derive(Debug, Default)]
pub struct FluxTrace {
    pub blocks: Vec<(Tensor, Tensor)>,
}

impl ChainModel for FluxModel {
    type Config = FluxConfig;
    type Block = AnyBlock;
    const FAMILY: &'static str = "flux";

    fn chain(c: &FluxConfig) -> Vec<BlockMetadata> {
        double_then_single(
            (FLUX_DOUBLE, FLUX_SINGLE),
            (c.num_layers, c.num_single_layers),
        )
    }

    fn hooks(&mut self) -> &mut magcache_core::HookRegistry {
        &mut self.blocks.hooks
    }

    fn load_block(w: &WeightStore, i: usize, c: &FluxConfig, dev: &Device) -> Result<AnyBlock> {
        AnyBlock::load(w, i, c, dev)
    }

    fn assemble(cfg: FluxConfig, w: &WeightStore, blocks: ModelBlocks<AnyBlock>) -> Result<Self> {
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
        let first_norm1 = if blocks.is_streamed() && cfg.num_layers > 0 {
            Some((
                lin(w, "transformer_blocks.0.norm1.linear", 6 * d, d)?,
                LayerNorm::new(d, 1e-6, None, &dev)?,
            ))
        } else {
            None
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
            norm_out: lin(w, "norm_out.linear", 2 * d, d)?,
            ln_out: LayerNorm::new(d, 1e-6, None, &dev)?,
            proj_out: lin(w, "proj_out", cfg.out_channels(), d)?,
            cfg,
        })
    }
}

impl FluxModel {
    /// Whether block weights are read from the checkpoint as blocks run.
    pub fn is_streamed(&self) -> bool {
        self.blocks.is_streamed()
    }

    /// The modulated-input indicator: the first double block's `norm1` on the image stream `h`
    /// entering the chain (streamed: from the held copy of that `norm1`, so a reused call reads no
    /// block). diffusers' SeaCache has no FLUX adapter: the packed tokens (`InputLatents`) are not
    /// offered.
    fn modulated_input(&self, h: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let first = self.blocks.held_blocks().and_then(|v| v.first());
        match (first, &self.first_norm1) {
            (Some(AnyBlock::Double(b)), _) => b.norm1_out(h, temb),
            (None, Some((norm1, ln))) => modulated_input(norm1, ln, h, temb),
            _ => Err(Error::msg(
                "flux: the chain has no double block to modulate its input",
            )),
        }
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
        mut trace: Option<&mut FluxTrace>,
    ) -> Result<Tensor> {
        let h = self.x_emb.forward(x)?;
        let temb = self.temb(t, guidance, pooled)?;
        let e = self.ctx_emb.forward(ctx)?;
        let (cos, sin) = self.rope(&Tensor::cat(&[txt_ids, img_ids], 0)?)?;
        let args = BlockArgs {
            temb: &temb,
            cos: &cos,
            sin: &sin,
        };
        let mut record = |_: usize, s: &Streams| {
            if let (Some(tr), Some(e)) = (trace.as_deref_mut(), &s.encoder) {
                tr.blocks.push((e.clone(), s.hidden.clone()));
            }
        };
        let input = || self.modulated_input(&h, &temb);
        let chain = (self.blocks)
            .call(cx.scope, |i, b: &AnyBlock, s: Streams| {
                let (h, e) = b.forward(&s.hidden, s.joint_encoder("flux", i)?, &args)?;
                Ok(Streams::joint(h, e))
            })
            .with_indicator(Indicator::TimestepEmbedding, &temb)
            .with_indicator_fn(Indicator::ModulatedInput, input)
            .traced(&mut record);
        let h = cx.run_chain(&chain, Streams::joint(h.clone(), e))?.hidden;
        drop(chain);
        // AdaLayerNormContinuous: (scale, shift) in that order.
        let m = self.norm_out.forward(&temb.silu()?)?;
        let d = self.cfg.inner_dim();
        let scale = m.narrow(1, 0, d)?.unsqueeze(1)?;
        let shift = m.narrow(1, d, d)?.unsqueeze(1)?;
        let y = modulate(&self.ln_out.forward(&h)?, &shift, &scale)?;
        self.proj_out.forward(&y)
    }
}
