"""Exhaustive schedule search on the trained digits model (issue 29): every set of k computed steps
of a 20-step, CFG-4 run (step 0 computed; the same steps for both CFG branches) with one residual
estimator, by depth-first search over the compute/reuse choices so that runs sharing a prefix share
its computation. Prints, per (k, estimator), the best schedules by PSNR (range 2, over the batch)
against the dense run on a batch of torch noise the shipped settings were not chosen on.

    python scripts/digits-exhaustive-search.py N SEED K[,K..] EST[,EST..] [TOP]

N samples (digit i % 10), torch noise seed SEED; EST: t1step (order 1 in step index, `taylor1`),
t1sigma (order 1 in sigma), t2sigma (order 2 in sigma), foca (their mean, in sigma). Env THREADS
(default 2). Same model split and residual semantics as `fewstep_cache_study.py` of the fixtures'
tools (head, blocks, tail; the residual is the blocks' output minus their input; with one computed
call a forecast reuses it). k = 6 (3.33x) visits 11 628 schedules: ~45 min on one Zen 5 core.
"""
import heapq
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file
from diffusers import WanTransformer3DModel, FlowMatchEulerDiscreteScheduler
torch.set_grad_enabled(False)
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
D = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "trained", "digits_wan")
m = WanTransformer3DModel.from_pretrained(D).float().eval()
emb = load_file(D + "/class_embeddings.safetensors")["class_embeddings"]
N = int(sys.argv[1]); seed = int(sys.argv[2]); ks = [int(a) for a in sys.argv[3].split(",")]
ests = sys.argv[4].split(","); top = int(sys.argv[5]) if len(sys.argv) > 5 else 15
STEPS, G = 20, 4.0
s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0); s.set_timesteps(STEPS)
T, SIG = s.timesteps, [float(v) for v in s.sigmas]
lat = torch.randn(N, 1, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
cls = torch.arange(N) % 10
ctx = torch.cat([emb[cls], emb[torch.full((N,), 10)]])

def head(x, t):
    x2 = torch.cat([x, x]); rope = m.rope(x2)
    h = m.patch_embedding(x2).flatten(2).transpose(1, 2).contiguous()
    temb, tproj, ctx_e, _ = m.condition_embedder(t.expand(2 * N), ctx, None)
    return h, (ctx_e, tproj.unflatten(1, (6, -1)), rope), temb

def blocks(h, aux):
    for b in m.blocks:
        h = b(h, *aux)
    return h

def tail(h, temb, shape):
    B, C, F, H, W = shape; pt, ph, pw = m.config.patch_size
    sh, sc = (m.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    h = (m.norm_out(h.float()) * (1 + sc) + sh).type_as(h); h = m.proj_out(h)
    h = h.reshape(B, F // pt, H // ph, W // pw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return h.flatten(6, 7).flatten(4, 5).flatten(2, 3)

def estimate(hist, i, est):
    sa, ga, ra = hist[-1]
    if est == "reuse" or len(hist) < 2: return ra
    sb, gb, rb = hist[-2]
    if est == "t1step": return ra + (ra - rb) * ((i - sa) / (sa - sb))
    x = SIG[i]
    t1 = ra + (ra - rb) * ((x - ga) / (ga - gb))
    if est == "t1sigma": return t1
    if len(hist) < 3: return t1
    sc_, gc, rc = hist[-3]
    # Newton order 2 through the three points in sigma
    d1 = (ra - rb) / (ga - gb); d0 = (rb - rc) / (gb - gc); d2 = (d1 - d0) / (ga - gc)
    t2 = t1 + d2 * (x - ga) * (x - gb)
    if est == "t2sigma": return t2
    return 0.5 * (t1 + t2)  # foca sigma

def advance(x, i, out, temb):
    p = tail(out, temb, (2 * N,) + tuple(x.shape[1:]))
    pc, pu = p[:N], p[N:]
    return x + (SIG[i + 1] - SIG[i]) * (pu + G * (pc - pu))

x = lat
for i in range(STEPS):
    h, aux, temb = head(x, T[i]); x = advance(x, i, blocks(h, aux), temb)
dense = x
def psnr(a): return 10 * torch.log10(4.0 / ((a - dense) ** 2).mean()).item()

for k in ks:
    for est in ests:
        t0 = time.time(); best = []; cnt = [0]
        def dfs(i, x, hist, nc, pat):
            if i == STEPS:
                q = psnr(x); cnt[0] += 1
                item = (q, pat)
                if len(best) < top: heapq.heappush(best, item)
                elif q > best[0][0]: heapq.heapreplace(best, item)
                return
            h, aux, temb = head(x, T[i])
            if nc < k:
                out = blocks(h, aux)
                dfs(i + 1, advance(x, i, out, temb), (hist + [(i, SIG[i], out - h)])[-3:], nc + 1, pat + (i,))
            if i > 0 and STEPS - i - 1 >= k - nc:
                out = h + estimate(hist, i, est)
                dfs(i + 1, advance(x, i, out, temb), hist, nc, pat)
        dfs(0, lat, [], 0, ())
        res = sorted(best, reverse=True)
        print(json.dumps({"k": k, "est": est, "n": N, "seed": seed, "runs": cnt[0], "s": round(time.time() - t0),
                          "top": [[round(q, 2), list(p)] for q, p in res]}), flush=True)
