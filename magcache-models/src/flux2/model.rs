//! `Flux2Transformer2DModel` in candle: double-stream then single-stream blocks in one cache chain,
//! shared modulations, 4-axis RoPE. Norms, softmax and modulations run in f32 whatever the weights'
//! dtype.
//!
//! The single-stream blocks of diffusers run on the fused `[text; image]` sequence and the last one
//! returns it fused; here every block takes and returns the two streams (the single block fuses,
//! updates and splits at the text length), so a cache's tail output is the image rows of that fused
//! sequence and FBCache's text residual its text rows (huggingface/diffusers#14280, PR #14359).

use super::blocks::{AnyBlock, BlockArgs, Modulations};
use super::config::Flux2Config;
use candle_core::{DType, Device, Tensor};
use magcache_core::{BlockMetadata, CallCx, Error, Indicator, ModelBlocks, Result, Streams};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::mmdit::chunks;
use magcache_layers::mmdit::double_then_single;
use magcache_layers::nn::{linear_no_bias, modulate, timestep_embedding, LayerNorm, Linear};
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
    t1: Linear,
    t2: Linear,
    g: Option<(Linear, Linear)>,
    mod_img: Linear,
    mod_txt: Linear,
    mod_single: Linear,
    /// The chain (double blocks, then single blocks), held or streamed, and its hooks.
    pub(crate) blocks: ModelBlocks<AnyBlock>,
    norm_out: Linear,
    ln: LayerNorm,
    proj_out: Linear,
}

/// Intermediates of one forward, for parity tests.
#[derive(Debug, Default)]
pub struct Flux2Trace {
    pub temb: Option<Tensor>,
    pub x_embedded: Option<Tensor>,
    pub context_embedded: Option<Tensor>,
    /// `(cos, sin)` `[S, head_dim/2]`, text rows first.
    pub rope: Option<(Tensor, Tensor)>,
    /// Each block's `(encoder, hidden)` outputs in chain order.
    pub blocks: Vec<(Tensor, Tensor)>,
    /// The image rows after `norm_out`, before `proj_out`.
    pub norm_out: Option<Tensor>,
}

impl ChainModel for Flux2Model {
    type Config = Flux2Config;
    type Block = AnyBlock;
    const FAMILY: &'static str = "flux2";

    fn chain(c: &Flux2Config) -> Vec<BlockMetadata> {
        double_then_single(
            (FLUX2_DOUBLE, FLUX2_SINGLE),
            (c.num_layers, c.num_single_layers),
        )
    }

    fn hooks(&mut self) -> &mut magcache_core::HookRegistry {
        &mut self.blocks.hooks
    }

    fn load_block(w: &WeightStore, i: usize, c: &Flux2Config, dev: &Device) -> Result<AnyBlock> {
        AnyBlock::load(w, i, c, dev)
    }

    fn assemble(cfg: Flux2Config, w: &WeightStore, blocks: ModelBlocks<AnyBlock>) -> Result<Self> {
        let dev = w.placement().device.clone();
        let d = cfg.inner_dim();
        let tc = cfg.timestep_guidance_channels;
        let tg = "time_guidance_embed";
        let g = if cfg.guidance_embeds {
            Some((
                linear_no_bias(w, &format!("{tg}.guidance_embedder.linear_1"), d, tc)?,
                linear_no_bias(w, &format!("{tg}.guidance_embedder.linear_2"), d, d)?,
            ))
        } else {
            None
        };
        Ok(Flux2Model {
            x_emb: linear_no_bias(w, "x_embedder", d, cfg.in_channels)?,
            ctx_emb: linear_no_bias(w, "context_embedder", d, cfg.joint_attention_dim)?,
            t1: linear_no_bias(w, &format!("{tg}.timestep_embedder.linear_1"), d, tc)?,
            t2: linear_no_bias(w, &format!("{tg}.timestep_embedder.linear_2"), d, d)?,
            g,
            mod_img: linear_no_bias(w, "double_stream_modulation_img.linear", 6 * d, d)?,
            mod_txt: linear_no_bias(w, "double_stream_modulation_txt.linear", 6 * d, d)?,
            mod_single: linear_no_bias(w, "single_stream_modulation.linear", 3 * d, d)?,
            blocks,
            norm_out: linear_no_bias(w, "norm_out.linear", 2 * d, d)?,
            ln: LayerNorm::new(d, cfg.eps, None, &dev)?,
            proj_out: linear_no_bias(w, "proj_out", cfg.out_channels(), d)?,
            cfg,
        })
    }
}

impl Flux2Model {
    pub fn is_streamed(&self) -> bool {
        self.blocks.is_streamed()
    }

