#!/usr/bin/env python3
"""Times the dense denoising loop of a magcache run file in the PyTorch reference (diffusers), on CPU,
in the run file's `model.dtype` (f32, or bf16 or f16: weights and inputs in that dtype, PyTorch's CPU
bf16 and f16 products on oneDNN, as a user's `torch_dtype=torch.bfloat16` runs them): the same architecture (preset + overrides), latent shape, text length, steps and CFG calls.
Weights are random (timing does not depend on them). Prints JSON: {"wall_seconds": ..., "calls": ...}.

Usage: python pytorch_dense.py RUN.toml [--threads N]
Needs: torch, diffusers."""
import argparse, json, time, tomllib

import diffusers
import torch
from diffusers import FluxTransformer2DModel, WanTransformer3DModel

WAN = {
    "wan2.1-t2v-1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    "wan2.2-ti2v-5b": dict(num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
}
WAN_BASE = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
FLUX = {"flux-dev": dict(guidance_embeds=True), "flux-schnell": dict(guidance_embeds=False)}
FLUX_BASE = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))

ap = argparse.ArgumentParser()
ap.add_argument("config")
ap.add_argument("--threads", type=int, default=None)
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
torch.set_grad_enabled(False)
cfg = tomllib.load(open(a.config, "rb"))
m, inp, smp = cfg["model"], cfg.get("inputs", {}), cfg["sampling"]
over = m.get("overrides", {})
steps = smp["steps"]
dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
if m.get("dtype", "f32") not in dtypes:
    raise SystemExit(f"{a.config}: model.dtype = {m.get('dtype')!r}: this script times f32, bf16 or f16")
dt = dtypes[m.get("dtype", "f32")]
torch.manual_seed(0)


def keep_fp32(model):
    """The parameters a model class keeps in f32 (`_keep_in_fp32_modules`: Wan's norms, modulation,
    time embedding), as diffusers 0.42's `from_pretrained(..., torch_dtype=torch.bfloat16)` loads
    them (older diffusers kept them for float16 only: the diffusers version is in the output), and
    the buffers (Wan's RoPE tables), which `from_pretrained` leaves in f32."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    if dt != torch.float32:
        for name, param in model.named_parameters():
            if any(k in name.split(".") for k in keep):
                param.data = param.data.float()
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.float()
    return model


if m["family"].startswith("wan"):
    c = {**WAN_BASE, **WAN[m["preset"]], **over}
    if "patch_size" in c:
        c["patch_size"] = tuple(c["patch_size"])
    model = keep_fp32(WanTransformer3DModel(**c).to(dt).eval())
    shape = inp.get("latent_shape", [1, c["in_channels"], 3, 24, 40])
    x = torch.randn(*shape, dtype=dt)
    ctx = torch.randn(shape[0], inp.get("text_len", 64), c["text_dim"], dtype=dt)
    cfg_calls = 2 if smp.get("guidance_scale", 5.0) > 1 else 1

    def call(t):
        return model(x, torch.full((shape[0],), t), ctx, return_dict=False)[0]
else:
    c = {**FLUX_BASE, **FLUX[m["preset"]], **over}
    c["axes_dims_rope"] = tuple(c["axes_dims_rope"])
    model = keep_fp32(FluxTransformer2DModel(**c).to(dt).eval())
    b, _, h, w = inp.get("latent_shape", [1, c["in_channels"] // 4, 64, 64])
    seq, L = (h // 2) * (w // 2), inp.get("text_len", 64)
    x = torch.randn(b, seq, c["in_channels"], dtype=dt)
    ctx = torch.randn(b, L, c["joint_attention_dim"], dtype=dt)
    pooled = torch.randn(b, c["pooled_projection_dim"], dtype=dt)
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] = torch.arange(h // 2)[:, None]
    img_ids[..., 2] = torch.arange(w // 2)[None, :]
    img_ids, txt_ids = img_ids.reshape(-1, 3), torch.zeros(L, 3)
    g = torch.full((b,), smp.get("guidance_scale", 3.5)) if c["guidance_embeds"] else None
    cfg_calls = 1

    def call(t):
        return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=torch.full((b,), t / 1000),
                     img_ids=img_ids, txt_ids=txt_ids, guidance=g, return_dict=False)[0]

t0 = time.perf_counter()
n = 0
for i in range(steps):
    for _ in range(cfg_calls):
        call(1000.0 * (1 - i / steps))
        n += 1
print(json.dumps({"wall_seconds": time.perf_counter() - t0, "calls": n, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "diffusers": diffusers.__version__, "dtype": str(dt).removeprefix("torch.")}))
