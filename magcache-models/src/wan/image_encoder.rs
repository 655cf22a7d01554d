//! Wan2.1 I2V's image side: the folder's `image_processor/` (transformers' `CLIPImageProcessor`) and
//! `image_encoder/` (`CLIPVisionModel`, saved as `CLIPVisionModelWithProjection`), giving the
//! `hidden_states[-2]` that `WanImageToVideoPipeline.encode_image` hands the transformer.
//!
//! The encoder is written here rather than taken from candle-transformers: its CLIP vision model
//! only has quick-GELU (laion's CLIP-ViT-H-14, the released image encoder, uses the exact erf GELU)
//! and fixes the layer-norm eps; here `hidden_act` and `layer_norm_eps` come from the config and
//! only the `L - 1` layers that `hidden_states[-2]` needs run (the last layer, `post_layernorm`
//! and `visual_projection` are never used by the pipeline).

use candle_core::{DType, Device, Tensor};
use magcache_core::{Error, Placement, Result};
use magcache_layers::config_util::{positive_json, read_json};
use magcache_layers::nn::{attention, linear, merge_heads, split_heads, LayerNorm, Linear};
use magcache_layers::picture::{resize, Filter, Rgb8};
use magcache_layers::weights::WeightStore;
use serde_json::Value;
use std::path::Path;

/// `CLIPImageProcessor` as `preprocessor_config.json` configures it.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipImageProcessor {
    /// Resize so the shorter side is this (`size.shortest_edge`); `None`: no resize.
    pub shortest_edge: Option<usize>,
    pub filter: Filter,
    /// Centre crop (height, width); `None`: no crop.
    pub crop: Option<(usize, usize)>,
    pub rescale: Option<f64>,
    pub mean_std: Option<([f64; 3], [f64; 3])>,
}

