//! FLUX.1's image VAE: diffusers `AutoencoderKL` (the `vae/` folder of a FLUX.1 pipeline: 16 latent
//! channels, `scaling_factor` 0.3611, `shift_factor` 0.1159, no `quant_conv` / `post_quant_conv`), any
//! size read from its `config.json`; BFL's single-file `ae.safetensors` layout is read too (renamed to
//! the diffusers names on load).
//!
//! Encoder: `conv_in`, one `DownEncoderBlock2D` per `block_out_channels` entry (`layers_per_block`
//! ResNet blocks, a stride-2 downsampler after all but the last, zero-padded one row/column at the
//! bottom/right), a mid block (ResNet, single-head self-attention, ResNet), GroupNorm, SiLU and
//! `conv_out` to `2 * latent_channels` (mean, logvar). Decoder: the mirror image with
//! `layers_per_block + 1` ResNet blocks per `UpDecoderBlock2D` and nearest 2x upsampling + conv.
//! GroupNorms use `norm_num_groups` and eps 1e-6; norms, attention and activations run in f32,
//! convolution weights in the run's dtype (bf16 on the CPU, where candle's conv2d has no bf16 kernel,
//! runs the bf16-rounded weights in f32). Every convolution goes through
//! [`crate::nn::conv2d_bounded`], so a 1024x1024 decode builds no im2col matrix over 256 MB, the
//! mid-block attention is query-chunked ([`crate::nn::attention`]) and batch items are decoded one at
//! a time.
//!
//! Not candle-transformers' `stable_diffusion::vae::AutoEncoderKL`, although it reads these diffusers
//! names with the quant convs optional: its posterior keeps the mean private (only `sample()`), so no
//! encode mean; it loads through `VarBuilder` (one dtype for every tensor, so no f32 norms beside
//! bf16 convolutions and no bf16 conv on the CPU; errors that name neither file nor tensor); it always
//! builds the mid-block attention (`mid_block_add_attention` ignored); and its convolutions and
//! attention are single calls whose im2col and score matrices grow with the image (GBs at 1024x1024).
//! Its `flux::autoencoder::AutoEncoder` reads BFL's `ae.safetensors` but hard-codes 32 groups and
//! samples in `encode`; here that layout is renamed to the diffusers one and runs through the same
//! module. (candle-transformers is also not a dependency of this workspace.)

use crate::nn::{attention, conv2d_bounded, Linear, IM2COL_BUDGET};
use crate::weights::WeightStore;
use candle_core::{DType, Device, Module, Tensor};
use magcache_core::{Error, Placement, Result};
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// GroupNorm epsilon of every norm in diffusers' `Encoder` / `Decoder` (and BFL's `Normalize`).
const NORM_EPS: f64 = 1e-6;

/// BFL's `AutoEncoderParams` for FLUX.1-dev and -schnell (no config file ships with `ae.safetensors`).
const BFL_GROUPS: usize = 32;
const BFL_SCALE: f64 = 0.3611;
const BFL_SHIFT: f64 = 0.1159;

/// `AutoencoderKL` configuration (`vae/config.json`), with diffusers' defaults for absent keys.
#[derive(Clone, Debug, PartialEq)]
pub struct FluxVaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    /// `shift_factor` (null / absent: 0).
    pub shift_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    /// diffusers pipelines run such a VAE in f32 when asked for f16 (f16 overflows in it).
    pub force_upcast: bool,
}

