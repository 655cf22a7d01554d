//! `QwenImageTransformer2DModel` in candle: a double-stream MMDiT (the joint-attention blocks of
//! [`magcache_layers::mmdit`], each with its own image and text modulations), its centred 3-axis
//! RoPE, and one cache chain over its blocks. Norms, softmax and modulation run in f32.

use super::config::QwenImageConfig;
use candle_core::{DType, Device, Tensor};
use magcache_core::{BlockMetadata, CallCx, Error, ModelBlocks, Result};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::dit::{joint_forward, modulated_input, JointTrace, OutputLayer};
use magcache_layers::mmdit::{chunks, Act, DoubleStream, FeedForward, JointAttention};
use magcache_layers::nn::{linear, LayerNorm, Linear, RmsNorm};
use magcache_layers::weights::WeightStore;

/// A double-stream block: image (hidden) and text (encoder) streams.
pub const QWENIMAGE_BLOCK: BlockMetadata = BlockMetadata::joint("qwenimage.block");

/// One `transformer_blocks.{i}`: `img_mod.1` / `txt_mod.1` and the shared double-stream maths.
pub struct QBlock {
    img_mod: Linear,
    txt_mod: Linear,
    inner: DoubleStream,
}

impl QBlock {
    pub fn load(w: &WeightStore, i: usize, c: &QwenImageConfig, dev: &Device) -> Result<Self> {
        let (d, hd) = (c.inner_dim(), c.attention_head_dim);
        let p = format!("transformer_blocks.{i}");
        let l = |n: &str| linear(w, n, d, d);
        let rms = |n: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(
                w.get_shape(&format!("{n}.weight"), &[hd])?,
                1e-6,
            ))
        };
        let mlp = |n: &str| -> Result<FeedForward> {
            Ok(FeedForward {
                inp: linear(w, &format!("{p}.{n}.net.0.proj"), 4 * d, d)?,
                out: linear(w, &format!("{p}.{n}.net.2"), d, 4 * d)?,
                act: Act::Gelu,
            })
        };
        Ok(QBlock {
            img_mod: linear(w, &format!("{p}.img_mod.1"), 6 * d, d)?,
            txt_mod: linear(w, &format!("{p}.txt_mod.1"), 6 * d, d)?,
            inner: DoubleStream {
                attn: JointAttention::load(&format!("{p}.attn"), c.num_attention_heads, l, rms)?,
                ff: mlp("img_mlp")?,
                ff_context: mlp("txt_mlp")?,
                ln: LayerNorm::new(d, 1e-6, None, dev)?,
            },
        })
    }

    /// `(image, text)` after the block.
    pub fn forward(
        &self,
        h: &Tensor,
        e: &Tensor,
        temb: &Tensor,
        r: &(Tensor, Tensor),
    ) -> Result<(Tensor, Tensor)> {
        let m = chunks(&self.img_mod, temb, 6)?;
        let mc = chunks(&self.txt_mod, temb, 6)?;
        self.inner.forward(h, e, &m, &mc, &r.0, &r.1)
    }
}

pub struct QwenImageModel {
    pub cfg: QwenImageConfig,
    img_in: Linear,
    txt_norm: RmsNorm,
    txt_in: Linear,
    t1: Linear,
    t2: Linear,
    /// The chain, held or streamed, and its hooks.
    pub(crate) blocks: ModelBlocks<QBlock>,
    /// Block 0's `img_mod`, held for the modulated-input indicator when the chain is streamed.
    mod0: Option<Linear>,
    out: OutputLayer,
}

impl QwenImageModel {
    pub fn is_streamed(&self) -> bool {
        self.blocks.is_streamed()
    }

    /// `temb` `[B, inner]`: `Timesteps(256, scale=1000)` (cosines first, the argument `1000 * (t *
    /// f_i)` in f32) through the two-layer MLP.
    pub fn temb(&self, t: &Tensor) -> Result<Tensor> {
        let dev = t.device();
        let t = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let half = 128;
        let f: Vec<f32> = (0..half)
            .map(|i| (-(10000f32.ln()) * i as f32 / half as f32).exp())
            .collect();
        let mut v = Vec::with_capacity(t.len() * 2 * half);
        for &ti in &t {
            let args: Vec<f32> = f.iter().map(|fi| 1000f32 * (ti * fi)).collect();
            v.extend(args.iter().map(|a| a.cos()));
            v.extend(args.iter().map(|a| a.sin()));
        }
        let p = Tensor::from_vec(v, (t.len(), 2 * half), dev)?;
        self.t2.forward(&self.t1.forward(&p)?.silu()?)
    }