impl ClipImageProcessor {
    /// Reads `image_processor/preprocessor_config.json`; errors name the file and the key.
    pub fn read(path: &Path) -> Result<Self> {
        let (v, file) = read_json(path)?;
        let bad = |k: &str, m: String| Error::config(&file, k, m);
        let flag = |k: &str| -> Result<bool> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(true),
                Some(Value::Bool(b)) => Ok(*b),
                Some(o) => Err(bad(k, format!("expected true or false, got {o}"))),
            }
        };
        let int = |x: Option<&Value>, k: &str| -> Result<usize> {
            x.and_then(|x| x.as_u64())
                .map(|n| n as usize)
                .filter(|&n| n > 0)
                .ok_or_else(|| bad(k, "expected a positive integer".into()))
        };
        if let Some(c) = v.get("image_processor_type").and_then(|c| c.as_str()) {
            if !c.starts_with("CLIPImageProcessor") {
                return Err(bad(
                    "image_processor_type",
                    format!("`{c}` is not supported (CLIPImageProcessor)"),
                ));
            }
        }
        let shortest_edge = if flag("do_resize")? {
            let size = v.get("size");
            match size.and_then(|s| s.get("shortest_edge")) {
                Some(e) => Some(int(Some(e), "size.shortest_edge")?),
                None => match size {
                    Some(Value::Number(n)) => Some(int(Some(&Value::Number(n.clone())), "size")?),
                    _ => {
                        return Err(bad(
                            "size",
                            "only `{\"shortest_edge\": N}` resizing is supported (the Wan pipelines' CLIP processor)".into(),
                        ))
                    }
                },
            }
        } else {
            None
        };
        let filter = match v.get("resample") {
            None | Some(Value::Null) => Filter::Bicubic,
            Some(r) => r.as_u64().and_then(Filter::from_pil_code).ok_or_else(|| {
                bad(
                    "resample",
                    format!("{r}: only PIL's BICUBIC (3) and LANCZOS (1) are supported"),
                )
            })?,
        };
        let crop = if flag("do_center_crop")? {
            let c = v.get("crop_size");
            let (h, w) = match c {
                Some(Value::Number(_)) => {
                    let n = int(c, "crop_size")?;
                    (n, n)
                }
                Some(o) => (
                    int(o.get("height"), "crop_size.height")?,
                    int(o.get("width"), "crop_size.width")?,
                ),
                None => return Err(bad("crop_size", "missing (do_center_crop is on)".into())),
            };
            Some((h, w))
        } else {
            None
        };
        let rescale = if flag("do_rescale")? {
            Some(match v.get("rescale_factor") {
                None | Some(Value::Null) => 1.0 / 255.0,
                Some(x) => x
                    .as_f64()
                    .ok_or_else(|| bad("rescale_factor", format!("expected a number, got {x}")))?,
            })
        } else {
            None
        };
        let mean_std = if flag("do_normalize")? {
            Some(mean_std(&v, &file)?)
        } else {
            None
        };
        Ok(ClipImageProcessor {
            shortest_edge,
            filter,
            crop,
            rescale,
            mean_std,
        })
    }

    /// The picture as `pixel_values` `[1, 3, h, w]` f32: resized so its shorter side is
    /// `shortest_edge` (the longer one `int(edge * long / short)`), centre-cropped (top
    /// `int((h - crop_h) / 2)`), `x * rescale_factor`, then `(x - mean) / std` per channel.
    pub fn pixel_values(&self, img: &Rgb8, dev: &Device, file: &str) -> Result<Tensor> {
        let mut img = img.clone();
        if let Some(edge) = self.shortest_edge {
            let (w, h) = (img.width, img.height);
            let (nw, nh) = if w <= h {
                (edge, (edge as f64 * h as f64 / w as f64) as usize)
            } else {
                ((edge as f64 * w as f64 / h as f64) as usize, edge)
            };
            // A very narrow picture resizes to a very long one before the crop (1 x 32768 to
            // 224 x 7340032, 4.9 GB): refused at the pictures' own limit on pixels.
            if nw.saturating_mul(nh) as u64 > magcache_layers::picture::MAX_PICTURE_PIXELS {
                return Err(Error::msg(format!(
                    "inputs.image: the {w}x{h} picture would be resized to {nw}x{nh} for the image encoder (shortest_edge {edge} in {file}), more than 8192 x 8192 pixels: crop it nearer to square"
                )));
            }
            img = resize(&img, nw, nh, self.filter)?;
        }
        if let Some((ch, cw)) = self.crop {
            if img.height < ch || img.width < cw {
                return Err(Error::config(
                    file,
                    "crop_size",
                    format!(
                        "{ch}x{cw} is larger than the resized picture ({}x{})",
                        img.height, img.width
                    ),
                ));
            }
            let top = (img.height - ch) / 2;
            let left = (img.width - cw) / 2;
            img = img.crop(left, top, cw, ch)?;
        }
        let (h, w) = (img.height, img.width);
        let mut v = vec![0f32; 3 * h * w];
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut x = f64::from(px[c]);
                if let Some(r) = self.rescale {
                    x = (x as f32 * r as f32) as f64;
                }
                if let Some((mean, std)) = &self.mean_std {
                    x = (x - mean[c]) / std[c];
                }
                v[c * h * w + i] = x as f32;
            }
        }
        Ok(Tensor::from_vec(v, (1, 3, h, w), dev)?)
    }
}

/// `CLIPVisionConfig` (`image_encoder/config.json`; a full `CLIPConfig`'s `vision_config` too).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    /// `gelu` (exact) or `quick_gelu`.
    pub hidden_act: String,
}

