//! `WanTransformer3DModel` configuration, read from diffusers' `config.json` or the original Wan
//! `config.json` (`dim`, `num_heads`, `in_dim`, ...), with `[model.overrides]` applied on top.

use magcache_core::{Error, Result};
use magcache_layers::footprint::{sz, Sz};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WanConfig {
    pub patch_size: [usize; 3],
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub text_dim: usize,
    pub freq_dim: usize,
    pub ffn_dim: usize,
    pub num_layers: usize,
    pub cross_attn_norm: bool,
    pub qk_norm: Option<String>,
    pub eps: f64,
    pub image_dim: Option<usize>,
    pub added_kv_proj_dim: Option<usize>,
    pub rope_max_seq_len: usize,
    pub pos_embed_seq_len: Option<usize>,
}

impl Default for WanConfig {
    /// diffusers' defaults (the 14B architecture).
    fn default() -> Self {
        WanConfig {
            patch_size: [1, 2, 2],
            num_attention_heads: 40,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: 16,
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 13824,
            num_layers: 40,
            cross_attn_norm: true,
            qk_norm: Some("rms_norm_across_heads".into()),
            eps: 1e-6,
            image_dim: None,
            added_kv_proj_dim: None,
            rope_max_seq_len: 1024,
            pos_embed_seq_len: None,
        }
    }
}

impl WanConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads
            .saturating_mul(self.attention_head_dim)
    }

    /// The config the latents themselves fit: an image-conditioned expert (Wan2.2 I2V, 36 input
    /// channels) takes the latents (`out_channels`) plus `in - out` condition channels.
    pub fn latents_config(&self) -> WanConfig {
        WanConfig {
            in_channels: self.in_channels.min(self.out_channels),
            ..self.clone()
        }
    }

    /// Why a latent shape does not fit this model (`[B, in_channels, F, H, W]` with F, H, W multiples
    /// of the patch size), or `None` if it fits.
    pub fn latent_shape_error(&self, dims: &[usize]) -> Option<String> {
        let fits = dims.len() == 5
            && dims[0] > 0
            && dims[1] == self.in_channels
            && dims[2..]
                .iter()
                .zip(self.patch_size)
                .all(|(&d, p)| d > 0 && d.is_multiple_of(p));
        (!fits).then(|| {
            format!(
                "shape {dims:?} does not fit the model: expected [B, {}, F, H, W] with F, H, W positive multiples of the patch size {:?}",
                self.in_channels, self.patch_size
            )
        })
    }

    /// Parses a config.json (diffusers or original Wan keys). Keys starting with `_` are metadata.
    pub fn from_json(v: &Value, file: &str) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::config(file, "(document)", "config.json is not a JSON object"))?;
        let obj = if obj.contains_key("dim") || obj.contains_key("num_heads") {
            original_to_diffusers(obj, file)?
        } else {
            obj.clone()
        };
        Self::from_map(obj, file, &Map::new())
    }

    /// Starts from `base` values, applies `obj` then `overrides` (both diffusers keys); unknown keys in
    /// overrides are errors, unknown keys in the config file are ignored only if they start with `_`
    /// or are known to be irrelevant.
    pub fn from_map(
        obj: Map<String, Value>,
        file: &str,
        overrides: &Map<String, Value>,
    ) -> Result<Self> {
        let cfg = magcache_layers::config_util::merge_config(
            &WanConfig::default(),
            &obj,
            overrides,
            file,
            "WanTransformer3DModel",
        )?;
        cfg.check(file)?;
        Ok(cfg)
    }

    pub fn check(&self, file: &str) -> Result<()> {
        let pos = [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("text_dim", self.text_dim),
            ("freq_dim", self.freq_dim),
            ("ffn_dim", self.ffn_dim),
            ("num_layers", self.num_layers),
            ("rope_max_seq_len", self.rope_max_seq_len),
        ];
        for (k, v) in pos {
            if v == 0 {
                return Err(Error::config(file, k, "must be at least 1"));
            }
        }
        if self.patch_size.contains(&0) {
            return Err(Error::config(
                file,
                "patch_size",
                "every patch dimension must be at least 1",
            ));
        }
        if !self.attention_head_dim.is_multiple_of(2) {
            return Err(Error::config(
                file,
                "attention_head_dim",
                "must be even (rotary embedding pairs)",
            ));
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm_across_heads") => {}
            Some(o) => {
                return Err(Error::config(
                    file,
                    "qk_norm",
                    format!("`{o}` is not supported (only rms_norm_across_heads or null)"),
                ))
            }
        }
        // Wan2.1 I2V: CLIP image tokens through `image_embedder` (image_dim -> inner) into every
        // block's added K/V projections (added_kv_proj_dim = inner); one without the other is no
        // released model.
        match (self.image_dim, self.added_kv_proj_dim) {
            (None, None) => {}
            (Some(i), Some(a)) => {
                if i == 0 {
                    return Err(Error::config(file, "image_dim", "must be at least 1"));
                }
                if a != self.inner_dim() {
                    return Err(Error::config(
                        file,
                        "added_kv_proj_dim",
                        format!(
                            "{a}: the image embedder gives inner_dim = {} wide tokens to the added K/V projections",
                            self.inner_dim()
                        ),
                    ));
                }
            }
            (None, Some(_)) => return Err(Error::config(
                file,
                "image_dim",
                "missing: `added_kv_proj_dim` (image attention) needs the CLIP width `image_dim`",
            )),
            (Some(_), None) => {
                return Err(Error::config(
                    file,
                    "added_kv_proj_dim",
                    "missing: `image_dim` (Wan2.1 I2V) needs the added K/V projections' width",
                ))
            }
        }
        if self.pos_embed_seq_len.is_some() {
            return Err(Error::config(
                file,
                "pos_embed_seq_len",
                "learned image position embeddings (Wan2.1 FLF2V, first and last frame) are not supported; set it to null",
            ));
        }
        Ok(())
    }
}

