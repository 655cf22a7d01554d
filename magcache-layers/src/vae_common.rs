//! What the Wan video VAE ([`crate::autoencoder_kl_wan`]) and FLUX.1's image VAE ([`crate::autoencoder_kl`]) do
//! alike: a diffusers VAE `config.json`'s typed fields (errors name the file and the key), finding the
//! config and weights from the path a user gives, checking the dtype and the input tensors, the
//! convolution that runs in the weights' dtype with f32 activations, and the pipeline's `np` pixels.

use crate::nn::{conv2d_bounded, IM2COL_BUDGET};
use candle_core::{DType, Tensor};
use magcache_core::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The most repeated layers per VAE stage a config may claim.
pub const MAX_LAYERS: usize = 64;

/// A VAE config object with the file it came from: typed reads with defaults, errors naming the
/// file and the key.
pub struct ConfigReader<'a> {
    obj: &'a Map<String, Value>,
    file: &'a str,
}

impl<'a> ConfigReader<'a> {
    /// `json` as the config of a diffusers `class` (`kind` describes it in messages, e.g. "a Wan
    /// VAE"): it must be an object, and a `_class_name` it has must be `class`.
    pub fn new(json: &'a Value, file: &'a str, class: &str, kind: &str) -> Result<Self> {
        let obj = json.as_object().ok_or_else(|| {
            Error::config(
                file,
                "(document)",
                format!("expected a JSON object ({class} config)"),
            )
        })?;
        if let Some(c) = obj.get("_class_name").and_then(|v| v.as_str()) {
            if c != class {
                return Err(Error::config(
                    file,
                    "_class_name",
                    format!("`{c}` is not {kind} (expected {class})"),
                ));
            }
        }
        Ok(ConfigReader { obj, file })
    }

    /// The raw value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key)
    }

    /// An error naming the file and `key`.
    pub fn error(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(self.file, key, msg)
    }

    /// A non-negative integer; `default` when absent (null is an error).
    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                self.error(key, format!("expected a non-negative integer, got {v}"))
            }),
        }
    }

    /// A count of repeated layers (`num_res_blocks`, `layers_per_block`): at most `max`, so a config
    /// claiming 10^10 layers is refused at once, not sized one layer at a time.
    pub fn count(&self, key: &str, default: usize, max: usize) -> Result<usize> {
        let n = self.usize(key, default)?;
        if n > max {
            return Err(self.error(
                key,
                format!(
                    "{n} is more than any VAE has (at most {max} here; released VAEs have 1 to 3)"
                ),
            ));
        }
        Ok(n)
    }

    /// A boolean; `default` when absent or null.
    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.error(key, format!("expected true or false, got {v}"))),
        }
    }

    /// A number; `default` when absent or null.
    pub fn float(&self, key: &str, default: f64) -> Result<f64> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.error(key, format!("expected a number, got {v}"))),
        }
    }

    /// A list whose entries `f` reads; `None` when absent (null is an error: not a list).
    pub fn list<T>(&self, key: &str, f: impl Fn(&Value) -> Option<T>) -> Result<Option<Vec<T>>> {
        self.obj
            .get(key)
            .map(|v| self.entries(v, key, f))
            .transpose()
    }

    /// A list whose entries `f` reads; `None` when absent or null.
    pub fn nullable_list<T>(
        &self,
        key: &str,
        f: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => self.entries(v, key, f).map(Some),
        }
    }

    fn entries<T>(&self, v: &Value, key: &str, f: impl Fn(&Value) -> Option<T>) -> Result<Vec<T>> {
        let arr = v
            .as_array()
            .ok_or_else(|| self.error(key, format!("expected a list, got {v}")))?;
        arr.iter()
            .map(|x| f(x).ok_or_else(|| self.error(key, format!("invalid entry {x}"))))
            .collect()
    }
}

/// A list entry that is a positive integer (channel multipliers and widths).
pub fn positive(x: &Value) -> Option<usize> {
    x.as_u64().filter(|&n| n > 0).map(|n| n as usize)
}

/// Where a VAE's config and weights are.
pub struct VaeFiles {
    /// `config.json`, when there is one.
    pub config: Option<PathBuf>,
    /// A weights file or a folder of them.
    pub weights: PathBuf,
}

