//! Building a resolved z-image run: the size guard per stage, the text encoder (freed before the
//! transformer loads), the transformer held or streamed, the inputs, and the registration.

use super::config::ZImageConfig;
use super::family::{zimage_info, zimage_params, Source, ZImageFolder, ZImageRun};
use super::model::{padded, ZImageModel, ZIMAGE_LAYER};
use super::pipeline::{zimage_plan, ZImageDecode, ZImagePipeline, ZImageSteps};
use candle_core::{DType, Tensor};
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::guard::Footprint;
use magcache_core::runtime::progress::Stage;
use magcache_core::runtime::registry::ModelFamily;
use magcache_core::runtime::resolved::{export_run, ResolvedRun};
use magcache_core::PipelineCommon;
use magcache_core::{Error, GenerationPlan, ModelInfo, Pipeline, Result};
use magcache_layers::footprint::{add_plan, attention_bytes, sz, weights_bytes};
use magcache_layers::inputs::InputFile;
use magcache_layers::random::randn_for;
use magcache_layers::run_basics::image_estimate;
use magcache_layers::weights::warm;
use magcache_text::qwen_chat::{QwenChatEncoder, ZIMAGE_CHAT};
use std::path::Path;

impl ZImageRun {
    /// The text encoder's stage: its layers' weights and one prompt's activations.
    fn text_footprint(&self) -> Option<Footprint> {
        let Source::Folder(root, ZImageFolder { text, .. }) = &self.base.source else {
            return None;
        };
        let te = root
            .join("text_encoder")
            .join("config.json")
            .display()
            .to_string();
        Some(text.footprint(
            text.num_hidden_layers.saturating_sub(1),
            self.base.text_len,
            self.base.run.dtype.size_in_bytes(),
            &te,
        ))
    }

    /// The transformer's stage: its weights (or, streamed, all but the main blocks and two of them),
    /// the plan, one call's activations, the cache, and the VAE decode.
    fn transformer_footprint(&self) -> Footprint {
        let c = &self.base.transformer;
        let mut fp = Footprint::default();
        let knob = match &self.base.source {
            Source::Folder(..) | Source::Transformer(_) => "model.weights".to_string(),
            Source::Preset(_) => "model.preset".to_string(),
        };
        let dt = self.base.run.dtype_name();
        if self.base.run.streamed() {
            let held = zimage_params(&ZImageConfig {
                n_layers: c.n_layers.min(2),
                ..c.clone()
            });
            fp.add_streamed(
                "streamed weights (refiners, embedders, head, two blocks)",
                knob,
                weights_bytes(held, dt).0,
            );
        } else {
            fp.add("weights", knob, weights_bytes(zimage_params(c), dt).0);
        }
        magcache_layers::footprint::add_lora_tables(
            &mut fp,
            &self.base.run.loras(0),
            Path::new(""),
            sz(self.base.transformer.dim) * sz(self.base.transformer.ffn_hidden()),
        );
        add_plan(&mut fp, self.base.run.steps, 1);
        let b = self.base.batch * if self.base.cfg_scale.is_some() { 2 } else { 1 };
        let l = padded(self.image_tokens()) + padded(self.base.text_len);
        let d = sz(c.dim);
        let per_token = (sz(8) * d + sz(c.ffn_hidden()) * sz(3)) * sz(4);
        let acts = sz(b) * sz(l) * per_token
            + attention_bytes(&self.placement_device(), b, c.n_heads, l, l);
        fp.add("activations", "inputs.height/width", acts.0);
        fp.add(
            "cache",
            "inputs.height/width",
            (sz(3) * sz(b) * sz(l) * d * sz(4)).0,
        );
        if let Source::Folder(_, ZImageFolder { vae, tiling, .. }) = &self.base.source {
            let v = &**vae;
            let (lh, lw) = self.lat;
            let cpu = self.base.run.on_cpu;
            fp.add("VAE weights", "model.dtype", (v.params() * sz(4)).0);
            magcache_layers::autoencoder_kl::add_decode_parts(&mut fp, v, *tiling, (lh, lw), cpu);
            fp.add(
                "decoded image (f32, 4 copies)",
                "inputs.height/width",
                v.decode_image_bytes(lh, lw).0,
            );
        }
        fp
    }

    fn placement_device(&self) -> String {
        if self.base.run.on_cpu {
            "cpu".into()
        } else {
            "cuda".into()
        }
    }