/// Maps the original Wan config (`WanModel`) to diffusers field names.
fn original_to_diffusers(o: &Map<String, Value>, file: &str) -> Result<Map<String, Value>> {
    let get = |k: &str| o.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
    let dim = get("dim")
        .ok_or_else(|| Error::config(file, "dim", "missing in the original Wan config"))?;
    let heads = get("num_heads")
        .ok_or_else(|| Error::config(file, "num_heads", "missing in the original Wan config"))?;
    if heads == 0 || dim % heads != 0 {
        return Err(Error::config(
            file,
            "num_heads",
            format!("{heads} heads do not divide dim {dim}"),
        ));
    }
    let mut m = Map::new();
    m.insert("num_attention_heads".into(), heads.into());
    m.insert("attention_head_dim".into(), (dim / heads).into());
    for (from, to) in [
        ("in_dim", "in_channels"),
        ("out_dim", "out_channels"),
        ("ffn_dim", "ffn_dim"),
        ("freq_dim", "freq_dim"),
        ("num_layers", "num_layers"),
        ("text_dim", "text_dim"),
    ] {
        if let Some(v) = o.get(from) {
            m.insert(to.into(), v.clone());
        }
    }
    if let Some(v) = o.get("eps") {
        m.insert("eps".into(), v.clone());
    }
    if let Some(v) = o.get("patch_size") {
        m.insert("patch_size".into(), v.clone());
    }
    Ok(m)
}

impl WanConfig {
    /// Parameters of a Wan transformer (checked arithmetic).
    pub fn params(&self) -> Sz {
        let c = self;
        let d = sz(c.inner_dim());
        let [pt, ph, pw] = c.patch_size;
        let patch = sz(pt) * sz(ph) * sz(pw);
        let lin = |o: Sz, i: Sz| o * i + o;
        let attn = lin(d, d) * sz(4)
            + if c.qk_norm.is_some() {
                d * sz(2)
            } else {
                sz(0)
            };
        let norm2 = if c.cross_attn_norm { d * sz(2) } else { sz(0) };
        let ffn = sz(c.ffn_dim);
        // Image attention (Wan2.1 I2V): every attn2's added K/V (and norm_added_k), and the image
        // embedder (two affine norms, two linears).
        let (added, image) = match (c.added_kv_proj_dim, c.image_dim) {
            (Some(a), Some(i)) => (
                lin(d, sz(a)) * sz(2) + d,
                lin(sz(i), sz(i)) + lin(d, sz(i)) + sz(i) * sz(2) + d * sz(2),
            ),
            _ => (sz(0), sz(0)),
        };
        let block = attn * sz(2) + added + norm2 + lin(ffn, d) + lin(d, ffn) + d * sz(6);
        let top = lin(d, sz(c.in_channels) * patch)
            + lin(d, sz(c.freq_dim))
            + lin(d, d)
            + lin(d * sz(6), d)
            + lin(d, sz(c.text_dim))
            + lin(d, d)
            + lin(sz(c.out_channels) * patch, d)
            + d * sz(2)
            + image;
        sz(c.num_layers) * block + top
    }
}
