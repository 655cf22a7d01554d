"""Two forecasts tried against the shipped one on the trained digits model (issue 44), on torch noise:
each CFG branch's own order-1 forecast of the blocks' residual (`taylor1` in step index, the shipped
files' start) against
  - a CFG split: the conditional branch computes more steps and the unconditional fewer, its
    residual at the other steps being the conditional one (computed or forecast) less an order-1
    forecast of their difference (one difference per step both computed), same 12 calls of 40;
  - staggered branches: 6 computed steps each, at different steps, each branch forecasting itself,
    optionally corrected by the other branch's forecast error where that one computed;
  - forecasting the model's output instead of the residual, as velocity v, as the clean-image
    estimate x0 = x - sigma v or as the noise estimate eps = x + (1 - sigma) v, in step index or
    in sigma, then turned back into v at the current latent (x0 and eps close the loop on where
    the sampler has taken the latent);
  - a predictor-corrector: after each computed step b, the steps since the previous computed step
    a are run again from a's corrected latent with residuals interpolated between a's and b's (in
    step index, order 1 or, with an older one, 2) instead of extrapolated, and b's residual is
    applied at the corrected latent (no extra block call; the head and the sampler run again);
  - per-sample compute, with an oracle: each batch's worst sample (under the shipped calls)
    given more computed steps, alone (at a higher average cost) or paid for by the other nine
    computing one step fewer (the same average cost, 6 steps of 20).
Prints per setting each batch's PSNR (range 2, against the dense run), the worst batch, the mean and
the worst single sample.

    python scripts/digits-forecast-study.py [BATCHES] [SEED]
    python scripts/digits-forecast-study.py fit VARIANT [NCAL] [ITERATIONS]

The second form runs the fitted estimator in torch (docs/quality.md, "The fitted estimator"):
VARIANT `plain`, `bias`, `gate`, `ridge` (plus `RIDGE` times the squared distance from the
start, default 1e-4), `oracle` (coefficients fitted on each held-out batch itself: an
upper bound for any shared profile on those calls; `CALLS` picks the calls, default digits_3x.toml's)
or `mixR` (plus a rank-R channel mixing of each past residual, `p A B`,
A random, B from 0; its learning rate `MIX_LR`, 0.0005 measured), NCAL calibration batches of 10
(default 8), ITERATIONS Adam steps (default 25); 4-8 minutes on 2 cores (15 on one busy core).

BATCHES batches of 10 (classes shuffled), torch noise seed SEED (default 6 and 123). Needs torch and
diffusers 0.42 (as scripts/digits-exhaustive-search.py); about a minute on 2 cores.
"""
import math
import os
import sys

import torch
from safetensors.torch import load_file
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

torch.set_grad_enabled(False)
D = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "trained", "digits_wan")
m = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(D)).float().eval()
m.load_state_dict(load_file(os.path.join(D, "diffusion_pytorch_model.safetensors")))
emb = load_file(os.path.join(D, "class_embeddings.safetensors"))["class_embeddings"]
STEPS, SHIFT, G = 20, 3.0, 4.0
# The computed steps of the fit study (`CALLS=0,7,13,16,18` for digits_4x.toml's).
CALLS = [int(x) for x in os.environ.get("CALLS", "0,4,9,13,16,18").split(",")]
blocks = m.blocks


class Chain(torch.nn.Module):
    """Stands for the block list: `policy(h, run)` returns the blocks' output for input h."""
    policy = None

    def forward(self, h, enc, tproj, rope):
        def run(x):
            for b in blocks:
                x = b(x, enc, tproj, rope)
            return x
        return Chain.policy(h, run)


m.blocks = torch.nn.ModuleList([Chain()])


def sampler():
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    s.set_timesteps(STEPS)
    return s


def order1(hist, at):
    """Order-1 forecast at `at` from [(coordinate, value)] (the last value alone after one)."""
    if len(hist) == 1:
        return hist[-1][1]
    (a, qa), (b, qb) = hist[-2], hist[-1]
    return qb + (at - b) / (b - a) * (qb - qa)


