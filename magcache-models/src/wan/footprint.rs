//! What a Wan run will hold in memory, from its configs and file headers only (nothing is built).

use super::config::WanConfig;
use super::family::Variant;
use super::keys::{DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH};
use super::run::{WanRun, WAN_CLASS};
use magcache_core::runtime::guard::Footprint;
use magcache_core::Result;
use magcache_layers::autoencoder_kl_wan::WanVaeConfig;
use magcache_layers::config_util::{overrides_json, resolve, to_map};
use magcache_layers::footprint::{
    add_plan, attention_bytes, safetensors_shapes, sz, weights_bytes, weights_knob, Sz,
    CACHE_FACTOR, FFN_FACTOR, HIDDEN_FACTOR, LATENT_FACTOR,
};

/// What a prompted run's VAE decode holds and the sizes behind it.
struct PromptedSizes {
    /// The latents `[1, C, F, H, W]` (from `inputs.height/width/num_frames` through the VAE's
    /// factors; the defaults as the pipeline's).
    latents: Vec<usize>,
    /// `prompt.max_sequence_length`.
    text_len: usize,
    decode: magcache_layers::autoencoder_kl_wan::DecodeBytes,
    tiled: bool,
}

/// The latent and text sizes of a run and the keys that set them.
struct Sizes {
    latents: Option<Vec<usize>>,
    text_len: Option<usize>,
    latents_knob: &'static str,
    text_knob: &'static str,
}

impl<V: Variant> WanRun<V> {
    /// The size guard's estimate per stage: the text encoder (prompted runs), the transformer(s)
    /// with the denoising's activations, then the VAE decode (the transformers freed before it:
    /// `Pipeline::release_models`).
    pub(super) fn stage_estimates(&self) -> Result<Vec<(String, Footprint)>> {
        let mut out = Vec::new();
        if let Some((root, _)) = &self.root {
            let text = super::prompted::text_footprint(&self.cfg, &self.run.file, root)?;
            out.push(("encode text".to_string(), text));
        }
        let (denoise, decode) = self.footprint();
        out.push(("denoise".to_string(), denoise));
        if let Some(d) = decode {
            out.push(("decode".to_string(), d));
        }
        Ok(out)
    }

    /// The transformers' weights: the preset's, or each checkpoint's (a GGUF file's quantized
    /// weights about its size; streamed: the embeddings, the head and two blocks).
    fn add_weights(&self, fp: &mut Footprint) {
        let dtype = self.run.dtype_name();
        if let (true, Some(p)) = (self.paths.is_empty(), self.preset) {
            let base = to_map(&(p.config)(), WAN_CLASS).unwrap_or_default();
            let params = self.configs[0].params() * sz(self.configs.len());
            fp.add(
                "weights",
                weights_knob(&base, &overrides_json(&self.cfg)),
                weights_bytes(params, dtype).0,
            );
            return;
        }
        let streamed = self.run.streamed();
        let (mut total, mut repacked) = (sz(0), 0u64);
        for (w, c) in self.paths.iter().zip(&self.configs) {
            let resident = if streamed {
                WanConfig {
                    num_layers: c.num_layers.min(2),
                    ..c.clone()
                }
                .params()
            } else {
                c.params()
            };
            let path = resolve(&self.base, w);
            let repack = self.cfg.model.gguf_repack;
            total = total
                + match magcache_layers::footprint::gguf_held_bytes(&path, streamed, repack) {
                    Some(g) => {
                        repacked = repacked.saturating_add(g.repacked);
                        Sz(Some(g.file))
                    }
                    None => weights_bytes(resident, dtype),
                };
        }
        if streamed {
            let what = "streamed weights (embeddings, head, two blocks)";
            fp.add_streamed(what, "model.weights", total.0);
        } else {
            fp.add("weights", "model.weights", total.0);
            magcache_layers::footprint::add_gguf_repacked(fp, repacked);
        }
    }

