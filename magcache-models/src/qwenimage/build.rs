//! Building a resolved qwen-image run: the size guard per stage, the text encoder (freed before the
//! transformer loads), the transformer held or streamed, the inputs, and the registration.

use super::config::QwenImageConfig;
use super::family::{qwenimage_info, qwenimage_params, QwenImageFolder, QwenImageRun, Source};
use super::model::{QwenImageModel, QWENIMAGE_BLOCK};
use super::pipeline::{qwenimage_plan, QwenImageDecode, QwenImagePipeline, QwenImageSteps};
use candle_core::{DType, Tensor};
use magcache_core::runtime::config::RunConfig;
use magcache_core::runtime::guard::Footprint;
use magcache_core::runtime::progress::{Stage, StageTime};
use magcache_core::runtime::registry::ModelFamily;
use magcache_core::runtime::resolved::{export_run, ResolvedRun};
use magcache_core::PipelineCommon;
use magcache_core::{Error, GenerationPlan, ModelInfo, Pipeline, Result};
use magcache_layers::footprint::{add_plan, attention_bytes, dtype_bytes, sz, weights_bytes};
use magcache_layers::inputs::InputFile;
use magcache_layers::random::randn_for;
use magcache_layers::run_basics::image_estimate;
use magcache_layers::weights::warm;
use magcache_text::qwenimage::{
    QwenImageTextEncoder, QWENIMAGE_DROP, QWENIMAGE_MAX_LEN, QWENIMAGE_TEMPLATE,
};
use std::path::Path;

/// The embeddings of a run: the prompt's `[1, L, j]` and, with true CFG, the negative's.
type Captions = (Tensor, Option<Tensor>, Option<StageTime>);

impl QwenImageRun {
    /// The transformer's weights (or, streamed, all but the blocks and three of them), the plan,
    /// one call's activations, the cache, and the one-frame VAE decode.
    fn transformer_footprint(&self) -> Footprint {
        let c = &self.base.transformer;
        let mut fp = Footprint::default();
        let knob = match &self.base.source {
            Source::Preset(_) => "model.preset",
            _ => "model.weights",
        };
        let dt = self.base.run.dtype_name();
        if self.base.run.streamed() {
            // Embeddings, head, two blocks at a time, and block 0's `img_mod` (the indicator).
            let two = qwenimage_params(&QwenImageConfig {
                num_layers: 2,
                ..c.clone()
            });
            let d = sz(c.inner_dim());
            let held = two + sz(6) * d * d;
            fp.add_streamed(
                "streamed weights (embeddings, head, two blocks, block 0's modulation)",
                knob,
                weights_bytes(held, dt).0,
            );
        } else {
            fp.add("weights", knob, weights_bytes(qwenimage_params(c), dt).0);
        }
        magcache_layers::footprint::add_lora_tables(
            &mut fp,
            &self.base.run.loras(0),
            Path::new(""),
            sz(self.base.transformer.inner_dim()) * sz(6 * self.base.transformer.inner_dim()),
        );
        add_plan(&mut fp, self.base.run.steps, 2);
        let (b, s, l) = (self.base.batch, self.image_tokens(), self.base.text_len);
        let joint = s.saturating_add(l);
        let d = sz(c.inner_dim());
        let dev = if self.base.run.on_cpu { "cpu" } else { "cuda" };
        let acts = sz(b) * sz(joint) * (sz(12) * d + d * sz(4) * sz(2)) * sz(4)
            + attention_bytes(dev, b, c.num_attention_heads, joint, joint);
        fp.add("activations", "inputs.height/width", acts.0);
        fp.add(
            "cache",
            "inputs.height/width",
            (sz(3) * sz(b) * sz(joint) * d * sz(4)).0,
        );
        if let Source::Folder(_, QwenImageFolder { vae, .. }) = &self.base.source {
            let (h, w) = (2 * self.grid.0, 2 * self.grid.1);
            let cpu = self.base.run.on_cpu;
            let wb = if cpu { 4 } else { dtype_bytes(dt) };
            let bytes = vae.decode_bytes(1, h, w, wb, cpu);
            fp.add(
                "VAE decode (weights, working set, frame)",
                "inputs.height/width",
                bytes.total().0,
            );
        }
        fp
    }

