//! `WanTransformer3DModel` (Wan2.1 / Wan2.2) in candle, f32.

use super::config::WanConfig;
use candle_core::{Device, Tensor};
use magcache_core::{BlockMetadata, CallCx, Error, Indicator, ModelBlocks, Result, Streams};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::nn::{
    attention_as, linear, merge_heads, modulate, split_heads, timestep_embedding, LayerNorm,
    Linear, RmsNorm,
};
use magcache_layers::weights::WeightStore;

/// A Wan block updates the hidden states ([`BlockArgs`] holds what it reads besides them).
pub const WAN_BLOCK: BlockMetadata = BlockMetadata::hidden("wan.block");

/// What a Wan block reads besides the hidden states: the same for every block of a call.
pub struct BlockArgs<'a> {
    /// The cross-attention context `[B, L, d]`: the embedded text, after the embedded image tokens
    /// on image-attention models (Wan2.1 I2V).
    pub context: &'a Tensor,
    /// Image-attention models: the first `image_rows` rows of `context` go to the added K/V
    /// projections (diffusers' split at `len - 512`, see [`image_context_rows`]).
    pub image_rows: usize,
    /// The timestep projection `[B, S', 6, d]` the block's modulation table is added to.
    pub modulation: &'a Tensor,
    /// Rotary tables of self-attention.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    /// Wan2.1 I2V cross-attention: the image tokens' own keys and values.
    added: Option<AddedKv>,
    heads: usize,
}

/// `add_k_proj`, `add_v_proj` and `norm_added_k` of an image-attention model's `attn2`.
struct AddedKv {
    k: Linear,
    v: Linear,
    norm_k: Option<RmsNorm>,
}

