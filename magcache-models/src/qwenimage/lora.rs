//! How LoRA adapters name Qwen-Image's modules outside the `transformer.` (diffusers / PEFT)
//! layout: Qwen-Image's original checkpoint uses the diffusers module names, so trainers that write
//! them under `diffusion_model.` (ComfyUI, ai-toolkit, musubi-tuner's `lora_unet_` spelling) map to
//! themselves.

use magcache_layers::lora::{LoraNames, Target};

pub struct QwenImageLoraNames;

impl LoraNames for QwenImageLoraNames {
    fn family(&self) -> &str {
        "Qwen-Image"
    }

    fn compounds(&self) -> &[&'static str] {
        &[
            "transformer_blocks",
            "img_mod",
            "txt_mod",
            "img_mlp",
            "txt_mlp",
            "img_in",
            "txt_in",
            "txt_norm",
            "norm_out",
            "proj_out",
            "time_text_embed",
            "timestep_embedder",
            "linear_1",
            "linear_2",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
            "to_q",
            "to_k",
            "to_v",
            "to_out",
        ]
    }

    fn original(&self, module: &str) -> Option<Vec<Target>> {
        Some(vec![Target::whole(module)])
    }
}