impl FluxVaeConfig {
    /// Reads `config.json`; errors name the file and the key.
    pub fn read(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(&shown, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&shown, "(document)", format!("invalid JSON: {e}")))?;
        Self::from_json(&json, &shown)
    }

    /// Parses an `AutoencoderKL` config object (`file` names it in errors).
    pub fn from_json(json: &Value, file: &str) -> Result<Self> {
        let obj = json.as_object().ok_or_else(|| {
            Error::config(
                file,
                "(document)",
                "expected a JSON object (AutoencoderKL config)",
            )
        })?;
        if let Some(c) = obj.get("_class_name").and_then(|v| v.as_str()) {
            if c != "AutoencoderKL" {
                return Err(Error::config(
                    file,
                    "_class_name",
                    format!("`{c}` is not an image VAE (expected AutoencoderKL)"),
                ));
            }
        }
        if let Some(a) = obj.get("act_fn") {
            if a.as_str() != Some("silu") {
                return Err(Error::config(
                    file,
                    "act_fn",
                    format!("{a} is not supported (only \"silu\")"),
                ));
            }
        }
        let block_out_channels = match obj.get("block_out_channels") {
            None => vec![64],
            Some(v) => list(v, file, "block_out_channels", |x| {
                x.as_u64().filter(|&n| n > 0).map(|n| n as usize)
            })?,
        };
        for (key, want) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            if let Some(v) = obj.get(key) {
                let types = list(v, file, key, |x| x.as_str().map(String::from))?;
                if let Some(t) = types.iter().find(|t| t.as_str() != want) {
                    return Err(Error::config(
                        file,
                        key,
                        format!("`{t}` is not supported (only {want})"),
                    ));
                }
                if types.len() != block_out_channels.len() {
                    return Err(Error::config(
                        file,
                        key,
                        format!(
                            "has {} entries; block_out_channels has {}",
                            types.len(),
                            block_out_channels.len()
                        ),
                    ));
                }
            }
        }
        let float = |key: &str, default: f64| -> Result<f64> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| Error::config(file, key, format!("expected a number, got {v}"))),
            }
        };
        let cfg = FluxVaeConfig {
            in_channels: get_usize(obj, file, "in_channels", 3)?,
            out_channels: get_usize(obj, file, "out_channels", 3)?,
            latent_channels: get_usize(obj, file, "latent_channels", 4)?,
            block_out_channels,
            layers_per_block: get_usize(obj, file, "layers_per_block", 1)?,
            norm_num_groups: get_usize(obj, file, "norm_num_groups", 32)?,
            scaling_factor: float("scaling_factor", 0.18215)?,
            shift_factor: float("shift_factor", 0.0)?,
            use_quant_conv: get_bool(obj, file, "use_quant_conv", true)?,
            use_post_quant_conv: get_bool(obj, file, "use_post_quant_conv", true)?,
            mid_block_add_attention: get_bool(obj, file, "mid_block_add_attention", true)?,
            force_upcast: get_bool(obj, file, "force_upcast", true)?,
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Checks the sizes fit together; errors name `file` and the key.
    pub fn validate(&self, file: &str) -> Result<()> {
        for (k, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if v == 0 {
                return Err(Error::config(file, k, "must be positive"));
            }
        }
        if self.block_out_channels.is_empty() || self.block_out_channels.len() > 16 {
            return Err(Error::config(
                file,
                "block_out_channels",
                format!(
                    "has {} entries; expected 1 to 16 stages",
                    self.block_out_channels.len()
                ),
            ));
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || c % self.norm_num_groups != 0)
        {
            return Err(Error::config(
                file,
                "norm_num_groups",
                format!(
                    "{} does not divide block_out_channels entry {c} (GroupNorm needs whole groups)",
                    self.norm_num_groups
                ),
            ));
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return Err(Error::config(
                file,
                "scaling_factor",
                format!("{} must be finite and non-zero", self.scaling_factor),
            ));
        }
        if !self.shift_factor.is_finite() {
            return Err(Error::config(file, "shift_factor", "must be finite"));
        }
        Ok(())
    }

    /// Pixels per latent along each side: `2^(len(block_out_channels) - 1)` (8 for FLUX.1).
    pub fn vae_scale_factor(&self) -> usize {
        1usize << (self.block_out_channels.len().saturating_sub(1))
    }

    /// The configuration of BFL-layout tensors (already renamed to diffusers names): channels and
    /// depth from the tensor shapes, groups and scale/shift from BFL's FLUX.1 `AutoEncoderParams`
    /// (32, 0.3611, 0.1159), quant convs and the mid-block attention by presence.
    pub fn from_bfl_tensors(store: &WeightStore) -> Result<Self> {
        let shape = |name: &str| -> Result<Vec<usize>> {
            store.shape(name).ok_or_else(|| {
                Error::weights(
                    &store.origin,
                    name,
                    "missing from the BFL autoencoder checkpoint (its sizes are read from this tensor)",
                )
            })
        };
        let dim = |name: &str, axis: usize| -> Result<usize> {
            shape(name)?.get(axis).copied().ok_or_else(|| {
                Error::weights(
                    &store.origin,
                    name,
                    "has too few dimensions for a conv weight",
                )
            })
        };
        let numbered = |prefix: &str| -> usize {
            store
                .keys()
                .filter_map(|k| {
                    k.strip_prefix(prefix)?
                        .split('.')
                        .next()?
                        .parse::<usize>()
                        .ok()
                })
                .map(|n| n + 1)
                .max()
                .unwrap_or(0)
        };
        let levels = numbered("encoder.down_blocks.");
        let block_out_channels = (0..levels)
            .map(|i| {
                dim(
                    &format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"),
                    0,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg = FluxVaeConfig {
            in_channels: dim("encoder.conv_in.weight", 1)?,
            out_channels: dim("decoder.conv_out.weight", 0)?,
            latent_channels: dim("decoder.conv_in.weight", 1)?,
            block_out_channels,
            layers_per_block: numbered("encoder.down_blocks.0.resnets."),
            norm_num_groups: BFL_GROUPS,
            scaling_factor: BFL_SCALE,
            shift_factor: BFL_SHIFT,
            use_quant_conv: store.contains("quant_conv.weight"),
            use_post_quant_conv: store.contains("post_quant_conv.weight"),
            mid_block_add_attention: store.contains("decoder.mid_block.attentions.0.to_q.weight"),
            force_upcast: true,
        };
        cfg.validate(&format!(
            "{} (sizes inferred from its tensors)",
            store.origin
        ))?;
        Ok(cfg)
    }
}

fn get_usize(obj: &Map<String, Value>, file: &str, key: &str, default: usize) -> Result<usize> {
    match obj.get(key) {
        None => Ok(default),
        Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
            Error::config(
                file,
                key,
                format!("expected a non-negative integer, got {v}"),
            )
        }),
    }
}

fn get_bool(obj: &Map<String, Value>, file: &str, key: &str, default: bool) -> Result<bool> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| Error::config(file, key, format!("expected true or false, got {v}"))),
    }
}

