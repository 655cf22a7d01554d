#!/usr/bin/env python3
"""Throughput of one linear layer's product in PyTorch on the CPU, the counterpart of the
`bf16_gemm` example (`magcache-layers/examples/bf16_gemm.rs`): `torch.nn.functional.linear` of an
`[M, K]` activation by an `[N, K]` weight, in f32 (MKL), bf16 and f16 (PyTorch's bundled oneDNN), the
first call of each untimed, then ROUNDS timed calls; prints GFLOP/s per call.

Usage: python pytorch_linear.py [M K N] [--rounds R] [--threads T]
(default: 4680 x 1536 by 1536 x 8960, the Wan2.1-1.3B FFN at 4680 tokens, 3 rounds, all threads).
Needs: torch."""
import argparse, time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("dims", type=int, nargs="*", default=[4680, 1536, 8960])
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--threads", type=int, default=None)
a = ap.parse_args()
if len(a.dims) != 3:
    ap.error("give M K N, or nothing")
if a.threads:
    torch.set_num_threads(a.threads)
torch.set_grad_enabled(False)
m, k, n = a.dims
flop = 2.0 * m * k * n
print(f"[{m} x {k}] by [{k} x {n}], {torch.get_num_threads()} threads, torch {torch.__version__}")
x = torch.randn(m, k)
w = torch.randn(n, k)
pairs = {"f32": (x, w), "bf16": (x.bfloat16(), w.bfloat16()), "f16": (x.half(), w.half())}
for xs, ws in pairs.values():
    torch.nn.functional.linear(xs, ws)
for r in range(1, a.rounds + 1):
    line = []
    for name, (xs, ws) in pairs.items():
        t = time.perf_counter()
        torch.nn.functional.linear(xs, ws)
        s = time.perf_counter() - t
        line.append(f"{name} {s * 1e3:.0f} ms ({flop / s / 1e9:.0f} GFLOP/s)")
    print(f"round {r}: " + "   ".join(line))
