#!/usr/bin/env python3
"""Time of PyTorch's CPU attention at a transformer's shapes, the counterpart of the
`attention_cpu` example (`magcache-layers/examples/attention_cpu.rs`):
`torch.nn.functional.scaled_dot_product_attention` of `[1, HEADS, TOKENS, HEAD_DIM]` queries, keys
and values, in f32 and bf16 (its fused flash attention on the CPU), the first call of each untimed,
then the median of ROUNDS timed calls.

Usage: python pytorch_attention.py [TOKENS HEADS HEAD_DIM] [--rounds R] [--threads T]
(default: 4 680 tokens of the Wan2.1-1.3B, 12 heads of 128, 3 rounds, all threads). Needs: torch."""
import argparse, statistics, time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("dims", type=int, nargs="*", default=[4680, 12, 128])
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--threads", type=int, default=None)
a = ap.parse_args()
if len(a.dims) != 3:
    ap.error("give TOKENS HEADS HEAD_DIM, or nothing")
if a.threads:
    torch.set_num_threads(a.threads)
torch.set_grad_enabled(False)
s, h, d = a.dims
print(f"attention [1, {h}, {s}, {d}], {torch.get_num_threads()} threads, median of {a.rounds}, torch {torch.__version__}")
q, k, v = (torch.randn(1, h, s, d) for _ in range(3))
for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
    qs, ks, vs = (x.to(dtype) for x in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(qs, ks, vs)
    times = []
    for _ in range(a.rounds):
        t = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(qs, ks, vs)
        times.append(time.perf_counter() - t)
    print(f"PyTorch {name}: {statistics.median(times) * 1e3:.1f} ms")
