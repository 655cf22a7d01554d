"""Writes the text encoders and the VAE of a FLUX.1-dev pipeline folder at the released sizes with
random weights (transformers / diffusers classes, the released configs and storage: CLIP-L and
T5-XXL in bf16, T5 in 5 GB shards with an index, the VAE in f32), for
`scripts/flux-real-size-pipeline.sh` (issue 30). The sizes are what is measured, not the weights.

    python scripts/flux-real-size-parts.py PIPELINE_DIR
"""

import json
import os
import sys

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

out = sys.argv[1]
here = os.path.dirname(os.path.abspath(__file__))
tiny = os.path.join(here, "..", "tests", "fixtures", "pipelines", "flux_tiny_folder")
torch.manual_seed(0)


def config(part, **released):
    c = json.load(open(os.path.join(tiny, part, "config.json")))
    for k in ("dtype", "transformers_version", "_diffusers_version"):
        c.pop(k, None)
    c.update(released)
    return c


# openai/clip-vit-large-patch14's text model, as FLUX.1-dev's text_encoder/config.json has it.
clip = config("text_encoder", hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12, projection_dim=768, vocab_size=49408)
# google/t5-v1_1-xxl's encoder, as FLUX.1-dev's text_encoder_2/config.json has it.
t5 = config("text_encoder_2", d_ff=10240, d_kv=64, d_model=4096, num_heads=64, num_layers=24,
            num_decoder_layers=24, vocab_size=32128, tie_word_embeddings=False)
vae = config("vae", block_out_channels=[128, 256, 512, 512], norm_num_groups=32, sample_size=1024)
vae.pop("_class_name")

torch.set_default_dtype(torch.bfloat16)
for name, cls, cfg_cls, cfg, shard in [("text_encoder", CLIPTextModel, CLIPTextConfig, clip, "10GB"),
                                       ("text_encoder_2", T5EncoderModel, T5Config, t5, "5GB")]:
    m = cls(cfg_cls(**cfg)).eval()
    n = sum(p.numel() for p in m.parameters())
    m.save_pretrained(os.path.join(out, name), max_shard_size=shard)
    print(f"{name}: {n / 1e9:.2f}B parameters (bf16)", flush=True)
    del m
torch.set_default_dtype(torch.float32)
v = AutoencoderKL(**vae)
v.save_pretrained(os.path.join(out, "vae"))
print(f"vae: {sum(p.numel() for p in v.parameters()) / 1e6:.1f}M parameters (f32)")
