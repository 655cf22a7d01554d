//! The Wan video VAE (diffusers `AutoencoderKLWan`, the Wan2.1 architecture that the Wan2.1 T2V/I2V
//! and Wan2.2 A14B pipelines share): causal 3-D convolutions over `[B, C, F, H, W]` videos, 8x spatial
//! and 4x temporal compression in the released configs.
//!
//! candle has no 3-D convolution. A causal conv3d with `kt` time taps is run as one conv2d: the `kt`
//! time-shifted copies of the input are stacked along the channel axis (tap-major) and the weight
//! `[O, C, kt, kh, kw]` is reshaped to `[O, kt*C, kh, kw]`, so every output frame is one 2-D
//! convolution of its `kt` input frames; the frames go into conv2d's batch. Internally activations
//! are laid out `[B, F, C, H, W]` so that frames <-> batch is a reshape, never a permute.
//!
//! Time is processed in chunks as diffusers does (encode: frame 0, then 4 frames at a time; decode:
//! one latent frame at a time) with a per-convolution feature cache holding the last two input
//! frames of the previous chunk, so memory is bounded by one chunk and the result equals diffusers'
//! (a causal pass with 2 zero frames in front, except at the temporal resamplers, whose first-chunk
//! rules are reproduced exactly). Norms, attention and activations run in f32; convolution weights
//! in the run's dtype.
//!
//! The Wan2.2 VAE (TI2V-5B: `is_residual`, `patch_size` 2, z_dim 48) is refused at load with an error
//! naming the config file and key.

