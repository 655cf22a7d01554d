//! `FluxTransformer2DModel` (FLUX.1) in candle, f32: double-stream blocks (joint attention over
//! `[text, image]`), single-stream blocks, one cache chain over both lists.

use super::config::FluxConfig;
use crate::nn::{attention, gelu, timestep_embedding, LayerNorm, Linear, RmsNorm};
use crate::weights::WeightStore;
use candle_core::{Device, Tensor, D};
use magcache_core::{
    BlockChain, BlockMetadata, CallCx, Error, HookRegistry, Indicator, Result, ScopeKey, Streams,
};
use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

/// Double-stream block: inputs `(hidden, encoder, temb, cos, sin)`, outputs `(encoder, hidden)`.
pub const FLUX_DOUBLE: BlockMetadata = BlockMetadata {
    kind: "flux.double",
    hidden_in: 0,
    encoder_in: Some(1),
    hidden_out: 1,
    encoder_out: Some(0),
    outputs: 2,
};
/// Single-stream block: same tuples as diffusers returns them, `(encoder, hidden)`.
pub const FLUX_SINGLE: BlockMetadata = BlockMetadata {
    kind: "flux.single",
    hidden_in: 0,
    encoder_in: Some(1),
    hidden_out: 1,
    encoder_out: Some(0),
    outputs: 2,
};

fn lin(w: &WeightStore, name: &str, out: usize, inp: usize) -> Result<Linear> {
    Linear::new(
        w.get_weight(&format!("{name}.weight"), &[out, inp])?,
        Some(w.get_shape(&format!("{name}.bias"), &[out])?),
    )
}

/// `[B, S, H*D]` -> `[B, S, H, D]` RMS-normed per head -> `[B, H, S, D]`.
fn heads_normed(x: &Tensor, heads: usize, norm: &RmsNorm) -> Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    let x = norm.forward(&x.reshape((b, s, heads, hd / heads))?)?;
    Ok(x.transpose(1, 2)?.contiguous()?)
}

fn heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    Ok(x.reshape((b, s, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

fn merge(x: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, s, h * d))?)
}

fn rope(q: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::rotary_emb::rope_i(q, cos, sin)?)
}

/// `chunks` equal parts of the modulation linear's output, each `[B, 1, d]`.
fn modulation(lin: &Linear, temb: &Tensor, chunks: usize) -> Result<Vec<Tensor>> {
    let m = lin.forward(&temb.silu()?)?; // [B, chunks*d]
    let d = m.dim(D::Minus1)? / chunks;
    (0..chunks)
        .map(|i| Ok(m.narrow(1, i * d, d)?.unsqueeze(1)?))
        .collect()
}

fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)?)
}

struct Ff {
    a: Linear,
    b: Linear,
}

