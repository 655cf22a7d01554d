//! The Wan VAE's layers: the causal convolution with its per-chunk feature cache, the RMS norm,
//! the residual and attention blocks, the spatial and temporal resamplers and the mid block.
//! Activations are f32 `[B, F, C, H, W]`.

use crate::nn::{attention, Linear};
use crate::vae_common::conv2d_f32_nobias;
use candle_core::Tensor;
use magcache_core::{Error, Result};

/// Frames a causal convolution keeps from the previous chunk (its time padding).
pub(super) const CACHE_T: usize = 2;

/// Per-call feature cache: one slot per causal convolution / temporal resampler.
pub(super) struct FeatCache {
    pub(super) slots: Vec<Option<Tensor>>,
}

impl FeatCache {
    pub(super) fn new(n: usize) -> Self {
        FeatCache {
            slots: vec![None; n],
        }
    }
    pub(super) fn get(&self, i: usize) -> Result<Option<&Tensor>> {
        self.slots
            .get(i)
            .map(|s| s.as_ref())
            .ok_or_else(|| Error::msg(format!("Wan VAE: feature cache slot {i} out of range")))
    }
    pub(super) fn set(&mut self, i: usize, t: Tensor) -> Result<()> {
        let s = self
            .slots
            .get_mut(i)
            .ok_or_else(|| Error::msg(format!("Wan VAE: feature cache slot {i} out of range")))?;
        *s = Some(t);
        Ok(())
    }
}

/// A (causal) convolution with `kt` time taps (1 for the per-frame 2-D convolutions).
///
/// candle has no 3-D convolution: output frame `j` is the sum over taps `k` of the 2-D convolution
/// of input frame `j * stride_t + k` with the tap's `[O, C, kh, kw]` slice of the weight. Frames of
/// the causal zero padding are skipped (their convolution is zero) and the cached frames are read
/// where they are, so a frame's working set is its own input, one tap's output and the sum: no
/// time-stacked copy of the input, nor the cache joined to it, is ever made.
pub(super) struct Conv {
    /// One `[O, C, kh, kw]` weight per time tap (`kt` of them), in the run's dtype.
    pub(super) taps: Vec<Tensor>,
    /// `[1, O, 1, 1]`, f32.
    pub(super) b: Tensor,
    pub(super) stride_t: usize,
    pub(super) pad_hw: usize,
    pub(super) stride_hw: usize,
    /// Zero frames in front (`2 * time padding`); such a conv caches its last inputs in this slot.
    pub(super) time_pad: usize,
    pub(super) slot: Option<usize>,
}

impl Conv {
    /// `x [B, F, C, H, W]` -> `[B, F', O, H', W']`, reading and updating the cache slot if it has one.
    pub(super) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        match self.slot {
            Some(slot) => {
                let prev = cache.get(slot)?.cloned();
                let prev_len = prev.as_ref().map(|p| p.dim(1)).transpose()?.unwrap_or(0);
                let zeros = self.time_pad.saturating_sub(prev_len);
                let y = self.run(zeros, &[prev.as_ref(), Some(x)])?;
                // The last `CACHE_T` frames of (cache, x).
                let n = x.dim(1)?;
                let kept = match &prev {
                    Some(p) if n < CACHE_T => {
                        let k = (CACHE_T - n).min(prev_len);
                        Tensor::cat(&[&p.narrow(1, prev_len - k, k)?, x], 1)?
                    }
                    _ => x.narrow(1, n - n.min(CACHE_T), n.min(CACHE_T))?.copy()?,
                };
                cache.set(slot, kept)?;
                Ok(y)
            }
            None => self.run(self.time_pad, &[Some(x)]),
        }
    }

    /// The convolution of an already padded input (no cache).
    pub(super) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.run(0, &[Some(x)])
    }

    /// The convolution over the frames of `zeros` zero frames followed by `parts` (each
    /// `[B, F_i, C, H, W]`, `None` parts skipped), without materialising that sequence.
    fn run(&self, zeros: usize, parts: &[Option<&Tensor>]) -> Result<Tensor> {
        let parts: Vec<&Tensor> = parts.iter().flatten().copied().collect();
        let lens = parts
            .iter()
            .map(|p| p.dim(1))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let n = zeros + lens.iter().sum::<usize>();
        let kt = self.taps.len();
        if n < kt {
            return Err(Error::msg(format!(
                "Wan VAE: a temporal convolution with {kt} taps got {n} frames (too few frames for this VAE's temporal downsampling)"
            )));
        }
        // Frame `i` of the virtual sequence: `None` inside the zero padding.
        let frame = |i: usize| -> Result<Option<Tensor>> {
            if i < zeros {
                return Ok(None);
            }
            let mut i = i - zeros;
            for (p, &len) in parts.iter().zip(&lens) {
                if i < len {
                    let (b, _, c, h, w) = p.dims5()?;
                    return Ok(Some(p.narrow(1, i, 1)?.reshape((b, c, h, w))?));
                }
                i -= len;
            }
            Err(Error::msg("Wan VAE: convolution frame index out of range"))
        };
        let t_out = (n - kt) / self.stride_t + 1;
        let mut outs = Vec::with_capacity(t_out);
        for j in 0..t_out {
            let mut acc: Option<Tensor> = None;
            for (k, w) in self.taps.iter().enumerate() {
                let Some(f) = frame(j * self.stride_t + k)? else {
                    continue;
                };
                let y = conv2d_f32_nobias(&f, w, self.pad_hw, self.stride_hw)?;
                acc = Some(match acc {
                    None => y,
                    Some(a) => (a + y)?,
                });
            }
            let acc = acc.ok_or_else(|| {
                Error::msg("Wan VAE: a convolution output frame saw only padding")
            })?;
            outs.push(acc.broadcast_add(&self.b)?.unsqueeze(1)?);
        }
        if outs.len() == 1 {
            return outs
                .pop()
                .ok_or_else(|| Error::msg("Wan VAE: empty convolution"));
        }
        Ok(Tensor::cat(&outs, 1)?)
    }
}