use crate::nn::{attention, conv2d_bounded, Linear, IM2COL_BUDGET};
use crate::random::{sub_seed, uniform};
use crate::weights::WeightStore;
use candle_core::{DType, Device, Tensor};
use magcache_core::{Error, Placement, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Frames a causal convolution keeps from the previous chunk (its time padding).
const CACHE_T: usize = 2;

/// `AutoencoderKLWan` configuration (`vae/config.json`), with diffusers' defaults for absent keys.
#[derive(Clone, Debug, PartialEq)]
pub struct WanVaeConfig {
    pub base_dim: usize,
    /// `decoder_base_dim`, or `base_dim` when the config leaves it null.
    pub decoder_base_dim: usize,
    pub z_dim: usize,
    pub dim_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_scales: Vec<f64>,
    pub temperal_downsample: Vec<bool>,
    pub latents_mean: Vec<f64>,
    pub latents_std: Vec<f64>,
    pub in_channels: usize,
    pub out_channels: usize,
}

const DEFAULT_MEAN: [f64; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];
const DEFAULT_STD: [f64; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.9160,
];

impl WanVaeConfig {
    /// Reads `config.json`; errors name the file and the key.
    pub fn read(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let text = magcache_core::error::read_text(std::path::Path::new(path))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&shown, "(document)", format!("invalid JSON: {e}")))?;
        Self::from_json(&json, &shown)
    }

    /// Parses an `AutoencoderKLWan` config object (`file` names it in errors).
    pub fn from_json(json: &Value, file: &str) -> Result<Self> {
        let obj = json.as_object().ok_or_else(|| {
            Error::config(
                file,
                "(document)",
                "expected a JSON object (AutoencoderKLWan config)",
            )
        })?;
        if let Some(c) = obj.get("_class_name").and_then(|v| v.as_str()) {
            if c != "AutoencoderKLWan" {
                return Err(Error::config(
                    file,
                    "_class_name",
                    format!("`{c}` is not a Wan VAE (expected AutoencoderKLWan)"),
                ));
            }
        }
        if obj.get("is_residual").and_then(|v| v.as_bool()) == Some(true) {
            return Err(Error::config(
                file,
                "is_residual",
                "true: this is the Wan2.2 VAE (TI2V-5B: residual blocks, patchified, z_dim 48), which is not supported; only the Wan2.1 VAE (is_residual false) is",
            ));
        }
        match obj.get("patch_size") {
            None | Some(Value::Null) => {}
            Some(v) if v.as_u64() == Some(1) => {}
            Some(v) => {
                return Err(Error::config(
                    file,
                    "patch_size",
                    format!("{v}: patchified VAEs (the Wan2.2 TI2V-5B VAE) are not supported; only patch_size null"),
                ))
            }
        }
        let base_dim = get_usize(obj, file, "base_dim", 96)?;
        let decoder_base_dim = match obj.get("decoder_base_dim") {
            None | Some(Value::Null) => base_dim,
            Some(_) => get_usize(obj, file, "decoder_base_dim", base_dim)?,
        };
        let z_dim = get_usize(obj, file, "z_dim", 16)?;
        let dim_mult = match obj.get("dim_mult") {
            None => vec![1, 2, 4, 4],
            Some(v) => list(v, file, "dim_mult", |x| {
                x.as_u64().filter(|&n| n > 0).map(|n| n as usize)
            })?,
        };
        let num_res_blocks = get_usize(obj, file, "num_res_blocks", 2)?;
        let attn_scales = match obj.get("attn_scales") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => list(v, file, "attn_scales", |x| x.as_f64())?,
        };
        let temperal_downsample = match obj.get("temperal_downsample") {
            None => vec![false, true, true],
            Some(v) => list(v, file, "temperal_downsample", |x| x.as_bool())?,
        };
        let floats = |key: &str, default: &[f64]| -> Result<Vec<f64>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default.to_vec()),
                Some(v) => list(v, file, key, |x| x.as_f64()),
            }
        };
        let latents_mean = floats("latents_mean", &DEFAULT_MEAN)?;
        let latents_std = floats("latents_std", &DEFAULT_STD)?;
        let cfg = WanVaeConfig {
            base_dim,
            decoder_base_dim,
            z_dim,
            dim_mult,
            num_res_blocks,
            attn_scales,
            temperal_downsample,
            latents_mean,
            latents_std,
            in_channels: get_usize(obj, file, "in_channels", 3)?,
            out_channels: get_usize(obj, file, "out_channels", 3)?,
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn validate(&self, file: &str) -> Result<()> {
        let positive = [
            ("base_dim", self.base_dim),
            ("decoder_base_dim", self.decoder_base_dim),
            ("z_dim", self.z_dim),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(Error::config(file, k, "must be positive"));
            }
        }
        if self.dim_mult.is_empty() {
            return Err(Error::config(
                file,
                "dim_mult",
                "empty: need at least one stage",
            ));
        }
        if self.temperal_downsample.len() + 1 != self.dim_mult.len() {
            return Err(Error::config(
                file,
                "temperal_downsample",
                format!(
                    "has {} entries; expected one per downsampling stage, len(dim_mult) - 1 = {}",
                    self.temperal_downsample.len(),
                    self.dim_mult.len() - 1
                ),
            ));
        }
        // The decoder halves the channels at every upsampler (`upsample_out_dim = dim // 2`).
        let last = self.decoder_base_dim * self.dim_mult[self.dim_mult.len() - 1];
        if self.dim_mult.len() > 1 && last < 2 {
            return Err(Error::config(
                file,
                "decoder_base_dim",
                "too small: the decoder's upsamplers halve the channel count",
            ));
        }
        for (k, v) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if v.len() != self.z_dim {
                return Err(Error::config(
                    file,
                    k,
                    format!("has {} values; expected z_dim = {}", v.len(), self.z_dim),
                ));
            }
        }
        if self.latents_std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(Error::config(
                file,
                "latents_std",
                "every value must be finite and non-zero",
            ));
        }
        Ok(())
    }

    /// Spatial downsampling factor (2 per stage but the last: 8 for the released VAE).
    pub fn spatial_scale(&self) -> usize {
        1usize
            .checked_shl(self.dim_mult.len().saturating_sub(1) as u32)
            .unwrap_or(usize::MAX)
    }

    /// Temporal downsampling factor (4 for the released VAE).
    pub fn temporal_scale(&self) -> usize {
        1usize
            .checked_shl(self.temperal_downsample.iter().filter(|&&t| t).count() as u32)
            .unwrap_or(usize::MAX)
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

fn list<T>(v: &Value, file: &str, key: &str, f: impl Fn(&Value) -> Option<T>) -> Result<Vec<T>> {
    let arr = v
        .as_array()
        .ok_or_else(|| Error::config(file, key, format!("expected a list, got {v}")))?;
    arr.iter()
        .map(|x| f(x).ok_or_else(|| Error::config(file, key, format!("invalid entry {x}"))))
        .collect()
}

// ------------------------------------------------------------------------------------------------
// Layers. Activations are f32 `[B, F, C, H, W]`.

/// Per-call feature cache: one slot per causal convolution / temporal resampler.
struct FeatCache {
    slots: Vec<Option<Tensor>>,
}

impl FeatCache {
    fn new(n: usize) -> Self {
        FeatCache {
            slots: vec![None; n],
        }
    }
    fn get(&self, i: usize) -> Result<Option<&Tensor>> {
        self.slots
            .get(i)
            .map(|s| s.as_ref())
            .ok_or_else(|| Error::msg(format!("Wan VAE: feature cache slot {i} out of range")))
    }
    fn set(&mut self, i: usize, t: Tensor) -> Result<()> {
        let s = self
            .slots
            .get_mut(i)
            .ok_or_else(|| Error::msg(format!("Wan VAE: feature cache slot {i} out of range")))?;
        *s = Some(t);
        Ok(())
    }
}

/// A (causal) convolution with `kt` time taps (1 for the per-frame 2-D convolutions).
struct Conv {
    /// `[O, kt*C, kh, kw]` in the run's dtype, taps major.
    w: Tensor,
    /// `[1, O, 1, 1]`, f32.
    b: Tensor,
    kt: usize,
    stride_t: usize,
    pad_hw: usize,
    stride_hw: usize,
    /// Zero frames in front (`2 * time padding`); such a conv caches its last inputs in this slot.
    time_pad: usize,
    slot: Option<usize>,
}

impl Conv {
    /// `x [B, F, C, H, W]` -> `[B, F', O, H', W']`, reading and updating the cache slot if it has one.
    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let x_in = match self.slot {
            Some(slot) => {
                let prev = cache.get(slot)?.cloned();
                let prev_len = prev.as_ref().map(|p| p.dim(1)).transpose()?.unwrap_or(0);
                let joined = match &prev {
                    Some(p) => Tensor::cat(&[p, x], 1)?,
                    None => x.clone(),
                };
                let n = joined.dim(1)?;
                let keep = n.min(CACHE_T);
                cache.set(slot, joined.narrow(1, n - keep, keep)?.copy()?)?;
                joined.pad_with_zeros(1, self.time_pad.saturating_sub(prev_len), 0)?
            }
            None if self.time_pad > 0 => x.pad_with_zeros(1, self.time_pad, 0)?,
            None => x.clone(),
        };
        self.apply(&x_in)
    }

    /// The convolution of an already padded input (no cache).
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c, h, w) = x.dims5()?;
        if n < self.kt {
            return Err(Error::msg(format!(
                "Wan VAE: a temporal convolution with {} taps got {n} frames (too few frames for this VAE's temporal downsampling)",
                self.kt
            )));
        }
        let t_out = (n - self.kt) / self.stride_t + 1;
        let stacked = if self.kt == 1 && self.stride_t == 1 {
            x.clone()
        } else {
            let taps = (0..self.kt)
                .map(|k| -> Result<Tensor> {
                    if self.stride_t == 1 {
                        Ok(x.narrow(1, k, t_out)?)
                    } else {
                        let idx: Vec<u32> =
                            (0..t_out).map(|j| (k + j * self.stride_t) as u32).collect();
                        let idx = Tensor::new(idx.as_slice(), x.device())?;
                        Ok(x.index_select(&idx, 1)?)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&taps, 2)?
        };
        let flat = stacked.reshape((b * t_out, self.kt * c, h, w))?;
        let y = conv2d_bounded(
            &flat.to_dtype(self.w.dtype())?,
            &self.w,
            self.pad_hw,
            self.stride_hw,
            IM2COL_BUDGET,
        )?
        .to_dtype(DType::F32)?
        .broadcast_add(&self.b)?;
        let (_, o, ho, wo) = y.dims4()?;
        Ok(y.reshape((b, t_out, o, ho, wo))?)
    }
}