/// Resolves the path a user gives for a VAE: a weights file (with the `config.json` beside it, if
/// any), a `config.json` (with its folder's weights), a VAE folder holding `config.json`, or a
/// pipeline folder whose `vae/` holds it. `Ok(None)` for a folder with no `config.json` in it or
/// in its `vae/` (the caller has its own fallback or message); an error naming the path when it
/// is neither a file nor a folder.
pub fn locate(path: &Path) -> Result<Option<VaeFiles>> {
    if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        if path.file_name().and_then(|n| n.to_str()) == Some("config.json") {
            return Ok(Some(VaeFiles {
                config: Some(path.to_path_buf()),
                weights: dir,
            }));
        }
        let cfg = dir.join("config.json");
        return Ok(Some(VaeFiles {
            config: cfg.is_file().then_some(cfg),
            weights: path.to_path_buf(),
        }));
    }
    if !path.is_dir() {
        return Err(Error::weights(
            path.display().to_string(),
            "(file)",
            "no such file or folder",
        ));
    }
    for dir in [path.to_path_buf(), path.join("vae")] {
        let cfg = dir.join("config.json");
        if cfg.is_file() {
            return Ok(Some(VaeFiles {
                config: Some(cfg),
                weights: dir,
            }));
        }
    }
    Ok(None)
}

/// Refuses a dtype the VAEs do not run in (`what` names the VAE in the message).
pub fn check_dtype(dtype: DType, what: &str) -> Result<()> {
    if matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "{what}: dtype {dtype:?} is not supported (f32, f16 or bf16)"
        )))
    }
}

/// Checks that `x` has `rank` dimensions, `channels` at axis 1 and none empty. `what` names the
/// VAE and where it was loaded from, `name` the input and `layout` the expected shape.
pub fn check_input(
    x: &Tensor,
    rank: usize,
    channels: usize,
    what: &str,
    name: &str,
    layout: &str,
) -> Result<()> {
    let dims = x.dims();
    if dims.len() != rank || dims[1] != channels || dims.contains(&0) {
        return Err(Error::msg(format!(
            "{what}: {name} has shape {dims:?}; expected {layout} with {channels} channels"
        )));
    }
    Ok(())
}

/// A convolution weight as the convolution runs it: in the run's dtype, except bf16 on the CPU,
/// where candle's conv2d has no bf16 kernel; there the bf16-rounded weight runs in f32.
pub fn runnable_conv_weight(w: Tensor) -> Result<Tensor> {
    if w.dtype() == DType::BF16 && w.device().is_cpu() {
        Ok(w.to_dtype(DType::F32)?)
    } else {
        Ok(w)
    }
}

/// `conv2d(x, w) + b` of images `[N, C, H, W]`: `x` in `w`'s dtype through
/// [`crate::nn::conv2d_bounded`], the result in f32 with the f32 bias `[1, O, 1, 1]` added.
pub fn conv2d_f32(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize, stride: usize) -> Result<Tensor> {
    Ok(conv2d_f32_nobias(x, w, pad, stride)?.broadcast_add(b)?)
}

/// [`conv2d_f32`] without the bias (the Wan VAE sums one per time tap, then adds its bias once).
pub fn conv2d_f32_nobias(x: &Tensor, w: &Tensor, pad: usize, stride: usize) -> Result<Tensor> {
    let y = conv2d_bounded(&x.to_dtype(w.dtype())?, w, pad, stride, IM2COL_BUDGET)?;
    Ok(y.to_dtype(DType::F32)?)
}

/// The pipeline's `output_type="np"` from decoder output `[B, C, ...]` in [-1, 1]:
/// `clamp(x * 0.5 + 0.5, 0, 1)` with the channel axis moved last (`[B, ..., C]`).
pub fn to_pixels_channels_last(decoded: &Tensor) -> Result<Tensor> {
    let rank = decoded.rank();
    if rank < 2 {
        return Err(Error::msg(format!(
            "decoded output has shape {:?}; expected [B, C, ...]",
            decoded.dims()
        )));
    }
    let order: Vec<usize> = std::iter::once(0).chain(2..rank).chain([1]).collect();
    Ok(((decoded * 0.5)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute(order)?
        .contiguous()?)
}

/// A VAE's residual block, `conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)`, over the
/// VAE's own norm `N` and convolution `C` (Wan's RMS norm and causal 3-D convolution, FLUX's group
/// norm and 2-D convolution).
pub struct ResBlock<N, C> {
    pub norm1: N,
    pub conv1: C,
    pub norm2: N,
    pub conv2: C,
    pub shortcut: Option<C>,
}

impl<N, C> ResBlock<N, C> {
    /// Runs the block with the VAE's `norm` and `conv`. The convolutions run in the order shortcut,
    /// conv1, conv2: a causal convolution's feature cache counts its convolutions in that order.
    pub fn apply(
        &self,
        x: &Tensor,
        norm: impl Fn(&N, &Tensor) -> Result<Tensor>,
        mut conv: impl FnMut(&C, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let h = match &self.shortcut {
            Some(s) => conv(s, x)?,
            None => x.clone(),
        };
        let y = conv(&self.conv1, &norm(&self.norm1, x)?.silu()?)?;
        let y = conv(&self.conv2, &norm(&self.norm2, &y)?.silu()?)?;
        Ok((y + h)?)
    }
}