fn list<T>(v: &Value, file: &str, key: &str, f: impl Fn(&Value) -> Option<T>) -> Result<Vec<T>> {
    let arr = v
        .as_array()
        .ok_or_else(|| Error::config(file, key, format!("expected a list, got {v}")))?;
    arr.iter()
        .map(|x| f(x).ok_or_else(|| Error::config(file, key, format!("invalid entry {x}"))))
        .collect()
}

// ------------------------------------------------------------------------------------------------
// Packing (FluxPipeline._pack_latents / _unpack_latents).

/// `FluxPipeline._unpack_latents`: the transformer's packed latents `[B, (h/2)(w/2), 4C]` of a
/// `height x width` pixel image -> `[B, C, h, w]`, with `h = 2 * (height / (2 * vae_scale_factor))`
/// (same for `w`). Token `r * (w/2) + c`, channel `ch * 4 + dy * 2 + dx` goes to latent
/// `[ch, 2r + dy, 2c + dx]`.
pub fn unpack_latents(
    packed: &Tensor,
    height: usize,
    width: usize,
    vae_scale_factor: usize,
) -> Result<Tensor> {
    let dims = packed.dims();
    let (&[b, seq, c4], true) = (dims, vae_scale_factor > 0) else {
        return Err(Error::msg(format!(
            "FLUX latents to unpack have shape {dims:?}; expected packed [B, seq, 4C]"
        )));
    };
    let h = 2 * (height / (2 * vae_scale_factor));
    let w = 2 * (width / (2 * vae_scale_factor));
    if c4 % 4 != 0 || (h / 2).checked_mul(w / 2) != Some(seq) || seq == 0 {
        return Err(Error::msg(format!(
            "FLUX packed latents {dims:?} do not fit a {height}x{width} image: it packs to [B, {}, 4C] ({}x{} tokens of 2x2 latents, VAE factor {vae_scale_factor})",
            (h / 2) * (w / 2),
            h / 2,
            w / 2
        )));
    }
    let c = c4 / 4;
    Ok(packed
        .reshape(vec![b, h / 2, w / 2, c, 2, 2])?
        .permute(vec![0, 3, 1, 4, 2, 5])?
        .contiguous()?
        .reshape((b, c, h, w))?)
}

/// `FluxPipeline._pack_latents`: `[B, C, h, w]` (even `h`, `w`) -> `[B, (h/2)(w/2), 4C]`.
pub fn pack_latents(latents: &Tensor) -> Result<Tensor> {
    let dims = latents.dims();
    let &[b, c, h, w] = dims else {
        return Err(Error::msg(format!(
            "FLUX latents to pack have shape {dims:?}; expected [B, C, h, w]"
        )));
    };
    if h % 2 != 0 || w % 2 != 0 {
        return Err(Error::msg(format!(
            "FLUX latents to pack have shape {dims:?}; h and w must be even (2x2 patches)"
        )));
    }
    Ok(latents
        .reshape(vec![b, c, h / 2, 2, w / 2, 2])?
        .permute(vec![0, 2, 4, 1, 3, 5])?
        .contiguous()?
        .reshape((b, (h / 2) * (w / 2), 4 * c))?)
}

/// The pipeline's `output_type="np"` from `vae.decode` output `[B, C, H, W]` in [-1, 1]:
/// `clamp(x * 0.5 + 0.5, 0, 1)` laid out `[B, H, W, C]`.
pub fn to_pixels(decoded: &Tensor) -> Result<Tensor> {
    Ok(((decoded * 0.5)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?)
}

// ------------------------------------------------------------------------------------------------
// Layers. Activations are f32 `[B, C, H, W]`.

struct Conv {
    /// `[O, C, k, k]` in the run's dtype (f32 for bf16 on the CPU).
    w: Tensor,
    /// `[1, O, 1, 1]`, f32.
    b: Tensor,
    pad: usize,
    stride: usize,
}

impl Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv2d_bounded(
            &x.to_dtype(self.w.dtype())?,
            &self.w,
            self.pad,
            self.stride,
            IM2COL_BUDGET,
        )?;
        Ok(y.to_dtype(DType::F32)?.broadcast_add(&self.b)?)
    }
}

struct Norm(candle_nn::GroupNorm);

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward(x)?)
    }
}

/// `ResnetBlock2D` without time embedding: `conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)`.
struct ResBlock {
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let y = self.conv2.forward(&self.norm2.forward(&y)?.silu()?)?;
        let h = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok((y + h)?)
    }
}

/// Single-head self-attention over the `H*W` positions (diffusers `Attention` with `group_norm`,
/// residual connection, rescale 1).
struct AttnBlock {
    norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl AttnBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let xn = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let head = |l: &Linear| -> Result<Tensor> { Ok(l.forward(&xn)?.unsqueeze(1)?) };
        let o = attention(&head(&self.q)?, &head(&self.k)?, &head(&self.v)?)?.squeeze(1)?;
        let o = self
            .out
            .forward(&o)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        Ok((o + x)?)
    }
}

struct MidBlock {
    res0: ResBlock,
    attn: Option<AttnBlock>,
    res1: ResBlock,
}

impl MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.res0.forward(x)?;
        if let Some(a) = &self.attn {
            x = a.forward(&x)?;
        }
        self.res1.forward(&x)
    }
}

