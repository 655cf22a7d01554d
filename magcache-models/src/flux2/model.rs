//! `Flux2Transformer2DModel` in candle: double-stream then single-stream blocks in one cache chain,
//! shared modulations, 4-axis RoPE. Norms, softmax and modulations run in f32 whatever the weights'
//! dtype.
//!
//! The single-stream blocks of diffusers run on the fused `[text; image]` sequence and the last one
//! returns it fused; here every block takes and returns the two streams (the single block fuses,
//! updates and splits at the text length), so a cache's tail output is the image rows of that fused
//! sequence and FBCache's text residual its text rows (huggingface/diffusers#14280, PR #14359).

use super::blocks::{double, single, AnyBlock, BlockArgs, Modulations};
use super::config::Flux2Config;
use candle_core::{DType, Device, Tensor};
use magcache_core::{BlockMetadata, CallCx, ModelBlocks, Result};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::dit::{axes_rope, joint_forward, JointTrace};
use magcache_layers::dit::{OutputLayer, PackedCall, TimeEmbedding};
use magcache_layers::mmdit::chunks;
use magcache_layers::mmdit::{double_then_single, DoubleOrSingle};
use magcache_layers::nn::{linear_no_bias, modulate, Linear};
use magcache_layers::weights::WeightStore;

/// Double-stream block: updates the image (hidden) and text (encoder) streams.
pub const FLUX2_DOUBLE: BlockMetadata = BlockMetadata::joint("flux2.double");
/// Single-stream block: the two streams concatenated (text first), updated, split again.
pub const FLUX2_SINGLE: BlockMetadata = BlockMetadata::joint("flux2.single");

/// The FLUX.2 transformer with its hook registry (chain: double blocks, then single blocks).
pub struct Flux2Model {
    pub cfg: Flux2Config,
    x_emb: Linear,
    ctx_emb: Linear,
    time: TimeEmbedding,
    mod_img: Linear,
    mod_txt: Linear,
    mod_single: Linear,
    /// The chain (double blocks, then single blocks), held or streamed, and its hooks.
    pub(crate) blocks: ModelBlocks<AnyBlock>,
    out: OutputLayer,
}

impl ChainModel for Flux2Model {
    type Config = Flux2Config;
    type Block = AnyBlock;
    const FAMILY: &'static str = "flux2";

    fn chain(c: &Flux2Config) -> Vec<BlockMetadata> {
        double_then_single((FLUX2_DOUBLE, FLUX2_SINGLE), c.depths())
    }

    fn hooks(&mut self) -> &mut magcache_core::HookRegistry {
        &mut self.blocks.hooks
    }

    /// Double block `i`, or single block `i - num_layers`.
    fn load_block(w: &WeightStore, i: usize, c: &Flux2Config, dev: &Device) -> Result<AnyBlock> {
        let load_single = |j| single(w, j, c, dev);
        DoubleOrSingle::load(i, c.num_layers, |i| double(w, i, c, dev), load_single)
    }

    fn assemble(cfg: Flux2Config, w: &WeightStore, blocks: ModelBlocks<AnyBlock>) -> Result<Self> {
        let (d, tc) = (cfg.inner_dim(), cfg.timestep_guidance_channels);
        let (g, nb) = (cfg.guidance_embeds, linear_no_bias);
        let time = TimeEmbedding::load(w, "time_guidance_embed", (d, tc), g, nb, "FLUX.2")?;
        Ok(Flux2Model {
            x_emb: nb(w, "x_embedder", d, cfg.in_channels)?,
            ctx_emb: nb(w, "context_embedder", d, cfg.joint_attention_dim)?,
            time,
            mod_img: nb(w, "double_stream_modulation_img.linear", 6 * d, d)?,
            mod_txt: nb(w, "double_stream_modulation_txt.linear", 6 * d, d)?,
            mod_single: nb(w, "single_stream_modulation.linear", 3 * d, d)?,
            blocks,
            out: OutputLayer::load(w, (d, cfg.out_channels()), cfg.eps, nb)?,
            cfg,
        })
    }
}

impl Flux2Model {
    pub fn is_streamed(&self) -> bool {
        self.blocks.is_streamed()
    }

    /// Rotary tables `[S, head_dim/2]` from position ids `[S, n_axes]` (any numeric dtype), with
    /// the config's `rope_theta`.
    pub fn rope(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        axes_rope(ids, &self.cfg.axes_dims_rope, self.cfg.rope_theta, "FLUX.2")
    }

    /// The conditioning `[B, d]`: `linear_2(silu(linear_1(proj(1000 t))))` (+ the guidance
    /// embedding where the model has one). `t` and `guidance` are on the 0..1 scale.
    pub fn temb(&self, t: &Tensor, guidance: Option<&Tensor>) -> Result<Tensor> {
        self.time.forward(t, guidance)
    }

    fn modulations(&self, temb: &Tensor) -> Result<Modulations> {
        Ok(Modulations {
            img: chunks(&self.mod_img, temb, 6)?,
            txt: chunks(&self.mod_txt, temb, 6)?,
            single: chunks(&self.mod_single, temb, 3)?,
        })
    }

    /// One transformer call on `call` (packed latents, text, timestep, position ids, guidance) ->
    /// the velocity `[B, seq, out_channels]`; intermediates recorded in `trace` when given.
    pub fn forward(
        &self,
        call: &PackedCall<'_>,
        cx: &CallCx<'_>,
        mut trace: Option<&mut JointTrace>,
    ) -> Result<Tensor> {
        let h = self.x_emb.forward(&call.x.to_dtype(DType::F32)?)?;
        let e = self.ctx_emb.forward(&call.ctx.to_dtype(DType::F32)?)?;
        let temb = self.temb(call.t, call.guidance)?;
        let mods = self.modulations(&temb)?;
        let ids = Tensor::cat(
            &[
                call.txt_ids.to_dtype(DType::F64)?,
                call.img_ids.to_dtype(DType::F64)?,
            ],
            0,
        )?;
        let rope = self.rope(&ids)?;
        JointTrace::record_inputs(trace.as_deref_mut(), &temb, (&h, &e), &rope);
        let args = BlockArgs {
            mods: &mods,
            cos: &rope.0,
            sin: &rope.1,
        };
        // The first double block's modulated input: the image stream entering the chain, layer
        // normed, shifted and scaled by the shared image modulation (held by the model, so
        // streamed runs read no block for it).
        let input = || modulate(&self.out.ln.forward(&h)?, &mods.img[0], &mods.img[1]);
        let parts = (&self.blocks, &self.out, cx);
        let inputs = ((h.clone(), e), (&temb, input));
        joint_forward(parts, inputs, trace, |b: &AnyBlock, h, e| args.run(b, h, e))
    }
}

/// Intermediates of one forward, for parity tests.
pub type Flux2Trace = JointTrace;
