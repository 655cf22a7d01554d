//! What a FLUX run will hold in memory, from its config and file headers only (nothing is built).

use super::config::FluxConfig;
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::guard::Footprint;
use magcache_layers::config_util::{overrides_json, resolve};
use magcache_layers::footprint::{
    add_plan, attention_bytes, safetensors_shapes, sz, weights_bytes, weights_knob, Sz,
    CACHE_FACTOR, FFN_FACTOR, HIDDEN_FACTOR, LATENT_FACTOR,
};
use std::path::Path;

/// Parameters of a FLUX transformer (checked arithmetic).
pub fn flux_params(c: &FluxConfig) -> Sz {
    let d = sz(c.inner_dim());
    let hd = sz(c.attention_head_dim);
    let lin = |o: Sz, i: Sz| o * i + o;
    let guidance = if c.guidance_embeds {
        lin(d, sz(256)) + lin(d, d)
    } else {
        sz(0)
    };
    let top = lin(d, sz(c.in_channels))
        + lin(d, sz(c.joint_attention_dim))
        + lin(d, sz(256))
        + lin(d, d)
        + guidance
        + lin(d, sz(c.pooled_projection_dim))
        + lin(d, d)
        + lin(d * sz(2), d)
        + lin(sz(c.out_channels()), d);
    let ff = lin(d * sz(4), d) + lin(d, d * sz(4));
    let double = lin(d * sz(6), d) * sz(2) + lin(d, d) * sz(8) + ff * sz(2) + hd * sz(4);
    let single =
        lin(d * sz(3), d) + lin(d, d) * sz(3) + lin(d * sz(4), d) + lin(d, d * sz(5)) + hd * sz(2);
    sz(c.num_layers) * double + sz(c.num_single_layers) * single + top
}

