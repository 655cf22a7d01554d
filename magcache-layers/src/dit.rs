//! What a DiT holds around its block chain, for the families that share it: the timestep (and
//! guidance) embedding and multi-axis rotary tables from position ids (FLUX.1, FLUX.2), the
//! AdaLN-continuous output layer and one call of a double-stream chain with its indicators, trace
//! and output layer (FLUX.1, FLUX.2, Qwen-Image), and a FLUX-style call's packed inputs. A family
//! keeps its tensor names (a prefix, bias or not) and its own extras.

use crate::nn::{modulate, timestep_embedding, LayerNorm, Linear};
use crate::weights::WeightStore;
use candle_core::{DType, Tensor, D};
use magcache_core::{CallCx, Error, Indicator, ModelBlocks, Result, Streams};

/// Reads a linear layer `name` of `[out, in]` (with or without bias: the family's choice).
pub type LinearLoader = fn(&WeightStore, &str, usize, usize) -> Result<Linear>;

/// `linear_2(silu(linear_1(proj(1000 t))))`, plus the same MLP on the guidance where the model
/// embeds one (`{prefix}.timestep_embedder.*`, `{prefix}.guidance_embedder.*`).
pub struct TimeEmbedding {
    t1: Linear,
    t2: Linear,
    guidance: Option<(Linear, Linear)>,
    /// Channels of the sinusoidal projection.
    channels: usize,
    /// The model, in the error a missing guidance value gives.
    model: &'static str,
}

impl TimeEmbedding {
    /// Reads the embedders under `prefix` for an inner width `d`.
    pub fn load(
        w: &WeightStore,
        prefix: &str,
        (d, channels): (usize, usize),
        guidance: bool,
        lin: LinearLoader,
        model: &'static str,
    ) -> Result<Self> {
        let mlp = |name: &str| -> Result<(Linear, Linear)> {
            Ok((
                lin(w, &format!("{prefix}.{name}.linear_1"), d, channels)?,
                lin(w, &format!("{prefix}.{name}.linear_2"), d, d)?,
            ))
        };
        let guidance = guidance.then(|| mlp("guidance_embedder")).transpose()?;
        let (t1, t2) = mlp("timestep_embedder")?;
        Ok(TimeEmbedding {
            t1,
            t2,
            guidance,
            channels,
            model,
        })
    }

    /// `[B, d]` for `t` (and `guidance`) on the 0..1 scale: the model multiplies by 1000 itself.
    pub fn forward(&self, t: &Tensor, guidance: Option<&Tensor>) -> Result<Tensor> {
        let embed = |x: &Tensor, (l1, l2): (&Linear, &Linear)| -> Result<Tensor> {
            let p = timestep_embedding(&(x.to_dtype(DType::F32)? * 1000.0)?, self.channels)?;
            l2.forward(&l1.forward(&p)?.silu()?)
        };
        let emb = embed(t, (&self.t1, &self.t2))?;
        match &self.guidance {
            None => Ok(emb),
            Some((g1, g2)) => {
                let g = guidance.ok_or_else(|| {
                    Error::msg(format!(
                        "this {} model embeds guidance: a guidance value is required",
                        self.model
                    ))
                })?;
                Ok((emb + embed(g, (g1, g2))?)?)
            }
        }
    }
}

