//! Spatial tiling of the Wan VAEs, as diffusers' `AutoencoderKLWan.enable_tiling` defines it: the
//! input is cut into overlapping tiles (`tile_sample_min_*` pixels, one every `tile_sample_stride_*`
//! pixels), each tile goes through the whole video with its own feature cache, and each tile's
//! first rows (columns) are blended linearly with the last rows (columns) of the tile above (to the
//! left), already blended, before the first `stride` of every tile are joined. The decoder blends
//! in its output space (the Wan2.2 VAE's patchified 2x2 channels: `patch_size` folds the sizes),
//! the encoder in latent space. Memory then grows with a tile's area instead of the frame's; the
//! result differs from the untiled one near the seams (the tiles see zero padding at their edges),
//! as in diffusers.
//!
//! Rows of tiles are decoded one after another and only the previous row is kept for blending,
//! so at most two rows of tiles are held besides the output (diffusers holds every tile).

use candle_core::{Device, Tensor};
use magcache_core::{Error, Result};

/// Tile sizes in pixels, diffusers' `enable_tiling` arguments (defaults: 256 and 192).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VaeTiling {
    pub tile_sample_min_height: usize,
    pub tile_sample_min_width: usize,
    pub tile_sample_stride_height: usize,
    pub tile_sample_stride_width: usize,
}

impl Default for VaeTiling {
    /// diffusers' defaults: 256 x 256 pixel tiles, one every 192 pixels (64 pixels blended).
    fn default() -> Self {
        VaeTiling {
            tile_sample_min_height: 256,
            tile_sample_min_width: 256,
            tile_sample_stride_height: 192,
            tile_sample_stride_width: 192,
        }
    }
}

impl VaeTiling {
    /// How many tiles cover `h x w` input positions whose tile sizes are the pixel sizes / `div`.
    pub(super) fn tile_count(&self, h: usize, w: usize, div: usize) -> usize {
        let d = div.max(1);
        h.div_ceil((self.tile_sample_stride_height / d).max(1))
            * w.div_ceil((self.tile_sample_stride_width / d).max(1))
    }

    /// Checks the sizes against a VAE of `spatial_scale` pixels per latent (`patch_size` pixels per
    /// patchified position): every size a positive multiple of the scale, strides at most the tile.
    /// `what` names the source for the error (`"run.toml: vae"`).
    pub fn check(&self, spatial_scale: usize, what: &str) -> Result<()> {
        let s = spatial_scale.max(1);
        for (key, v) in [
            ("tile_sample_min_height", self.tile_sample_min_height),
            ("tile_sample_min_width", self.tile_sample_min_width),
            ("tile_sample_stride_height", self.tile_sample_stride_height),
            ("tile_sample_stride_width", self.tile_sample_stride_width),
        ] {
            if v == 0 || !v.is_multiple_of(s) {
                return Err(Error::msg(format!(
                    "{what}.{key}: {v} must be a positive multiple of the VAE's {s} pixels per latent"
                )));
            }
        }
        for (stride, min, key) in [
            (
                self.tile_sample_stride_height,
                self.tile_sample_min_height,
                "tile_sample_stride_height",
            ),
            (
                self.tile_sample_stride_width,
                self.tile_sample_min_width,
                "tile_sample_stride_width",
            ),
        ] {
            if stride > min {
                return Err(Error::msg(format!(
                    "{what}.{key}: {stride} is more than the tile ({min}): tiles would leave gaps"
                )));
            }
        }
        Ok(())
    }
}

/// Runs `tile` over the grid of an input of `h x w` positions (`[B, F, C, H, W]`, height and width in
/// dims 3 and 4), whose tile sizes are the pixel sizes divided by `in_div`, and joins the results
/// (blended and cut in the output's positions: pixel sizes divided by `out_div`) into strips of
/// `out_w` wide, `out_h` high in all, each mapped by `strip`. Only the previous row of tiles is
/// kept for blending. `tile(i, th, j, tw)` gets the tile's start and size in input positions.
pub(super) fn run(
    t: &VaeTiling,
    (h, w): (usize, usize),
    (in_div, out_div): (usize, usize),
    (out_h, out_w): (usize, usize),
    mut tile: impl FnMut(usize, usize, usize, usize) -> Result<Tensor>,
    mut strip: impl FnMut(Tensor) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let (id, od) = (in_div.max(1), out_div.max(1));
    let rows = Axis {
        len: h,
        min: t.tile_sample_min_height / id,
        stride: t.tile_sample_stride_height / id,
    }
    .tiles();
    let cols = Axis {
        len: w,
        min: t.tile_sample_min_width / id,
        stride: t.tile_sample_stride_width / id,
    }
    .tiles();
    let keep = (
        t.tile_sample_stride_height / od,
        t.tile_sample_stride_width / od,
    );
    let blend = (
        (t.tile_sample_min_height / od).saturating_sub(keep.0),
        (t.tile_sample_min_width / od).saturating_sub(keep.1),
    );
    let mut above: Vec<Tensor> = Vec::new();
    let mut strips = Vec::with_capacity(rows.len());
    let mut height = 0;
    for &(i, th) in &rows {
        let row = cols
            .iter()
            .map(|&(j, tw)| tile(i, th, j, tw))
            .collect::<Result<Vec<_>>>()?;
        let row = blend_row(row, &above, (3, 4), blend)?;
        let s = join_row(&row, (3, 4), keep, out_w, out_h.saturating_sub(height))?;
        height += s.dim(3)?;
        strips.push(strip(s)?);
        above = row;
        if height >= out_h {
            break;
        }
    }
    Ok(strips)
}