    fn captions(&self) -> Result<Captions> {
        let dev = &self.base.run.placement()?.device;
        let j = self.base.transformer.joint_attention_dim;
        let Source::Folder(root, ..) = &self.base.source else {
            if let Some(p) = &self.base.latents_file {
                let inp = InputFile::load(p)?;
                if inp.has("prompt_embeds") {
                    let get = |k: &str| -> Result<Tensor> {
                        let t = inp.get(k, 3, "[1, L, joint_attention_dim] text embeddings")?;
                        if t.dim(0)? != 1 || t.dim(2)? != j {
                            return Err(Error::inputs(
                                &inp.path,
                                k,
                                format!(
                                    "has shape {:?}; expected [1, L, {j}] (joint_attention_dim)",
                                    t.dims()
                                ),
                            ));
                        }
                        Ok(t.to_dtype(DType::F32)?.to_device(dev)?)
                    };
                    let neg = match (self.base.cfg_scale, inp.has("negative_prompt_embeds")) {
                        (Some(_), true) => Some(get("negative_prompt_embeds")?),
                        _ => None,
                    };
                    return Ok((get("prompt_embeds")?, neg, None));
                }
            }
            let rows = |k: u64| {
                randn_for(
                    &self.base.run.file,
                    "inputs.text_len",
                    self.base.run.seed.wrapping_add(k),
                    &[1, self.base.text_len, j],
                )
            };
            let neg = self.base.cfg_scale.map(|_| rows(3)).transpose()?;
            return Ok((
                rows(2)?.to_device(dev)?,
                neg.map(|n| n.to_device(dev)).transpose()?,
                None,
            ));
        };
        let (text, negative) = self.prompt.clone().unwrap_or_default();
        let stage = Stage::begin("encode text");
        let dt = self.base.run.dtype;
        let negative = negative.filter(|_| self.base.cfg_scale.is_some());
        let key = format!(
            "qwen-image {:?}",
            (root, dt, dev, self.base.text_len, &text, &negative)
        );
        let ((pos, neg), _) = warm::prompt_pair(key, || {
            let enc = QwenImageTextEncoder::load_pipeline(root, dev, dt)?;
            if enc.hidden_size() != j {
                return Err(Error::config(
                    root.join("transformer")
                        .join("config.json")
                        .display()
                        .to_string(),
                    "joint_attention_dim",
                    format!(
                        "{j} but the text encoder's hidden_size is {}",
                        enc.hidden_size()
                    ),
                ));
            }
            let pos = enc.encode(&text, self.base.text_len)?.prompt_embeds;
            let neg = negative.as_ref().map(|n| enc.encode(n, self.base.text_len));
            Ok((
                (pos, neg.transpose()?.map(|n| n.prompt_embeds)),
                String::new(),
            ))
        })?;
        let stage = stage.end();
        let te = root.join("text_encoder");
        magcache_layers::stage::check_embeds(&pos, neg.as_ref(), "Qwen2.5-VL", &te)?;
        Ok((pos, neg, Some(stage)))
    }

    fn transformer(&self) -> Result<(QwenImageModel, Vec<String>)> {
        let c = &self.base.transformer;
        let depth = ("num_layers", c.num_layers);
        let names = super::lora::QwenImageLoraNames;
        self.base.model(c.inner_dim(), &names, depth)
    }

    fn latents(&self) -> Result<Tensor> {
        let c = self.base.transformer.in_channels;
        let shape = [self.base.batch, self.image_tokens(), c];
        self.base.latents((3, "[B, seq, C] packed latents"), &shape)
    }

    /// The text encoder's stage estimate (prompted runs).
    fn text_footprint(&self) -> Option<Footprint> {
        let (root, QwenImageFolder { text, .. }) = self.base.source.folder()?;
        let te = root
            .join("text_encoder")
            .join("config.json")
            .display()
            .to_string();
        // The encoder runs every token of the templated prompt (the rows past
        // `max_sequence_length` are cut after it): at most one per byte of the longer prompt
        // plus the template's, and at most the tokenizer's limit.
        let longest = self
            .prompt
            .as_ref()
            .map(|(p, n)| p.len().max(n.as_ref().map_or(0, String::len)))
            .unwrap_or(0);
        let tokens = (longest + QWENIMAGE_TEMPLATE.len()).min(QWENIMAGE_MAX_LEN + QWENIMAGE_DROP);
        let dt = self.base.run.dtype.size_in_bytes();
        Some(text.footprint(text.num_hidden_layers, tokens, dt, &te))
    }
}

