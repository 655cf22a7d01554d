#!/usr/bin/env python3
"""Times one transformer call of diffusers' Wan2.1-1.3B or FLUX.1-dev on a CUDA GPU, bf16, SDPA
(diffusers' default attention: torch.nn.functional.scaled_dot_product_attention), random weights, at
the same architecture and input sizes as scripts/gpu-bench.sh's magcache runs.

Usage: python diffusers_gpu_bench.py wan|flux [--calls N] [--warmup W]
Prints JSON: {"model", "seconds_per_call", "calls", "torch", "diffusers", "gpu"}.
Needs: torch with CUDA, diffusers."""
import argparse, json, statistics, time

import diffusers
import torch
from diffusers import FluxTransformer2DModel, WanTransformer3DModel

# Same fields as magcache-cli/benches/pytorch_dense.py (the presets of magcache-models).
WAN_13B = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
               num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                axes_dims_rope=(16, 56, 56), guidance_embeds=True)

ap = argparse.ArgumentParser()
ap.add_argument("model", choices=["wan", "flux"])
ap.add_argument("--calls", type=int, default=10)
ap.add_argument("--warmup", type=int, default=2)
ap.add_argument("--text-len", type=int, default=512)
a = ap.parse_args()
torch.set_grad_enabled(False)
torch.manual_seed(0)
dev, dt = torch.device("cuda"), torch.bfloat16
L = a.text_len
torch.set_default_dtype(dt)
with dev:  # random init directly on the GPU, in bf16
    if a.model == "wan":
        model = WanTransformer3DModel(**WAN_13B).eval()
        # 480x832, 81 frames -> latents [1, 16, 21, 60, 104]: 21 * 30 * 52 = 32,760 tokens.
        x = torch.randn(1, 16, 21, 60, 104)
        ctx = torch.randn(1, L, 4096)

        def call(t):
            return model(x, torch.full((1,), t), ctx, return_dict=False)[0]
    else:
        model = FluxTransformer2DModel(**FLUX_DEV).eval()
        # 1024x1024 -> latents [1, 16, 128, 128], packed 2x2: 64 * 64 = 4,096 tokens.
        h = w = 128
        x = torch.randn(1, (h // 2) * (w // 2), 64)
        ctx, pooled = torch.randn(1, L, 4096), torch.randn(1, 768)
        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] = torch.arange(h // 2)[:, None]
        img_ids[..., 2] = torch.arange(w // 2)[None, :]
        img_ids, txt_ids = img_ids.reshape(-1, 3), torch.zeros(L, 3)
        g = torch.full((1,), 3.5)

        def call(t):
            return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                         timestep=torch.full((1,), t / 1000), img_ids=img_ids, txt_ids=txt_ids,
                         guidance=g, return_dict=False)[0]
torch.set_default_dtype(torch.float32)

for i in range(a.warmup):
    call(1000.0 - i)
torch.cuda.synchronize()
times = []
for i in range(a.calls):
    t0 = time.perf_counter()
    call(1000.0 * (1 - i / a.calls))
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
print(json.dumps({"model": a.model, "seconds_per_call": statistics.median(times), "mean": statistics.mean(times),
                  "calls": a.calls, "torch": torch.__version__, "diffusers": diffusers.__version__,
                  "gpu": torch.cuda.get_device_name(0)}))