impl ClipVisionConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let (v, file) = read_json(path)?;
        let v = v.get("vision_config").cloned().unwrap_or(v);
        let int = |k: &str, default: usize| {
            positive_json(&v, &file, k, Some(default), "the CLIP vision config")
        };
        let c = ClipVisionConfig {
            hidden_size: int("hidden_size", 768)?,
            intermediate_size: int("intermediate_size", 3072)?,
            num_hidden_layers: int("num_hidden_layers", 12)?,
            num_attention_heads: int("num_attention_heads", 12)?,
            num_channels: int("num_channels", 3)?,
            image_size: int("image_size", 224)?,
            patch_size: int("patch_size", 32)?,
            layer_norm_eps: v
                .get("layer_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-5),
            hidden_act: v
                .get("hidden_act")
                .and_then(|x| x.as_str())
                .unwrap_or("quick_gelu")
                .to_string(),
        };
        if !matches!(c.hidden_act.as_str(), "gelu" | "quick_gelu") {
            return Err(Error::config(
                &file,
                "hidden_act",
                format!("`{}` is not supported (gelu or quick_gelu)", c.hidden_act),
            ));
        }
        if c.num_channels != 3 {
            return Err(Error::config(&file, "num_channels", "must be 3 (RGB)"));
        }
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(Error::config(
                &file,
                "num_attention_heads",
                format!("does not divide hidden_size {}", c.hidden_size),
            ));
        }
        if !c.image_size.is_multiple_of(c.patch_size) {
            return Err(Error::config(
                &file,
                "patch_size",
                format!("does not divide image_size {}", c.image_size),
            ));
        }
        Ok(c)
    }

    /// Tokens of one image: the patches and the class token.
    pub fn tokens(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }

    /// Parameters of the layers `hidden_states[-2]` runs (all but the last), the embeddings and
    /// `pre_layrnorm`.
    pub fn params_used(&self) -> u64 {
        let d = self.hidden_size as u64;
        let m = self.intermediate_size as u64;
        let p = self.patch_size as u64;
        let layer = 4 * (d * d + d) + (m * d + m) + (d * m + d) + 4 * d;
        let layers = self.num_hidden_layers.saturating_sub(1) as u64;
        layers * layer + d * 3 * p * p + d + self.tokens() as u64 * d + 2 * d
    }
}

struct Layer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// The CLIP vision tower up to `hidden_states[-2]`.
pub struct ClipVisionEncoder {
    pub config: ClipVisionConfig,
    patch: Linear,
    class: Tensor,
    position: Tensor,
    pre_ln: LayerNorm,
    layers: Vec<Layer>,
    pub origin: String,
}