/// The footprint of a FLUX run's denoising with `c` (`base_cfg`: the preset's fields, for naming
/// the override that grows it). A prompted run's decode is its own stage
/// ([`flux_decode_footprint`]): the runner frees the transformer before it.
pub fn flux_footprint(
    cfg: &RunConfig,
    base: &Path,
    c: &FluxConfig,
    base_cfg: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Footprint {
    let mut fp = Footprint::default();
    let knob = match base_cfg {
        Some(b) => weights_knob(b, &overrides_json(cfg)),
        None => "model.weights".to_string(),
    };
    // Streamed: the embeddings and head, and two blocks (the one running, the next); the double
    // blocks are the larger kind.
    let streamed = magcache_core::runtime::placement::parse_offload(&cfg.model.offload, "")
        .is_ok_and(|o| o == magcache_core::Offload::Stream);
    let resident = if streamed {
        let two = c.num_layers.min(2);
        flux_params(&FluxConfig {
            num_layers: two,
            num_single_layers: 2 - two,
            ..c.clone()
        })
    } else {
        flux_params(c)
    };
    let gguf = match &cfg.model.weights {
        Some(magcache_core::runtime::config::WeightsSpec::One(w)) => {
            magcache_layers::footprint::gguf_held_bytes(
                &magcache_layers::config_util::resolve(base, w),
                streamed,
                cfg.model.gguf_repack,
            )
        }
        _ => None,
    };
    // GGUF: quantized linear weights stay quantized (about the file's size).
    let bytes = gguf
        .map(|g| g.file)
        .or(weights_bytes(resident, &cfg.model.dtype).0);
    if streamed {
        fp.add_streamed(
            "streamed weights (embeddings, head, two blocks)",
            knob,
            bytes,
        );
    } else {
        fp.add("weights", knob, bytes);
        magcache_layers::footprint::add_gguf_repacked(&mut fp, gguf.map_or(0, |g| g.repacked));
    }
    add_plan(&mut fp, cfg.sampling.steps, 1);
    let (dims, lat_knob, text_knob) = token_dims(cfg, base, c);
    let Some((b, s, l)) = dims else {
        return fp;
    };
    let d = sz(c.inner_dim());
    let f32b = sz(4);
    let heads = c.num_attention_heads;
    let per_token = (sz(HIDDEN_FACTOR) * d + sz(FFN_FACTOR * 4) * d) * f32b;
    let joint = s.saturating_add(l);
    let activations = sz(b) * sz(s) * per_token
        + attention_bytes(&cfg.model.device, b, heads, joint, joint)
        + sz(b) * sz(s) * sz(c.in_channels) * sz(LATENT_FACTOR) * f32b
        + sz(s) * sz(3) * f32b;
    fp.add("activations", lat_knob, activations.0);
    fp.add(
        "cache",
        lat_knob,
        (sz(CACHE_FACTOR) * sz(b) * sz(joint) * d * f32b).0,
    );
    let text =
        sz(b) * sz(l) * (per_token + sz(c.joint_attention_dim) * f32b) + sz(l) * sz(3) * f32b;
    fp.add("text embeddings", text_knob, text.0);
    // The largest weight: a single block's fused output projection (d x 5d).
    magcache_layers::footprint::add_lora(&mut fp, cfg, base, d * sz(5 * c.inner_dim()));
    fp
}

/// (batch, image tokens, text tokens) of a FLUX run, and the keys that set the image and the text
/// sizes; `None` when they cannot be told without loading anything.
#[allow(clippy::type_complexity)]
fn token_dims(
    cfg: &RunConfig,
    base: &Path,
    c: &FluxConfig,
) -> (Option<(usize, usize, usize)>, &'static str, &'static str) {
    match &cfg.inputs.file {
        // A prompted run: the image tokens from inputs.height/width through the pipeline VAE's
        // factor (or the inputs file's `latents_init`), the text from max_sequence_length.
        f if cfg.prompt.is_some() => {
            let l = cfg
                .prompt
                .as_ref()
                .and_then(|p| p.max_sequence_length)
                .unwrap_or(super::prompted::DEFAULT_MAX_SEQUENCE_LENGTH);
            let s = match f {
                Some(f) => safetensors_shapes(&resolve(base, f))
                    .and_then(|m| m.get("latents_init").and_then(|d| d.get(1).copied())),
                None => cfg
                    .model
                    .weights
                    .as_ref()
                    .and_then(|w| w.paths().first().map(|p| resolve(base, p)))
                    .and_then(|root| super::prompted::image_seq_len(cfg, "", &root).ok()),
            };
            let knob = if f.is_some() {
                "inputs.file"
            } else {
                "inputs.height/width"
            };
            (s.map(|s| (1, s, l)), knob, "prompt.max_sequence_length")
        }
        Some(f) => {
            let shapes = safetensors_shapes(&resolve(base, f));
            let get = |n: &str| shapes.as_ref().and_then(|s| s.get(n).cloned());
            let dims = match (
                get("latents_init").as_deref(),
                get("encoder_hidden_states").as_deref(),
            ) {
                (Some(&[b, s, _]), Some(&[_, l, _])) => Some((b, s, l)),
                _ => None,
            };
            (dims, "inputs.file", "inputs.file")
        }
        None => {
            let shape = cfg
                .inputs
                .latent_shape
                .clone()
                .unwrap_or_else(|| vec![1, c.in_channels / 4, 64, 64]);
            let dims = match shape.as_slice() {
                &[b, _, h, w] => Some((
                    b,
                    (h / 2).saturating_mul(w / 2),
                    cfg.inputs.text_len.unwrap_or(64),
                )),
                _ => None,
            };
            (dims, "inputs.latent_shape", "inputs.text_len")
        }
    }
}

/// The VAE decode of a prompted FLUX run, after the transformer is freed
/// (`Pipeline::release_models`): the VAE's weights, the decode's working set at the image's size
/// (one tile's with `[vae] tiling`, plus two rows of decoded tiles held for blending), and the
/// decoded image. `None` for other runs, or when the run's VAE config cannot be read (the loader
/// reports it).
pub fn flux_decode_footprint(cfg: &RunConfig, base: &Path) -> Option<Footprint> {
    cfg.prompt.as_ref()?;
    let root = resolve(base, cfg.model.weights.as_ref()?.paths().first()?);
    let v =
        magcache_layers::autoencoder_kl::FluxVaeConfig::read(&root.join("vae").join("config.json"))
            .ok()?;
    let tiling = magcache_layers::autoencoder_kl::run_tiling(cfg, "", &root)
        .ok()
        .flatten();
    let (ph, pw) = (
        cfg.inputs.height.unwrap_or(super::prompted::DEFAULT_SIZE),
        cfg.inputs.width.unwrap_or(super::prompted::DEFAULT_SIZE),
    );
    let f = v.vae_scale_factor().max(1);
    let (lh, lw) = (ph / f, pw / f);
    let cpu = !cfg.model.device.starts_with("cuda");
    let wb = if cpu {
        4
    } else {
        magcache_layers::footprint::dtype_bytes(&cfg.model.dtype)
    };
    let mut fp = Footprint::default();
    fp.add("VAE weights", "model.dtype", (v.params() * sz(wb)).0);
    magcache_layers::autoencoder_kl::add_decode_parts(&mut fp, &v, tiling, (lh, lw), cpu);
    fp.add(
        "decoded image (f32, 4 copies)",
        "inputs.height/width",
        v.decode_image_bytes(lh, lw).0,
    );
    Some(fp)
}
