//! A prompted FLUX-style run's picture (FLUX.1, FLUX.2): where it is drawn or read as packed
//! latents and how the pipeline folder's VAE decodes them. The family brings its text and its
//! position ids.

use crate::autoencoder_kl::{FluxTiling, FluxVae};
use crate::dit::PackedInputs;
use crate::run_basics::RunAt;
use candle_core::{DType, Device, Tensor};
use magcache_core::runtime::progress::StageTime;
use magcache_core::{Placement, Result};
use std::path::{Path, PathBuf};

/// A VAE that decodes packed latents `[B, seq, 4C]` into pixels `[B, H, W, 3]` in [0, 1].
pub trait PackedDecoder: Sized {
    /// Reads the VAE of a pipeline folder's `vae/`.
    fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self>;
    /// Decodes in tiles (`Some`) or whole.
    fn set_tiling(&mut self, tiling: Option<FluxTiling>) -> Result<()>;
    /// Unpacks `packed` to the `height x width` picture's latents and decodes them.
    fn decode_packed(&self, packed: &Tensor, height: usize, width: usize) -> Result<Tensor>;
}

impl PackedDecoder for FluxVae {
    fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        FluxVae::load(dir, device, dtype)
    }
    fn set_tiling(&mut self, tiling: Option<FluxTiling>) -> Result<()> {
        FluxVae::set_tiling(self, tiling)
    }
    fn decode_packed(&self, packed: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        FluxVae::decode_packed(self, packed, height, width)
    }
}

/// The picture of a prompted run: its pipeline folder, size in pixels, the VAE's downsampling,
/// the run's placement and `[vae]` tiling (all checked before anything loads).
pub struct PackedPicture {
    pub root: PathBuf,
    pub height: usize,
    pub width: usize,
    /// The VAE's downsampling factor (the packing then halves each side again).
    pub factor: usize,
    pub placement: Placement,
    pub tiling: Option<FluxTiling>,
}

impl PackedPicture {
    /// The picture of a run of `root` at `(height, width)` pixels through a VAE of `factor`: the
    /// run's placement and `[vae]` tiling read from the run file.
    pub fn read(
        (cfg, file): (&magcache_core::RunConfig, &str),
        root: &Path,
        (height, width, factor): (usize, usize, usize),
    ) -> Result<Self> {
        Ok(PackedPicture {
            root: root.to_path_buf(),
            height,
            width,
            factor,
            placement: cfg.model.placement(file)?,
            tiling: crate::autoencoder_kl::run_tiling(cfg, file, root)?,
        })
    }

    /// The packed inputs: `latents_init` of `[inputs] file` or latents of the picture's size drawn
    /// from the run's seed ([`crate::inputs::packed_latents`]), the prompt's embeddings `ctx`,
    /// and the position ids `ids(grid, text rows)` gives; on the run's device.
    pub fn inputs(
        &self,
        (cfg, file, base): RunAt<'_>,
        in_channels: usize,
        ctx: &Tensor,
        ids: impl FnOnce((usize, usize), usize) -> Result<(Tensor, Tensor)>,
    ) -> Result<PackedInputs> {
        let size = (self.height, self.width, self.factor);
        let (latents, grid) = crate::inputs::packed_latents(cfg, file, base, in_channels, size)?;
        let (img_ids, txt_ids) = ids(grid, ctx.dim(1)?)?;
        PackedInputs {
            latents,
            ctx: ctx.clone(),
            img_ids,
            txt_ids,
        }
        .to_device(&self.placement.device)
    }

    /// The decode stage: the folder's `vae/` (loaded, used and dropped) decodes the final packed
    /// `latents` into pixels `[B, H, W, 3]` in [0, 1], timed and checked finite.
    pub fn decode<V: PackedDecoder>(
        &self,
        latents: &Tensor,
        stages: &mut Vec<StageTime>,
    ) -> Result<Tensor> {
        crate::stage::decode_stage(stages, &self.root.join("vae"), |dir| {
            let mut vae = V::load(dir, &self.placement.device, self.placement.dtype)?;
            vae.set_tiling(self.tiling)?;
            vae.decode_packed(latents, self.height, self.width)
        })
    }
}