struct Stage {
    resnets: Vec<ResBlock>,
    /// Encoder: stride-2 conv after zero-padding (0, 1, 0, 1); decoder: nearest 2x then conv.
    resample: Option<Conv>,
}

struct Encoder {
    conv_in: Conv,
    down: Vec<Stage>,
    mid: MidBlock,
    norm_out: Norm,
    conv_out: Conv,
}

impl Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for s in &self.down {
            for r in &s.resnets {
                x = r.forward(&x)?;
            }
            if let Some(d) = &s.resample {
                x = d.forward(&x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        let x = self.mid.forward(&x)?;
        self.conv_out.forward(&self.norm_out.forward(&x)?.silu()?)
    }
}

struct Decoder {
    conv_in: Conv,
    mid: MidBlock,
    up: Vec<Stage>,
    norm_out: Norm,
    conv_out: Conv,
}

impl Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid.forward(&x)?;
        for s in &self.up {
            for r in &s.resnets {
                x = r.forward(&x)?;
            }
            if let Some(u) = &s.resample {
                let (_, _, h, w) = x.dims4()?;
                x = u.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&x)?.silu()?)
    }
}

// ------------------------------------------------------------------------------------------------
// Building from diffusers-named tensors.

struct Builder<'a> {
    store: &'a WeightStore,
}

impl Builder<'_> {
    /// A convolution: weight in the run's dtype (f32 for bf16 on the CPU), bias in f32.
    fn conv(&self, name: &str, cin: usize, cout: usize, k: usize, pad: usize) -> Result<Conv> {
        let mut w = self
            .store
            .get_weight(&format!("{name}.weight"), &[cout, cin, k, k])?;
        if w.dtype() == DType::BF16 && w.device().is_cpu() {
            w = w.to_dtype(DType::F32)?;
        }
        let b = self
            .store
            .get_shape(&format!("{name}.bias"), &[cout])?
            .reshape((1, cout, 1, 1))?;
        Ok(Conv {
            w,
            b,
            pad,
            stride: 1,
        })
    }

    fn norm(&self, name: &str, c: usize, groups: usize) -> Result<Norm> {
        let w = self.store.get_shape(&format!("{name}.weight"), &[c])?;
        let b = self.store.get_shape(&format!("{name}.bias"), &[c])?;
        Ok(Norm(candle_nn::GroupNorm::new(w, b, c, groups, NORM_EPS)?))
    }

    fn linear(&self, name: &str, c: usize) -> Result<Linear> {
        let w = self.store.get_weight(&format!("{name}.weight"), &[c, c])?;
        let b = self.store.get_shape(&format!("{name}.bias"), &[c])?;
        Linear::new(w, Some(b))
    }

    fn resnet(&self, name: &str, cin: usize, cout: usize, g: usize) -> Result<ResBlock> {
        Ok(ResBlock {
            norm1: self.norm(&format!("{name}.norm1"), cin, g)?,
            conv1: self.conv(&format!("{name}.conv1"), cin, cout, 3, 1)?,
            norm2: self.norm(&format!("{name}.norm2"), cout, g)?,
            conv2: self.conv(&format!("{name}.conv2"), cout, cout, 3, 1)?,
            shortcut: (cin != cout)
                .then(|| self.conv(&format!("{name}.conv_shortcut"), cin, cout, 1, 0))
                .transpose()?,
        })
    }

    fn mid(&self, name: &str, c: usize, cfg: &FluxVaeConfig) -> Result<MidBlock> {
        let g = cfg.norm_num_groups;
        let attn = if cfg.mid_block_add_attention {
            let a = format!("{name}.attentions.0");
            Some(AttnBlock {
                norm: self.norm(&format!("{a}.group_norm"), c, g)?,
                q: self.linear(&format!("{a}.to_q"), c)?,
                k: self.linear(&format!("{a}.to_k"), c)?,
                v: self.linear(&format!("{a}.to_v"), c)?,
                out: self.linear(&format!("{a}.to_out.0"), c)?,
            })
        } else {
            None
        };
        Ok(MidBlock {
            res0: self.resnet(&format!("{name}.resnets.0"), c, c, g)?,
            attn,
            res1: self.resnet(&format!("{name}.resnets.1"), c, c, g)?,
        })
    }

    fn encoder(&self, cfg: &FluxVaeConfig) -> Result<Encoder> {
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let n = boc.len();
        let conv_in = self.conv("encoder.conv_in", cfg.in_channels, boc[0], 3, 1)?;
        let mut down = Vec::with_capacity(n);
        let mut cin = boc[0];
        for (i, &cout) in boc.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    self.resnet(&format!("{p}.resnets.{j}"), c, cout, g)
                })
                .collect::<Result<Vec<_>>>()?;
            let resample = if i + 1 < n {
                let mut c = self.conv(&format!("{p}.downsamplers.0.conv"), cout, cout, 3, 0)?;
                c.stride = 2;
                Some(c)
            } else {
                None
            };
            down.push(Stage { resnets, resample });
            cin = cout;
        }
        let last = boc[n - 1];
        Ok(Encoder {
            conv_in,
            down,
            mid: self.mid("encoder.mid_block", last, cfg)?,
            norm_out: self.norm("encoder.conv_norm_out", last, g)?,
            conv_out: self.conv("encoder.conv_out", last, 2 * cfg.latent_channels, 3, 1)?,
        })
    }

    fn decoder(&self, cfg: &FluxVaeConfig) -> Result<Decoder> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let n = rev.len();
        let conv_in = self.conv("decoder.conv_in", cfg.latent_channels, rev[0], 3, 1)?;
        let mid = self.mid("decoder.mid_block", rev[0], cfg)?;
        let mut up = Vec::with_capacity(n);
        let mut cin = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    self.resnet(&format!("{p}.resnets.{j}"), c, cout, g)
                })
                .collect::<Result<Vec<_>>>()?;
            let resample = (i + 1 < n)
                .then(|| self.conv(&format!("{p}.upsamplers.0.conv"), cout, cout, 3, 1))
                .transpose()?;
            up.push(Stage { resnets, resample });
            cin = cout;
        }
        let first = rev[n - 1];
        Ok(Decoder {
            conv_in,
            mid,
            up,
            norm_out: self.norm("decoder.conv_norm_out", first, g)?,
            conv_out: self.conv("decoder.conv_out", first, cfg.out_channels, 3, 1)?,
        })
    }
}