def loop(lat, cls, policy):
    """The CFG loop; `policy(branch, step, h, run)` gives the blocks' output."""
    s = sampler()
    cond, uncond = emb[cls], emb[torch.full_like(cls, 10)]
    for i, t in enumerate(s.timesteps):
        tt = t.expand(lat.shape[0])
        Chain.policy = lambda h, run: policy("c", i, h, run)
        pc = m(lat, tt, cond, return_dict=False)[0]
        Chain.policy = lambda h, run: policy("u", i, h, run)
        pu = m(lat, tt, uncond, return_dict=False)[0]
        lat = s.step(pu + G * (pc - pu), t, lat, return_dict=False)[0]
    return lat


def dense(_branch, _i, h, run):
    return run(h)


def residuals(sc, su, split):
    """Residual forecasts: cond computes `sc`, uncond `su`; `split`: uncond from cond less the difference."""
    hist = {"c": [], "u": [], "d": []}
    cond_now = {}

    def policy(br, i, h, run):
        if i in (sc if br == "c" else su):
            out = run(h)
            r = out - h
            hist[br].append((i, r))
            if br == "c":
                cond_now[i] = r
            elif i in cond_now:
                hist["d"].append((i, cond_now[i] - r))
            return out
        if br == "u" and split and hist["d"]:
            return h + cond_now[i] - order1(hist["d"], i)
        r = order1(hist[br], i)
        if br == "c":
            cond_now[i] = r
        return h + r
    return policy


