//! Spatial tiling of FLUX's `AutoencoderKL` (FLUX.1, and FLUX.2's VAE around it), as diffusers'
//! `enable_tiling()` defines it: tiles of `tile_sample_min_size` pixels (the config's `sample_size`,
//! 1024 for the released VAEs) and `tile_latent_min_size = tile_sample_min_size / vae_scale_factor`
//! latents, one every three quarters of a tile (`tile_overlap_factor = 0.25`), a quarter blended.
//! The decode tiles latents larger than one latent tile and blends in pixels; the encode tiles
//! images larger than one pixel tile and blends in latents. Unlike the Wan VAEs' tiling, diffusers
//! joins the kept parts uncut, so the tile size must make the kept parts add up to the image:
//! [`FluxTiling::check`] asks for a multiple of `4 x vae_scale_factor` pixels.

use super::config::FluxVaeConfig;
use crate::vae_tiles::Grid;
use candle_core::Tensor;
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::keys::{fields_of, FamilyKeys};
use magcache_core::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The tile size of a FLUX VAE's tiling, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FluxTiling {
    /// diffusers' `vae.tile_sample_min_size` (its `tile_latent_min_size` is this over the VAE's
    /// pixels per latent).
    pub tile_sample_min_size: usize,
}

impl FluxTiling {
    /// diffusers' default: the config's `sample_size`.
    pub fn of_config(c: &FluxVaeConfig) -> Self {
        FluxTiling {
            tile_sample_min_size: c.sample_size,
        }
    }

    /// The tile size in latents.
    pub fn latent_min(&self, c: &FluxVaeConfig) -> usize {
        self.tile_sample_min_size / c.vae_scale_factor().max(1)
    }

    /// Checks the size against the VAE: a positive multiple of four latents' pixels, so that tiles
    /// every three quarters of a tile keep exactly what they advance by. `what` names the source.
    pub fn check(&self, c: &FluxVaeConfig, what: &str) -> Result<()> {
        let unit = 4 * c.vae_scale_factor().max(1);
        let t = self.tile_sample_min_size;
        if t == 0 || !t.is_multiple_of(unit) {
            return Err(Error::msg(format!(
                "{what}: tile_sample_min_size {t} must be a positive multiple of {unit} pixels (4 latents of this VAE's {} pixels: tiles come every 3/4 of a tile and a quarter is blended)",
                c.vae_scale_factor()
            )));
        }
        Ok(())
    }

    /// Whether a decode of `h x w` latents is tiled (larger than one latent tile either way).
    pub fn tiles_latents(&self, c: &FluxVaeConfig, h: usize, w: usize) -> bool {
        let m = self.latent_min(c);
        h > m || w > m
    }

    /// Whether an encode of `h x w` pixels is tiled (larger than one tile either way).
    pub fn tiles_pixels(&self, h: usize, w: usize) -> bool {
        h > self.tile_sample_min_size || w > self.tile_sample_min_size
    }

    /// The decode's grid over `[B, C, h, w]` latents: latent tiles, pixel blending.
    pub(super) fn decode_grid(&self, c: &FluxVaeConfig) -> Grid {
        let (lat, px) = (self.latent_min(c), self.tile_sample_min_size);
        square(lat, lat * 3 / 4, px - px / 4, px / 4)
    }

    /// The encode's grid over `[B, C, H, W]` images: pixel tiles, latent blending.
    pub(super) fn encode_grid(&self, c: &FluxVaeConfig) -> Grid {
        let (lat, px) = (self.latent_min(c), self.tile_sample_min_size);
        square(px, px * 3 / 4, lat - lat / 4, lat / 4)
    }
}

/// The `[vae]` table of a FLUX.1 or FLUX.2 prompted run: diffusers' `vae.enable_tiling()`, and the
/// tile size users set as `vae.tile_sample_min_size`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct FluxVaeKeys {
    /// Cut images larger than one tile into overlapping tiles (bounded decode memory at large
    /// sizes, small seams); default false, as diffusers.
    pub tiling: Option<bool>,
    /// Tile size in pixels; default the VAE config's `sample_size` (1024 released).
    pub tile_sample_min_size: Option<usize>,
}