impl Attention {
    fn load(w: &WeightStore, p: &str, cfg: &WanConfig) -> Result<Self> {
        let d = cfg.inner_dim();
        let lin = |n: &str| -> Result<Linear> { linear(w, &format!("{p}.{n}"), d, d) };
        let norm = |n: &str| -> Result<Option<RmsNorm>> {
            if cfg.qk_norm.is_some() {
                Ok(Some(RmsNorm::new(
                    w.get_shape(&format!("{p}.{n}.weight"), &[d])?,
                    cfg.eps,
                )))
            } else {
                Ok(None)
            }
        };
        let added = match cfg.added_kv_proj_dim {
            Some(a) if p.ends_with("attn2") => Some(AddedKv {
                k: linear(w, &format!("{p}.add_k_proj"), d, a)?,
                v: linear(w, &format!("{p}.add_v_proj"), d, a)?,
                norm_k: norm("norm_added_k")?,
            }),
            _ => None,
        };
        Ok(Attention {
            added,
            q: lin("to_q")?,
            k: lin("to_k")?,
            v: lin("to_v")?,
            o: lin("to_out.0")?,
            norm_q: norm("norm_q")?,
            norm_k: norm("norm_k")?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `x [B, S, d]`, `kv [B, L, d]`; rope `(cos, sin)` `[S, head_dim/2]` for self-attention.
    fn forward(&self, x: &Tensor, kv: &Tensor, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        self.forward_split(x, kv, 0, rope)
    }

    /// As [`Attention::forward`]; with added K/V projections (image attention) the first
    /// `image_rows` rows of `kv` are the image tokens: the query attends to them through the added
    /// projections and, separately, to the other rows; the two outputs are summed before `to_out`.
    fn forward_split(
        &self,
        x: &Tensor,
        kv: &Tensor,
        image_rows: usize,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let (image, kv) = match &self.added {
            Some(_) => {
                let len = kv.dim(1)?;
                let rows = image_rows.min(len);
                (
                    (rows > 0).then(|| kv.narrow(1, 0, rows)).transpose()?,
                    kv.narrow(1, rows, len - rows)?,
                )
            }
            None => (None, kv.clone()),
        };
        let kv = &kv;
        let mut q = self.q.forward(x)?;
        let mut k = self.k.forward(kv)?;
        let v = self.v.forward(kv)?;
        if let Some(n) = &self.norm_q {
            q = n.forward(&q)?;
        }
        if let Some(n) = &self.norm_k {
            k = n.forward(&k)?;
        }
        let mut q = split_heads(&q, self.heads)?;
        let mut k = split_heads(&k, self.heads)?;
        let v = split_heads(&v, self.heads)?;
        if let Some((cos, sin)) = rope {
            q = magcache_layers::nn::rope_i(&q, cos, sin)?;
            k = magcache_layers::nn::rope_i(&k, cos, sin)?;
        }
        // A bf16 block on a CPU with AVX512-BF16: the attention's products in bf16 too.
        let bf16 = self.q.runs_bf16();
        let mut o = attention_as(&q, &k, &v, bf16)?;
        if let (Some(a), Some(img)) = (&self.added, &image) {
            let mut ki = a.k.forward(img)?;
            if let Some(n) = &a.norm_k {
                ki = n.forward(&ki)?;
            }
            let ki = split_heads(&ki, self.heads)?;
            let vi = split_heads(&a.v.forward(img)?, self.heads)?;
            o = (o + attention_as(&q, &ki, &vi, bf16)?)?;
        }
        self.o.forward(&merge_heads(&o)?)
    }
}

/// One transformer block (self-attention, cross-attention, feed-forward), loaded from `blocks.{i}`.
pub struct Block {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: Option<LayerNorm>,
    attn2: Attention,
    norm3: LayerNorm,
    ff1: Linear,
    ff2: Linear,
    /// `[1, 1, 6, d]`
    table: Tensor,
}

impl Block {
    fn load(w: &WeightStore, i: usize, cfg: &WanConfig, dev: &Device) -> Result<Self> {
        let d = cfg.inner_dim();
        let p = format!("blocks.{i}");
        let norm2 = if cfg.cross_attn_norm {
            Some(LayerNorm::new(
                d,
                cfg.eps,
                Some((
                    w.get_shape(&format!("{p}.norm2.weight"), &[d])?,
                    w.get_shape(&format!("{p}.norm2.bias"), &[d])?,
                )),
                dev,
            )?)
        } else {
            None
        };
        Ok(Block {
            norm1: LayerNorm::new(d, cfg.eps, None, dev)?,
            attn1: Attention::load(w, &format!("{p}.attn1"), cfg)?,
            norm2,
            attn2: Attention::load(w, &format!("{p}.attn2"), cfg)?,
            norm3: LayerNorm::new(d, cfg.eps, None, dev)?,
            ff1: linear(w, &format!("{p}.ffn.net.0.proj"), cfg.ffn_dim, d)?,
            ff2: linear(w, &format!("{p}.ffn.net.2"), d, cfg.ffn_dim)?,
            table: w
                .get_shape(&format!("{p}.scale_shift_table"), &[1, 6, d])?
                .unsqueeze(0)?,
        })
    }

    /// The hidden states `[B, S, d]` after the block.
    fn forward(&self, h: &Tensor, args: &BlockArgs<'_>) -> Result<Tensor> {
        let BlockArgs {
            context: enc,
            image_rows,
            modulation: tproj,
            cos,
            sin,
        } = args;
        let m = self.table.broadcast_add(tproj)?;
        let chunk = |i: usize| -> Result<Tensor> { Ok(m.narrow(2, i, 1)?.squeeze(2)?) };
        let (shift, scale, gate) = (chunk(0)?, chunk(1)?, chunk(2)?);
        let (c_shift, c_scale, c_gate) = (chunk(3)?, chunk(4)?, chunk(5)?);

        let x = modulate(&self.norm1.forward(h)?, &shift, &scale)?;
        let a = self.attn1.forward(&x, &x, Some((cos, sin)))?;
        let h = (h + a.broadcast_mul(&gate)?)?;

        let x = match &self.norm2 {
            Some(n) => n.forward(&h)?,
            None => h.clone(),
        };
        let h = (&h + self.attn2.forward_split(&x, enc, *image_rows, None)?)?;

        let x = modulate(&self.norm3.forward(&h)?, &c_shift, &c_scale)?;
        let f = self.ff1.forward_gelu_then(&self.ff2, &x)?;
        Ok((h + f.broadcast_mul(&c_gate)?)?)
    }
}

/// `condition_embedder.image_embedder` (Wan2.1 I2V): LayerNorm -> Linear -> exact GELU -> Linear ->
/// LayerNorm, CLIP width `image_dim` to the model width (both norms affine, eps 1e-5).
struct ImageEmbedder {
    norm1: LayerNorm,
    ff1: Linear,
    ff2: Linear,
    norm2: LayerNorm,
}

impl ImageEmbedder {
    fn load(w: &WeightStore, image_dim: usize, d: usize, dev: &Device) -> Result<Self> {
        let p = "condition_embedder.image_embedder";
        let ln = |n: &str, dim: usize| -> Result<LayerNorm> {
            LayerNorm::new(
                dim,
                1e-5,
                Some((
                    w.get_shape(&format!("{p}.{n}.weight"), &[dim])?,
                    w.get_shape(&format!("{p}.{n}.bias"), &[dim])?,
                )),
                dev,
            )
        };
        Ok(ImageEmbedder {
            norm1: ln("norm1", image_dim)?,
            ff1: linear(w, &format!("{p}.ff.net.0.proj"), image_dim, image_dim)?,
            ff2: linear(w, &format!("{p}.ff.net.2"), d, image_dim)?,
            norm2: ln("norm2", d)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.ff1.forward(&self.norm1.forward(x)?)?.gelu_erf()?;
        self.norm2.forward(&self.ff2.forward(&x)?)
    }
}

/// The rows of a cross-attention context `[image ; text]` of `len` rows that diffusers' attention
/// processor takes as image tokens: it hard-codes 512 text rows and slices `[:, :len - 512]`, with
/// Python's meaning of a negative bound. Right (= the image tokens) only when the text has 512 rows,
/// the pipelines' default `max_sequence_length`; reproduced as it is for other lengths.
pub fn image_context_rows(len: usize) -> usize {
    if len >= 512 {
        len - 512
    } else {
        // `[:, :k]` with k = len - 512 < 0 keeps the first len + k rows (none when that is negative).
        (2 * len).saturating_sub(512)
    }
}

/// Intermediate values of one forward, for parity tests.
#[derive(Debug, Default)]
pub struct WanTrace {
    pub temb: Option<Tensor>,
    pub timestep_proj: Option<Tensor>,
    pub encoder_embedded: Option<Tensor>,
    pub rope_cos: Option<Tensor>,
    pub rope_sin: Option<Tensor>,
    pub blocks: Vec<Tensor>,
}

/// The Wan transformer with its hook registry.
pub struct WanModel {
    pub cfg: WanConfig,
    patch_w: Tensor,
    patch_b: Tensor,
    time1: Linear,
    time2: Linear,
    time_proj: Linear,
    text1: Linear,
    text2: Linear,
    /// Image-attention models (Wan2.1 I2V).
    image_embedder: Option<ImageEmbedder>,
    /// The block chain (held or streamed) and its hooks.
    pub(crate) blocks: ModelBlocks<Block>,
    norm_out: LayerNorm,
    proj_out: Linear,
    /// `[1, 1, 2, d]`
    out_table: Tensor,
    /// Per-axis rotary frequencies (f64), lengths t/2, h/2, w/2 of the head dim.
    rope_freqs: [Vec<f64>; 3],
}

impl ChainModel for WanModel {
    type Config = WanConfig;
    type Block = Block;
    const FAMILY: &'static str = "wan";

    fn chain(cfg: &WanConfig) -> Vec<BlockMetadata> {
        vec![WAN_BLOCK; cfg.num_layers]
    }

    fn hooks(&mut self) -> &mut magcache_core::HookRegistry {
        &mut self.blocks.hooks
    }

    fn load_block(w: &WeightStore, i: usize, cfg: &WanConfig, dev: &Device) -> Result<Block> {
        Block::load(w, i, cfg, dev)
    }

    fn assemble(cfg: WanConfig, w: &WeightStore, blocks: ModelBlocks<Block>) -> Result<Self> {
        let dev = w.placement().device.clone();
        let d = cfg.inner_dim();
        let [pt, ph, pw] = cfg.patch_size;
        let patch_w = w.get_shape("patch_embedding.weight", &[d, cfg.in_channels, pt, ph, pw])?;
        let patch_w = patch_w
            .reshape((d, cfg.in_channels * pt * ph * pw))?
            .t()?
            .contiguous()?;
        let lin = |n: &str, o: usize, i: usize| -> Result<Linear> { linear(w, n, o, i) };
        let out_dim = cfg.out_channels * pt * ph * pw;
        let hd = cfg.attention_head_dim;
        let h_dim = 2 * (hd / 6);
        let t_dim = hd - 2 * h_dim;
        let freqs = |dim: usize| -> Vec<f64> {
            (0..dim / 2)
                .map(|j| 1.0 / 10000f64.powf((2 * j) as f64 / dim as f64))
                .collect()
        };
        Ok(WanModel {
            patch_b: w.get_shape("patch_embedding.bias", &[d])?,
            patch_w,
            time1: lin("condition_embedder.time_embedder.linear_1", d, cfg.freq_dim)?,
            time2: lin("condition_embedder.time_embedder.linear_2", d, d)?,
            time_proj: lin("condition_embedder.time_proj", 6 * d, d)?,
            text1: lin("condition_embedder.text_embedder.linear_1", d, cfg.text_dim)?,
            text2: lin("condition_embedder.text_embedder.linear_2", d, d)?,
            image_embedder: match cfg.image_dim {
                Some(i) => Some(ImageEmbedder::load(w, i, d, &dev)?),
                None => None,
            },
            blocks,
            norm_out: LayerNorm::new(d, cfg.eps, None, &dev)?,
            proj_out: lin("proj_out", out_dim, d)?,
            out_table: w.get_shape("scale_shift_table", &[1, 2, d])?.unsqueeze(0)?,
            rope_freqs: [freqs(t_dim), freqs(h_dim), freqs(h_dim)],
            cfg,
        })
    }
}

impl WanModel {
    /// Rotary tables `[S, head_dim/2]` for a latent grid of `f x h x w` patches.
    pub fn rope(&self, f: usize, h: usize, w: usize) -> Result<(Tensor, Tensor)> {
        let half: usize = self.rope_freqs.iter().map(|v| v.len()).sum();
        let (mut cos, mut sin) = (
            Vec::with_capacity(f * h * w * half),
            Vec::with_capacity(f * h * w * half),
        );
        for fi in 0..f {
            for hi in 0..h {
                for wi in 0..w {
                    for (axis, pos) in [(0, fi), (1, hi), (2, wi)] {
                        for fr in &self.rope_freqs[axis] {
                            let a = pos as f64 * fr;
                            cos.push(a.cos() as f32);
                            sin.push(a.sin() as f32);
                        }
                    }
                }
            }
        }
        let dev = self.patch_b.device();
        Ok((
            Tensor::from_vec(cos, (f * h * w, half), dev)?,
            Tensor::from_vec(sin, (f * h * w, half), dev)?,
        ))
    }

    /// Time and text conditioning: `temb [B, S', d]`, `timestep_proj [B, S', 6, d]`, text `[B, L, d]`.
    /// `t` is `[B]` (one timestep per sample, S' = 1) or `[B, S]` (one per token).
    pub fn condition(&self, t: &Tensor, ctx: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let d = self.cfg.inner_dim();
        let b = t.dim(0)?;
        let s = if t.rank() == 2 { t.dim(1)? } else { 1 };
        let e = timestep_embedding(&t.flatten_all()?, self.cfg.freq_dim)?;
        let temb = self.time2.forward(&self.time1.forward(&e)?.silu()?)?;
        let tproj = self.time_proj.forward(&temb.silu()?)?;
        let temb = temb.reshape((b, s, d))?;
        let tproj = tproj.reshape((b, s, 6, d))?;
        let text = self.text1.forward_gelu_then(&self.text2, ctx)?;
        Ok((temb, tproj, text))
    }

    /// Patchify `[B, C, F, H, W] -> [B, S, C*pt*ph*pw]` (the Conv3d with kernel = stride = patch).
    fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, f, h, w) = x.dims5()?;
        let [pt, ph, pw] = self.cfg.patch_size;
        let x = x.reshape(vec![b, c, f / pt, pt, h / ph, ph, w / pw, pw])?;
        let x = x.permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?.contiguous()?;
        let s = (f / pt) * (h / ph) * (w / pw);
        let x = x.reshape((b * s, c * pt * ph * pw))?;
        let y = x.matmul(&self.patch_w)?.broadcast_add(&self.patch_b)?;
        Ok(y.reshape((b, s, self.cfg.inner_dim()))?)
    }

    /// Checks an input latent against the config.
    pub fn check_latents(&self, x: &Tensor) -> Result<()> {
        match self.cfg.latent_shape_error(x.dims()) {
            Some(msg) => Err(Error::msg(format!("latents: {msg}"))),
            None => Ok(()),
        }
    }

    /// Forward: `x [B, C, F, H, W]`, `t [B]` or `[B, S]` (0..1000), `ctx [B, L, text_dim]` -> `[B, C_out, F, H, W]`.
    /// The block chain runs through `cx` (the call's scope and cache).
    pub fn forward(&self, x: &Tensor, t: &Tensor, ctx: &Tensor, cx: &CallCx<'_>) -> Result<Tensor> {
        self.forward_inner(x, t, ctx, None, cx, None)
    }

    /// Whether the model has image attention (`image_dim`, Wan2.1 I2V) and so needs image tokens.
    pub fn takes_image(&self) -> bool {
        self.image_embedder.is_some()
    }

    /// [`WanModel::forward`], recording intermediates into `trace`.
    pub fn forward_traced(
        &self,
        x: &Tensor,
        t: &Tensor,
        ctx: &Tensor,
        cx: &CallCx<'_>,
        trace: Option<&mut WanTrace>,
    ) -> Result<Tensor> {
        self.forward_inner(x, t, ctx, None, cx, trace)
    }

    /// [`WanModel::forward_traced`] with the CLIP image tokens `image [B, N, image_dim]` of an
    /// image-attention model (Wan2.1 I2V); `None` on other models.
    pub fn forward_inner(
        &self,
        x: &Tensor,
        t: &Tensor,
        ctx: &Tensor,
        image: Option<&Tensor>,
        cx: &CallCx<'_>,
        mut trace: Option<&mut WanTrace>,
    ) -> Result<Tensor> {
        self.check_latents(x)?;
        let (b, _c, f, h, w) = x.dims5()?;
        let [pt, ph, pw] = self.cfg.patch_size;
        let (pf, phh, pww) = (f / pt, h / ph, w / pw);
        let seq = pf * phh * pww;
        if t.rank() == 2 && (t.dim(0)? != b || t.dim(1)? != seq) {
            return Err(Error::msg(format!(
                "per-token timesteps have shape {:?}, expected [{b}, {seq}]",
                t.dims()
            )));
        }
        if t.rank() == 1 && t.dim(0)? != b {
            return Err(Error::msg(format!(
                "timesteps have shape {:?}, expected [{b}]",
                t.dims()
            )));
        }
        let (cos, sin) = self.rope(pf, phh, pww)?;
        let hidden = self.patchify(x)?;
        let (temb, tproj, text) = self.condition(t, ctx)?;
        let (text, image_rows) = match (&self.image_embedder, image) {
            (None, None) => (text, 0),
            (Some(e), Some(img)) => {
                let want = self.cfg.image_dim.unwrap_or(0);
                if img.rank() != 3 || img.dim(0)? != b || img.dim(2)? != want {
                    return Err(Error::msg(format!(
                        "image embeddings have shape {:?}, expected [{b}, N, {want}]",
                        img.dims()
                    )));
                }
                let ctx = Tensor::cat(&[&e.forward(img)?, &text], 1)?;
                let rows = image_context_rows(ctx.dim(1)?);
                (ctx, rows)
            }
            (Some(_), None) => {
                return Err(Error::msg(
                    "this transformer has image attention (image_dim: Wan2.1 I2V) and needs the image's CLIP embeddings",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::msg(
                    "image embeddings given to a transformer without image attention (no image_dim)",
                ))
            }
        };
        if let Some(tr) = trace.as_deref_mut() {
            tr.temb = Some(temb.clone());
            tr.timestep_proj = Some(tproj.clone());
            tr.encoder_embedded = Some(text.clone());
            tr.rope_cos = Some(cos.clone());
            tr.rope_sin = Some(sin.clone());
        }
        let args = BlockArgs {
            context: &text,
            image_rows,
            modulation: &tproj,
            cos: &cos,
            sin: &sin,
        };
        let mut record = |_: usize, s: &Streams| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.blocks.push(s.hidden.clone());
            }
        };
        // [B, C, F, H, W] -> [B, F, H, W, C], computed only when a strategy asks.
        let latents = || Ok(x.permute((0, 2, 3, 4, 1))?.contiguous()?);
        let chain = (self.blocks)
            .call(cx.scope, |_, b: &Block, s: Streams| {
                Ok(Streams::hidden(b.forward(&s.hidden, &args)?))
            })
            .with_indicator(Indicator::TimestepEmbedding, &temb)
            .with_indicator(Indicator::TimestepModulation, &tproj)
            .with_indicator_fn(Indicator::InputLatents, latents)
            .traced(&mut record);
        let hs = cx.run_chain(&chain, Streams::hidden(hidden))?.hidden;
        drop(chain);
        // Output norm with the final modulation, projection, unpatchify.
        let m = self.out_table.broadcast_add(&temb.unsqueeze(2)?)?; // [B, S', 2, d]
        let shift = m.narrow(2, 0, 1)?.squeeze(2)?;
        let scale = m.narrow(2, 1, 1)?.squeeze(2)?;
        let y = modulate(&self.norm_out.forward(&hs)?, &shift, &scale)?;
        let y = self.proj_out.forward(&y)?; // [B, S, pt*ph*pw*C]
        let c_out = self.cfg.out_channels;
        let y = y.reshape(vec![b, pf, phh, pww, pt, ph, pw, c_out])?;
        let y = y.permute(vec![0, 7, 1, 4, 2, 5, 3, 6])?.contiguous()?;
        Ok(y.reshape((b, c_out, f, h, w))?)
    }

    /// The device the model's tensors live on.
    pub fn device(&self) -> &Device {
        self.patch_b.device()
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.cfg.num_layers
    }

    /// Whether block weights are read from the checkpoint as blocks run.
    pub fn is_streamed(&self) -> bool {
        self.blocks.is_streamed()
    }
}

/// Diffusers-named random weights for a config (presets): linear weights uniform with std
/// `1/sqrt(fan_in)`, zero biases, unit norms, modulation tables `randn / sqrt(d)`.
pub fn random_weights(
    cfg: &WanConfig,
    seed: u64,
    dtype: candle_core::DType,
) -> Result<WeightStore> {
    magcache_layers::random::random_store(seed, WanModel::shapes(cfg)?, cfg.inner_dim(), dtype)
}