/// Rotary tables `(cos, sin)`, each `[S, sum(axes)/2]`, from position ids `[S, axes.len()]` (any
/// numeric dtype): axis `i` takes `axes[i]` dims, `freq_j = 1 / theta^(2j / axes[i])` in f64,
/// angles `pos * freq_j`.
pub fn axes_rope(
    ids: &Tensor,
    axes: &[usize],
    theta: f64,
    model: &str,
) -> Result<(Tensor, Tensor)> {
    let (s, n) = ids.dims2()?;
    if n != axes.len() {
        return Err(Error::msg(format!(
            "position ids have {n} axes, the {model} model has {} (axes_dims_rope)",
            axes.len()
        )));
    }
    let dev = ids.device().clone();
    let ids = ids.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let freqs: Vec<Vec<f64>> = axes
        .iter()
        .map(|&dim| {
            (0..dim / 2)
                .map(|j| 1.0 / theta.powf((2 * j) as f64 / dim as f64))
                .collect()
        })
        .collect();
    let half: usize = axes.iter().sum::<usize>() / 2;
    let (mut cos, mut sin) = (Vec::with_capacity(s * half), Vec::with_capacity(s * half));
    for row in &ids {
        for (&pos, fs) in row.iter().zip(&freqs) {
            for &f in fs {
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

/// The output layer: AdaLN-continuous (`norm_out.linear` on `silu(temb)` gives scale, then shift),
/// then `proj_out`. `ln` is public: the families' modulated-input indicator normalises with it too.
pub struct OutputLayer {
    norm_out: Linear,
    pub ln: LayerNorm,
    proj_out: Linear,
}

impl OutputLayer {
    /// `norm_out.linear` `[2d, d]`, a layer norm of `eps` without affine, `proj_out` `[out, d]`.
    pub fn load(
        w: &WeightStore,
        (d, out): (usize, usize),
        eps: f64,
        lin: LinearLoader,
    ) -> Result<Self> {
        let dev = w.placement().device.clone();
        Ok(OutputLayer {
            norm_out: lin(w, "norm_out.linear", 2 * d, d)?,
            ln: LayerNorm::new(d, eps, None, &dev)?,
            proj_out: lin(w, "proj_out", out, d)?,
        })
    }

    /// `(normed, out)`: the modulated tokens before `proj_out` (parity traces) and the output.
    pub fn forward(&self, h: &Tensor, temb: &Tensor) -> Result<(Tensor, Tensor)> {
        let m = self.norm_out.forward(&temb.silu()?)?;
        let d = m.dim(D::Minus1)? / 2;
        let scale = m.narrow(D::Minus1, 0, d)?.unsqueeze(1)?;
        let shift = m.narrow(D::Minus1, d, d)?.unsqueeze(1)?;
        let y = modulate(&self.ln.forward(h)?, &shift, &scale)?;
        let out = self.proj_out.forward(&y)?;
        Ok((y, out))
    }
}

/// A block's modulated image input (the `ModulatedInput` indicator): `ln(h)` shifted and scaled by
/// the first two of the six chunks `modulation(silu(temb))` gives.
pub fn modulated_input(
    modulation: &Linear,
    ln: &LayerNorm,
    h: &Tensor,
    temb: &Tensor,
) -> Result<Tensor> {
    let m = crate::mmdit::chunks(modulation, temb, 6)?;
    modulate(&ln.forward(h)?, &m[0], &m[1])
}

/// One call of a chain of joint (image, text) blocks: `block(b, hidden, encoder)` runs one block
/// on the streams `(h, e)`; the timestep embedding `temb` and the modulated input (computed only
/// when a strategy asks) are offered as indicators, and each block's `(encoder, hidden)` is pushed
/// to `trace` when given. Returns the image stream leaving the chain.
pub fn joint_chain_call<B: Send>(
    blocks: &ModelBlocks<B>,
    cx: &CallCx<'_>,
    (h, e): (Tensor, Tensor),
    (temb, modulated_input): (&Tensor, impl Fn() -> Result<Tensor>),
    mut trace: Option<&mut Vec<(Tensor, Tensor)>>,
    block: impl Fn(&B, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
) -> Result<Tensor> {
    let mut record = |_: usize, s: &Streams| {
        if let (Some(tr), Some(e)) = (trace.as_deref_mut(), &s.encoder) {
            tr.push((e.clone(), s.hidden.clone()));
        }
    };
    let model = blocks.name();
    let chain = blocks
        .call(cx.scope, |i, b: &B, s: Streams| {
            let (h, e) = block(b, &s.hidden, s.joint_encoder(model, i)?)?;
            Ok(Streams::joint(h, e))
        })
        .with_indicator(Indicator::TimestepEmbedding, temb)
        .with_indicator_fn(Indicator::ModulatedInput, modulated_input)
        .traced(&mut record);
    Ok(cx.run_chain(&chain, Streams::joint(h, e))?.hidden)
}

/// What a FLUX-style transformer (packed latents, text and position ids) runs on, besides what a
/// family adds (FLUX.1's pooled text, FLUX.2's negative prompt).
pub struct PackedInputs {
    /// `[B, seq, in_channels]` packed initial latents.
    pub latents: Tensor,
    /// `[B, L, joint_attention_dim]` prompt embeddings.
    pub ctx: Tensor,
    /// `[seq, axes]` and `[L, axes]` position ids.
    pub img_ids: Tensor,
    pub txt_ids: Tensor,
}

impl PackedInputs {
    /// The inputs on `dev`.
    pub fn to_device(self, dev: &candle_core::Device) -> Result<Self> {
        Ok(PackedInputs {
            latents: self.latents.to_device(dev)?,
            ctx: self.ctx.to_device(dev)?,
            img_ids: self.img_ids.to_device(dev)?,
            txt_ids: self.txt_ids.to_device(dev)?,
        })
    }

    /// Packed `[B, h*w, C]` latents -> `[B*C, h, w]` planes on the grid of `img_ids`.
    pub fn to_planes(&self, latents: &Tensor) -> Result<Tensor> {
        crate::autoencoder_kl::packed_to_planes(latents, &self.img_ids)
    }

    /// The embedded guidance `[B]` of a model that has a guidance embedder (`embeds`), else `None`.
    pub fn guidance(&self, embeds: bool, value: f64) -> Result<Option<Tensor>> {
        let (b, dev) = (self.latents.dim(0)?, self.latents.device());
        embeds
            .then(|| crate::generation::per_item(value as f32, b, dev))
            .transpose()
    }

    /// A step's timestep `t` (0..1000) as the model takes it: `[B]`, on the 0..1 scale.
    pub fn timestep(&self, t: f32) -> Result<Tensor> {
        let (b, dev) = (self.latents.dim(0)?, self.latents.device());
        crate::generation::per_item(t / 1000.0, b, dev)
    }

    /// One call on `x` at timestep `t` (`[B]`, 0..1) with the text `ctx` (the prompt's or the
    /// negative prompt's).
    pub fn call<'a>(
        &'a self,
        x: &'a Tensor,
        ctx: &'a Tensor,
        t: &'a Tensor,
        guidance: Option<&'a Tensor>,
    ) -> PackedCall<'a> {
        PackedCall {
            x,
            ctx,
            t,
            img_ids: &self.img_ids,
            txt_ids: &self.txt_ids,
            guidance,
        }
    }
}

/// One call of a FLUX-style transformer: packed latents `[B, seq, in_channels]`, text `[B, L,
/// joint_attention_dim]`, timestep `[B]` (0..1), position ids `[seq, axes]` and `[L, axes]`, and
/// the embedded guidance of models that have one.
pub struct PackedCall<'a> {
    pub x: &'a Tensor,
    pub ctx: &'a Tensor,
    pub t: &'a Tensor,
    pub img_ids: &'a Tensor,
    pub txt_ids: &'a Tensor,
    pub guidance: Option<&'a Tensor>,
}

/// Intermediates of one forward of a joint-attention DiT, for parity tests (what a family does
/// not compute stays `None`).
#[derive(Debug, Default)]
pub struct JointTrace {
    pub temb: Option<Tensor>,
    /// The image tokens after their input projection (`x_embedder`, `img_in`).
    pub x_embedded: Option<Tensor>,
    /// The text tokens after theirs (`context_embedder`, `txt_in`).
    pub context_embedded: Option<Tensor>,
    /// `(cos, sin)` `[S, head_dim/2]`, text rows first.
    pub rope: Option<(Tensor, Tensor)>,
    /// Each block's `(encoder, hidden)` outputs in chain order.
    pub blocks: Vec<(Tensor, Tensor)>,
    /// The image rows after `norm_out`, before `proj_out`.
    pub norm_out: Option<Tensor>,
}

impl JointTrace {
    /// Records what enters the chain: the conditioning, both streams and the rotary tables.
    pub fn record_inputs(
        trace: Option<&mut JointTrace>,
        temb: &Tensor,
        (x, ctx): (&Tensor, &Tensor),
        rope: &(Tensor, Tensor),
    ) {
        if let Some(tr) = trace {
            tr.temb = Some(temb.clone());
            tr.x_embedded = Some(x.clone());
            tr.context_embedded = Some(ctx.clone());
            tr.rope = Some(rope.clone());
        }
    }
}

/// The rest of a joint-attention DiT's call from its embedded streams: the chain of `blocks`
/// ([`joint_chain_call`]) through `cx`'s cache, then the output layer `out`. `inputs` are the
/// streams `(hidden, encoder)` and the indicators `(temb, modulated input)`; each block's outputs
/// and `norm_out` are recorded in `trace` when given.
pub fn joint_forward<B: Send>(
    (blocks, out, cx): (&ModelBlocks<B>, &OutputLayer, &CallCx<'_>),
    (streams, indicators): ((Tensor, Tensor), (&Tensor, impl Fn() -> Result<Tensor>)),
    mut trace: Option<&mut JointTrace>,
    block: impl Fn(&B, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
) -> Result<Tensor> {
    let temb = indicators.0;
    let records = trace.as_deref_mut().map(|t| &mut t.blocks);
    let h = joint_chain_call(blocks, cx, streams, indicators, records, block)?;
    let (y, out) = out.forward(&h, temb)?;
    if let Some(tr) = trace {
        tr.norm_out = Some(y);
    }
    Ok(out)
}
