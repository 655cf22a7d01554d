//! `FluxTransformer2DModel` (FLUX.1) in candle, f32: double-stream blocks (joint attention over
//! `[text, image]`), single-stream blocks, one cache chain over both lists.

use super::blocks::{lin, AnyBlock, BlockArgs, DoubleBlock, SingleBlock};
use super::config::FluxConfig;
use candle_core::{Device, Tensor};
use magcache_core::{BlockMetadata, CallCx, Error, ModelBlocks, Result};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::dit::{axes_rope, joint_forward, modulated_input, JointTrace};
use magcache_layers::dit::{OutputLayer, PackedCall, TimeEmbedding};
use magcache_layers::mmdit::{double_then_single, DoubleOrSingle};
use magcache_layers::nn::Linear;
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
    time: TimeEmbedding,
    p1: Linear,
    p2: Linear,
    /// The chain (double blocks, then single blocks), held or streamed, and its hooks.
    pub(crate) blocks: ModelBlocks<AnyBlock>,
    /// Streamed: the first double block's `norm1.linear`, held so that the modulated-input
    /// indicator reads no block on the calls a cache reuses.
    first_norm1: Option<Linear>,
    out: OutputLayer,
}

impl ChainModel for FluxModel {
    type Config = FluxConfig;
    type Block = AnyBlock;
    const FAMILY: &'static str = "flux";

    fn chain(c: &FluxConfig) -> Vec<BlockMetadata> {
        double_then_single((FLUX_DOUBLE, FLUX_SINGLE), c.depths())
    }

    fn hooks(&mut self) -> &mut magcache_core::HookRegistry {
        &mut self.blocks.hooks
    }

    /// Double block `i`, or single block `i - num_layers`.
    fn load_block(w: &WeightStore, i: usize, c: &FluxConfig, dev: &Device) -> Result<AnyBlock> {
        let single = |j| SingleBlock::load(w, j, c, dev);
        DoubleOrSingle::load(i, c.num_layers, |i| DoubleBlock::load(w, i, c, dev), single)
    }

    fn assemble(cfg: FluxConfig, w: &WeightStore, blocks: ModelBlocks<AnyBlock>) -> Result<Self> {
        let d = cfg.inner_dim();
        let tt = "time_text_embed";
        let time = TimeEmbedding::load(w, tt, (d, 256), cfg.guidance_embeds, lin, "FLUX")?;
        let first_norm1 = (blocks.is_streamed() && cfg.num_layers > 0)
            .then(|| lin(w, "transformer_blocks.0.norm1.linear", 6 * d, d))
            .transpose()?;
        let pooled = cfg.pooled_projection_dim;
        Ok(FluxModel {
            x_emb: lin(w, "x_embedder", d, cfg.in_channels)?,
            ctx_emb: lin(w, "context_embedder", d, cfg.joint_attention_dim)?,
            time,
            p1: lin(w, &format!("{tt}.text_embedder.linear_1"), d, pooled)?,
            p2: lin(w, &format!("{tt}.text_embedder.linear_2"), d, d)?,
            blocks,
            first_norm1,
            out: OutputLayer::load(w, (d, cfg.out_channels()), 1e-6, lin)?,
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
            (Some(DoubleOrSingle::Double(b)), _) => b.norm1_out(h, temb),
            (None, Some(norm1)) => modulated_input(norm1, &self.out.ln, h, temb),
            _ => Err(Error::msg(
                "flux: the chain has no double block to modulate its input",
            )),
        }
    }

    /// Rotary tables `[S, head_dim/2]` from position ids `[S, n_axes]`.
    pub fn rope(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        axes_rope(ids, &self.cfg.axes_dims_rope, 10000.0, "FLUX")
    }

    /// Time (+ guidance) + pooled-text conditioning `[B, d]`. `t` and `guidance` are on the 0..1 scale:
    /// the model multiplies them by 1000 itself.
    pub fn temb(&self, t: &Tensor, guidance: Option<&Tensor>, pooled: &Tensor) -> Result<Tensor> {
        let emb = self.time.forward(t, guidance)?;
        let p = self.p2.forward(&self.p1.forward(pooled)?.silu()?)?;
        Ok((emb + p)?)
    }

    /// One call: `call` (packed latents, T5 text, timestep, position ids, guidance) and CLIP's
    /// `pooled` text -> the velocity `[B, seq, out_channels]`; each block's outputs pushed to
    /// `trace` when given.
    pub fn forward(
        &self,
        call: &PackedCall<'_>,
        pooled: &Tensor,
        cx: &CallCx<'_>,
        trace: Option<&mut JointTrace>,
    ) -> Result<Tensor> {
        let h = self.x_emb.forward(call.x)?;
        let temb = self.temb(call.t, call.guidance, pooled)?;
        let e = self.ctx_emb.forward(call.ctx)?;
        let (cos, sin) = self.rope(&Tensor::cat(&[call.txt_ids, call.img_ids], 0)?)?;
        let args = BlockArgs {
            temb: &temb,
            cos: &cos,
            sin: &sin,
        };
        let input = || self.modulated_input(&h, &temb);
        let parts = (&self.blocks, &self.out, cx);
        let inputs = ((h.clone(), e), (&temb, input));
        joint_forward(parts, inputs, trace, |b: &AnyBlock, h, e| args.run(b, h, e))
    }
}

/// Intermediates of one forward, for parity tests (FLUX.1 records each block's two outputs and
/// `norm_out`).
pub type FluxTrace = JointTrace;