    /// Rotary tables `[S, head_dim/2]` from position ids `[S, n_axes]` (any numeric dtype): axis `i`
    /// takes `axes_dims_rope[i]` dims, `freq_j = 1 / theta^(2j / d_i)` (f64), angles `pos * freq_j`.
    pub fn rope(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (s, n) = ids.dims2()?;
        let axes = &self.cfg.axes_dims_rope;
        if n != axes.len() {
            return Err(Error::msg(format!(
                "position ids have {n} axes, the FLUX.2 model has {} (axes_dims_rope)",
                axes.len()
            )));
        }
        let dev = ids.device().clone();
        let ids = ids.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let half: usize = axes.iter().sum::<usize>() / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(s * half), Vec::with_capacity(s * half));
        let theta = self.cfg.rope_theta;
        for row in &ids {
            for (&pos, &dim) in row.iter().zip(axes) {
                for j in 0..dim / 2 {
                    let f = 1.0 / theta.powf((2 * j) as f64 / dim as f64);
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

    /// The conditioning `[B, d]`: `linear_2(silu(linear_1(proj(1000 t))))` (+ the guidance
    /// embedding where the model has one). `t` and `guidance` are on the 0..1 scale.
    pub fn temb(&self, t: &Tensor, guidance: Option<&Tensor>) -> Result<Tensor> {
        let tc = self.cfg.timestep_guidance_channels;
        let te = timestep_embedding(&(t.to_dtype(DType::F32)? * 1000.0)?, tc)?;
        let mut emb = self.t2.forward(&self.t1.forward(&te)?.silu()?)?;
        if let Some((g1, g2)) = &self.g {
            let g = guidance.ok_or_else(|| {
                Error::msg("this FLUX.2 model embeds guidance: a guidance value is required")
            })?;
            let ge = timestep_embedding(&(g.to_dtype(DType::F32)? * 1000.0)?, tc)?;
            emb = (emb + g2.forward(&g1.forward(&ge)?.silu()?)?)?;
        }
        Ok(emb)
    }

    fn modulations(&self, temb: &Tensor) -> Result<Modulations> {
        Ok(Modulations {
            img: chunks(&self.mod_img, temb, 6)?,
            txt: chunks(&self.mod_txt, temb, 6)?,
            single: chunks(&self.mod_single, temb, 3)?,
        })
    }

    /// One transformer call: `x` `[B, seq, in_channels]` packed latents, `ctx` `[B, L,
    /// joint_attention_dim]`, `t` `[B]` (0..1), `img_ids` `[seq, axes]`, `txt_ids` `[L, axes]` ->
    /// the velocity `[B, seq, out_channels]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        t: &Tensor,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        guidance: Option<&Tensor>,
        cx: &CallCx<'_>,
    ) -> Result<Tensor> {
        self.forward_traced(x, ctx, t, img_ids, txt_ids, guidance, cx, None)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn forward_traced(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        t: &Tensor,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        guidance: Option<&Tensor>,
        cx: &CallCx<'_>,
        mut trace: Option<&mut Flux2Trace>,
    ) -> Result<Tensor> {
        let h = self.x_emb.forward(&x.to_dtype(DType::F32)?)?;
        let e = self.ctx_emb.forward(&ctx.to_dtype(DType::F32)?)?;
        let temb = self.temb(t, guidance)?;
        let mods = self.modulations(&temb)?;
        let ids = Tensor::cat(
            &[txt_ids.to_dtype(DType::F64)?, img_ids.to_dtype(DType::F64)?],
            0,
        )?;
        let (cos, sin) = self.rope(&ids)?;
        if let Some(tr) = trace.as_deref_mut() {
            tr.temb = Some(temb.clone());
            tr.x_embedded = Some(h.clone());
            tr.context_embedded = Some(e.clone());
            tr.rope = Some((cos.clone(), sin.clone()));
        }
        let args = BlockArgs {
            mods: &mods,
            cos: &cos,
            sin: &sin,
        };
        let mut record = |_: usize, s: &Streams| {
            if let (Some(tr), Some(e)) = (trace.as_deref_mut(), &s.encoder) {
                tr.blocks.push((e.clone(), s.hidden.clone()));
            }
        };
        // The first double block's modulated input: the image stream entering the chain, layer
        // normed, shifted and scaled by the shared image modulation (held by the model, so
        // streamed runs read no block for it).
        let input = || modulate(&self.ln.forward(&h)?, &mods.img[0], &mods.img[1]);
        let chain = (self.blocks)
            .call(cx.scope, |i, b: &AnyBlock, s: Streams| {
                let (h, e) = b.forward(&s.hidden, s.joint_encoder("flux2", i)?, &args)?;
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
        let y = modulate(&self.ln.forward(&h)?, &shift, &scale)?;
        if let Some(tr) = trace {
            tr.norm_out = Some(y.clone());
        }
        self.proj_out.forward(&y)
    }
}