impl Ff {
    fn load(w: &WeightStore, p: &str, d: usize) -> Result<Self> {
        Ok(Ff {
            a: lin(w, &format!("{p}.net.0.proj"), 4 * d, d)?,
            b: lin(w, &format!("{p}.net.2"), d, 4 * d)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.b.forward(&gelu(&self.a.forward(x)?)?)
    }
}

/// A double block's `norm1` applied to the image stream: layer norm, then shift and scale from the
/// block's modulation of `temb`.
fn modulated_input(norm1: &Linear, ln: &LayerNorm, h: &Tensor, temb: &Tensor) -> Result<Tensor> {
    let m = modulation(norm1, temb, 6)?;
    modulate(&ln.forward(h)?, &m[0], &m[1])
}

struct DoubleBlock {
    norm1: Linear,
    norm1_ctx: Linear,
    q: Linear,
    k: Linear,
    v: Linear,
    aq: Linear,
    ak: Linear,
    av: Linear,
    nq: RmsNorm,
    nk: RmsNorm,
    naq: RmsNorm,
    nak: RmsNorm,
    out: Linear,
    add_out: Linear,
    ff: Ff,
    ff_ctx: Ff,
    ln: LayerNorm,
    heads: usize,
}

impl DoubleBlock {
    fn load(w: &WeightStore, i: usize, c: &FluxConfig, dev: &Device) -> Result<Self> {
        let d = c.inner_dim();
        let hd = c.attention_head_dim;
        let p = format!("transformer_blocks.{i}");
        let a = format!("{p}.attn");
        let rms = |n: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(
                w.get_shape(&format!("{a}.{n}.weight"), &[hd])?,
                1e-6,
            ))
        };
        Ok(DoubleBlock {
            norm1: lin(w, &format!("{p}.norm1.linear"), 6 * d, d)?,
            norm1_ctx: lin(w, &format!("{p}.norm1_context.linear"), 6 * d, d)?,
            q: lin(w, &format!("{a}.to_q"), d, d)?,
            k: lin(w, &format!("{a}.to_k"), d, d)?,
            v: lin(w, &format!("{a}.to_v"), d, d)?,
            aq: lin(w, &format!("{a}.add_q_proj"), d, d)?,
            ak: lin(w, &format!("{a}.add_k_proj"), d, d)?,
            av: lin(w, &format!("{a}.add_v_proj"), d, d)?,
            nq: rms("norm_q")?,
            nk: rms("norm_k")?,
            naq: rms("norm_added_q")?,
            nak: rms("norm_added_k")?,
            out: lin(w, &format!("{a}.to_out.0"), d, d)?,
            add_out: lin(w, &format!("{a}.to_add_out"), d, d)?,
            ff: Ff::load(w, &format!("{p}.ff"), d)?,
            ff_ctx: Ff::load(w, &format!("{p}.ff_context"), d)?,
            ln: LayerNorm::new(d, 1e-6, None, dev)?,
            heads: c.num_attention_heads,
        })
    }

    /// The image stream after `norm1` (the modulated input, [`Indicator::ModulatedInput`]).
    fn norm1_out(&self, h: &Tensor, temb: &Tensor) -> Result<Tensor> {
        modulated_input(&self.norm1, &self.ln, h, temb)
    }

    fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [h, e, temb, cos, sin] = inputs else {
            return Err(Error::msg(format!(
                "flux double block expects 5 inputs, got {}",
                inputs.len()
            )));
        };
        let m = modulation(&self.norm1, temb, 6)?;
        let mc = modulation(&self.norm1_ctx, temb, 6)?;
        let nh = modulate(&self.ln.forward(h)?, &m[0], &m[1])?;
        let ne = modulate(&self.ln.forward(e)?, &mc[0], &mc[1])?;
        let q = Tensor::cat(
            &[
                heads_normed(&self.aq.forward(&ne)?, self.heads, &self.naq)?,
                heads_normed(&self.q.forward(&nh)?, self.heads, &self.nq)?,
            ],
            2,
        )?;
        let k = Tensor::cat(
            &[
                heads_normed(&self.ak.forward(&ne)?, self.heads, &self.nak)?,
                heads_normed(&self.k.forward(&nh)?, self.heads, &self.nk)?,
            ],
            2,
        )?;
        let v = Tensor::cat(
            &[
                heads(&self.av.forward(&ne)?, self.heads)?,
                heads(&self.v.forward(&nh)?, self.heads)?,
            ],
            2,
        )?;
        let o = merge(&attention(&rope(&q, cos, sin)?, &rope(&k, cos, sin)?, &v)?)?;
        let lt = e.dim(1)?;
        let li = h.dim(1)?;
        let attn_e = self.add_out.forward(&o.narrow(1, 0, lt)?)?;
        let attn_h = self.out.forward(&o.narrow(1, lt, li)?)?;

        let h = (h + attn_h.broadcast_mul(&m[2])?)?;
        let x = modulate(&self.ln.forward(&h)?, &m[3], &m[4])?;
        let h = (&h + self.ff.forward(&x)?.broadcast_mul(&m[5])?)?;

