//! How LoRA adapters name Z-Image's modules outside the diffusers layout: the original checkpoint's
//! names (ComfyUI, `diffusion_model.layers.N.attention.qkv`: one fused projection, split here into
//! `to_q`, `to_k`, `to_v`; `attention.out` for `to_out.0`) and trainers that write the diffusers
//! module names under `diffusion_model.` (ai-toolkit, musubi-tuner), which map to themselves.

use magcache_layers::lora::{LoraNames, Target};

pub struct ZImageLoraNames {
    /// The model width (`dim`): the fused `qkv` is three blocks of it.
    pub dim: usize,
}

impl LoraNames for ZImageLoraNames {
    fn family(&self) -> &str {
        "Z-Image"
    }

    fn compounds(&self) -> &[&'static str] {
        &[
            "noise_refiner",
            "context_refiner",
            "all_x_embedder",
            "all_final_layer",
            "t_embedder",
            "cap_embedder",
            "adaLN_modulation",
            "attention_norm1",
            "attention_norm2",
            "ffn_norm1",
            "ffn_norm2",
            "feed_forward",
            "to_q",
            "to_k",
            "to_v",
            "to_out",
        ]
    }

    fn original(&self, module: &str) -> Option<Vec<Target>> {
        let d = self.dim;
        if let Some(p) = module.strip_suffix(".attention.qkv") {
            return Some(
                ["to_q", "to_k", "to_v"]
                    .iter()
                    .enumerate()
                    .map(|(i, n)| Target {
                        module: format!("{p}.attention.{n}"),
                        rows: vec![(i * d, d)],
                    })
                    .collect(),
            );
        }
        if let Some(p) = module.strip_suffix(".attention.out") {
            return Some(vec![Target::whole(format!("{p}.attention.to_out.0"))]);
        }
        Some(vec![Target::whole(module)])
    }
}