impl ClipVisionEncoder {
    /// Loads `image_encoder/` (config.json + safetensors, single or sharded): tensors below
    /// `vision_model.`; `visual_projection`, the last layer and `post_layernorm` are not read.
    pub fn load(dir: &Path, placement: &Placement) -> Result<Self> {
        let config = ClipVisionConfig::read(&dir.join("config.json"))?;
        let mut store = WeightStore::load_checkpoint(dir)?;
        store.set_placement(placement.clone());
        let dev = &placement.device;
        let c = &config;
        let d = c.hidden_size;
        let p = "vision_model";
        let ln = |n: &str| -> Result<LayerNorm> {
            LayerNorm::new(
                d,
                c.layer_norm_eps,
                Some((
                    store.get_shape(&format!("{n}.weight"), &[d])?,
                    store.get_shape(&format!("{n}.bias"), &[d])?,
                )),
                dev,
            )
        };
        let ps = c.patch_size;
        let pw = store
            .get_weight(
                &format!("{p}.embeddings.patch_embedding.weight"),
                &[d, 3, ps, ps],
            )?
            .reshape((d, 3 * ps * ps))?;
        let keep = c.num_hidden_layers.saturating_sub(1);
        let layers = (0..keep)
            .map(|i| {
                let l = format!("{p}.encoder.layers.{i}");
                Ok(Layer {
                    ln1: ln(&format!("{l}.layer_norm1"))?,
                    q: linear(&store, &format!("{l}.self_attn.q_proj"), d, d)?,
                    k: linear(&store, &format!("{l}.self_attn.k_proj"), d, d)?,
                    v: linear(&store, &format!("{l}.self_attn.v_proj"), d, d)?,
                    o: linear(&store, &format!("{l}.self_attn.out_proj"), d, d)?,
                    ln2: ln(&format!("{l}.layer_norm2"))?,
                    fc1: linear(&store, &format!("{l}.mlp.fc1"), c.intermediate_size, d)?,
                    fc2: linear(&store, &format!("{l}.mlp.fc2"), d, c.intermediate_size)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipVisionEncoder {
            patch: Linear::new(pw, None)?,
            class: store
                .get_shape(&format!("{p}.embeddings.class_embedding"), &[d])?
                .reshape((1, 1, d))?,
            position: store
                .get_shape(
                    &format!("{p}.embeddings.position_embedding.weight"),
                    &[c.tokens(), d],
                )?
                .unsqueeze(0)?,
            pre_ln: ln(&format!("{p}.pre_layrnorm"))?,
            layers,
            origin: store.origin.clone(),
            config,
        })
    }

    fn act(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.config.hidden_act.as_str() {
            "quick_gelu" => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            _ => x.gelu_erf()?,
        })
    }

    /// `hidden_states[-2]` of `pixel_values [B, 3, S, S]` (S = `image_size`): `[B, tokens, hidden]`.
    pub fn hidden_states_penultimate(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, ch, h, w) = pixel_values.dims4()?;
        if ch != 3 || h != c.image_size || w != c.image_size {
            return Err(Error::msg(format!(
                "{}: pixel_values have shape {:?}; the encoder takes [B, 3, {s}, {s}] (image_size); the image processor's crop_size must equal it",
                self.origin,
                pixel_values.dims(),
                s = c.image_size
            )));
        }
        let (p, g, d) = (c.patch_size, c.image_size / c.patch_size, c.hidden_size);
        let x = pixel_values
            .to_dtype(DType::F32)?
            .reshape(vec![b, 3, g, p, g, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((b, g * g, 3 * p * p))?;
        let patches = self.patch.forward(&x)?;
        let class = self.class.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position)?;
        let mut x = self.pre_ln.forward(&x)?;
        let heads = c.num_attention_heads;
        for l in &self.layers {
            // A cancelled job (a served request) stops within one layer.
            magcache_core::cancel::check()?;
            let y = l.ln1.forward(&x)?;
            let q = split_heads(&l.q.forward(&y)?, heads)?;
            let k = split_heads(&l.k.forward(&y)?, heads)?;
            let v = split_heads(&l.v.forward(&y)?, heads)?;
            let a = l.o.forward(&merge_heads(&attention(&q, &k, &v)?)?)?;
            x = (x + a)?;
            let y = l
                .fc2
                .forward(&self.act(&l.fc1.forward(&l.ln2.forward(&x)?)?)?)?;
            x = (x + y)?;
        }
        Ok(x)
    }
}

/// `image_mean` and `image_std` of a CLIP processor config (CLIP's defaults when absent).
fn mean_std(v: &Value, file: &str) -> Result<([f64; 3], [f64; 3])> {
    let bad = |k: &str, m: String| Error::config(file, k, m);
    let triple = |k: &str, default: [f64; 3]| -> Result<[f64; 3]> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Array(a)) if a.len() == 3 => {
                let mut out = [0.0; 3];
                for (o, x) in out.iter_mut().zip(a) {
                    *o = x
                        .as_f64()
                        .ok_or_else(|| bad(k, format!("expected numbers, got {x}")))?;
                }
                Ok(out)
            }
            Some(o) => Err(bad(
                k,
                format!("expected 3 numbers (one per channel), got {o}"),
            )),
        }
    };
    let std = triple("image_std", [0.26862954, 0.26130258, 0.27577711])?;
    if std.contains(&0.0) {
        return Err(bad("image_std", "must not be 0".into()));
    }
    Ok((
        triple("image_mean", [0.48145466, 0.4578275, 0.40821073])?,
        std,
    ))
}
