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
//! The grid is walked by [`crate::vae_tiles::run`] (shared with FLUX's VAE): at most two rows of
//! tiles are held besides the output (diffusers holds every tile).

use crate::vae_tiles::Grid;
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
    /// The grid over `[B, F, C, H, W]` inputs whose tile sizes are the pixel sizes divided by
    /// `in_div`, blended and kept in output positions (the pixel sizes divided by `out_div`): a
    /// tile keeps its first `stride` and blends `min - stride`.
    pub(super) fn grid(&self, in_div: usize, out_div: usize) -> Grid {
        let (id, od) = (in_div.max(1), out_div.max(1));
        let keep = (
            self.tile_sample_stride_height / od,
            self.tile_sample_stride_width / od,
        );
        Grid {
            min: (
                self.tile_sample_min_height / id,
                self.tile_sample_min_width / id,
            ),
            stride: (
                self.tile_sample_stride_height / id,
                self.tile_sample_stride_width / id,
            ),
            keep,
            blend: (
                (self.tile_sample_min_height / od).saturating_sub(keep.0),
                (self.tile_sample_min_width / od).saturating_sub(keep.1),
            ),
            dims: (3, 4),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_and_checks() {
        let t = VaeTiling::default();
        // Decoder of the Wan2.1 VAE: latents in, pixels out.
        let g = t.grid(8, 1);
        assert_eq!(
            (g.min, g.stride, g.keep, g.blend),
            ((32, 32), (24, 24), (192, 192), (64, 64))
        );
        assert_eq!(g.count(60, 104), 3 * 5);
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
