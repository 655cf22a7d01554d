//! `ZImageTransformer2DModel` in candle: patch and caption embedders, the noise refiner (image
//! tokens, modulated) and context refiner (caption tokens) that run on every call, then one
//! sequence `[image; caption]` through the main `layers`, the cache chain. Norms, softmax and
//! modulation run in f32 whatever the weights' dtype.

use super::blocks::{check_positions, pad_rows, seq_rope, ZBlock};
use super::config::{ZImageConfig, SEQ_MULTI_OF, T_FREQ_CHANNELS, T_MLP_HIDDEN};
use candle_core::{DType, Device, Tensor, D};
use magcache_core::{BlockMetadata, CallCx, Indicator, ModelBlocks, Result, Streams};
use magcache_layers::chain_model::ChainModel;
use magcache_layers::nn::{linear, timestep_embedding, LayerNorm, Linear, RmsNorm};
use magcache_layers::weights::WeightStore;

/// A main block: the unified `[image; caption]` sequence, modulated by the timestep.
pub const ZIMAGE_LAYER: BlockMetadata = BlockMetadata::hidden("zimage.layer");

pub struct ZImageModel {
    pub cfg: ZImageConfig,
    t1: Linear,
    t2: Linear,
    x_emb: Linear,
    cap_norm: RmsNorm,
    cap_emb: Linear,
    x_pad: Tensor,
    cap_pad: Tensor,
    noise_refiner: Vec<ZBlock>,
    context_refiner: Vec<ZBlock>,
    /// The main `layers`, held or streamed, and their hooks.
    pub(crate) blocks: ModelBlocks<ZBlock>,
    final_mod: Linear,
    final_norm: LayerNorm,
    final_lin: Linear,
}

/// Intermediates of one forward (per item rows as the reference's fixture names them).
#[derive(Debug, Default)]
pub struct ZImageTrace {
    pub adaln_input: Option<Tensor>,
    pub x_embedded: Option<Tensor>,
    pub cap_embedded: Option<Tensor>,
    pub noise_refiner: Vec<Tensor>,
    pub context_refiner: Vec<Tensor>,
    pub unified: Option<Tensor>,
    pub layers: Vec<Tensor>,
    pub final_layer: Option<Tensor>,
}

/// `ceil(n / 32) * 32`.
pub fn padded(n: usize) -> usize {
    n.div_ceil(SEQ_MULTI_OF) * SEQ_MULTI_OF
}

impl ChainModel for ZImageModel {
    type Config = ZImageConfig;
    type Block = ZBlock;
    const FAMILY: &'static str = "z-image";

    fn chain(cfg: &ZImageConfig) -> Vec<BlockMetadata> {
        BlockMetadata::chain(&[(ZIMAGE_LAYER, cfg.n_layers)])
    }

    fn hooks(&mut self) -> &mut magcache_core::HookRegistry {
        &mut self.blocks.hooks
    }

    fn load_block(w: &WeightStore, i: usize, c: &ZImageConfig, _: &Device) -> Result<ZBlock> {
        ZBlock::load(w, &format!("layers.{i}"), c, true)
    }

    fn assemble(cfg: ZImageConfig, w: &WeightStore, blocks: ModelBlocks<ZBlock>) -> Result<Self> {
        let dev = w.placement().device.clone();
        let (d, a) = (cfg.dim, cfg.adaln_dim());
        let refiners = |name: &str, modulated: bool| {
            (0..cfg.n_refiner_layers)
                .map(|i| ZBlock::load(w, &format!("{name}.{i}"), &cfg, modulated))
                .collect::<Result<Vec<_>>>()
        };
        let fl = "all_final_layer.2-1";
        Ok(ZImageModel {
            t1: linear(w, "t_embedder.mlp.0", T_MLP_HIDDEN, T_FREQ_CHANNELS)?,
            t2: linear(w, "t_embedder.mlp.2", a, T_MLP_HIDDEN)?,
            x_emb: linear(w, "all_x_embedder.2-1", d, cfg.patch_channels())?,
            cap_norm: RmsNorm::new(
                w.get_shape("cap_embedder.0.weight", &[cfg.cap_feat_dim])?,
                cfg.norm_eps,
            ),
            cap_emb: linear(w, "cap_embedder.1", d, cfg.cap_feat_dim)?,
            x_pad: w.get_shape("x_pad_token", &[1, d])?,
            cap_pad: w.get_shape("cap_pad_token", &[1, d])?,
            noise_refiner: refiners("noise_refiner", true)?,
            context_refiner: refiners("context_refiner", false)?,
            blocks,
            final_mod: linear(w, &format!("{fl}.adaLN_modulation.1"), d, a)?,
            final_norm: LayerNorm::new(d, 1e-6, None, &dev)?,
            final_lin: linear(w, &format!("{fl}.linear"), cfg.patch_channels(), d)?,
            cfg,
        })
    }
}

