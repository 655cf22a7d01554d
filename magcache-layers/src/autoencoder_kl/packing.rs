//! FluxPipeline's latent packing (`_pack_latents` / `_unpack_latents`) and its `np` pixels.

use crate::vae_common::to_pixels_channels_last;
use candle_core::Tensor;
use magcache_core::{Error, Result};

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
    to_pixels_channels_last(decoded)
}

/// Packed latents `[B, h*w, C]` -> `[B*C, h, w]` on the grid of position ids `[seq, axes]` whose
/// axes 1 and 2 are the row and column (FLUX.1 and FLUX.2); ids that give no grid: one row of
/// `seq` values per plane.
pub fn packed_to_planes(latents: &Tensor, img_ids: &Tensor) -> Result<Tensor> {
    let (b, seq, c) = latents.dims3()?;
    let ids = img_ids
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?;
    let extent = |axis: usize| {
        ids.iter()
            .map(|r| r.get(axis).map_or(0, |&v| v as usize))
            .max()
            .unwrap_or(0)
            .saturating_add(1)
    };
    let (h, w) = (extent(1), extent(2));
    if h.checked_mul(w) != Some(seq) {
        return Ok(latents
            .permute((0, 2, 1))?
            .contiguous()?
            .reshape((b * c, 1, seq))?);
    }
    Ok(latents
        .reshape((b, h, w, c))?
        .permute((0, 3, 1, 2))?
        .contiguous()?
        .reshape((b * c, h, w))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
}