/// `WanRMS_norm`: `x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma`, f32.
pub(super) struct Norm {
    /// `[1, 1, C, 1, 1]`.
    pub(super) gamma: Tensor,
    pub(super) scale: f64,
}

impl Norm {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let norm = x.sqr()?.sum_keepdim(2)?.sqrt()?.maximum(1e-12)?;
        Ok((x.broadcast_div(&norm)? * self.scale)?.broadcast_mul(&self.gamma)?)
    }
}

/// `WanResidualBlock`: RMS norms and causal convolutions.
pub(super) type ResBlock = crate::vae_common::ResBlock<Norm, Conv>;

impl ResBlock {
    pub(super) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        self.apply(x, Norm::forward, |c, t| c.forward(t, cache))
    }
}

/// Single-head self-attention over the `H*W` positions of each frame.
pub(super) struct AttnBlock {
    pub(super) norm: Norm,
    pub(super) to_qkv: Linear,
    pub(super) proj: Linear,
}

impl AttnBlock {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
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

pub(super) enum Resample {
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

pub(super) fn upsample_spatial(x: &Tensor, conv: &Conv, cache: &mut FeatCache) -> Result<Tensor> {
    let (b, f, c, h, w) = x.dims5()?;
    let up = x
        .reshape((b * f, c, h, w))?
        .upsample_nearest2d(2 * h, 2 * w)?
        .reshape((b, f, c, 2 * h, 2 * w))?;
    conv.forward(&up, cache)
}

pub(super) fn downsample_spatial(x: &Tensor, conv: &Conv, cache: &mut FeatCache) -> Result<Tensor> {
    // ZeroPad2d((0, 1, 0, 1)): one zero column right, one zero row below; then 3x3 stride 2.
    let padded = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(4, 0, 1)?;
    conv.forward(&padded, cache)
}

impl Resample {
    pub(super) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
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

pub(super) struct MidBlock {
    pub(super) res0: ResBlock,
    pub(super) attn: AttnBlock,
    pub(super) res1: ResBlock,
}

impl MidBlock {
    pub(super) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let x = self.res0.forward(x, cache)?;
        let x = self.attn.forward(&x)?;
        self.res1.forward(&x, cache)
    }
}

/// `AvgDown3D` (the Wan2.2 VAE's down-block shortcut): `ft` frames (zero frames in front to a
/// multiple) and `fs x fs` pixels folded into the channels (channel `c * ft*fs*fs + t*fs*fs + y*fs +
/// x`), then the mean of each group of `group` consecutive channels.
pub(super) struct AvgDown {
    pub(super) ft: usize,
    pub(super) fs: usize,
    pub(super) out: usize,
    pub(super) group: usize,
}

impl AvgDown {
    /// `x [B, T, C, H, W]` -> `[B, ceil(T / ft), out, H / fs, W / fs]`.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ft, fs) = (self.ft, self.fs);
        let t = x.dim(1)?;
        let x = x.pad_with_zeros(1, (ft - t % ft) % ft, 0)?;
        let (b, t, c, h, w) = x.dims5()?;
        let x = x
            .reshape(vec![b, t / ft, ft, c, h / fs, fs, w / fs, fs])?
            .permute(vec![0, 1, 3, 2, 5, 7, 4, 6])?
            .contiguous()?
            .reshape(vec![b, t / ft, self.out, self.group, h / fs, w / fs])?;
        Ok(x.mean(3)?)
    }
}

/// `DupUp3D` (the Wan2.2 VAE's up-block shortcut): every channel repeated `repeats` times, the
/// result unfolded into `ft` frames and `fs x fs` pixels (the inverse layout of [`AvgDown`]); on the
/// first chunk only the last of the `ft` frames is kept.
pub(super) struct DupUp {
    pub(super) ft: usize,
    pub(super) fs: usize,
    pub(super) out: usize,
    pub(super) repeats: usize,
}

impl DupUp {
    /// `x [B, T, C, H, W]` -> `[B, T * ft, out, H * fs, W * fs]` (first chunk: `ft - 1` frames fewer).
    pub(super) fn forward(&self, x: &Tensor, first_chunk: bool) -> Result<Tensor> {
        let (ft, fs) = (self.ft, self.fs);
        let (b, t, c, h, w) = x.dims5()?;
        let x = x
            .unsqueeze(3)?
            .broadcast_as(vec![b, t, c, self.repeats, h, w])?
            .contiguous()?
            .reshape(vec![b, t, self.out, ft, fs, fs, h, w])?
            .permute(vec![0, 1, 3, 2, 6, 4, 7, 5])?
            .contiguous()?
            .reshape((b, t * ft, self.out, h * fs, w * fs))?;
        if first_chunk && ft > 1 {
            Ok(x.narrow(1, ft - 1, t * ft - (ft - 1))?)
        } else {
            Ok(x)
        }
    }
}

/// Folds `p x p` pixels into channels (diffusers' `patchify`, channel `c * p*p + dx * p + dy`):
/// `[B, C, F, H, W]` -> `[B, C*p*p, F, H/p, W/p]`.
pub(super) fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (b, c, f, h, w) = x.dims5()?;
    Ok(x.reshape(vec![b, c, f, h / p, p, w / p, p])?
        .permute(vec![0, 1, 6, 4, 2, 3, 5])?
        .contiguous()?
        .reshape((b, c * p * p, f, h / p, w / p))?)
}

