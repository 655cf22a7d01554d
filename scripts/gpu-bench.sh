#!/usr/bin/env bash
# Times dense and cached transformer calls of a CUDA `magcache` (scripts/build-cuda.sh) against
# PyTorch + diffusers on the same GPU: same architectures, random weights, bf16, SDPA.
#   Wan2.1-T2V-1.3B at 480x832, 81 frames (latents [1,16,21,60,104]: 32,760 tokens), text 512, CFG;
#   FLUX.1-dev at 1024x1024 (latents [1,16,128,128]: 4,096 tokens), text 512.
# Runs on the GPU machine (needs no Rust toolchain); prints a table.
#
# Usage: scripts/gpu-bench.sh MAGCACHE_BIN [STEPS]        (STEPS default 10)
# Env:   PYTHON (python with torch (CUDA) and diffusers; default python3), SKIP_TORCH=1, ONLY=wan|flux
#
# magcache's seconds per dense call = (wall(STEPS) - wall(2 steps)) / (calls(STEPS) - calls(2)): the
# first calls' start-up (cuBLAS handles, module loading) cancels out. PyTorch: median of 10 calls after
# 2 warm-up calls. Cached: the preset's MagCache curve; wall speedup against the same dense run, and
# its efficiency = wall speedup / ideal speedup (calls / computed calls).
set -euo pipefail
bin="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; steps="${2:-10}"
here="$(cd "$(dirname "$0")" && pwd)"; py="${PYTHON:-python3}"
[ -x "$bin" ] || { echo "gpu-bench.sh: $1 is not an executable" >&2; exit 2; }
# The CUDA runtime libraries the binary links (libcudart/libcublas/libcurand .so.13) from the
# nvidia-* wheels PyTorch brings, unless the system has them.
if nv="$("$py" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)"; then
  for d in "$nv"/nvidia/cu13/lib "$nv"/nvidia/*/lib; do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  export LD_LIBRARY_PATH
fi
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT

config() { # NAME STEPS CACHED -> path
  local f="$tmp/$1-$2-$3.toml"
  case "$1" in
    wan) cat > "$f" <<TOML
[model]
family = "wan2.1"
preset = "wan2.1-t2v-1.3b"
seed = 0
device = "cuda"
dtype = "bf16"

[inputs]
latent_shape = [1, 16, 21, 60, 104]
text_len = 512

[sampling]
steps = $2
shift = 5.0
guidance_scale = 5.0
scheduler = "unipc"
TOML
      [ "$3" = cached ] && printf '\n[cache]\nstrategy = "magcache"\nthreshold = 0.12\nmax_skip_steps = 2\nretention_ratio = 0.2\n' >> "$f";;
    flux) cat > "$f" <<TOML
[model]
family = "flux"
preset = "flux-dev"
seed = 0
device = "cuda"
dtype = "bf16"

[inputs]
latent_shape = [1, 16, 128, 128]
text_len = 512

[sampling]
steps = $2
guidance_scale = 3.5
TOML
      [ "$3" = cached ] && printf '\n[cache]\nstrategy = "magcache"\nthreshold = 0.24\nmax_skip_steps = 5\nretention_ratio = 0.1\n' >> "$f";;
  esac
  echo "$f"
}
run() { # config -> "wall total computed"
  set -o pipefail
  "$bin" run --quiet --json --config "$1" \
    | "$py" -c 'import json,sys; d=json.load(sys.stdin); print(d["wall_seconds"], d["total_calls"], d["computed_calls"])'
}

echo "date: $(date -u +%F)   gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo '?')"
echo "magcache: $bin   steps: $steps"
rows=()
for m in ${ONLY:-wan flux}; do
  echo "== $m" >&2
  fail() { echo "gpu-bench.sh: magcache failed on $m ($1)" >&2; exit 1; }
  o=$(run "$(config "$m" 2 dense)") || fail "dense, 2 steps"; read -r w2 c2 _ <<<"$o"
  o=$(run "$(config "$m" "$steps" dense)") || fail dense; read -r wd cd _ <<<"$o"
  o=$(run "$(config "$m" "$steps" cached)") || fail cached; read -r wc cc kc <<<"$o"
  rs=$("$py" -c "print(($wd - $w2) / ($cd - $c2))")
  if [ -z "${SKIP_TORCH:-}" ]; then
    ts=$("$py" "$here/diffusers_gpu_bench.py" "$m" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["seconds_per_call"])')
  else ts=nan; fi
  rows+=("$("$py" - "$m" "$rs" "$ts" "$wd" "$wc" "$cc" "$kc" <<'PY'
import sys
m, rs, ts, wd, wc, cc, kc = sys.argv[1], *map(float, sys.argv[2:])
ideal, sp = cc / kc, wd / wc
print(f"| {m} | {rs:.3f} | {ts:.3f} | {ts / rs:.2f}x | {wc / cc:.3f} | {int(kc)}/{int(cc)} | {sp:.2f}x | {ideal:.2f}x | {100 * sp / ideal:.1f}% |")
PY
)")
done
echo
echo "| model | magcache dense s/call | PyTorch s/call | PyTorch / magcache | magcache cached s/call | computed | wall speedup | ideal | efficiency |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
"$py" -c 'import torch, diffusers; print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")' 2>/dev/null || true