/// `WanRMS_norm`: `x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma`, f32.
struct Norm {
    /// `[1, 1, C, 1, 1]`.
    gamma: Tensor,
    scale: f64,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let norm = x.sqr()?.sum_keepdim(2)?.sqrt()?.maximum(1e-12)?;
        Ok((x.broadcast_div(&norm)? * self.scale)?.broadcast_mul(&self.gamma)?)
    }
}

struct ResBlock {
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResBlock {
    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let h = match &self.shortcut {
            Some(s) => s.forward(x, cache)?,
            None => x.clone(),
        };
        let y = self.norm1.forward(x)?.silu()?;
        let y = self.conv1.forward(&y, cache)?;
        let y = self.norm2.forward(&y)?.silu()?;
        let y = self.conv2.forward(&y, cache)?;
        Ok((y + h)?)
    }
}

/// Single-head self-attention over the `H*W` positions of each frame.
struct AttnBlock {
    norm: Norm,
    to_qkv: Linear,
    proj: Linear,
}

impl AttnBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, f, c, h, w) = x.dims5()?;
        let xn = self
            .norm
            .forward(x)?
            .reshape((b * f, c, h * w))?
            .transpose(1, 2)?;
        let qkv = self.to_qkv.forward(&xn)?;
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i * c, c)?.unsqueeze(1)?) };
        let o = attention(&part(0)?, &part(1)?, &part(2)?)?.squeeze(1)?;
        let o = self.proj.forward(&o)?;
        let o = o.transpose(1, 2)?.reshape((b, f, c, h, w))?;
        Ok((o + x)?)
    }
}

enum Resample {
    Up2d {
        conv: Conv,
    },
    Up3d {
        conv: Conv,
        time_conv: Conv,
        slot: usize,
    },
    Down2d {
        conv: Conv,
    },
    Down3d {
        conv: Conv,
        time_conv: Conv,
        slot: usize,
    },
}

fn upsample_spatial(x: &Tensor, conv: &Conv, cache: &mut FeatCache) -> Result<Tensor> {
    let (b, f, c, h, w) = x.dims5()?;
    let up = x
        .reshape((b * f, c, h, w))?
        .upsample_nearest2d(2 * h, 2 * w)?
        .reshape((b, f, c, 2 * h, 2 * w))?;
    conv.forward(&up, cache)
}

fn downsample_spatial(x: &Tensor, conv: &Conv, cache: &mut FeatCache) -> Result<Tensor> {
    // ZeroPad2d((0, 1, 0, 1)): one zero column right, one zero row below; then 3x3 stride 2.
    let padded = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(4, 0, 1)?;
    conv.forward(&padded, cache)
}

impl Resample {
    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        match self {
            Resample::Up2d { conv } => upsample_spatial(x, conv, cache),
            Resample::Up3d {
                conv,
                time_conv,
                slot,
            } => {
                let x = if cache.get(*slot)?.is_none() {
                    // First chunk: no temporal upsampling; later chunks see a zero frame before
                    // theirs instead of this one (diffusers' "Rep" marker).
                    cache.set(*slot, x.narrow(1, 0, 1)?.zeros_like()?)?;
                    x.clone()
                } else {
                    let (b, f, c, h, w) = x.dims5()?;
                    // [B, F, 2C, H, W]: channels [0, C) become frame 2t, [C, 2C) frame 2t + 1.
                    time_conv.forward(x, cache)?.reshape((b, 2 * f, c, h, w))?
                };
                upsample_spatial(&x, conv, cache)
            }
            Resample::Down2d { conv } => downsample_spatial(x, conv, cache),
            Resample::Down3d {
                conv,
                time_conv,
                slot,
            } => {
                let s = downsample_spatial(x, conv, cache)?;
                let n = s.dim(1)?;
                let last = s.narrow(1, n - 1, 1)?.copy()?;
                let prev = cache.get(*slot)?.cloned();
                cache.set(*slot, last)?;
                match prev {
                    // First chunk: passes through unchanged in time.
                    None => Ok(s),
                    // Kernel 3, stride 2, no padding over (last frame of the previous chunk, this chunk).
                    Some(p) => time_conv.apply(&Tensor::cat(&[&p, &s], 1)?),
                }
            }
        }
    }
}

struct MidBlock {
    res0: ResBlock,
    attn: AttnBlock,
    res1: ResBlock,
}

impl MidBlock {
    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let x = self.res0.forward(x, cache)?;
        let x = self.attn.forward(&x)?;
        self.res1.forward(&x, cache)
    }
}

enum DownLayer {
    Res(ResBlock),
    Attn(AttnBlock),
    Resample(Resample),
}