// ------------------------------------------------------------------------------------------------
// Checkpoint layouts.

/// How the checkpoint names its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaeLayout {
    /// diffusers `AutoencoderKL` (`encoder.down_blocks.0.resnets.0.conv1.weight`).
    Diffusers,
    /// BFL's `ae.safetensors` (`encoder.down.0.block.0.conv1.weight`, `decoder.up.3...`).
    Bfl,
}

/// The layout of a store's tensor names, or an error naming the file when it is neither.
pub fn detect_layout(store: &WeightStore) -> Result<VaeLayout> {
    let has = |p: &str| store.keys().any(|k| k.starts_with(p));
    if has("encoder.down_blocks.") || has("decoder.up_blocks.") || has("decoder.mid_block.") {
        return Ok(VaeLayout::Diffusers);
    }
    if has("encoder.down.") || has("decoder.up.") || has("decoder.mid.") {
        return Ok(VaeLayout::Bfl);
    }
    let mut sample: Vec<&String> = store.keys().collect();
    sample.sort();
    sample.truncate(3);
    Err(Error::weights(
        &store.origin,
        "encoder.conv_in.weight",
        format!(
            "not an image autoencoder checkpoint: neither diffusers AutoencoderKL names (encoder.down_blocks.*) nor BFL ae.safetensors names (encoder.down.*); first tensors: {sample:?}"
        ),
    ))
}

/// A BFL `ae.safetensors` name -> the diffusers `AutoencoderKL` name (`levels` = number of
/// resolution levels: BFL numbers the decoder's `up` levels from the highest resolution, diffusers
/// its `up_blocks` in execution order).
fn bfl_to_diffusers(name: &str, levels: usize) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let resnet_tail = |rest: &[&str]| -> String {
        rest.iter()
            .map(|p| {
                if *p == "nin_shortcut" {
                    "conv_shortcut"
                } else {
                    p
                }
            })
            .collect::<Vec<_>>()
            .join(".")
    };
    let num = |s: &str| s.parse::<usize>().ok();
    match parts.as_slice() {
        [side @ ("encoder" | "decoder"), level @ ("down" | "up"), i, kind, rest @ ..] => {
            let Some(i) = num(i) else {
                return name.to_string();
            };
            let (blocks, i) = if *level == "down" {
                ("down_blocks", i)
            } else {
                ("up_blocks", levels.saturating_sub(1).saturating_sub(i))
            };
            match (*kind, rest) {
                ("block", [j, tail @ ..]) => {
                    format!("{side}.{blocks}.{i}.resnets.{j}.{}", resnet_tail(tail))
                }
                ("downsample", tail) => {
                    format!("{side}.{blocks}.{i}.downsamplers.0.{}", tail.join("."))
                }
                ("upsample", tail) => {
                    format!("{side}.{blocks}.{i}.upsamplers.0.{}", tail.join("."))
                }
                _ => name.to_string(),
            }
        }
        [side @ ("encoder" | "decoder"), "mid", which, rest @ ..] => match *which {
            "block_1" => format!("{side}.mid_block.resnets.0.{}", resnet_tail(rest)),
            "block_2" => format!("{side}.mid_block.resnets.1.{}", resnet_tail(rest)),
            "attn_1" => {
                let (module, tail) = match rest {
                    [m, tail @ ..] => (*m, tail.join(".")),
                    [] => return name.to_string(),
                };
                let m = match module {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    other => other,
                };
                format!("{side}.mid_block.attentions.0.{m}.{tail}")
            }
            _ => name.to_string(),
        },
        [side @ ("encoder" | "decoder"), "norm_out", rest @ ..] => {
            format!("{side}.conv_norm_out.{}", rest.join("."))
        }
        _ => name.to_string(),
    }
}