impl ResolvedRun for QwenImageRun {
    fn resolve(cfg: &RunConfig, file: &str, base: &Path) -> Result<Self> {
        Self::read(cfg, file, base)
    }

    fn warnings(&self) -> Vec<String> {
        self.base.run.warnings.clone()
    }

    fn plan(&self) -> Result<(GenerationPlan, ModelInfo)> {
        let plan = qwenimage_plan(&self.schedule()?, self.base.cfg_scale.is_some());
        Ok((plan, qwenimage_info(self.variant())))
    }

    fn estimate(&self) -> Vec<(String, Footprint)> {
        image_estimate(self.text_footprint(), self.transformer_footprint())
    }

    /// The stages up to the loop: text, transformer, inputs (`build_run` checked every stage's
    /// estimate first).
    fn build(&self) -> Result<Box<dyn Pipeline>> {
        let (pos, neg, stage) = self.captions()?;
        let (model, unused) = self.transformer()?;
        let (warnings, mut desc) = self.base.build_start(unused, self.variant());
        let c = &self.base.transformer;
        desc.push_str(&format!(
            "{} double-stream blocks, dim {}, {} heads{}",
            c.num_layers,
            c.inner_dim(),
            c.num_attention_heads,
            match self.base.cfg_scale {
                Some(g) if neg.is_some() => format!(", true CFG {g} with the negative prompt"),
                _ => ", no CFG".into(),
            }
        ));
        if model.is_streamed() {
            desc.push_str(", blocks streamed from the checkpoint");
        }
        let latents = self.latents()?;
        let b = latents.dim(0)?;
        let rep = |t: &Tensor| -> Result<Tensor> { Ok(t.repeat((b, 1, 1))?) };
        let mut embeds = vec![("prompt_embeds".to_string(), pos.clone())];
        if let Some(n) = &neg {
            embeds.push(("negative_prompt_embeds".to_string(), n.clone()));
        }
        let decode = match &self.base.source {
            Source::Folder(root, QwenImageFolder { vae, .. }) => Some(QwenImageDecode {
                root: root.clone(),
                placement: self.base.run.placement()?.clone(),
                height: 2 * self.grid.0 * vae.spatial_scale(),
                width: 2 * self.grid.1 * vae.spatial_scale(),
            }),
            _ => None,
        };
        let negative = match (&neg, self.base.cfg_scale) {
            (Some(n), Some(s)) => Some((rep(n)?, s)),
            _ => None,
        };
        Ok(Box::new(QwenImagePipeline {
            model: Some(model),
            steps: QwenImageSteps {
                schedule: self.schedule()?,
                ctx: rep(&pos)?,
                latents,
                grid: self.grid,
                negative,
                decode,
                embeds,
            },
            common: PipelineCommon {
                stages: stage.into_iter().collect(),
                ..PipelineCommon::new(desc, qwenimage_info(self.variant()), warnings)
            },
        }))
    }

    /// The preset's transformer, generated tensor by tensor (`magcache export`): with the folder
    /// written, `offload = "stream"` runs the preset at its released size from disk.
    fn export(&self) -> Result<Option<Vec<magcache_core::GeneratedWeights>>> {
        let c = &self.base.transformer;
        let preset = matches!(self.base.source, Source::Preset(_));
        self.base.run.export_preset::<QwenImageModel>(
            preset,
            c,
            c.inner_dim(),
            &super::lora::QwenImageLoraNames,
        )
    }
}

inventory::submit! {
    magcache_core::PresetExport { family: "qwen-image", export: export_run::<QwenImageRun>, gguf: None }
}

inventory::submit! {
    ModelFamily {
        name: "qwen-image",
        description: "Qwen-Image (QwenImageTransformer2DModel, Qwen2.5-VL text, the Wan VAE on one frame): double-stream blocks in one cache chain, Euler with dynamic shift to a terminal sigma; true CFG (cond, uncond) with the cond norm kept",
        blocks: &[QWENIMAGE_BLOCK],
        presets: &["qwen-image"],
        ..ModelFamily::resolved::<QwenImageRun>()
    }
}