struct Encoder {
    conv_in: Conv,
    layers: Vec<DownLayer>,
    mid: MidBlock,
    norm_out: Norm,
    conv_out: Conv,
    slots: usize,
}

impl Encoder {
    fn forward(
        &self,
        x: &Tensor,
        cache: &mut FeatCache,
        mut trace: Option<&mut VaeTrace>,
    ) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x, cache)?;
        for l in &self.layers {
            x = match l {
                DownLayer::Res(r) => r.forward(&x, cache)?,
                DownLayer::Attn(a) => a.forward(&x)?,
                DownLayer::Resample(r) => r.forward(&x, cache)?,
            };
        }
        let x = self.mid.forward(&x, cache)?;
        record(&mut trace, "encoder.mid_block", &x);
        let x = self.norm_out.forward(&x)?.silu()?;
        let x = self.conv_out.forward(&x, cache)?;
        record(&mut trace, "encoder", &x);
        Ok(x)
    }
}

struct UpBlock {
    resnets: Vec<ResBlock>,
    upsampler: Option<Resample>,
}

struct Decoder {
    conv_in: Conv,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: Norm,
    conv_out: Conv,
    slots: usize,
}

impl Decoder {
    fn forward(
        &self,
        x: &Tensor,
        cache: &mut FeatCache,
        mut trace: Option<&mut VaeTrace>,
    ) -> Result<Tensor> {
        let x = self.conv_in.forward(x, cache)?;
        record(&mut trace, "decoder.conv_in", &x);
        let mut x = self.mid.forward(&x, cache)?;
        record(&mut trace, "decoder.mid_block", &x);
        for (i, blk) in self.up.iter().enumerate() {
            for r in &blk.resnets {
                x = r.forward(&x, cache)?;
            }
            if let Some(u) = &blk.upsampler {
                x = u.forward(&x, cache)?;
            }
            if trace.is_some() {
                record(&mut trace, &format!("decoder.up_blocks.{i}"), &x);
            }
        }
        let x = self.norm_out.forward(&x)?.silu()?;
        let x = self.conv_out.forward(&x, cache)?;
        record(&mut trace, "decoder", &x);
        Ok(x)
    }
}

/// Intermediate outputs of an encode or decode, by diffusers module name (`encoder.mid_block`,
/// `encoder`, `post_quant_conv`, `decoder.conv_in`, `decoder.mid_block`, `decoder.up_blocks.{i}`,
/// `decoder`), the chunks concatenated along time.
#[derive(Default)]
pub struct VaeTrace {
    chunks: BTreeMap<String, Vec<Tensor>>,
}

impl VaeTrace {
    /// The recorded output of module `name` as `[B, C, F, H, W]`, if recorded.
    pub fn get(&self, name: &str) -> Result<Option<Tensor>> {
        match self.chunks.get(name) {
            None => Ok(None),
            Some(parts) => Ok(Some(
                Tensor::cat(parts, 1)?
                    .permute((0, 2, 1, 3, 4))?
                    .contiguous()?,
            )),
        }
    }

    /// The names recorded.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.chunks.keys()
    }
}

fn record(trace: &mut Option<&mut VaeTrace>, name: &str, x: &Tensor) {
    if let Some(t) = trace.as_deref_mut() {
        t.chunks
            .entry(name.to_string())
            .or_default()
            .push(x.clone());
    }
}

// ------------------------------------------------------------------------------------------------
// Loading.

/// Where the builder takes its tensors from: a checkpoint, or seeded random init (presets, tests).
enum Source<'a> {
    Store(&'a WeightStore),
    Random {
        seed: u64,
        device: Device,
        dtype: DType,
    },
}

struct Builder<'a> {
    src: Source<'a>,
    slots: usize,
}

