//! What a Wan run will hold in memory, from its configs and file headers only (nothing is built).

use super::config::WanConfig;
use super::load;
use super::presets::{find_preset, WanPreset};
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::guard::Footprint;
use magcache_core::Result;
use magcache_layers::config_util::{overrides_json, resolve, to_map};
use magcache_layers::footprint::{
    add_plan, attention_bytes, safetensors_shapes, sz, weights_bytes, weights_knob, Sz,
    CACHE_FACTOR, FFN_FACTOR, HIDDEN_FACTOR, LATENT_FACTOR,
};
use std::path::Path;

/// Parameters of a Wan transformer (checked arithmetic).
pub fn wan_params(c: &WanConfig) -> Sz {
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

/// A prompted run's latent shape (from `inputs.height/width/num_frames` through the pipeline
/// VAE's factors; the defaults as the pipeline's), its text length (`prompt.max_sequence_length`)
/// and what its VAE decode holds (with `[vae] tiling` as the run sets it); `None` for other runs or
/// when the VAE config cannot be read (the loader reports it).
fn prompted_sizes(
    cfg: &RunConfig,
    base: &Path,
    latent_ch: usize,
) -> Option<(
    Vec<usize>,
    usize,
    magcache_layers::autoencoder_kl_wan::DecodeBytes,
    bool,
)> {
    let p = cfg.prompt.as_ref()?;
    let w = cfg.model.weights.as_ref()?.paths().first().copied()?;
    let vae = magcache_layers::autoencoder_kl_wan::WanVaeConfig::read(
        &resolve(base, w).join("vae").join("config.json"),
    )
    .ok()?;
    let (ss, ts) = (vae.spatial_scale().max(1), vae.temporal_scale().max(1));
    let height = cfg.inputs.height.unwrap_or(super::keys::DEFAULT_HEIGHT);
    let width = cfg.inputs.width.unwrap_or(super::keys::DEFAULT_WIDTH);
    let keys = super::keys::WanKeys::read(cfg, "").ok()?;
    let frames = keys
        .inputs
        .num_frames
        .unwrap_or(super::keys::DEFAULT_FRAMES);
    let tiling = keys.vae.tiling("", ss).ok().flatten();
    let lat_frames = frames.saturating_sub(1) / ts + 1;
    // The VAE runs in the run's dtype, but f32 where it is bf16 on the CPU (no bf16 conv2d there).
    let dtype = cfg.model.dtype.as_str();
    let wb = if dtype == "bf16" && !cfg.model.device.starts_with("cuda") {
        4
    } else {
        magcache_layers::footprint::dtype_bytes(dtype)
    };
    // The CPU runs an f32 VAE's convolutions as the row convolution (`nn::conv2d_bounded`; not on
    // a GPU, Metal included).
    let on_cpu = magcache_core::runtime::placement::parse_device(&cfg.model.device, "")
        .is_ok_and(|d| d == magcache_core::runtime::placement::DeviceSpec::Cpu);
    let row_conv = wb == 4 && on_cpu;
    let decode = vae.decode_bytes_tiled(lat_frames, height / ss, width / ss, wb, tiling, row_conv);
    let len = p
        .max_sequence_length
        .unwrap_or(super::prompted::DEFAULT_MAX_SEQUENCE_LENGTH);
    Some((
        vec![1, latent_ch, lat_frames, height / ss, width / ss],
        len,
        decode,
        tiling.is_some(),
    ))
}

/// The footprint of a Wan run over `paths` (weights of each expert; empty: the preset): the
/// denoising (the transformers, their activations and cache), and for a prompted run the VAE decode
/// that follows it (the runner frees the transformers first: `Pipeline::release_models`).
pub fn wan_footprint(
    cfg: &RunConfig,
    file: &str,
    base: &Path,
    paths: &[String],
    presets: &'static [WanPreset],
    family: &str,
) -> Result<(Footprint, Option<Footprint>)> {
    let overrides = overrides_json(cfg);
    let dtype = cfg.model.dtype.as_str();
    let streamed = magcache_core::runtime::placement::parse_offload(&cfg.model.offload, file)?
        == magcache_core::Offload::Stream;
    let mut fp = Footprint::default();
    // The architecture of each expert and its weights.
    let mut configs = Vec::new();
    if paths.is_empty() {
        let name = magcache_layers::config_util::preset_name(cfg, file)?;
        let preset = find_preset(cfg, file, presets, name)?;
        let base_cfg = to_map(&(preset.config)(), "WanTransformer3DModel")?;
        let c = WanConfig::from_map(base_cfg.clone(), file, &overrides)?;
        let n = preset.experts.max(1);
        fp.add(
            "weights",
            weights_knob(&base_cfg, &overrides),
            (weights_bytes(wan_params(&c), dtype) * sz(n)).0,
        );
        configs.extend(std::iter::repeat_n(c, n));
    } else {
        let mut total = sz(0);
        let mut repacked = 0u64;
        for w in paths {
            let path = resolve(base, w);
            let explicit = cfg.model.config.as_deref().map(|c| resolve(base, c));
            let c = load::read_wan_config(&path, explicit.as_deref(), &overrides, file)?;
            // Streamed: the embeddings and head, and two blocks (the one running, the next).
            let resident = if streamed {
                wan_params(&WanConfig {
                    num_layers: c.num_layers.min(2),
                    ..c.clone()
                })
            } else {
                wan_params(&c)
            };
            total = total
                + match magcache_layers::footprint::gguf_held_bytes(
                    &path,
                    streamed,
                    cfg.model.gguf_repack,
                ) {
                    // GGUF: quantized linear weights stay quantized (about the file's size).
                    Some(g) => {
                        repacked = repacked.saturating_add(g.repacked);
                        Sz(Some(g.file))
                    }
                    None => weights_bytes(resident, dtype),
                };
            configs.push(c);
        }
        if streamed {
            fp.add_streamed(
                "streamed weights (embeddings, head, two blocks)",
                "model.weights",
                total.0,
            );
        } else {
            fp.add("weights", "model.weights", total.0);
            magcache_layers::footprint::add_gguf_repacked(&mut fp, repacked);
        }
    }
    let Some(c) = configs.first() else {
        return Ok((fp, None));
    };
    let experts = configs.len();
    let extra = c.in_channels.saturating_sub(c.out_channels);
    let latent_ch = c.in_channels.saturating_sub(extra);
    let guidance = cfg.sampling.guidance_scale.unwrap_or(5.0);
    // Latents and text length: from the inputs file's header, else the config (or the defaults).
    let prompted = prompted_sizes(cfg, base, latent_ch);
    let (lat, text_len, lat_knob, text_knob) = match &cfg.inputs.file {
        // A prompted run: the latents from height/width/num_frames through the VAE's factors,
        // the text from max_sequence_length (an inputs file holds `latents_init` only).
        _ if cfg.prompt.is_some() => {
            let lat = match &cfg.inputs.file {
                Some(f) => safetensors_shapes(&resolve(base, f))
                    .and_then(|s| s.get("latents_init").cloned()),
                None => prompted.as_ref().map(|p| p.0.clone()),
            };
            let knob = if cfg.inputs.file.is_some() {
                "inputs.file"
            } else {
                "inputs.height/width/num_frames"
            };
            (
                lat,
                prompted.as_ref().map(|p| p.1),
                knob,
                "prompt.max_sequence_length",
            )
        }
        Some(f) => {
            let shapes = safetensors_shapes(&resolve(base, f));
            let lat = shapes.as_ref().and_then(|s| s.get("latents_init").cloned());
            let l = shapes.as_ref().and_then(|s| {
                ["cond", "uncond"]
                    .iter()
                    .filter_map(|n| s.get(*n).and_then(|d| d.get(1).copied()))
                    .max()
            });
            (lat, l, "inputs.file", "inputs.file")
        }
        None => (
            Some(
                cfg.inputs
                    .latent_shape
                    .clone()
                    .unwrap_or_else(|| vec![1, latent_ch, 3, 24, 40]),
            ),
            Some(cfg.inputs.text_len.unwrap_or(64)),
            "inputs.latent_shape",
            "inputs.text_len",
        ),
    };
    let branches = if guidance > 1.0 { 2 } else { 1 };
    add_plan(&mut fp, cfg.sampling.steps, branches);
    let Some(&[b, _, f, h, w]) = lat.as_deref() else {
        // A shape the model cannot take: the inputs' own check reports it.
        return Ok((fp, None));
    };
    let [pt, ph, pw] = c.patch_size;
    let s = (f / pt.max(1))
        .saturating_mul(h / ph.max(1))
        .saturating_mul(w / pw.max(1));
    let tokens = sz(b) * sz(s);
    let d = sz(c.inner_dim());
    let heads = c.num_attention_heads;
    let f32b = sz(4);
    let latent_elems = sz(b) * sz(c.in_channels) * sz(f) * sz(h) * sz(w);
    let per_token_t = family == "wan2.2" && experts == 1;
    let tproj = if per_token_t {
        tokens * d * sz(7) * f32b
    } else {
        sz(b) * d * sz(7) * f32b
    };
    let activations = tokens * (sz(HIDDEN_FACTOR) * d + sz(FFN_FACTOR) * sz(c.ffn_dim)) * f32b
        + attention_bytes(&cfg.model.device, b, heads, s, s)
        + sz(s) * sz(c.attention_head_dim) * f32b
        + tproj
        + latent_elems * sz(LATENT_FACTOR) * f32b;
    fp.add("activations", lat_knob, activations.0);
    let cache = sz(experts * branches) * sz(CACHE_FACTOR) * tokens * d * f32b;
    fp.add("cache", lat_knob, cache.0);
    magcache_layers::footprint::add_lora(&mut fp, cfg, base, d * sz(c.ffn_dim.max(c.inner_dim())));
    if let Some(l) = text_len {
        let text = sz(branches) * sz(b) * sz(l) * (sz(c.text_dim) + d * sz(3)) * f32b
            + attention_bytes(&cfg.model.device, b, heads, s, l);
        fp.add("text embeddings", text_knob, text.0);
    }
    let decode = prompted.as_ref().map(|(_, _, dec, tiled)| {
        let mut fp = Footprint::default();
        // The VAE decode (after the transformers are freed): its weights, its feature cache (two
        // frames per causal convolution: grows with height x width, or a tile's with tiling, not
        // with the frames), one frame's (tile's) working set, and the decoded video (grows with
        // the frames).
        fp.add("VAE weights", "model.dtype", dec.weights.0);
        let (knob, advice, of) = if *tiled {
            (
                "vae.tile_sample_min_height/width",
                "make vae.tile_sample_min_height/width smaller (or inputs.height/width)",
                "one tile",
            )
        } else {
            (
                "vae.tiling",
                "set `tiling = true` in [vae] (the decode then holds one 256x256 tile's cache, not the frame's) or make inputs.height/width smaller",
                "one frame",
            )
        };
        fp.add(
            format!("VAE decode feature cache (two frames per causal conv of {of}, f32)"),
            knob,
            dec.cache.0,
        );
        fp.advise(advice);
        fp.add(
            format!("VAE decode working set ({of}, f32)"),
            knob,
            dec.working.0,
        );
        fp.advise(advice);
        if *tiled {
            fp.add(
                "VAE decode tiles (two rows of tiles for blending, f32)",
                "vae.tile_sample_min_height/width",
                dec.tiles.0,
            );
            fp.advise(advice);
        }
        if *tiled {
            fp.add(
                "decoded video (f32, the rows joined so far)",
                "inputs.num_frames",
                dec.video.0,
            );
            // The rows' join (two copies of the video) comes after the tiles are freed: counted
            // where it is more than the tile stage.
            let stage = dec.decoding();
            let more = dec
                .join
                .0
                .zip(stage.0)
                .map(|(j, s)| j.saturating_sub(s));
            if more != Some(0) {
                fp.add(
                    "decoded video's join (f32, 2 copies, after the tiles are freed)",
                    "inputs.num_frames",
                    more,
                );
            }
        } else {
            fp.add(
                "decoded video (f32, 2 copies)",
                "inputs.num_frames",
                dec.video.0,
            );
        }
        // The final latents, held while decoding.
        fp.add(
            "final latents (f32)",
            "inputs.height/width/num_frames",
            (latent_elems * f32b).0,
        );
        fp
    });
    Ok((fp, decode))
}