        let e = (e + attn_e.broadcast_mul(&mc[2])?)?;
        let x = modulate(&self.ln.forward(&e)?, &mc[3], &mc[4])?;
        let e = (&e + self.ff_ctx.forward(&x)?.broadcast_mul(&mc[5])?)?;
        Ok(vec![e, h])
    }
}

struct SingleBlock {
    norm: Linear,
    q: Linear,
    k: Linear,
    v: Linear,
    nq: RmsNorm,
    nk: RmsNorm,
    mlp: Linear,
    out: Linear,
    ln: LayerNorm,
    heads: usize,
}

impl SingleBlock {
    fn load(w: &WeightStore, i: usize, c: &FluxConfig, dev: &Device) -> Result<Self> {
        let d = c.inner_dim();
        let hd = c.attention_head_dim;
        let p = format!("single_transformer_blocks.{i}");
        let a = format!("{p}.attn");
        Ok(SingleBlock {
            norm: lin(w, &format!("{p}.norm.linear"), 3 * d, d)?,
            q: lin(w, &format!("{a}.to_q"), d, d)?,
            k: lin(w, &format!("{a}.to_k"), d, d)?,
            v: lin(w, &format!("{a}.to_v"), d, d)?,
            nq: RmsNorm::new(w.get_shape(&format!("{a}.norm_q.weight"), &[hd])?, 1e-6),
            nk: RmsNorm::new(w.get_shape(&format!("{a}.norm_k.weight"), &[hd])?, 1e-6),
            mlp: lin(w, &format!("{p}.proj_mlp"), 4 * d, d)?,
            out: lin(w, &format!("{p}.proj_out"), d, 5 * d)?,
            ln: LayerNorm::new(d, 1e-6, None, dev)?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [h, e, temb, cos, sin] = inputs else {
            return Err(Error::msg(format!(
                "flux single block expects 5 inputs, got {}",
                inputs.len()
            )));
        };
        let lt = e.dim(1)?;
        let li = h.dim(1)?;
        let x = Tensor::cat(&[e, h], 1)?;
        let m = modulation(&self.norm, temb, 3)?;
        let nx = modulate(&self.ln.forward(&x)?, &m[0], &m[1])?;
        let mlp = gelu(&self.mlp.forward(&nx)?)?;
        let q = rope(
            &heads_normed(&self.q.forward(&nx)?, self.heads, &self.nq)?,
            cos,
            sin,
        )?;
        let k = rope(
            &heads_normed(&self.k.forward(&nx)?, self.heads, &self.nk)?,
            cos,
            sin,
        )?;
        let v = heads(&self.v.forward(&nx)?, self.heads)?;
        let a = merge(&attention(&q, &k, &v)?)?;
        let y = self
            .out
            .forward(&Tensor::cat(&[a, mlp], 2)?)?
            .broadcast_mul(&m[2])?;
        let x = (x + y)?;
        Ok(vec![x.narrow(1, 0, lt)?, x.narrow(1, lt, li)?])
    }
}

/// `weight` and `bias` of a linear layer `n` of shape `[o, i]`.
fn lin_tensors(v: &mut Vec<(String, Vec<usize>)>, n: &str, o: usize, i: usize) {
    v.push((format!("{n}.weight"), vec![o, i]));
    v.push((format!("{n}.bias"), vec![o]));
}

/// The diffusers-named tensors outside the blocks (embeddings, head) and their shapes.
pub fn top_tensors(c: &FluxConfig) -> Vec<(String, Vec<usize>)> {
    let d = c.inner_dim();
    let mut v = Vec::new();
    let tt = "time_text_embed";
    lin_tensors(&mut v, "x_embedder", d, c.in_channels);
    lin_tensors(&mut v, "context_embedder", d, c.joint_attention_dim);
    lin_tensors(&mut v, &format!("{tt}.timestep_embedder.linear_1"), d, 256);
    lin_tensors(&mut v, &format!("{tt}.timestep_embedder.linear_2"), d, d);
    if c.guidance_embeds {
        lin_tensors(&mut v, &format!("{tt}.guidance_embedder.linear_1"), d, 256);
        lin_tensors(&mut v, &format!("{tt}.guidance_embedder.linear_2"), d, d);
    }
    let pooled = c.pooled_projection_dim;
    lin_tensors(&mut v, &format!("{tt}.text_embedder.linear_1"), d, pooled);
    lin_tensors(&mut v, &format!("{tt}.text_embedder.linear_2"), d, d);
    lin_tensors(&mut v, "norm_out.linear", 2 * d, d);
    lin_tensors(&mut v, "proj_out", c.out_channels(), d);
    v
}

/// The diffusers-named tensors of chain block `i` (double blocks first, then single blocks) and
/// their shapes: what the block's `load` reads.
pub fn block_tensors(c: &FluxConfig, i: usize) -> Vec<(String, Vec<usize>)> {
    let d = c.inner_dim();
    let hd = c.attention_head_dim;
    let mut v = Vec::new();
    if i < c.num_layers {
        let p = format!("transformer_blocks.{i}");
        lin_tensors(&mut v, &format!("{p}.norm1.linear"), 6 * d, d);
        lin_tensors(&mut v, &format!("{p}.norm1_context.linear"), 6 * d, d);
        for n in [
            "to_q",
            "to_k",
            "to_v",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_out.0",
            "to_add_out",
        ] {
            lin_tensors(&mut v, &format!("{p}.attn.{n}"), d, d);
        }
        for f in ["ff", "ff_context"] {
            lin_tensors(&mut v, &format!("{p}.{f}.net.0.proj"), 4 * d, d);
            lin_tensors(&mut v, &format!("{p}.{f}.net.2"), d, 4 * d);
        }
        for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
            v.push((format!("{p}.attn.{n}.weight"), vec![hd]));
        }
    } else {
        let p = format!("single_transformer_blocks.{}", i - c.num_layers);
        lin_tensors(&mut v, &format!("{p}.norm.linear"), 3 * d, d);
        for n in ["to_q", "to_k", "to_v"] {
            lin_tensors(&mut v, &format!("{p}.attn.{n}"), d, d);
        }
        lin_tensors(&mut v, &format!("{p}.proj_mlp"), 4 * d, d);
        lin_tensors(&mut v, &format!("{p}.proj_out"), d, 5 * d);
        for n in ["norm_q", "norm_k"] {
            v.push((format!("{p}.attn.{n}.weight"), vec![hd]));
        }
    }
    v
}

/// One block of the chain.
enum AnyBlock {
    Double(DoubleBlock),
    Single(SingleBlock),
}

impl AnyBlock {
    /// Chain block `i`: double block `i`, or single block `i - num_layers`.
    fn load(w: &WeightStore, i: usize, c: &FluxConfig, dev: &Device) -> Result<Self> {
        if i < c.num_layers {
            Ok(AnyBlock::Double(DoubleBlock::load(w, i, c, dev)?))
        } else {
            Ok(AnyBlock::Single(SingleBlock::load(
                w,
                i - c.num_layers,
                c,
                dev,
            )?))
        }
    }

    fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        match self {
            AnyBlock::Double(b) => b.forward(inputs),
            AnyBlock::Single(b) => b.forward(inputs),
        }
    }
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
            for (name, shape) in block_tensors(&cfg, i) {
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
        let inputs = [h, e, self.temb.clone(), self.cos.clone(), self.sin.clone()];
        let out = m
            .hooks
            .run_block(self.scope, i, &inputs, &|inp: &[Tensor]| blk.forward(inp))?;
        // The registry holds each block's metadata (built once in `assemble`).
        let meta = m
            .hooks
            .metadata()
            .get(i)
            .ok_or_else(|| Error::msg(format!("flux: block {i} has no metadata")))?;
        let h = meta.hidden_output(&out)?.clone();
        let e = meta
            .encoder_output(&out)?
            .cloned()
            .ok_or_else(|| Error::msg("flux block returned no encoder stream"))?;
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