impl Builder<'_> {
    fn next_slot(&mut self) -> usize {
        self.slots += 1;
        self.slots - 1
    }

    /// A convolution weight in the run's dtype.
    fn weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match &self.src {
            Source::Store(s) => s.get_weight(name, shape),
            Source::Random {
                seed,
                device,
                dtype,
            } => {
                let fan_in: usize = shape.iter().skip(1).product();
                let a = (3.0 / fan_in.max(1) as f32).sqrt();
                Ok(uniform(sub_seed(*seed, name), shape, a)?
                    .to_dtype(*dtype)?
                    .to_device(device)?)
            }
        }
    }

    /// A bias or norm scale in f32 (random init: scales `1 + U(-0.1, 0.1)`, biases `U(-0.05, 0.05)`).
    fn param(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match &self.src {
            Source::Store(s) => s.get_shape(name, shape),
            Source::Random { seed, device, .. } => {
                let s = sub_seed(*seed, name);
                let t = if name.ends_with(".gamma") {
                    (uniform(s, shape, 0.1)? + 1.0)?
                } else {
                    uniform(s, shape, 0.05)?
                };
                Ok(t.to_device(device)?)
            }
        }
    }

    /// A convolution weight as the convolution runs it: in the run's dtype, except bf16 on the CPU,
    /// where candle's conv2d has no bf16 kernel; there the bf16-rounded weight runs in f32.
    fn conv_weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let w = self.weight(name, shape)?;
        if w.dtype() == DType::BF16 && w.device().is_cpu() {
            Ok(w.to_dtype(DType::F32)?)
        } else {
            Ok(w)
        }
    }

    fn bias(&self, name: &str, o: usize) -> Result<Tensor> {
        Ok(self
            .param(&format!("{name}.bias"), &[o])?
            .reshape((1, o, 1, 1))?)
    }

    /// `WanCausalConv3d(cin, cout, (kt, k, k), padding=(pt, p, p), stride=(st, 1, 1))`.
    #[allow(clippy::too_many_arguments)]
    fn conv3d(
        &mut self,
        name: &str,
        cin: usize,
        cout: usize,
        kt: usize,
        k: usize,
        pt: usize,
        p: usize,
        stride_t: usize,
    ) -> Result<Conv> {
        let w = self
            .conv_weight(&format!("{name}.weight"), &[cout, cin, kt, k, k])?
            .permute((0, 2, 1, 3, 4))?
            .reshape((cout, kt * cin, k, k))?
            .contiguous()?;
        let time_pad = 2 * pt;
        let slot = (time_pad > 0).then(|| self.next_slot());
        Ok(Conv {
            w,
            b: self.bias(name, cout)?,
            kt,
            stride_t,
            pad_hw: p,
            stride_hw: 1,
            time_pad,
            slot,
        })
    }

    /// The usual `3x3x3` causal conv with padding 1.
    fn conv333(&mut self, name: &str, cin: usize, cout: usize) -> Result<Conv> {
        self.conv3d(name, cin, cout, 3, 3, 1, 1, 1)
    }

    /// A per-frame `nn.Conv2d(cin, cout, k, padding, stride)`.
    fn conv2d(
        &mut self,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        pad: usize,
        stride: usize,
    ) -> Result<Conv> {
        let w = self.conv_weight(&format!("{name}.weight"), &[cout, cin, k, k])?;
        Ok(Conv {
            w,
            b: self.bias(name, cout)?,
            kt: 1,
            stride_t: 1,
            pad_hw: pad,
            stride_hw: stride,
            time_pad: 0,
            slot: None,
        })
    }

    fn norm(&self, name: &str, c: usize, images: bool) -> Result<Norm> {
        let shape: &[usize] = if images { &[c, 1, 1] } else { &[c, 1, 1, 1] };
        let g = self
            .param(&format!("{name}.gamma"), shape)?
            .reshape((1, 1, c, 1, 1))?;
        Ok(Norm {
            gamma: g,
            scale: (c as f64).sqrt(),
        })
    }

    fn linear1x1(&self, name: &str, cin: usize, cout: usize) -> Result<Linear> {
        let w = self
            .weight(&format!("{name}.weight"), &[cout, cin, 1, 1])?
            .reshape((cout, cin))?;
        let b = self.param(&format!("{name}.bias"), &[cout])?;
        Linear::new(w, Some(b))
    }

    fn res(&mut self, name: &str, cin: usize, cout: usize) -> Result<ResBlock> {
        let shortcut = if cin != cout {
            Some(self.conv3d(&format!("{name}.conv_shortcut"), cin, cout, 1, 1, 0, 0, 1)?)
        } else {
            None
        };
        Ok(ResBlock {
            norm1: self.norm(&format!("{name}.norm1"), cin, false)?,
            conv1: self.conv333(&format!("{name}.conv1"), cin, cout)?,
            norm2: self.norm(&format!("{name}.norm2"), cout, false)?,
            conv2: self.conv333(&format!("{name}.conv2"), cout, cout)?,
            shortcut,
        })
    }

    fn attn(&self, name: &str, c: usize) -> Result<AttnBlock> {
        Ok(AttnBlock {
            norm: self.norm(&format!("{name}.norm"), c, true)?,
            to_qkv: self.linear1x1(&format!("{name}.to_qkv"), c, 3 * c)?,
            proj: self.linear1x1(&format!("{name}.proj"), c, c)?,
        })
    }

    fn mid(&mut self, name: &str, c: usize) -> Result<MidBlock> {
        Ok(MidBlock {
            res0: self.res(&format!("{name}.resnets.0"), c, c)?,
            attn: self.attn(&format!("{name}.attentions.0"), c)?,
            res1: self.res(&format!("{name}.resnets.1"), c, c)?,
        })
    }

    fn encoder(&mut self, cfg: &WanVaeConfig) -> Result<Encoder> {
        let dims: Vec<usize> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|m| cfg.base_dim * m)
            .collect();
        let conv_in = self.conv333("encoder.conv_in", cfg.in_channels, dims[0])?;
        let stages = cfg.dim_mult.len();
        let mut layers = Vec::new();
        let mut scale = 1.0f64;
        let mut out_dim = dims[0];
        for i in 0..stages {
            let mut in_dim = dims[i];
            out_dim = dims[i + 1];
            for _ in 0..cfg.num_res_blocks {
                let name = format!("encoder.down_blocks.{}", layers.len());
                layers.push(DownLayer::Res(self.res(&name, in_dim, out_dim)?));
                if cfg.attn_scales.contains(&scale) {
                    let name = format!("encoder.down_blocks.{}", layers.len());
                    layers.push(DownLayer::Attn(self.attn(&name, out_dim)?));
                }
                in_dim = out_dim;
            }
            if i + 1 != stages {
                let name = format!("encoder.down_blocks.{}", layers.len());
                let conv = self.conv2d(&format!("{name}.resample.1"), out_dim, out_dim, 3, 0, 2)?;
                let temporal = cfg.temperal_downsample.get(i).copied().ok_or_else(|| {
                    Error::msg(format!("Wan VAE config: temperal_downsample[{i}] missing"))
                })?;
                let r = if temporal {
                    let time_conv = self.conv3d(
                        &format!("{name}.time_conv"),
                        out_dim,
                        out_dim,
                        3,
                        1,
                        0,
                        0,
                        2,
                    )?;
                    Resample::Down3d {
                        conv,
                        time_conv,
                        slot: self.next_slot(),
                    }
                } else {
                    Resample::Down2d { conv }
                };
                layers.push(DownLayer::Resample(r));
                scale /= 2.0;
            }
        }
        let mid = self.mid("encoder.mid_block", out_dim)?;
        let norm_out = self.norm("encoder.norm_out", out_dim, false)?;
        let conv_out = self.conv333("encoder.conv_out", out_dim, 2 * cfg.z_dim)?;
        Ok(Encoder {
            conv_in,
            layers,
            mid,
            norm_out,
            conv_out,
            slots: self.slots,
        })
    }

    fn decoder(&mut self, cfg: &WanVaeConfig) -> Result<Decoder> {
        let d = cfg.decoder_base_dim;
        let stages = cfg.dim_mult.len();
        let dims: Vec<usize> = std::iter::once(cfg.dim_mult[stages - 1])
            .chain(cfg.dim_mult.iter().rev().copied())
            .map(|m| d * m)
            .collect();
        let conv_in = self.conv333("decoder.conv_in", cfg.z_dim, dims[0])?;
        let mid = self.mid("decoder.mid_block", dims[0])?;
        let mut up = Vec::new();
        let mut out_dim = dims[0];
        for i in 0..stages {
            // Every upsampler halves the channels, so each stage after the first starts at half width.
            let mut in_dim = if i > 0 { dims[i] / 2 } else { dims[i] };
            out_dim = dims[i + 1];
            let mut resnets = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                resnets.push(self.res(
                    &format!("decoder.up_blocks.{i}.resnets.{j}"),
                    in_dim,
                    out_dim,
                )?);
                in_dim = out_dim;
            }
            let upsampler = if i + 1 != stages {
                let name = format!("decoder.up_blocks.{i}.upsamplers.0");
                let conv =
                    self.conv2d(&format!("{name}.resample.1"), out_dim, out_dim / 2, 3, 1, 1)?;
                // temperal_upsample = temperal_downsample reversed.
                let temporal = cfg
                    .temperal_downsample
                    .iter()
                    .rev()
                    .nth(i)
                    .copied()
                    .ok_or_else(|| {
                        Error::msg(format!(
                            "Wan VAE config: temperal_downsample entry for up block {i} missing"
                        ))
                    })?;
                Some(if temporal {
                    let time_conv = self.conv3d(
                        &format!("{name}.time_conv"),
                        out_dim,
                        2 * out_dim,
                        3,
                        1,
                        1,
                        0,
                        1,
                    )?;
                    // The time conv's own cache slot doubles as the "first chunk seen" marker.
                    let slot = time_conv.slot.ok_or_else(|| {
                        Error::msg("Wan VAE: upsample time_conv without cache slot")
                    })?;
                    Resample::Up3d {
                        conv,
                        time_conv,
                        slot,
                    }
                } else {
                    Resample::Up2d { conv }
                })
            } else {
                None
            };
            up.push(UpBlock { resnets, upsampler });
        }
        let norm_out = self.norm("decoder.norm_out", out_dim, false)?;
        let conv_out = self.conv333("decoder.conv_out", out_dim, cfg.out_channels)?;
        Ok(Decoder {
            conv_in,
            mid,
            up,
            norm_out,
            conv_out,
            slots: self.slots,
        })
    }
}