    /// A prompted run's sizes and VAE decode (with `[vae] tiling` as the run sets it); `None` for
    /// other runs or when the VAE config cannot be read (the loader reports it).
    fn prompted_sizes(&self, latent_ch: usize) -> Option<PromptedSizes> {
        let p = self.cfg.prompt.as_ref()?;
        let (root, _) = self.root.as_ref()?;
        let vae = WanVaeConfig::read(&root.join("vae").join("config.json")).ok()?;
        let (ss, ts) = (vae.spatial_scale().max(1), vae.temporal_scale().max(1));
        let height = self.cfg.inputs.height.unwrap_or(DEFAULT_HEIGHT);
        let width = self.cfg.inputs.width.unwrap_or(DEFAULT_WIDTH);
        let frames = self.keys.inputs.num_frames.unwrap_or(DEFAULT_FRAMES);
        let tiling = self.keys.vae.tiling("", ss).ok().flatten();
        let lat_frames = frames.saturating_sub(1) / ts + 1;
        // The VAE runs in the run's dtype, but f32 where it is bf16 on the CPU (no bf16 conv2d
        // there); the CPU runs an f32 VAE's convolutions as the row convolution
        // (`nn::conv2d_bounded`; not on a GPU, Metal included).
        let dtype = self.run.dtype_name();
        let wb = if dtype == "bf16" && !self.cfg.model.device.starts_with("cuda") {
            4
        } else {
            magcache_layers::footprint::dtype_bytes(dtype)
        };
        let row_conv = wb == 4 && self.run.on_cpu;
        let (h, w) = (height / ss, width / ss);
        Some(PromptedSizes {
            latents: vec![1, latent_ch, lat_frames, h, w],
            text_len: p
                .max_sequence_length
                .unwrap_or(super::prompted::DEFAULT_MAX_SEQUENCE_LENGTH),
            decode: vae.decode_bytes_tiled(lat_frames, h, w, wb, tiling, row_conv),
            tiled: tiling.is_some(),
        })
    }

    /// The latents and text length: from the inputs file's header, else the run's sizes (or the
    /// defaults).
    fn sizes(&self, latent_ch: usize, prompted: Option<&PromptedSizes>) -> Sizes {
        let inputs = &self.cfg.inputs;
        let shapes = inputs
            .file
            .as_ref()
            .and_then(|f| safetensors_shapes(&resolve(&self.base, f)));
        let file_latents = || shapes.as_ref().and_then(|s| s.get("latents_init").cloned());
        if self.cfg.prompt.is_some() {
            // A prompted run: the latents from height/width/num_frames through the VAE's
            // factors, the text from max_sequence_length (an inputs file holds `latents_init`).
            return Sizes {
                latents: match &inputs.file {
                    Some(_) => file_latents(),
                    None => prompted.map(|p| p.latents.clone()),
                },
                text_len: prompted.map(|p| p.text_len),
                latents_knob: match inputs.file {
                    Some(_) => "inputs.file",
                    None => "inputs.height/width/num_frames",
                },
                text_knob: "prompt.max_sequence_length",
            };
        }
        if inputs.file.is_some() {
            let text_len = shapes.as_ref().and_then(|s| {
                ["cond", "uncond"]
                    .iter()
                    .filter_map(|n| s.get(*n).and_then(|d| d.get(1).copied()))
                    .max()
            });
            return Sizes {
                latents: file_latents(),
                text_len,
                latents_knob: "inputs.file",
                text_knob: "inputs.file",
            };
        }
        Sizes {
            latents: Some(
                inputs
                    .latent_shape
                    .clone()
                    .unwrap_or_else(|| vec![1, latent_ch, 3, 24, 40]),
            ),
            text_len: Some(inputs.text_len.unwrap_or(64)),
            latents_knob: "inputs.latent_shape",
            text_knob: "inputs.text_len",
        }
    }