impl ZImageModel {
    pub fn is_streamed(&self) -> bool {
        self.blocks.is_streamed()
    }

    /// `adaln_input` `[B, min(dim, 256)]`: the timestep MLP on the cosine-first sinusoid of
    /// `t_scale * t` (`t` on the pipeline's reversed 0..1 scale).
    pub fn adaln_input(&self, t: &Tensor) -> Result<Tensor> {
        let f = timestep_embedding(
            &(t.to_dtype(DType::F32)? * self.cfg.t_scale)?,
            T_FREQ_CHANNELS,
        )?;
        self.t2.forward(&self.t1.forward(&f)?.silu()?)
    }

    /// `[B, C, h, w]` latents -> `[B, (h/2)(w/2), 4C]` tokens, channel `(dy * 2 + dx) * C + c`.
    pub fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        Ok(x.reshape((b, c, h / 2, 2, w / 2, 2))?
            .permute((0, 2, 4, 3, 5, 1))?
            .reshape((b, (h / 2) * (w / 2), 4 * c))?)
    }

    /// `[B, seq, 4C]` -> `[B, C, h, w]` (the inverse of [`ZImageModel::patchify`]).
    fn unpatchify(&self, y: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, _, pc) = y.dims3()?;
        let c = pc / 4;
        Ok(y.reshape((b, h / 2, w / 2, 2, 2, c))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((b, c, h, w))?)
    }

    /// One transformer call on `B` items: `x` `[B, C, h, w]` latents (even `h`, `w`), `caps[b]`
    /// `[n_b, cap_feat_dim]` item `b`'s caption, `t` `[B]` -> `[B, C, h, w]`.
    pub fn forward(
        &self,
        x: &Tensor,
        caps: &[Tensor],
        t: &Tensor,
        cx: &CallCx<'_>,
    ) -> Result<Tensor> {
        self.forward_traced(x, caps, t, cx, None)
    }

    pub fn forward_traced(
        &self,
        x: &Tensor,
        caps: &[Tensor],
        t: &Tensor,
        cx: &CallCx<'_>,
        mut trace: Option<&mut ZImageTrace>,
    ) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let dev = x.device().clone();
        let (h2, w2) = (h / 2, w / 2);
        let n_img = h2 * w2;
        let li = padded(n_img);
        let caps = check_caps(&self.cfg, caps, b, &dev)?;
        let adaln = self.adaln_input(t)?;
        // Image tokens: embedded, then the padding rows set to the pad token.
        let xt = self
            .x_emb
            .forward(&self.patchify(&x.to_dtype(DType::F32)?)?)?;
        let xt = self.with_pad(&xt, n_img, li, &self.x_pad)?;
        // Caption tokens per item, padded to a multiple of 32 the same way.
        let mut cap_rows = Vec::with_capacity(b);
        let (mut x_pos, mut cap_pos) = (Vec::new(), Vec::new());
        for cap in &caps {
            let n = cap.dim(0)?;
            let lc = padded(n);
            let e = self
                .cap_emb
                .forward(&self.cap_norm.forward(&cap.to_dtype(DType::F32)?)?)?;
            cap_rows.push(
                self.with_pad(&e.unsqueeze(0)?, n, lc, &self.cap_pad)?
                    .squeeze(0)?,
            );
            cap_pos.push((0..lc).map(|l| [1 + l, 0, 0]).collect::<Vec<_>>());
            let mut p: Vec<[usize; 3]> = (0..n_img).map(|i| [lc + 1, i / w2, i % w2]).collect();
            p.resize(li, [0, 0, 0]);
            x_pos.push(p);
        }
        check_positions(&self.cfg, &x_pos.concat(), "the picture and caption")?;
        check_positions(&self.cfg, &cap_pos.concat(), "the caption")?;
        let mut cs = pad_rows(&cap_rows)?;
        if let Some(tr) = trace.as_deref_mut() {
            tr.adaln_input = Some(adaln.clone());
            tr.x_embedded = Some(xt.clone());
            tr.cap_embedded = Some(cs.clone());
        }
        let xr = seq_rope(&self.cfg, &x_pos, &dev)?;
        let mut xs = xt;
        for blk in &self.noise_refiner {
            xs = blk.forward(&xs, Some(&adaln), &xr)?;
            if let Some(tr) = trace.as_deref_mut() {
                tr.noise_refiner.push(xs.clone());
            }
        }
        let cr = seq_rope(&self.cfg, &cap_pos, &dev)?;
        for blk in &self.context_refiner {
            cs = blk.forward(&cs, None, &cr)?;
            if let Some(tr) = trace.as_deref_mut() {
                tr.context_refiner.push(cs.clone());
            }
        }
        // One sequence per item, image first, zero-padded to the longest item.
        let mut unified = Vec::with_capacity(b);
        let mut u_pos = Vec::with_capacity(b);
        for (i, p) in cap_pos.iter().enumerate() {
            let c = cs.get(i)?.narrow(0, 0, p.len())?;
            unified.push(Tensor::cat(&[&xs.get(i)?, &c], 0)?);
            u_pos.push([x_pos[i].clone(), p.clone()].concat());
        }
        let ur = seq_rope(&self.cfg, &u_pos, &dev)?;
        let u = pad_rows(&unified)?;
        if let Some(tr) = trace.as_deref_mut() {
            tr.unified = Some(u.clone());
        }
        let mut record = |_: usize, s: &Streams| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.layers.push(s.hidden.clone());
            }
        };
        let chain = (self.blocks)
            .call(cx.scope, |_, blk: &ZBlock, s: Streams| {
                Ok(Streams::hidden(blk.forward(
                    &s.hidden,
                    Some(&adaln),
                    &ur,
                )?))
            })
            .with_indicator(Indicator::TimestepEmbedding, &adaln)
            .traced(&mut record);
        let u = cx.run_chain(&chain, Streams::hidden(u))?.hidden;
        drop(chain);
        let scale = (self.final_mod.forward(&adaln.silu()?)? + 1.0)?.unsqueeze(1)?;
        let y = self.final_norm.forward(&u)?.broadcast_mul(&scale)?;
        let y = self.final_lin.forward(&y)?;
        if let Some(tr) = trace {
            tr.final_layer = Some(y.clone());
        }
        self.unpatchify(&y.narrow(1, 0, n_img)?, h, w)
    }

    /// `[B, n, dim]` real rows -> `[B, len, dim]` with rows `n..len` the pad token `[1, dim]`.
    fn with_pad(&self, t: &Tensor, n: usize, len: usize, pad: &Tensor) -> Result<Tensor> {
        if len == n {
            return Ok(t.clone());
        }
        let (b, _, d) = t.dims3()?;
        let p = pad
            .to_dtype(DType::F32)?
            .unsqueeze(0)?
            .broadcast_as((b, len - n, d))?;
        Ok(Tensor::cat(&[t, &p.contiguous()?], 1)?)
    }
}

/// Checks a caption list against a batch: as many items, each `[n, cap_feat_dim]`.
fn check_caps(c: &ZImageConfig, caps: &[Tensor], b: usize, dev: &Device) -> Result<Vec<Tensor>> {
    if caps.len() != b {
        return Err(magcache_core::Error::msg(format!(
            "Z-Image: {} captions for a batch of {b}",
            caps.len()
        )));
    }
    caps.iter()
        .map(|t| {
            let t = if t.rank() == 3 { t.squeeze(0)? } else { t.clone() };
            if t.rank() != 2 || t.dim(D::Minus1)? != c.cap_feat_dim || t.dim(0)? == 0 {
                return Err(magcache_core::Error::msg(format!(
                    "Z-Image: a caption of shape {:?}; the transformer takes [n >= 1, {}] (cap_feat_dim)",
                    t.dims(),
                    c.cap_feat_dim
                )));
            }
            Ok(t.to_device(dev)?)
        })
        .collect()
}