/// The table [`FluxVaeKeys`] adds, for the flux and flux2 registrations.
pub const FLUX_VAE_KEYS: FamilyKeys = FamilyKeys {
    table: "vae",
    keys: fields_of::<FluxVaeKeys>,
    paths: &[],
};

#[derive(Default, Deserialize)]
#[serde(default)]
struct VaeTable {
    vae: FluxVaeKeys,
}

/// Adds a FLUX VAE's decode of `lh x lw` latents to `fp`: the working set (one latent tile's with
/// `tiling` where it tiles them, plus two rows of decoded tiles held for blending; else the whole
/// picture's), and what a refusal driven by it tells the user. FLUX.1's and Z-Image's guards.
pub fn add_decode_parts(
    fp: &mut magcache_core::runtime::guard::Footprint,
    v: &FluxVaeConfig,
    tiling: Option<FluxTiling>,
    (lh, lw): (usize, usize),
    cpu: bool,
) {
    use crate::footprint::sz;
    match tiling {
        Some(t) if t.tiles_latents(v, lh, lw) => {
            let m = t.latent_min(v);
            fp.add(
                format!("VAE decode working set (one {m}x{m}-latent tile, f32)"),
                "vae.tile_sample_min_size",
                v.decode_working_bytes(lh.min(m), lw.min(m), cpu).0,
            );
            fp.advise("make vae.tile_sample_min_size smaller (or inputs.height/width)");
            // Two rows of decoded tiles, each a tile of pixels.
            let cols = lw.div_ceil((m * 3 / 4).max(1));
            let px = sz(t.tile_sample_min_size);
            fp.add(
                "VAE decode tiles (two rows of tiles for blending, f32)",
                "vae.tile_sample_min_size",
                (sz(2) * sz(cols) * px * px * sz(v.out_channels) * sz(4)).0,
            );
        }
        _ => {
            fp.add(
                "VAE decode working set (f32)",
                "vae.tiling",
                v.decode_working_bytes(lh, lw, cpu).0,
            );
            fp.advise(match tiling {
                // Tiling is on, but the picture fits in one tile: decoded whole.
                Some(_) => "make vae.tile_sample_min_size smaller than the picture (it is decoded whole in one tile now) or inputs.height/width smaller".to_string(),
                None => format!(
                    "set `tiling = true` in [vae] (the decode then works in {}-pixel tiles) or make inputs.height/width smaller",
                    FluxTiling::of_config(v).tile_sample_min_size
                ),
            });
        }
    }
}

/// The tiling a run file asks for (`[vae]`), checked against the pipeline's `vae/config.json` under
/// `root` (read only when tiling is on); errors name the file and `vae.<key>`.
pub fn run_tiling(cfg: &RunConfig, file: &str, root: &Path) -> Result<Option<FluxTiling>> {
    let k = cfg.family_keys::<VaeTable>(file)?.vae;
    if (k.tiling.is_some() || k.tile_sample_min_size.is_some()) && cfg.prompt.is_none() {
        return Err(Error::config(
            file,
            "vae.tiling",
            "applies only to prompted runs (a `[prompt]` table and a pipeline folder: they decode with the VAE)",
        ));
    }
    if k.tiling != Some(true) {
        if k.tile_sample_min_size.is_some() {
            return Err(Error::config(
                file,
                "vae.tiling",
                "a tile size is given but tiling is off: add `tiling = true` to [vae]",
            ));
        }
        return Ok(None);
    }
    let c = tiled_vae_config(&root.join("vae").join("config.json"))?;
    let t = k
        .tile_sample_min_size
        .map(|tile_sample_min_size| FluxTiling {
            tile_sample_min_size,
        })
        .unwrap_or_else(|| FluxTiling::of_config(&c));
    t.check(&c, &format!("{file}: vae"))?;
    Ok(Some(t))
}