    /// Runs without a pipeline folder: the inputs file's `prompt_embeds` (and negative ones with
    /// CFG), else seeded random rows.
    fn unprompted_captions(&self) -> Result<(Tensor, Option<Tensor>)> {
        let dev = &self.base.run.placement()?.device;
        if let Some(p) = &self.base.latents_file {
            let inp = InputFile::load(p)?;
            if inp.has("prompt_embeds") {
                let cap = self.base.transformer.cap_feat_dim;
                let get = |k: &str| -> Result<Tensor> {
                    let t = inp.get(k, 3, "[1, n, cap_feat_dim] caption")?;
                    if t.dim(0)? != 1 || t.dim(2)? != cap || t.dim(1)? == 0 {
                        return Err(Error::inputs(
                            &inp.path,
                            k,
                            format!(
                                "has shape {:?}; expected [1, n >= 1, {cap}] (cap_feat_dim)",
                                t.dims()
                            ),
                        ));
                    }
                    Ok(t.squeeze(0)?.to_dtype(DType::F32)?.to_device(dev)?)
                };
                let neg = match self.base.cfg_scale {
                    Some(_) => Some(get("negative_prompt_embeds")?),
                    None => None,
                };
                return Ok((get("prompt_embeds")?, neg));
            }
        }
        let rows = |k: u64| {
            randn_for(
                &self.base.run.file,
                "inputs.text_len",
                self.base.run.seed.wrapping_add(k),
                &[self.base.text_len, self.base.transformer.cap_feat_dim],
            )
        };
        let neg = self.base.cfg_scale.map(|_| rows(3)).transpose()?;
        Ok((
            rows(2)?.to_device(dev)?,
            neg.map(|n| n.to_device(dev)).transpose()?,
        ))
    }

    /// The captions (prompt, then negative with CFG) of one item each, `[n, hidden]`: encoded by the
    /// folder's Qwen3 (freed before this returns), or seeded random rows for presets.
    #[allow(clippy::type_complexity)]
    fn captions(
        &self,
    ) -> Result<(
        Tensor,
        Option<Tensor>,
        Option<(String, magcache_core::runtime::progress::StageTime)>,
    )> {
        let dev = &self.base.run.placement()?.device;
        let Source::Folder(root, ..) = &self.base.source else {
            let (pos, neg) = self.unprompted_captions()?;
            return Ok((pos, neg, None));
        };
        let (text, negative) = self.prompt.clone().unwrap_or_default();
        let stage = Stage::begin("encode text");
        let dt = self.base.run.dtype;
        let neg_text = self.base.cfg_scale.map(|_| &negative);
        let key = format!(
            "z-image {:?}",
            (root, dt, dev, self.base.text_len, &text, neg_text)
        );
        let ((pos, neg), template) = warm::prompt_pair(key, || {
            let enc = QwenChatEncoder::load_pipeline(root, ZIMAGE_CHAT, dev, dt)?;
            if enc.encoder().config.hidden_size != self.base.transformer.cap_feat_dim {
                return Err(Error::config(
                    root.join("transformer")
                        .join("config.json")
                        .display()
                        .to_string(),
                    "cap_feat_dim",
                    format!(
                        "{} but the text encoder's hidden_size is {}",
                        self.base.transformer.cap_feat_dim,
                        enc.encoder().config.hidden_size
                    ),
                ));
            }
            let template = format!(
                "Qwen3 ChatML, one user message, thinking on (the template of {})",
                enc.template_source()
            );
            let pos = enc
                .encode(&text, self.base.text_len)?
                .prompt_embeds
                .squeeze(0)?;
            let neg = match self.base.cfg_scale {
                Some(_) => Some(
                    enc.encode(&negative, self.base.text_len)?
                        .prompt_embeds
                        .squeeze(0)?,
                ),
                None => None,
            };
            Ok(((pos, neg), template))
        })?;
        let stage = stage.end();
        let te = root.join("text_encoder");
        magcache_layers::stage::check_embeds(&pos, neg.as_ref(), "Qwen3", &te)?;
        Ok((pos, neg, Some((template, stage))))
    }

    /// The transformer: the folder's checkpoint (held or streamed), or a preset's seeded weights.
    fn transformer(&self) -> Result<(ZImageModel, Vec<String>)> {
        let c = &self.base.transformer;
        let names = super::lora::ZImageLoraNames { dim: c.dim };
        self.base.model(c.dim, &names, ("n_layers", c.n_layers))
    }