    /// Rotary tables `[L_text + h'w', head_dim/2]` (text rows first) for an `h' x w'` patch grid
    /// and `l` text tokens: per axis `freq_j = 1 / 10000^(2j / d)` and the angle `pos * freq_j`, in
    /// f32; image rows `(0, r - (h' - h'/2), c - (w' - w'/2))`, text row `k` at `max(h'/2, w'/2) + k`
    /// on every axis.
    pub fn rope(&self, hp: usize, wp: usize, l: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let axes = &self.cfg.axes_dims_rope;
        let half: usize = axes.iter().sum::<usize>() / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        let freqs: Vec<Vec<f32>> = axes
            .iter()
            .map(|&d| {
                (0..d / 2)
                    .map(|j| 1f32 / 10000f32.powf((2 * j) as f32 / d as f32))
                    .collect()
            })
            .collect();
        let mut row = |pos: [i64; 3]| {
            for (&p, fs) in pos.iter().zip(&freqs) {
                for &f in fs {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        };
        let start = (hp / 2).max(wp / 2) as i64;
        for k in 0..l as i64 {
            row([start + k; 3]);
        }
        let (oh, ow) = ((hp - hp / 2) as i64, (wp - wp / 2) as i64);
        for r in 0..hp as i64 {
            for c in 0..wp as i64 {
                row([0, r - oh, c - ow]);
            }
        }
        let n = l + hp * wp;
        Ok((
            Tensor::from_vec(cos, (n, half), dev)?,
            Tensor::from_vec(sin, (n, half), dev)?,
        ))
    }

    /// One call: `x` `[B, h'w', in_channels]` packed latents on an `h' x w'` grid, `ctx` `[B, L,
    /// joint_attention_dim]`, `t` `[B]` (0..1) -> `[B, h'w', 4 * out_channels]`.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        t: &Tensor,
        grid: (usize, usize),
        cx: &CallCx<'_>,
    ) -> Result<Tensor> {
        self.forward_traced(x, ctx, t, grid, cx, None)
    }

    pub fn forward_traced(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        t: &Tensor,
        grid: (usize, usize),
        cx: &CallCx<'_>,
        mut trace: Option<&mut JointTrace>,
    ) -> Result<Tensor> {
        let h = self.img_in.forward(&x.to_dtype(DType::F32)?)?;
        let e = self
            .txt_in
            .forward(&self.txt_norm.forward(&ctx.to_dtype(DType::F32)?)?)?;
        let temb = self.temb(&t.to_device(x.device())?)?;
        let r = self.rope(grid.0, grid.1, ctx.dim(1)?, x.device())?;
        JointTrace::record_inputs(trace.as_deref_mut(), &temb, (&h, &e), &r);
        let held = self.blocks.held_blocks().and_then(|b| b.first());
        let mod0 = self.mod0.as_ref().or(held.map(|b| &b.img_mod));
        let input = || match mod0 {
            Some(m) => modulated_input(m, &self.out.ln, &h, &temb),
            None => Err(Error::msg(
                "qwen-image: an empty chain has no modulated input",
            )),
        };
        let parts = (&self.blocks, &self.out, cx);
        let inputs = ((h.clone(), e), (&temb, input));
        joint_forward(parts, inputs, trace, |b: &QBlock, h, e| {
            b.forward(h, e, &temb, &r)
        })
    }
}

impl ChainModel for QwenImageModel {
    type Config = QwenImageConfig;
    type Block = QBlock;
    const FAMILY: &'static str = "qwen-image";

    fn chain(cfg: &QwenImageConfig) -> Vec<BlockMetadata> {
        BlockMetadata::chain(&[(QWENIMAGE_BLOCK, cfg.num_layers)])
    }

    fn hooks(&mut self) -> &mut magcache_core::HookRegistry {
        &mut self.blocks.hooks
    }

    fn load_block(w: &WeightStore, i: usize, c: &QwenImageConfig, dev: &Device) -> Result<QBlock> {
        QBlock::load(w, i, c, dev)
    }

    fn assemble(
        cfg: QwenImageConfig,
        w: &WeightStore,
        blocks: ModelBlocks<QBlock>,
    ) -> Result<Self> {
        let (d, j) = (cfg.inner_dim(), cfg.joint_attention_dim);
        let mod0 = blocks
            .is_streamed()
            .then(|| linear(w, "transformer_blocks.0.img_mod.1", 6 * d, d))
            .transpose()?;
        let te = "time_text_embed.timestep_embedder";
        Ok(QwenImageModel {
            img_in: linear(w, "img_in", d, cfg.in_channels)?,
            txt_norm: RmsNorm::new(w.get_shape("txt_norm.weight", &[j])?, 1e-6),
            txt_in: linear(w, "txt_in", d, j)?,
            t1: linear(w, &format!("{te}.linear_1"), d, 256)?,
            t2: linear(w, &format!("{te}.linear_2"), d, d)?,
            blocks,
            mod0,
            out: OutputLayer::load(w, (d, cfg.out_tokens()), 1e-6, linear)?,
            cfg,
        })
    }
}

/// Intermediates of one forward, for parity tests (`x_embedded` is `img_in`'s output,
/// `context_embedded` `txt_in`'s).
pub type QwenImageTrace = JointTrace;
