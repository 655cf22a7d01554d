//! Reading an inputs file (`[inputs] file`): named tensors, checked for presence, shape and finiteness.

use candle_core::{Device, Tensor};
use magcache_core::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

pub struct InputFile {
    pub path: String,
    tensors: HashMap<String, Tensor>,
}

impl InputFile {
    pub fn load(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        if let Some(why) = magcache_core::error::not_a_file(path) {
            return Err(Error::inputs(
                &shown,
                "(file)",
                format!("inputs file {why}"),
            ));
        }
        magcache_core::files::record_read(path);
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            Error::inputs(
                &shown,
                "(header)",
                format!(
                    "not a readable safetensors file: {}",
                    magcache_core::error::candle_text(e)
                ),
            )
        })?;
        Ok(InputFile {
            path: shown,
            tensors,
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A required tensor of the given rank, converted to f32 and checked finite.
    pub fn get(&self, name: &str, rank: usize, what: &str) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::inputs(&self.path, name, format!("missing ({what})")))?;
        if t.rank() != rank {
            return Err(Error::inputs(
                &self.path,
                name,
                format!("has shape {:?}; expected {what}", t.dims()),
            ));
        }
        if t.dims().contains(&0) {
            return Err(Error::inputs(
                &self.path,
                name,
                format!(
                    "is empty (shape {:?}); expected {what} with every dimension at least 1 (text embeddings need at least one token)",
                    t.dims()
                ),
            ));
        }
        use candle_core::DType;
        if !matches!(
            t.dtype(),
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            return Err(Error::inputs(
                &self.path,
                name,
                format!(
                    "has dtype {:?}; expected f32, f16 or bf16 values",
                    t.dtype()
                ),
            ));
        }
        let t = t
            .to_dtype(DType::F32)
            .map_err(|e| Error::inputs(&self.path, name, magcache_core::error::candle_text(e)))?;
        check_finite(&t, &self.path, name)?;
        Ok(t)
    }

    /// [`InputFile::get`] of a tensor of shape `want` (`None`: any size there, shown as `_`).
    pub fn get_shaped(&self, name: &str, what: &str, want: &[Option<usize>]) -> Result<Tensor> {
        let t = self.get(name, want.len(), what)?;
        let fits = t
            .dims()
            .iter()
            .zip(want)
            .all(|(d, w)| w.is_none_or(|w| w == *d));
        if !fits {
            let shown: Vec<String> = want
                .iter()
                .map(|w| w.map_or("_".to_string(), |w| w.to_string()))
                .collect();
            return Err(Error::inputs(
                &self.path,
                name,
                format!("has shape {:?}; expected [{}]", t.dims(), shown.join(", ")),
            ));
        }
        Ok(t)
    }
}

/// Errors if the tensor holds NaN or Inf.
pub fn check_finite(t: &Tensor, file: &str, name: &str) -> Result<()> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(Error::inputs(
            file,
            name,
            format!("holds a non-finite value ({x}) at flat index {i}"),
        ));
    }
    Ok(())
}

/// What a run without an inputs file draws from: the seed (`inputs.seed`, else the model's) and the
/// latents' shape (`inputs.latent_shape`, else `default`). The family checks the shape.
pub fn drawn(cfg: &magcache_core::RunConfig, default: &[usize]) -> (u64, Vec<usize>) {
    let seed = cfg.inputs.seed.unwrap_or(cfg.model.seed);
    let shape = cfg
        .inputs
        .latent_shape
        .clone()
        .unwrap_or_else(|| default.to_vec());
    (seed, shape)
}

/// Seeded latents `[B, C, H, W]` that `family` packs 2x2 into `in_channels = 4 C`: `(B, H, W)`, or
/// the error naming `inputs.latent_shape` (plan and build check with this one rule).
pub fn packed_drawn_shape(
    shape: &[usize],
    in_channels: usize,
    family: &str,
    file: &str,
) -> Result<(usize, usize, usize)> {
    match *shape {
        [b, ch, h, w]
            if b > 0
                && ch.checked_mul(4) == Some(in_channels)
                && h > 0
                && w > 0
                && h % 2 == 0
                && w % 2 == 0 =>
        {
            Ok((b, h, w))
        }
        _ => Err(Error::config(
            file,
            "inputs.latent_shape",
            format!(
                "{shape:?} is not [B, {}, H, W] with positive even H and W ({family} packs 2x2 latents into {in_channels} channels)",
                in_channels / 4
            ),
        )),
    }
}

/// A prompted run's initial packed latents `[1, seq, channels]` (f32) and their grid `(h2, w2)`
/// (`seq = h2 * w2`: the picture's `(height, width)` through the VAE's `factor` and 2x2 packing):
/// `latents_init` of `[inputs] file`, its shape checked against the picture's, or seeded noise
/// (`inputs.seed`, else `model.seed`).
pub fn packed_latents(
    cfg: &magcache_core::RunConfig,
    file: &str,
    base: &Path,
    channels: usize,
    (height, width, factor): (usize, usize, usize),
) -> Result<(Tensor, (usize, usize))> {
    if factor == 0 {
        return Err(Error::msg(format!(
            "{file}: packed latents need a VAE scale factor of at least 1"
        )));
    }
    let grid = (height / (2 * factor), width / (2 * factor));
    let seq = grid.0.saturating_mul(grid.1);
    let latents = match &cfg.inputs.file {
        Some(path) => {
            let inp = InputFile::load(&crate::config_util::resolve(base, path))?;
            let l = inp.get("latents_init", 3, "[B, seq, C] packed latents")?;
            if l.dims() != [1, seq, channels] {
                return Err(Error::inputs(
                    &inp.path,
                    "latents_init",
                    format!(
                        "has shape {:?}; height {height} and width {width} give [1, {seq}, {channels}]",
                        l.dims(),
                    ),
                ));
            }
            l.to_dtype(candle_core::DType::F32)?
        }
        None => crate::random::randn_for(
            file,
            "inputs.height/width",
            cfg.inputs.seed.unwrap_or(cfg.model.seed),
            &[1, seq, channels],
        )?,
    };
    Ok((latents, grid))
}