/// The inverse of [`patchify`]: `[B, C*p*p, F, H, W]` -> `[B, C, F, H*p, W*p]`.
pub(super) fn unpatchify(x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (b, cp, f, h, w) = x.dims5()?;
    let c = cp / (p * p);
    Ok(x.reshape(vec![b, c, p, p, f, h, w])?
        .permute(vec![0, 1, 4, 5, 3, 6, 2])?
        .contiguous()?
        .reshape((b, c, f, h * p, w * p))?)
}

#[cfg(test)]
mod tests {
    use super::super::load::{Builder, Source};
    use super::*;
    use crate::nn::{conv2d_bounded, max_abs_diff};
    use crate::weights::WeightStore;
    use candle_core::Device;

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
                let d = max_abs_diff(&full, &got);
                assert!(d < 1e-5, "pad {pad} stride {stride} budget {budget}: {d}");
            }
        }
    }

    #[test]
    fn patchify_layout_and_round_trip() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 6.0, &dev)
            .unwrap()
            .reshape((1, 2, 3, 4, 6))
            .unwrap();
        let p = patchify(&x, 2).unwrap();
        assert_eq!(p.dims(), &[1, 8, 3, 2, 3]);
        // Channel c * 4 + 2 * dx + dy holds pixel (2y + dy, 2x + dx): channel 1*4 + 2*1 + 0 = 6 at
        // (f 2, y 1, x 2) is x[0, 1, 2, 2, 5].
        let a = p
            .get(0)
            .unwrap()
            .get(6)
            .unwrap()
            .get(2)
            .unwrap()
            .get(1)
            .unwrap()
            .get(2)
            .unwrap();
        let b = x
            .get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .get(2)
            .unwrap()
            .get(2)
            .unwrap()
            .get(5)
            .unwrap();
        assert_eq!(a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert_eq!(max_abs_diff(&unpatchify(&p, 2).unwrap(), &x), 0.0);
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
        let d = max_abs_diff(&full, &chunked);
        assert!(d < 1e-5, "{d}");
    }
}
