"""Writes a FLUX.1 VAE folder (diffusers `AutoencoderKL`, the released `vae/config.json` of
black-forest-labs/FLUX.1-dev) with random weights, for `flux_vae_memory` (issue 30): the released
sizes are what is measured, not the weights.

    python scripts/flux-vae-random.py OUT_DIR
"""

import sys

import torch
from diffusers import AutoencoderKL

CONFIG = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    force_upcast=True,
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    latents_mean=None,
    latents_std=None,
    layers_per_block=2,
    mid_block_add_attention=True,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_post_quant_conv=False,
    use_quant_conv=False,
)

torch.manual_seed(0)
AutoencoderKL(**CONFIG).save_pretrained(sys.argv[1])