/// Renames a BFL-layout store to diffusers names.
fn rename_bfl(store: &mut WeightStore) {
    let levels = store
        .keys()
        .filter_map(|k| {
            k.strip_prefix("decoder.up.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|n| n + 1)
        .max()
        .unwrap_or(0);
    store.rename(|k| bfl_to_diffusers(k, levels));
}

/// Attention projections stored as 1x1 convolutions (BFL, some converted checkpoints) and the
/// deprecated attention names (`query`/`key`/`value`/`proj_attn`) -> `to_q`.. linear weights.
fn normalize_attention(store: &mut WeightStore) -> Result<()> {
    let old = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    if store.keys().any(|k| k.contains(".attentions.0.query.")) {
        store.rename(|k| {
            let mut k = k.to_string();
            if k.contains(".attentions.0.") {
                for (a, b) in old {
                    k = k.replace(a, b);
                }
            }
            k
        });
    }
    let convs: Vec<String> = store
        .keys()
        .filter(|k| {
            k.contains(".attentions.0.to_")
                && k.ends_with(".weight")
                && store.shape(k).map(|s| s.len()) == Some(4)
        })
        .cloned()
        .collect();
    for k in convs {
        if let Some(t) = store.take(&k)? {
            let (o, i, kh, kw) = t.dims4()?;
            if kh != 1 || kw != 1 {
                return Err(Error::weights(
                    &store.origin,
                    &k,
                    format!("has shape {:?}; an attention projection must be [C, C] or a 1x1 conv [C, C, 1, 1]", t.dims()),
                ));
            }
            store.insert(&k, t.reshape((o, i))?);
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// The model.

/// FLUX.1's image VAE (diffusers `AutoencoderKL`).
pub struct FluxVae {
    pub config: FluxVaeConfig,
    pub layout: VaeLayout,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv>,
    post_quant_conv: Option<Conv>,
    device: Device,
    /// What the VAE was loaded from (for messages).
    pub origin: String,
    /// Checkpoint tensors the VAE did not use (outside the encoder and decoder), for the report.
    pub warnings: Vec<String>,
}

/// Where a VAE path's config and weights are: `(config.json if any, weights path)`.
fn vae_paths(path: &Path) -> Result<(Option<PathBuf>, PathBuf)> {
    let shown = path.display().to_string();
    if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        if path.file_name().and_then(|n| n.to_str()) == Some("config.json") {
            return Ok((Some(path.to_path_buf()), dir));
        }
        let cfg = dir.join("config.json");
        return Ok((cfg.is_file().then_some(cfg), path.to_path_buf()));
    }
    if !path.is_dir() {
        return Err(Error::weights(&shown, "(file)", "no such file or folder"));
    }
    if path.join("config.json").is_file() {
        return Ok((Some(path.join("config.json")), path.to_path_buf()));
    }
    let sub = path.join("vae");
    if sub.join("config.json").is_file() {
        return Ok((Some(sub.join("config.json")), sub));
    }
    let ae = path.join("ae.safetensors");
    if ae.is_file() {
        return Ok((None, ae));
    }
    Err(Error::weights(
        &shown,
        "config.json",
        "no AutoencoderKL config.json here or in vae/, and no BFL ae.safetensors (give the pipeline's vae/ folder or ae.safetensors)",
    ))
}

impl FluxVae {
    /// Loads a diffusers VAE folder (`config.json` + `diffusion_pytorch_model.safetensors` or a
    /// sharded `*.safetensors.index.json`), a pipeline folder (its `vae/`, else its BFL
    /// `ae.safetensors`), a weights file with `config.json` beside it, or BFL's single-file
    /// `ae.safetensors` (layout detected by tensor names; its sizes come from a beside
    /// `AutoencoderKL` `config.json` if there is one, else from the tensors with BFL's FLUX.1 groups
    /// and scale/shift). Convolution and attention weights are used in `dtype` (f32, f16 or bf16;
    /// f16 runs in f32 when the config has `force_upcast`, as diffusers pipelines do) on `device`;
    /// norms and activations in f32.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<FluxVae> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::msg(format!(
                "FLUX VAE: dtype {dtype:?} is not supported (f32, f16 or bf16)"
            )));
        }
        let (cfg_path, weights) = vae_paths(path)?;
        let mut store = WeightStore::load_checkpoint(&weights)?;
        let layout = detect_layout(&store)?;
        if layout == VaeLayout::Bfl {
            rename_bfl(&mut store);
        }
        normalize_attention(&mut store)?;
        let config = match (&cfg_path, layout) {
            (Some(c), _) => FluxVaeConfig::read(c)?,
            (None, VaeLayout::Bfl) => FluxVaeConfig::from_bfl_tensors(&store)?,
            (None, VaeLayout::Diffusers) => {
                return Err(Error::weights(
                    weights.display().to_string(),
                    "config.json",
                    "no config.json beside these diffusers AutoencoderKL weights (give the vae/ folder)",
                ))
            }
        };
        let dtype = if dtype == DType::F16 && config.force_upcast {
            DType::F32
        } else {
            dtype
        };
        store.set_placement(Placement {
            device: device.clone(),
            dtype,
        });
        let mut vae = FluxVae::from_store(config, &store)?;
        vae.layout = layout;
        let cfg_name = cfg_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("{} (inferred sizes)", store.origin));
        vae.check_unused(&store, &cfg_name)?;
        Ok(vae)
    }

    /// Builds the VAE from diffusers-named tensors (the store's placement gives device and dtype).
    pub fn from_store(config: FluxVaeConfig, store: &WeightStore) -> Result<FluxVae> {
        config.validate(&store.origin)?;
        let b = Builder { store };
        let encoder = b.encoder(&config)?;
        let decoder = b.decoder(&config)?;
        let z2 = 2 * config.latent_channels;
        let z = config.latent_channels;
        let quant_conv = config
            .use_quant_conv
            .then(|| b.conv("quant_conv", z2, z2, 1, 0))
            .transpose()?;
        let post_quant_conv = config
            .use_post_quant_conv
            .then(|| b.conv("post_quant_conv", z, z, 1, 0))
            .transpose()?;
        Ok(FluxVae {
            config,
            layout: VaeLayout::Diffusers,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            device: store.placement().device.clone(),
            origin: store.origin.clone(),
            warnings: Vec::new(),
        })
    }

    /// Tensors the model did not use: an error when they belong to the encoder, decoder or quant
    /// convs (the config builds a smaller VAE than the checkpoint: it would decode wrongly), a
    /// warning otherwise.
    fn check_unused(&mut self, store: &WeightStore, cfg_name: &str) -> Result<()> {
        let unused = store.unused();
        let structural: BTreeSet<&String> = unused
            .iter()
            .filter(|k| {
                ["encoder.", "decoder.", "quant_conv.", "post_quant_conv."]
                    .iter()
                    .any(|p| k.starts_with(p))
            })
            .collect();
        if let Some(first) = structural.iter().next() {
            return Err(Error::weights(
                store.file_of(first),
                first.as_str(),
                format!(
                    "is not used by the VAE that {cfg_name} describes ({} such tensor(s)): the config (layers_per_block, block_out_channels, use_quant_conv, use_post_quant_conv, mid_block_add_attention) does not match the checkpoint",
                    structural.len()
                ),
            ));
        }
        if let Some(w) = store.check_unused(cfg_name, |_| "its config".to_string())? {
            self.warnings.push(w);
        }
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Pixels per latent along each side (8 for FLUX.1).
    pub fn vae_scale_factor(&self) -> usize {
        self.config.vae_scale_factor()
    }

    /// Checks a `[B, channels, H, W]` input (non-empty, finite) and returns it f32 on the device.
    fn prepare(&self, x: &Tensor, what: &str, channels: usize, layout: &str) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != channels || dims.contains(&0) {
            return Err(Error::msg(format!(
                "FLUX VAE ({}): {what} has shape {dims:?}; expected {layout} with {channels} channels",
                self.origin
            )));
        }
        let x = x.to_device(&self.device)?.to_dtype(DType::F32)?;
        if !magcache_core::finite::all_finite(&x)? {
            return Err(Error::msg(format!(
                "FLUX VAE ({}): {what} holds non-finite values: {}",
                self.origin,
                magcache_core::finite::describe_non_finite(&x)?
            )));
        }
        Ok(x)
    }

    /// Runs `f` on each batch item (bounds activation memory to one image) and concatenates.
    fn per_item(
        &self,
        x: &Tensor,
        what: &str,
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let parts = (0..x.dim(0)?)
            .map(|i| f(&x.narrow(0, i, 1)?))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| Error::msg(format!("FLUX VAE ({}): {what}: {e}", self.origin)))?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The posterior's `(mean, logvar)` of an image `[B, in_channels, H, W]` in [-1, 1], each
    /// `[B, latent_channels, H/8, W/8]` (rounded down; factor 8 for FLUX.1); logvar clamped to
    /// [-30, 20].
    pub fn encode_moments(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = self.prepare(
            image,
            "image",
            self.config.in_channels,
            "[B, C, H, W] image in [-1, 1]",
        )?;
        // Each downsampler halves (rounding down) a side that must be at least 2: a side needs
        // `vae_scale_factor` pixels.
        let (_, _, ih, iw) = x.dims4()?;
        let min = self.vae_scale_factor();
        if ih < min || iw < min {
            return Err(Error::msg(format!(
                "FLUX VAE ({}): image is {ih}x{iw} pixels; encoding needs at least {min}x{min}",
                self.origin
            )));
        }
        let h = self.per_item(&x, "encode", |x| {
            let h = self.encoder.forward(x)?;
            match &self.quant_conv {
                Some(q) => q.forward(&h),
                None => Ok(h),
            }
        })?;
        let z = self.config.latent_channels;
        let mean = h.narrow(1, 0, z)?.contiguous()?;
        let logvar = h.narrow(1, z, z)?.clamp(-30f32, 20f32)?.contiguous()?;
        Ok((mean, logvar))
    }

    /// `vae.encode(x).latent_dist.mean` of an image `[B, 3, H, W]` in [-1, 1]: VAE-space latents
    /// `[B, latent_channels, H/8, W/8]`, not normalised.
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        Ok(self.encode_moments(image)?.0)
    }

    /// The posterior mean in the transformer's space: `(mean - shift_factor) * scaling_factor`
    /// (what FLUX image-to-image pipelines pack and noise).
    pub fn encode_normalized(&self, image: &Tensor) -> Result<Tensor> {
        self.normalize_latents(&self.encode_mean(image)?)
    }

    /// VAE-space latents `[B, C, h, w]` -> the transformer's space: `(z - shift) * scale`.
    pub fn normalize_latents(&self, z: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let z = self.prepare(z, "latents", c.latent_channels, "[B, C, h, w] latents")?;
        Ok(((z - c.shift_factor)? * c.scaling_factor)?)
    }

    /// The transformer's (unpacked) latents `[B, C, h, w]` -> VAE space, as FluxPipeline writes it:
    /// `latents / scaling_factor + shift_factor`.
    pub fn denormalize_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let l = self.prepare(
            latents,
            "latents",
            c.latent_channels,
            "[B, C, h, w] latents",
        )?;
        Ok(((l / c.scaling_factor)? + c.shift_factor)?)
    }

    /// `vae.decode(z).sample`: VAE-space latents `[B, latent_channels, h, w]` -> `[B, out_channels,
    /// 8h, 8w]` (factor 8 for FLUX.1), roughly in [-1, 1], not clamped.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = self.prepare(
            z,
            "latents",
            self.config.latent_channels,
            "[B, C, h, w] VAE-space latents",
        )?;
        self.per_item(&z, "decode", |z| {
            let z = match &self.post_quant_conv {
                Some(p) => p.forward(z)?,
                None => z.clone(),
            };
            self.decoder.forward(&z)
        })
    }

    /// The transformer's unpacked latents `[B, C, h, w]` -> the pipeline's `output_type="np"` image
    /// `[B, 8h, 8w, out_channels]` in [0, 1] (de-normalise, decode, `x * 0.5 + 0.5`, clamp).
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        to_pixels(&self.decode(&self.denormalize_latents(latents)?)?)
    }

    /// The transformer's packed latents after the denoising loop, `[B, (h/2)(w/2), 4C]` for a
    /// `height x width` image -> the pipeline's `output_type="np"` image `[B, H, W, out_channels]` in
    /// [0, 1] (`H = 2 * (height / 16) * 8` for FLUX.1: `height` rounded down to a multiple of 16).
    pub fn decode_packed(&self, packed: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let latents = unpack_latents(packed, height, width, self.vae_scale_factor())
            .map_err(|e| Error::msg(format!("FLUX VAE ({}): {e}", self.origin)))?;
        self.decode_latents(&latents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfl_names_map_to_diffusers() {
        let cases = [
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "encoder.down.2.downsample.conv.bias",
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
            ),
            (
                "decoder.up.3.block.2.norm1.weight",
                "decoder.up_blocks.0.resnets.2.norm1.weight",
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
            ),
            (
                "decoder.mid.block_2.conv1.weight",
                "decoder.mid_block.resnets.1.conv1.weight",
            ),
            (
                "encoder.mid.attn_1.proj_out.bias",
                "encoder.mid_block.attentions.0.to_out.0.bias",
            ),
            (
                "encoder.mid.attn_1.norm.weight",
                "encoder.mid_block.attentions.0.group_norm.weight",
            ),
            ("decoder.norm_out.bias", "decoder.conv_norm_out.bias"),
            ("encoder.conv_in.weight", "encoder.conv_in.weight"),
        ];
        for (bfl, diff) in cases {
            assert_eq!(bfl_to_diffusers(bfl, 4), diff, "{bfl}");
        }
    }

    #[test]
    fn pack_unpack_round_trip() {
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4, 6))
            .unwrap();
        let p = pack_latents(&x).unwrap();
        assert_eq!(p.dims(), &[2, 6, 12]);
        // Token 1 (row 0, col 1), channel 1*4 + 1*2 + 0 = 6: latent [ch 1, row 1, col 2].
        let v = p.get(0).unwrap().get(1).unwrap().get(6).unwrap();
        let want = x
            .get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .get(1)
            .unwrap()
            .get(2)
            .unwrap();
        assert_eq!(
            v.to_scalar::<f32>().unwrap(),
            want.to_scalar::<f32>().unwrap()
        );
        let back = unpack_latents(&p, 32, 48, 8).unwrap();
        let d = (back - &x).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        assert!(unpack_latents(&p, 64, 48, 8).is_err());
        assert!(unpack_latents(&p, 32, 48, 0).is_err());
        assert!(pack_latents(&x.narrow(3, 0, 5).unwrap()).is_err());
    }

    #[test]
    fn config_errors_name_the_key() {
        let parse = |extra: &str| {
            let text = format!(
                r#"{{"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "norm_num_groups": 4{extra}}}"#
            );
            FluxVaeConfig::from_json(&serde_json::from_str(&text).unwrap(), "vae/config.json")
        };
        let c = parse("").unwrap();
        assert_eq!(c.vae_scale_factor(), 2);
        assert!(c.use_quant_conv && c.mid_block_add_attention);
        assert_eq!(c.shift_factor, 0.0);
        for (extra, key) in [
            (r#", "norm_num_groups": 3"#, "norm_num_groups"),
            (r#", "act_fn": "gelu""#, "act_fn"),
            (
                r#", "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]"#,
                "down_block_types",
            ),
            (
                r#", "up_block_types": ["UpDecoderBlock2D"]"#,
                "up_block_types",
            ),
            (r#", "scaling_factor": 0"#, "scaling_factor"),
            (r#", "layers_per_block": -1"#, "layers_per_block"),
            (r#", "_class_name": "AutoencoderKLWan""#, "_class_name"),
        ] {
            let e = parse(extra).unwrap_err().to_string();
            assert!(e.starts_with(&format!("vae/config.json: {key}:")), "{e}");
        }
    }
}