def fit_study(variant, ncal=8, its=25):
    """The fitted estimator in torch on `digits_3x.toml`'s calls (three residuals, from `taylor1` in
    step index, Adam 0.01, `ncal` calibration and 3 validation batches of torch noise, the iterate
    kept on the validation worst); `variant`: `plain` (as `calibrate --fit`), `bias` (plus a
    per-channel bias on each reused call, from 0), `gate` (each coefficient plus a per-channel
    slope times the sample's relative residual change `|r_b - r_a| / |r_b|`, from 0) or `mixR`
    (plus `sum_j (p_j A_j) B_j`, a rank-R mixing of the hidden channels of each past residual). Prints the
    start's and the fit's PSNR on 12 held-out batches."""
    import time
    S, H, C = CALLS, 3, m.config.num_attention_heads * m.config.attention_head_dim

    def taylor_w(past, at):
        if len(past) == 1:
            return [1.0]
        sa, sb = past[-2], past[-1]
        q = (at - sb) / (sb - sa)
        return [0.0] * (len(past) - 2) + [-q, 1 + q]

    def coefs(v):
        w, extra, computed = {}, {}, []
        for k in range(STEPS):
            if k in S:
                computed.append(k)
                continue
            past = computed[-H:]
            w[k] = [torch.full((C,), x, requires_grad=True) for x in taylor_w(past, k)]
            if v == "bias":
                extra[k] = [torch.zeros(C, requires_grad=True)]
            elif v == "gate":
                extra[k] = [torch.zeros(C, requires_grad=True) for _ in past]
            elif v.startswith("mix"):
                # low-rank channel mixing on each past residual, LoRA-style: A random, B from 0
                rank = int(v[3:] or 4)
                g = torch.Generator().manual_seed(k)
                extra[k] = [t for _ in past for t in (
                    (torch.randn(C, rank, generator=g) / math.sqrt(C)).requires_grad_(),
                    torch.zeros(rank, C, requires_grad=True))]
        return w, extra, v

    def cached(lat, cls, co):
        w, extra, v = co
        hist = {"c": [], "u": []}

        def policy(br, i, h, run):
            if i in S:
                out = run(h)
                hist[br].append(out - h)
                return out
            past = hist[br][-H:]
            if v == "gate" and len(past) >= 2:
                d = (past[-1] - past[-2]).flatten(1).norm(dim=1) / past[-1].flatten(1).norm(dim=1)
                f = d.view(-1, 1, 1)
                return h + sum((wj + f * uj) * p for wj, uj, p in zip(w[i], extra[i], past))
            r = sum(wj * p for wj, p in zip(w[i], past))
            if v.startswith("mix"):
                e = extra[i]
                r = r + sum((p @ e[2 * j]) @ e[2 * j + 1] for j, p in enumerate(past))
            return h + (r + extra[i][0] if v == "bias" else r)
        return loop(lat, cls, policy)

    def draw(n, seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            lat = torch.randn(10, 1, 1, 16, 16, generator=g)
            cls = torch.randperm(10, generator=g)
            out.append((lat, cls, loop(lat, cls, dense)))
        return out

    def psnrs(bs, co):
        return [10 * math.log10(4 / ((cached(l, c, co) - r) ** 2).mean().item()) for l, c, r in bs]

    def show(name, h):
        print(f"{name}: held {' '.join(f'{x:.2f}' for x in h)} | worst {min(h):.2f} mean {sum(h) / len(h):.2f}",
              flush=True)

    if variant in ("oracle", "oracle1"):
        # Upper bounds on held-out batches: `oracle` fits one set of coefficients on the 12
        # held-out batches together (the best profile shared by these very inputs: no profile
        # fitted on other noise can beat its worst batch but by luck), `oracle1` one set per batch
        # on that batch alone. Adam 0.01, `its` iterations, each batch's best iterate kept.
        held = draw(12, 3000)
        groups = [[i] for i in range(len(held))] if variant == "oracle1" else [list(range(len(held)))]
        start, best_of, t0 = [], [0.0] * len(held), time.time()
        for g in groups:
            co = coefs("plain")
            params = [p for ws in co[0].values() for p in ws]
            opt = torch.optim.Adam(params, lr=0.01)
            top, tot = -1e9, 0.0
            for it in range(its + 1):
                opt.zero_grad()
                ps, tot = [], 0.0
                with torch.enable_grad():
                    for i in g:
                        l, c, r = held[i]
                        err = (cached(l, c, co) - r) ** 2
                        ps.append(10 * math.log10(4 / err.mean().item()))
                        if it < its:
                            loss = err.sum() / (r ** 2).sum()
                            loss.backward()
                            tot += loss.item()
                if it == 0:
                    start.extend(ps)
                if min(ps) > top:
                    top = min(ps)
                    for i, p in zip(g, ps):
                        best_of[i] = p
                print(f"{variant} iteration {it}: worst {min(ps):.2f} mean {sum(ps) / len(ps):.2f} dB, error {tot:.4e} ({time.time() - t0:.0f} s)", flush=True)
                if it == its:
                    break
                opt.step()
        show(f"start (taylor1, step) on {CALLS}", start)
        show(f"{variant}: fitted on the held-out batches themselves ({its} iterations, the best worst kept)", best_of)
        return
    cal, val, held = draw(ncal, 1000), draw(3, 2000), draw(12, 3000)
    show("start (taylor1, step)", psnrs(held, coefs("plain")))
    co = coefs(variant)
    own = [p for ws in co[0].values() for p in ws]
    extra = [p for es in co[1].values() for p in es]
    params = own + extra
    # the mixing's B is a product term (A B): its steps are scaled down apart (MIX_LR)
    opt = torch.optim.Adam([{"params": own, "lr": 0.01},
                            {"params": extra, "lr": float(os.environ.get("MIX_LR", "0.01"))}])
    best_v, best, t0 = -1e9, None, time.time()
    # `ridge`: the loss plus RIDGE times the squared distance of the coefficients from their start
    # (the order-1 forecast), summed over every coefficient.
    ridge = float(os.environ.get("RIDGE", "1e-4")) if variant == "ridge" else 0.0
    own0 = [p.detach().clone() for p in own]
    for it in range(its + 1):
        v = min(psnrs(val, co))
        if v > best_v:
            best_v, best = v, ([p.detach().clone() for p in params], it)
        if it == its:
            break
        opt.zero_grad()
        tot = 0.0
        with torch.enable_grad():
            for l, c, r in cal:
                loss = ((cached(l, c, co) - r) ** 2).sum() / (r ** 2).sum()
                loss.backward()
                tot += loss.item()
            if ridge > 0:
                pen = ridge * sum(((p - q) ** 2).sum() for p, q in zip(own, own0))
                pen.backward()
                print(f"ridge penalty {pen.item():.4e}", flush=True)
        opt.step()
        print(f"{variant} iteration {it}: calibration {tot:.4e}, validation worst {v:.2f} dB ({time.time() - t0:.0f} s)",
              flush=True)
    for p, q in zip(params, best[0]):
        p.data.copy_(q)
    show(f"fitted {variant}, {ncal} calibration batches (iteration {best[1]} kept, validation {best_v:.2f})",
         psnrs(held, co))


if len(sys.argv) > 1 and sys.argv[1] == "fit":
    fit_study(sys.argv[2], *(int(a) for a in sys.argv[3:5]))
    sys.exit(0)


def staggered(lat, cls, sc, su, lam):
    """Each branch on its own calls (cond `sc`, uncond `su`), its own order-1 forecast elsewhere; at
    a step where one branch computes, it runs first and the other's forecast gains `lam` times the
    computed branch's forecast error there."""
    s = sampler()
    ctx = {"c": emb[cls], "u": emb[torch.full_like(cls, 10)]}
    sets, hist = {"c": sc, "u": su}, {"c": [], "u": []}
    for i, t in enumerate(s.timesteps):
        err, pred = [None], {}
        for br in sorted("cu", key=lambda b: 0 if i in sets[b] else 1):
            def policy(h, run, br=br):
                if i in sets[br]:
                    f = order1(hist[br], i) if hist[br] else None
                    out = run(h)
                    hist[br].append((i, out - h))
                    err[0] = None if f is None else out - h - f
                    return out
                r = order1(hist[br], i)
                return h + (r if err[0] is None else r + lam * err[0])
            Chain.policy = policy
            pred[br] = m(lat, t.expand(lat.shape[0]), ctx[br], return_dict=False)[0]
        lat = s.step(pred["u"] + G * (pred["c"] - pred["u"]), t, lat, return_dict=False)[0]
    return lat


def outputs(lat, cls, steps, space, axis):
    """Forecast of the model output in `space` (v, x0, eps) on `axis` (step, sigma)."""
    s = sampler()
    cond, uncond = emb[cls], emb[torch.full_like(cls, 10)]
    Chain.policy = lambda h, run: run(h)
    hist = {"c": [], "u": []}
    for i, t in enumerate(s.timesteps):
        sg = float(s.sigmas[i])
        at = i if axis == "step" else sg
        pred = {}
        for br, e in (("c", cond), ("u", uncond)):
            if i in steps:
                v = m(lat, t.expand(lat.shape[0]), e, return_dict=False)[0]
                hist[br].append((at, {"v": v, "x0": lat - sg * v, "eps": lat + (1 - sg) * v}[space]))
                pred[br] = v
            else:
                q = order1(hist[br], at)
                pred[br] = {"v": q, "x0": (lat - q) / sg, "eps": (q - lat) / (1 - sg)}[space]
        lat = s.step(pred["u"] + G * (pred["c"] - pred["u"]), t, lat, return_dict=False)[0]
    return lat


def lagrange(pts, at):
    """The polynomial through [(coordinate, value)] at `at`."""
    out = 0
    for j, (xj, vj) in enumerate(pts):
        w = 1.0
        for k, (xk, _) in enumerate(pts):
            if k != j:
                w *= (at - xk) / (xj - xk)
        out = out + w * vj
    return out


def corrected(lat, cls, steps, order):
    """The predictor-corrector over the computed `steps` (interpolation of order `order`)."""
    s = sampler()
    sig = [float(v) for v in s.sigmas]
    ctx = {"c": emb[cls], "u": emb[torch.full_like(cls, 10)]}
    hist = {"c": [], "u": []}

    def call(x, i, br, r=None):
        """The model's output at step i; r None: blocks computed (their residual stored)."""
        def policy(h, run):
            if r is not None:
                return h + r
            out = run(h)
            hist[br].append((i, out - h))
            return out
        Chain.policy = policy
        return m(x, s.timesteps[i].expand(x.shape[0]), ctx[br], return_dict=False)[0]

    def advance(x, i, r):
        v = {br: call(x, i, br, r(br)) for br in ("c", "u")}
        return x + (sig[i + 1] - sig[i]) * (v["u"] + G * (v["c"] - v["u"]))

    x = anchor = lat
    for j, b in enumerate(steps):
        for br in ("c", "u"):
            call(x, b, br)
        if j > 0:
            a = steps[j - 1]
            x = anchor
            for i in range(a, b):
                x = advance(x, i, lambda br: lagrange(hist[br][-(order + 1):], i) if i > a else hist[br][-2][1])
        anchor = x
        end = steps[j + 1] if j + 1 < len(steps) else STEPS
        for i in range(b, end):
            x = advance(x, i, lambda br: hist[br][-1][1] if i == b else order1(hist[br], i))
    return x


def report(name, run, batches):
    per_batch, per_sample = [], []
    for lat, cls, ref in batches:
        mse = ((run(lat, cls) - ref) ** 2).flatten(1).mean(1)
        per_sample.append(10 * torch.log10(4 / mse))
        per_batch.append(10 * math.log10(4 / mse.mean().item()))
    worst = torch.cat(per_sample).min().item()
    print(f"{name:44s} {' '.join(f'{x:.2f}' for x in per_batch)} | worst {min(per_batch):.2f}"
          f" mean {sum(per_batch) / len(per_batch):.2f} | worst sample {worst:.2f}", flush=True)


n = int(sys.argv[1]) if len(sys.argv) > 1 else 6
g = torch.Generator().manual_seed(int(sys.argv[2]) if len(sys.argv) > 2 else 123)
batches = []
for _ in range(n):
    lat = torch.randn(10, 1, 1, 16, 16, generator=g)
    cls = torch.randperm(10, generator=g)
    batches.append((lat, cls, loop(lat, cls, dense)))
S6 = [0, 4, 9, 13, 16, 18]  # digits_3x.toml's calls
report("residual taylor1 (step), both branches S6", lambda l, c: loop(l, c, residuals(S6, S6, False)), batches)
for sc, su in [([0, 2, 4, 7, 9, 12, 15, 18], [0, 4, 9, 16]), ([0, 3, 5, 8, 11, 14, 16, 18], [0, 5, 11, 16]),
               ([0, 4, 9, 13, 16, 18], [0, 2, 6, 11, 15, 18])]:
    report(f"CFG split c{sc} u{su}", lambda l, c: loop(l, c, residuals(sc, su, True)), batches)
for su in ([0, 2, 7, 11, 15, 18], [0, 3, 7, 11, 15, 18], [0, 2, 6, 11, 14, 17]):
    for lam in (0, 0.5, 1.0):
        report(f"staggered c S6 u {su} lam {lam}", lambda l, c: staggered(l, c, S6, su, lam), batches)
for space in ("v", "x0", "eps"):
    for axis in ("step", "sigma"):
        report(f"output {space} in {axis}, S6", lambda l, c: outputs(l, c, S6, space, axis), batches)
for order in (1, 2):
    report(f"predictor-corrector, order {order}, S6", lambda l, c: corrected(l, c, S6, order), batches)
S5 = [0, 5, 11, 15, 18]  # digits_4x.toml's calls until 2026-11-26 evening (now [0, 7, 13, 16, 18])
S15 = [0, 1, 2, 3, 4, 6, 8, 10, 11, 12, 13, 14, 15, 17, 19]


def psnr_of(mses):
    return 10 * math.log10(4 / (sum(mses) / len(mses)))


for b, (lat, cls, ref) in enumerate(batches):
    def each(steps):
        """Each sample's mean squared error, sample j run alone on its own computed steps[j]."""
        out = []
        for j in range(len(cls)):
            x = loop(lat[j:j + 1], cls[j:j + 1], residuals(steps[j], steps[j], False))
            out.append(((x - ref[j:j + 1]) ** 2).mean().item())
        return out
    base = each([S6] * 10)
    w = max(range(10), key=lambda j: base[j])
    line = [f"per-sample, batch {b}: S6 {psnr_of(base):.2f} (its worst sample {10 * math.log10(4 / base[w]):.2f})"]
    for name, sw, others in [("worst dense", list(range(STEPS)), S6), ("worst 15 steps, others S5", S15, S5)]:
        steps = [others] * 10
        steps[w] = sw
        cost = sum(len(s) for s in steps) / 10
        line.append(f"{name} {psnr_of(each(steps)):.2f} ({STEPS / cost:.2f}x)")
    print(" | ".join(line), flush=True)