/// The grid of one axis: where each tile starts (every `stride` from 0 below `len`), how long it is
/// (`min`, shorter at the end), how much of it is kept (`keep` = the stride) and blended (`blend`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Axis {
    pub(super) len: usize,
    pub(super) min: usize,
    pub(super) stride: usize,
}

impl Axis {
    /// `(start, length)` of each tile.
    pub(super) fn tiles(&self) -> Vec<(usize, usize)> {
        (0..self.len)
            .step_by(self.stride.max(1))
            .map(|s| (s, self.min.min(self.len - s)))
            .collect()
    }
}

/// `b` with its first `extent` positions along `dim` blended from `a`'s last ones: position `y`
/// becomes `a[-extent + y] * (1 - y / extent) + b[y] * (y / extent)` (f32 weights, as diffusers'
/// `blend_v` / `blend_h` multiply an f32 tensor by a Python float).
pub(super) fn blend(a: &Tensor, b: &Tensor, dim: usize, extent: usize) -> Result<Tensor> {
    let (la, lb) = (a.dim(dim)?, b.dim(dim)?);
    let e = extent.min(la).min(lb);
    if e == 0 {
        return Ok(b.clone());
    }
    let rank = b.rank();
    let shape: Vec<usize> = (0..rank).map(|d| if d == dim { e } else { 1 }).collect();
    let w: Vec<f32> = (0..e).map(|y| (y as f64 / e as f64) as f32).collect();
    let one_minus: Vec<f32> = (0..e).map(|y| (1.0 - y as f64 / e as f64) as f32).collect();
    let dev: &Device = b.device();
    let w = Tensor::from_vec(w, shape.as_slice(), dev)?;
    let one_minus = Tensor::from_vec(one_minus, shape.as_slice(), dev)?;
    let head = (a.narrow(dim, la - e, e)?.broadcast_mul(&one_minus)?
        + b.narrow(dim, 0, e)?.broadcast_mul(&w)?)?;
    if e == lb {
        return Ok(head);
    }
    Ok(Tensor::cat(&[&head, &b.narrow(dim, e, lb - e)?], dim)?)
}

/// Tiles of one row, blended with the row above (`above`, already blended) and each with the one to
/// its left, in place of the row's tiles; `dims` are the (height, width) dimensions.
pub(super) fn blend_row(
    row: Vec<Tensor>,
    above: &[Tensor],
    dims: (usize, usize),
    extents: (usize, usize),
) -> Result<Vec<Tensor>> {
    let mut out: Vec<Tensor> = Vec::with_capacity(row.len());
    for (j, t) in row.into_iter().enumerate() {
        let mut t = t;
        if let Some(a) = above.get(j) {
            t = blend(a, &t, dims.0, extents.0)?;
        }
        if let Some(l) = j.checked_sub(1).and_then(|k| out.get(k)) {
            t = blend(l, &t, dims.1, extents.1)?;
        }
        out.push(t);
    }
    Ok(out)
}

/// One row's kept part: each tile's first `keep` (height, width), joined along the width and cut
/// to `width`; `rows_left` caps the height (the last row is cut to the output's height).
pub(super) fn join_row(
    row: &[Tensor],
    dims: (usize, usize),
    keep: (usize, usize),
    width: usize,
    rows_left: usize,
) -> Result<Tensor> {
    let pieces = row
        .iter()
        .map(|t| {
            let h = t.dim(dims.0)?.min(keep.0).min(rows_left);
            let w = t.dim(dims.1)?.min(keep.1);
            Ok(t.narrow(dims.0, 0, h)?.narrow(dims.1, 0, w)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let joined = Tensor::cat(&pieces, dims.1)?;
    let w = joined.dim(dims.1)?.min(width);
    Ok(joined.narrow(dims.1, 0, w)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blend_weights_and_extent() {
        let dev = Device::Cpu;
        let a = Tensor::from_vec(vec![10f32, 20., 30., 40.], (1, 4), &dev).unwrap();
        let b = Tensor::from_vec(vec![0f32, 0., 0.], (1, 3), &dev).unwrap();
        // extent 2: y=0 takes a[-2] fully, y=1 half of a[-1].
        let r = blend(&a, &b, 1, 2).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(r, vec![vec![30., 20., 0.]]);
        // extent capped by the shorter tile.
        let r = blend(&a, &b, 1, 9).unwrap().to_vec2::<f32>().unwrap();
        let want = [20., 30. * 2. / 3., 40. / 3.];
        assert!(
            r[0].iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-5),
            "{r:?}"
        );
        let r = blend(&a, &b, 1, 0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(r, vec![vec![0., 0., 0.]]);
    }

    #[test]
    fn axis_tiles_and_checks() {
        let ax = Axis {
            len: 13,
            min: 8,
            stride: 6,
        };
        assert_eq!(ax.tiles(), vec![(0, 8), (6, 7), (12, 1)]);
        let t = VaeTiling::default();
        t.check(8, "run.toml: vae").unwrap();
        t.check(16, "run.toml: vae").unwrap();
        let bad = VaeTiling {
            tile_sample_stride_width: 304,
            ..t
        };
        let e = bad.check(8, "run.toml: vae").unwrap_err().to_string();
        assert!(
            e.contains("vae.tile_sample_stride_width") && e.contains("gaps"),
            "{e}"
        );
        let e = VaeTiling {
            tile_sample_min_height: 100,
            ..t
        }
        .check(8, "run.toml: vae")
        .unwrap_err()
        .to_string();
        assert!(e.contains("tile_sample_min_height: 100"), "{e}");
    }
}