/// The Wan2.1 video VAE (`AutoencoderKLWan`).
pub struct WanVae {
    pub config: WanVaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv,
    post_quant_conv: Conv,
    /// `[1, z, 1, 1, 1]` f32.
    mean: Tensor,
    /// `1 / latents_std`, `[1, z, 1, 1, 1]` f32 (the pipeline multiplies / divides by this).
    inv_std: Tensor,
    device: Device,
    /// What the VAE was loaded from (for messages).
    pub origin: String,
}

/// The folder holding `config.json` for a VAE path: the folder itself, its `vae/` (a pipeline
/// folder), or the folder of a weights file.
fn vae_dir(path: &Path) -> Result<(PathBuf, PathBuf)> {
    if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        return Ok((dir.join("config.json"), path.to_path_buf()));
    }
    if path.join("config.json").is_file() {
        return Ok((path.join("config.json"), path.to_path_buf()));
    }
    let sub = path.join("vae");
    if sub.join("config.json").is_file() {
        return Ok((sub.join("config.json"), sub));
    }
    Err(Error::weights(
        path.display().to_string(),
        "config.json",
        "no AutoencoderKLWan config.json here or in vae/ (give the pipeline's vae/ folder)",
    ))
}

impl WanVae {
    /// Loads a diffusers VAE folder (`config.json` + `diffusion_pytorch_model.safetensors` or a
    /// sharded `*.safetensors.index.json`), a pipeline folder (its `vae/`), or a weights file with
    /// `config.json` beside it. Convolution weights are used in `dtype` (f32, f16 or bf16) on `device`;
    /// norms, attention and activations run in f32.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<WanVae> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::msg(format!(
                "Wan VAE: dtype {dtype:?} is not supported (f32, f16 or bf16)"
            )));
        }
        let (cfg_path, weights) = vae_dir(path)?;
        if !cfg_path.is_file() {
            return Err(Error::weights(
                weights.display().to_string(),
                "config.json",
                "no config.json beside the VAE weights",
            ));
        }
        let config = WanVaeConfig::read(&cfg_path)?;
        let mut store = WeightStore::load_checkpoint(&weights)?;
        store.set_placement(Placement {
            device: device.clone(),
            dtype,
        });
        WanVae::from_store(config, &store)
    }

    /// Builds the VAE from diffusers-named tensors (the store's placement gives device and dtype).
    pub fn from_store(config: WanVaeConfig, store: &WeightStore) -> Result<WanVae> {
        if store
            .keys()
            .any(|k| k.starts_with("encoder.downsamples.") || k.starts_with("decoder.upsamples."))
        {
            return Err(Error::weights(
                &store.origin,
                "encoder.downsamples.*",
                "original Wan VAE layout (Wan2.1_VAE.pth); use the diffusers `vae/` folder (AutoencoderKLWan)",
            ));
        }
        let device = store.placement().device.clone();
        WanVae::build(config, || Source::Store(store), device, &store.origin)
    }

    /// A VAE of this config with seeded random weights (convolutions uniform with std
    /// `1/sqrt(fan_in)` in `dtype`; norm scales near 1, small biases), for presets and tests.
    pub fn random(
        config: WanVaeConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<WanVae> {
        let src = || Source::Random {
            seed,
            device: device.clone(),
            dtype,
        };
        WanVae::build(config, src, device.clone(), "(random init)")
    }

    fn build<'a>(
        config: WanVaeConfig,
        src: impl Fn() -> Source<'a>,
        device: Device,
        origin: &str,
    ) -> Result<WanVae> {
        config.validate(origin)?;
        let z = config.z_dim;
        let mut enc_b = Builder {
            src: src(),
            slots: 0,
        };
        let encoder = enc_b.encoder(&config)?;
        let quant_conv = enc_b.conv3d("quant_conv", 2 * z, 2 * z, 1, 1, 0, 0, 1)?;
        let mut dec_b = Builder {
            src: src(),
            slots: 0,
        };
        let post_quant_conv = dec_b.conv3d("post_quant_conv", z, z, 1, 1, 0, 0, 1)?;
        let decoder = dec_b.decoder(&config)?;
        let mean: Vec<f32> = config.latents_mean.iter().map(|&v| v as f32).collect();
        let inv_std: Vec<f32> = config
            .latents_std
            .iter()
            .map(|&v| 1.0 / (v as f32))
            .collect();
        Ok(WanVae {
            mean: Tensor::from_vec(mean, (1, z, 1, 1, 1), &device)?,
            inv_std: Tensor::from_vec(inv_std, (1, z, 1, 1, 1), &device)?,
            config,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            device,
            origin: origin.to_string(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Checks a `[B, channels, F, H, W]` input and returns it as f32 `[B, F, C, H, W]` on the device.
    fn prepare(&self, x: &Tensor, what: &str, channels: usize, layout: &str) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() != 5 || dims[1] != channels || dims.contains(&0) {
            return Err(Error::msg(format!(
                "Wan VAE ({}): {what} has shape {dims:?}; expected {layout} with {channels} channels",
                self.origin
            )));
        }
        Ok(x.to_device(&self.device)?
            .to_dtype(DType::F32)?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?)
    }

    /// The posterior's `(mean, logvar)` of a video `[B, in_channels, F, H, W]` in [-1, 1], each
    /// `[B, z_dim, 1 + (F-1)/4, H/8, W/8]` (released factors); logvar clamped to [-30, 20]. As in
    /// diffusers, frame 0 is encoded alone and then chunks of 4 frames; frames past the last full
    /// chunk (when `F - 1` is not a multiple of 4) are not used.
    pub fn encode_moments(&self, video: &Tensor) -> Result<(Tensor, Tensor)> {
        self.encode_moments_traced(video, None)
    }

    /// [`WanVae::encode_moments`], recording intermediates into `trace`.
    pub fn encode_moments_traced(
        &self,
        video: &Tensor,
        mut trace: Option<&mut VaeTrace>,
    ) -> Result<(Tensor, Tensor)> {
        let x = self.prepare(
            video,
            "video",
            self.config.in_channels,
            "[B, C, F, H, W] video",
        )?;
        let frames = x.dim(1)?;
        let chunks = 1 + (frames - 1) / 4;
        let mut cache = FeatCache::new(self.encoder.slots);
        let mut outs = Vec::with_capacity(chunks);
        for i in 0..chunks {
            let (start, len) = if i == 0 { (0, 1) } else { (1 + 4 * (i - 1), 4) };
            let chunk = x.narrow(1, start, len)?;
            outs.push(
                self.encoder
                    .forward(&chunk, &mut cache, trace.as_deref_mut())?,
            );
        }
        let enc = Tensor::cat(&outs, 1)?;
        let h = self.quant_conv.forward(&enc, &mut cache)?;
        let z = self.config.z_dim;
        let to_bcfhw =
            |t: Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 1, 3, 4))?.contiguous()?) };
        let mean = to_bcfhw(h.narrow(2, 0, z)?)?;
        let logvar = to_bcfhw(h.narrow(2, z, z)?.clamp(-30f32, 20f32)?)?;
        Ok((mean, logvar))
    }

    /// The posterior mean (`latent_dist.mode()`) of a video `[B, 3, F, H, W]` in [-1, 1]: VAE-space
    /// latents `[B, z_dim, 1 + (F-1)/4, H/8, W/8]`, not normalised.
    pub fn encode_mean(&self, video: &Tensor) -> Result<Tensor> {
        Ok(self.encode_moments(video)?.0)
    }

    /// The posterior mean normalised as the image-to-video pipelines condition on it:
    /// `(mean - latents_mean) * (1 / latents_std)`.
    pub fn encode_normalized(&self, video: &Tensor) -> Result<Tensor> {
        self.normalize_latents(&self.encode_mean(video)?)
    }

    /// VAE-space latents `[B, z, F, h, w]` -> the transformer's space: `(z - mean) * (1 / std)`.
    pub fn normalize_latents(&self, z: &Tensor) -> Result<Tensor> {
        let z = self.prepare(z, "latents", self.config.z_dim, "[B, z, F, h, w] latents")?;
        let z = z.permute((0, 2, 1, 3, 4))?;
        Ok(z.broadcast_sub(&self.mean)?
            .broadcast_mul(&self.inv_std)?
            .contiguous()?)
    }

    /// The transformer's latents `[B, z, F, h, w]` -> VAE space, as the pipeline writes it:
    /// `latents / (1 / std) + mean`.
    pub fn denormalize_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let l = self.prepare(
            latents,
            "latents",
            self.config.z_dim,
            "[B, z, F, h, w] latents",
        )?;
        let l = l.permute((0, 2, 1, 3, 4))?;
        Ok(l.broadcast_div(&self.inv_std)?
            .broadcast_add(&self.mean)?
            .contiguous()?)
    }

    /// `vae.decode(z).sample`: VAE-space latents `[B, z_dim, F, h, w]` -> video
    /// `[B, out_channels, 1 + 4(F-1), 8h, 8w]` (released factors) clamped to [-1, 1]. Decodes one
    /// latent frame at a time with the causal feature cache.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_traced(z, None)
    }

    /// [`WanVae::decode`], recording intermediates into `trace`.
    pub fn decode_traced(&self, z: &Tensor, mut trace: Option<&mut VaeTrace>) -> Result<Tensor> {
        let z = self.prepare(z, "latents", self.config.z_dim, "[B, z, F, h, w] latents")?;
        let mut cache = FeatCache::new(self.decoder.slots);
        let x = self.post_quant_conv.forward(&z, &mut cache)?;
        record(&mut trace, "post_quant_conv", &x);
        let frames = x.dim(1)?;
        let mut outs = Vec::with_capacity(frames);
        for i in 0..frames {
            let chunk = x.narrow(1, i, 1)?;
            outs.push(
                self.decoder
                    .forward(&chunk, &mut cache, trace.as_deref_mut())?,
            );
        }
        let out = Tensor::cat(&outs, 1)?.clamp(-1f32, 1f32)?;
        Ok(out.permute((0, 2, 1, 3, 4))?.contiguous()?)
    }

    /// What the pipeline returns with `output_type="np"`: the transformer's (normalised) latents
    /// `[B, z_dim, F, h, w]` de-normalised, decoded, mapped from [-1, 1] to [0, 1] pixels and laid out
    /// `[B, F', H, W, out_channels]` (f32, F' = 1 + 4(F-1), H = 8h, W = 8w for the released VAE).
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z = self.denormalize_latents(latents)?;
        let video = self.decode(&z)?;
        Ok(((video * 0.5)? + 0.5)?
            .clamp(0f32, 1f32)?
            .permute((0, 2, 3, 4, 1))?
            .contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Result<WanVaeConfig> {
        let text = format!(
            r#"{{"_class_name": "AutoencoderKLWan", "base_dim": 4, "z_dim": 2, "dim_mult": [1, 2],
                "temperal_downsample": [true], "latents_mean": [0.0, 1.0], "latents_std": [1.0, 2.0]{extra}}}"#
        );
        WanVaeConfig::from_json(&serde_json::from_str(&text).unwrap(), "vae/config.json")
    }

    #[test]
    fn config_reads_sizes_and_refuses_wan22() {
        let c = cfg("").unwrap();
        assert_eq!(c.decoder_base_dim, 4);
        assert_eq!(c.spatial_scale(), 2);
        assert_eq!(c.temporal_scale(), 2);
        let e = cfg(r#", "is_residual": true"#).unwrap_err().to_string();
        assert!(e.starts_with("vae/config.json: is_residual:"), "{e}");
        let e = cfg(r#", "patch_size": 2"#).unwrap_err().to_string();
        assert!(e.starts_with("vae/config.json: patch_size:"), "{e}");
        assert!(cfg(r#", "patch_size": null"#).is_ok());
        let e = cfg(r#", "latents_std": [1.0]"#).unwrap_err().to_string();
        assert!(e.contains("latents_std"), "{e}");
    }

    #[test]
    fn bounded_conv2d_equals_one_call() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 4, 11, 9), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 4, 3, 3), &dev).unwrap();
        for (pad, stride) in [(1, 1), (0, 2), (1, 2)] {
            let full = x.conv2d(&w, pad, stride, 1, 1).unwrap();
            // Budgets forcing groups of images, one image at a time, and bands of 1 or 2 rows.
            for budget in [1 << 30, 20_000, 8_000, 1_000, 1] {
                let got = conv2d_bounded(&x, &w, pad, stride, budget).unwrap();
                let d = crate::nn::max_abs_diff(&full, &got);
                assert!(d < 1e-5, "pad {pad} stride {stride} budget {budget}: {d}");
            }
        }
    }

    /// The chunked causal conv equals one pass with two zero frames in front.
    #[test]
    fn chunked_causal_conv_equals_full_pass() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3, 3, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let store = WeightStore::from_map(
            "mem",
            [("c.weight".to_string(), w), ("c.bias".to_string(), b)]
                .into_iter()
                .collect(),
        );
        let mut bld = Builder {
            src: Source::Store(&store),
            slots: 0,
        };
        let conv = bld.conv333("c", 3, 5).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 7, 3, 4, 5), &dev).unwrap();
        let full = conv.apply(&x.pad_with_zeros(1, 2, 0).unwrap()).unwrap();
        let mut cache = FeatCache::new(1);
        let parts: Vec<Tensor> = [(0, 1), (1, 4), (5, 1), (6, 1)]
            .iter()
            .map(|&(s, l)| {
                conv.forward(&x.narrow(1, s, l).unwrap(), &mut cache)
                    .unwrap()
            })
            .collect();
        let chunked = Tensor::cat(&parts, 1).unwrap();
        let d = crate::nn::max_abs_diff(&full, &chunked);
        assert!(d < 1e-5, "{d}");
    }
}
