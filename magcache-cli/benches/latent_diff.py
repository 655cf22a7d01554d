#!/usr/bin/env python3
"""Compares two final latents written by `magcache run --out` (safetensors, tensor `final`): PSNR
over a data range (default 2, the latents' [-1, 1]) and the largest difference as a fraction of the
first's largest magnitude. Reads the file format itself (an 8-byte header length, a JSON header,
the raw values), so it needs only torch for the arithmetic.

Usage: latent_diff.py A.safetensors B.safetensors [--data-range R]"""
import argparse, json, math, struct

import torch

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def final(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        body = f.read()
    if "final" not in header:
        raise SystemExit(f"{path}: no tensor `final` (a `magcache run --out` file)")
    meta = header["final"]
    a, b = meta["data_offsets"]
    t = torch.frombuffer(bytearray(body[a:b]), dtype=DTYPES[meta["dtype"]])
    return t.reshape(meta["shape"]).to(torch.float64)


ap = argparse.ArgumentParser()
ap.add_argument("a")
ap.add_argument("b")
ap.add_argument("--data-range", type=float, default=2.0)
o = ap.parse_args()
x, y = final(o.a), final(o.b)
if x.shape != y.shape:
    raise SystemExit(f"shapes differ: {list(x.shape)} and {list(y.shape)}")
mse = torch.mean((x - y) ** 2).item()
psnr = math.inf if mse == 0 else 10 * math.log10(o.data_range**2 / mse)
rel = (x - y).abs().max().item() / max(x.abs().max().item(), 1e-30)
print(f"PSNR {psnr:.2f} dB (range {o.data_range:g}), max difference {100 * rel:.3f}% of the largest value")