    /// The initial latents `[B, C, h, w]`: `latents_init` of the inputs file or seeded noise.
    fn latents(&self) -> Result<Tensor> {
        let c = self.base.transformer.in_channels;
        let shape = [self.base.batch, c, self.lat.0, self.lat.1];
        self.base.latents((4, "[B, C, h, w] latents"), &shape)
    }
}

impl ResolvedRun for ZImageRun {
    fn resolve(cfg: &RunConfig, file: &str, base: &Path) -> Result<Self> {
        Self::read(cfg, file, base)
    }

    fn warnings(&self) -> Vec<String> {
        self.base.run.warnings.clone()
    }

    fn plan(&self) -> Result<(GenerationPlan, ModelInfo)> {
        let schedule = self.schedule()?;
        Ok((
            zimage_plan(&schedule, self.base.shift.shift),
            zimage_info(self.variant()),
        ))
    }

    fn estimate(&self) -> Vec<(String, Footprint)> {
        image_estimate(self.text_footprint(), self.transformer_footprint())
    }

    /// The stages up to the loop: text, transformer, inputs (`build_run` checked every stage's
    /// estimate first).
    fn build(&self) -> Result<Box<dyn Pipeline>> {
        let (pos, neg, template) = self.captions()?;
        let (model, unused) = self.transformer()?;
        let (warnings, mut desc) = self.base.build_start(unused, self.variant());
        let c = &self.base.transformer;
        desc.push_str(&format!(
            "{} layers + {}+{} refiners, dim {}, {} heads{}",
            c.n_layers,
            c.n_refiner_layers,
            c.n_refiner_layers,
            c.dim,
            c.n_heads,
            match self.base.cfg_scale {
                Some(g) => format!(", CFG {g} batched with the negative prompt"),
                None => ", no CFG".into(),
            }
        ));
        if model.is_streamed() {
            desc.push_str(", main blocks streamed from the checkpoint");
        }
        let mut stages = Vec::new();
        if let Some((t, stage)) = template {
            desc.push_str(&format!("; prompt rendered as {t}"));
            stages.push(stage);
        }
        let latents = self.latents()?;
        let b = latents.dim(0)?;
        let decode = match &self.base.source {
            Source::Folder(root, ZImageFolder { tiling, .. }) => Some(ZImageDecode {
                root: root.clone(),
                placement: self.base.run.placement()?.clone(),
                tiling: *tiling,
            }),
            Source::Preset(_) | Source::Transformer(_) => None,
        };
        Ok(Box::new(ZImagePipeline {
            model: Some(model),
            steps: ZImageSteps {
                schedule: self.schedule()?,
                shift: self.base.shift.shift,
                latents,
                caps: vec![pos; b],
                negative: neg.zip(self.base.cfg_scale).map(|(n, g)| (vec![n; b], g)),
                decode,
            },
            common: PipelineCommon {
                stages,
                ..PipelineCommon::new(desc, zimage_info(self.variant()), warnings)
            },
        }))
    }

    /// The preset's transformer, generated tensor by tensor (`magcache export`): with the folder
    /// written, `offload = "stream"` runs the preset at its released size from disk.
    fn export(&self) -> Result<Option<Vec<magcache_core::GeneratedWeights>>> {
        let c = &self.base.transformer;
        let preset = matches!(self.base.source, Source::Preset(_));
        self.base.run.export_preset::<ZImageModel>(
            preset,
            c,
            c.dim,
            &super::lora::ZImageLoraNames { dim: c.dim },
        )
    }
}

inventory::submit! {
    magcache_core::PresetExport { family: "z-image", export: export_run::<ZImageRun>, gguf: None }
}

inventory::submit! {
    ModelFamily {
        name: "z-image",
        description: "Z-Image / Z-Image-Turbo (ZImageTransformer2DModel, Qwen3 text, AutoencoderKL): refiners on every call, the main single-stream layers in one cache chain, Euler with a static shift; CFG as one batched call",
        blocks: &[ZIMAGE_LAYER],
        presets: &["z-image-turbo", "z-image"],
        keys: &[magcache_layers::autoencoder_kl::FLUX_VAE_KEYS],
        ..ModelFamily::resolved::<ZImageRun>()
    }
}