/// The VAE classes whose tiling is `AutoencoderKL`'s: FLUX.2's `AutoencoderKLFlux2` wraps one (its
/// extra keys, the batch norm's, do not shape the tiles); the rest of its config is the family's to
/// check when it loads the VAE.
const TILED_CLASSES: [&str; 2] = ["AutoencoderKL", "AutoencoderKLFlux2"];

/// The `AutoencoderKL` part of a tiled VAE's `config.json` (any of [`TILED_CLASSES`]).
fn tiled_vae_config(path: &Path) -> Result<FluxVaeConfig> {
    let (mut json, shown) = crate::config_util::read_json(path)?;
    if let Some(obj) = json.as_object_mut() {
        let class = obj.get("_class_name").and_then(|v| v.as_str());
        if class.is_some_and(|c| TILED_CLASSES[1..].contains(&c)) {
            obj.remove("_class_name");
        }
    }
    FluxVaeConfig::from_json(&json, &shown)
}

/// Runs `f` over the tiles of `grid` on a `[1, C, H, W]` input and joins the blended results uncut
/// along the height, as diffusers' `AutoencoderKL` tiled paths do; `what` names the progress line
/// (`"decode: tile"`).
pub(super) fn run_tiles(
    grid: &Grid,
    x: &Tensor,
    what: &str,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (tiles, mut n) = (grid.count(h, w), 0);
    let strips = crate::vae_tiles::run(
        grid,
        (h, w),
        (usize::MAX, usize::MAX),
        |i, th, j, tw| {
            n += 1;
            let out = f(&x.narrow(2, i, th)?.narrow(3, j, tw)?)?;
            magcache_core::runtime::progress::tick(what, n, tiles);
            magcache_core::cancel::check()?;
            Ok(out)
        },
        Ok,
    )?;
    Ok(Tensor::cat(&strips, 2)?)
}

fn square(min: usize, stride: usize, keep: usize, blend: usize) -> Grid {
    Grid {
        min: (min, min),
        stride: (stride, stride),
        keep: (keep, keep),
        blend: (blend, blend),
        dims: (2, 3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_sizes_and_checks() {
        let json = serde_json::json!({
            "_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
            "sample_size": 1024
        });
        let c = FluxVaeConfig::from_json(&json, "vae/config.json").unwrap();
        let t = FluxTiling::of_config(&c);
        assert_eq!(t.latent_min(&c), 128);
        t.check(&c, "vae").unwrap();
        // diffusers: overlap_size int(128 * 0.75) = 96 latents, blend_extent int(1024 * 0.25)
        // = 256 pixels, row_limit 1024 - 256 = 768 pixels.
        let g = t.decode_grid(&c);
        assert_eq!(
            (g.min.0, g.stride.0, g.keep.0, g.blend.0),
            (128, 96, 768, 256)
        );
        let g = t.encode_grid(&c);
        assert_eq!(
            (g.min.0, g.stride.0, g.keep.0, g.blend.0),
            (1024, 768, 96, 32)
        );
        assert!(t.tiles_latents(&c, 129, 64) && !t.tiles_latents(&c, 128, 128));
        assert!(t.tiles_pixels(1024, 1032) && !t.tiles_pixels(1024, 1024));
        let e = FluxTiling {
            tile_sample_min_size: 1000,
        }
        .check(&c, "run.toml: vae")
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("run.toml: vae: tile_sample_min_size 1000") && e.contains("32"),
            "{e}"
        );
        // A list sample_size: its first entry.
        let json = serde_json::json!({"_class_name": "AutoencoderKL", "sample_size": [64, 96]});
        let c = FluxVaeConfig::from_json(&json, "vae/config.json").unwrap();
        assert_eq!(FluxTiling::of_config(&c).tile_sample_min_size, 64);
    }
}
