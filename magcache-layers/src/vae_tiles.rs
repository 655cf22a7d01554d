//! Spatial tiling of a VAE's decode and encode, as diffusers' VAEs define it (`tiled_decode`,
//! `tiled_encode`): the input is cut into overlapping tiles, each tile runs through the model on
//! its own, and each tile's first rows (columns) are blended linearly with the last rows (columns)
//! of the tile above (to the left), already blended, before the first `keep` of every tile are
//! joined. The families say where the tiles are ([`Grid`]: the Wan VAEs from `enable_tiling`'s
//! sizes, [`crate::autoencoder_kl_wan::VaeTiling`]; FLUX's `AutoencoderKL` from its `sample_size` and a
//! quarter overlap, [`crate::autoencoder_kl::FluxTiling`]); this module walks the grid.
//!
//! Rows of tiles are run one after another and only the previous row is kept for blending, so at
//! most two rows of tiles are held besides the output (diffusers holds every tile).

use candle_core::{Device, Tensor};
use magcache_core::Result;

/// Where the tiles are, per axis as (height, width): their size and spacing in input positions,
/// what each keeps and blends in output positions, and the tensor dimensions of height and width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    /// A tile's size (shorter at the end), input positions.
    pub min: (usize, usize),
    /// One tile every this many input positions.
    pub stride: (usize, usize),
    /// Output positions kept of each tile (its first ones; all of a shorter last tile).
    pub keep: (usize, usize),
    /// Output positions blended with the previous tile's last ones.
    pub blend: (usize, usize),
    /// The dimensions of height and width in the tensors (`(3, 4)` for `[B, F, C, H, W]`).
    pub dims: (usize, usize),
}

impl Grid {
    /// How many tiles cover `h x w` input positions.
    pub fn count(&self, h: usize, w: usize) -> usize {
        h.div_ceil(self.stride.0.max(1)) * w.div_ceil(self.stride.1.max(1))
    }
}

/// Runs `tile` over the grid of an input of `h x w` positions and joins the results (blended and
/// cut in the output's positions) into strips, each at most `out_w` wide and together at most
/// `out_h` high (`usize::MAX`: uncut, as diffusers' `AutoencoderKL` joins them), each mapped by
/// `strip`. Only the previous row of tiles is kept for blending. `tile(i, th, j, tw)` gets the
/// tile's start and size in input positions.
pub fn run(
    g: &Grid,
    (h, w): (usize, usize),
    (out_h, out_w): (usize, usize),
    mut tile: impl FnMut(usize, usize, usize, usize) -> Result<Tensor>,
    mut strip: impl FnMut(Tensor) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let rows = Axis {
        len: h,
        min: g.min.0,
        stride: g.stride.0,
    }
    .tiles();
    let cols = Axis {
        len: w,
        min: g.min.1,
        stride: g.stride.1,
    }
    .tiles();
    let mut above: Vec<Tensor> = Vec::new();
    let mut strips = Vec::with_capacity(rows.len());
    let mut height = 0;
    for &(i, th) in &rows {
        let row = cols
            .iter()
            .map(|&(j, tw)| tile(i, th, j, tw))
            .collect::<Result<Vec<_>>>()?;
        let row = blend_row(row, &above, g.dims, g.blend)?;
        let s = join_row(&row, g.dims, g.keep, out_w, out_h.saturating_sub(height))?;
        height += s.dim(g.dims.0)?;
        strips.push(strip(s)?);
        above = row;
        if height >= out_h {
            break;
        }
    }
    Ok(strips)
}

/// The grid of one axis: where each tile starts (every `stride` from 0 below `len`) and how long
/// it is (`min`, shorter at the end).
#[derive(Clone, Copy, Debug)]
struct Axis {
    len: usize,
    min: usize,
    stride: usize,
}

impl Axis {
    /// `(start, length)` of each tile.
    fn tiles(&self) -> Vec<(usize, usize)> {
        (0..self.len)
            .step_by(self.stride.max(1))
            .map(|s| (s, self.min.min(self.len - s)))
            .collect()
    }
}

/// `b` with its first `extent` positions along `dim` blended from `a`'s last ones: position `y`
/// becomes `a[-extent + y] * (1 - y / extent) + b[y] * (y / extent)` (f32 weights, as diffusers'
/// `blend_v` / `blend_h` multiply an f32 tensor by a Python float).
fn blend(a: &Tensor, b: &Tensor, dim: usize, extent: usize) -> Result<Tensor> {
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
fn blend_row(
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
fn join_row(
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
    fn axis_tiles() {
        let ax = Axis {
            len: 13,
            min: 8,
            stride: 6,
        };
        assert_eq!(ax.tiles(), vec![(0, 8), (6, 7), (12, 1)]);
    }

    /// An identity "model" over a ramp: with blending weights summing to one, every kept position
    /// is the input's own value, so the joined strips reproduce the input (uncut and cut).
    #[test]
    fn identity_tiles_rebuild_the_input() {
        let dev = Device::Cpu;
        let (h, w) = (11, 14);
        let x = Tensor::arange(0f32, (h * w) as f32, &dev)
            .unwrap()
            .reshape((1, 1, h, w))
            .unwrap();
        let g = Grid {
            min: (5, 6),
            stride: (4, 4),
            keep: (4, 4),
            blend: (1, 2),
            dims: (2, 3),
        };
        for out in [(usize::MAX, usize::MAX), (h, w)] {
            let strips = run(
                &g,
                (h, w),
                out,
                |i, th, j, tw| Ok(x.narrow(2, i, th)?.narrow(3, j, tw)?),
                Ok,
            )
            .unwrap();
            let y = Tensor::cat(&strips, 2).unwrap();
            assert_eq!(y.dims(), x.dims());
            let d = (y - &x).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
        }
        assert_eq!(g.count(h, w), 3 * 4);
    }
}