    /// The footprint of the denoising (the transformers, their activations and cache), and for a
    /// prompted run the VAE decode that follows it.
    fn footprint(&self) -> (Footprint, Option<Footprint>) {
        let mut fp = Footprint::default();
        self.add_weights(&mut fp);
        let c = &self.configs[0];
        let experts = self.configs.len();
        let latent_ch = c.out_channels.min(c.in_channels);
        let prompted = self.prompted_sizes(latent_ch);
        let sizes = self.sizes(latent_ch, prompted.as_ref());
        let branches = if self.guidance > 1.0 { 2 } else { 1 };
        add_plan(&mut fp, self.run.steps, branches);
        let Some(&[b, _, f, h, w]) = sizes.latents.as_deref() else {
            // A shape the model cannot take: the inputs' own check reports it.
            return (fp, None);
        };
        let [pt, ph, pw] = c.patch_size;
        let s = (f / pt.max(1))
            .saturating_mul(h / ph.max(1))
            .saturating_mul(w / pw.max(1));
        let tokens = sz(b) * sz(s);
        let d = sz(c.inner_dim());
        let (heads, device) = (c.num_attention_heads, self.cfg.model.device.as_str());
        let f32b = sz(4);
        let latent_elems = sz(b) * sz(c.in_channels) * sz(f) * sz(h) * sz(w);
        let per_token_t = V::FAMILY.ti2v && experts == 1;
        let tproj = if per_token_t { tokens } else { sz(b) } * d * sz(7) * f32b;
        let activations = tokens * (sz(HIDDEN_FACTOR) * d + sz(FFN_FACTOR) * sz(c.ffn_dim)) * f32b
            + attention_bytes(device, b, heads, s, s)
            + sz(s) * sz(c.attention_head_dim) * f32b
            + tproj
            + latent_elems * sz(LATENT_FACTOR) * f32b;
        fp.add("activations", sizes.latents_knob, activations.0);
        let cache = sz(experts * branches) * sz(CACHE_FACTOR) * tokens * d * f32b;
        fp.add("cache", sizes.latents_knob, cache.0);
        let largest = d * sz(c.ffn_dim.max(c.inner_dim()));
        magcache_layers::footprint::add_lora(&mut fp, &self.cfg, &self.base, largest);
        if let Some(l) = sizes.text_len {
            let text = sz(branches) * sz(b) * sz(l) * (sz(c.text_dim) + d * sz(3)) * f32b
                + attention_bytes(device, b, heads, s, l);
            fp.add("text embeddings", sizes.text_knob, text.0);
        }
        let decode = prompted.map(|p| decode_footprint(&p, (latent_elems * f32b).0));
        (fp, decode)
    }
}

/// The VAE decode (after the transformers are freed): its weights, its feature cache (two frames
/// per causal convolution: grows with height x width, or a tile's with tiling, not with the
/// frames), one frame's (tile's) working set, the decoded video (grows with the frames) and the
/// final latents (`latents` bytes), held while decoding.
fn decode_footprint(p: &PromptedSizes, latents: Option<u64>) -> Footprint {
    let (dec, tiled) = (&p.decode, p.tiled);
    let mut fp = Footprint::default();
    fp.add("VAE weights", "model.dtype", dec.weights.0);
    let (knob, advice, of) = if tiled {
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
    if tiled {
        fp.add(
            "VAE decode tiles (two rows of tiles for blending, f32)",
            "vae.tile_sample_min_height/width",
            dec.tiles.0,
        );
        fp.advise(advice);
        fp.add(
            "decoded video (f32, the rows joined so far)",
            "inputs.num_frames",
            dec.video.0,
        );
        // The rows' join (two copies of the video) comes after the tiles are freed: counted
        // where it is more than the tile stage.
        let more = dec
            .join
            .0
            .zip(dec.decoding().0)
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
    fp.add(
        "final latents (f32)",
        "inputs.height/width/num_frames",
        latents,
    );
    fp
}
