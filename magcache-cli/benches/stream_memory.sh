#!/usr/bin/env bash
# Peak resident memory of transformers held and streamed (`offload = "stream"`), in bf16, from
# checkpoints written once by `magcache export` (issue 15; figures in docs/benchmarks.md).
#
# Usage: magcache-cli/benches/stream_memory.sh [WORK_DIR] [MODELS]
#   WORK_DIR: where the checkpoints go (default /tmp/magcache-stream; Wan2.1-14B takes 28.6 GB of
#             disk, FLUX.1-dev 23.8 GB, Wan2.1-1.3B 2.8 GB; they are kept for re-runs, delete them after).
#   MODELS:   "1.3b 14b" by default; also "flux-dev", "z-image-turbo" (6B, 12 GB) and "qwen-image"
#             (20B, 41 GB).
# Env: MAGCACHE (default target/release/magcache), STEPS (default 2; no CFG: one call per step),
#      FORMAT (default bf16: a safetensors folder; q8_0, q4_0, ...: one GGUF file, `export --gguf`,
#      its matrices kept quantized when held; Wan only); RUN_EXTRA: a line added to each run's [model]
#      table (e.g. 'gguf_repack = false': held GGUF matrices not repacked by candle, one copy).
# Each run: 64 image tokens (Wan: 1 latent frame of 16x16; FLUX: 16x16 latents), text 64, no CFG,
# so the weights dominate the memory.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
work="${1:-/tmp/magcache-stream}"
models="${2:-1.3b 14b}"
bin="${MAGCACHE:-$repo/target/release/magcache}"
steps="${STEPS:-2}"
format="${FORMAT:-bf16}"
[ -x "$bin" ] || { echo "stream_memory.sh: build first: cargo build --release -p magcache-cli" >&2; exit 2; }
mkdir -p "$work"
work="$(cd "$work" && pwd)" # absolute: a run file resolves `weights` against its own folder
echo "date: $(date -u +%F)  cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) threads, $(free -g | awk '/Mem:/{print $2}') GB"
tail_cfg="[inputs]
latent_shape = LATENTS
text_len = 64
[sampling]
steps = $steps
guidance_scale = GUIDANCE
"
rss() { # run a config, print the run's true peak RSS (GB) and wall seconds from its report
  # (not /usr/bin/time: the runner resets the kernel's high-water mark at each stage to measure the
  # stage's own peak, so `time -v` sees only the last stage's; the report keeps the true peak).
  local out; out=$("$bin" run --config "$1" --json 2>/dev/null) || { "$bin" run --config "$1" --quiet >&2; return 1; }
  echo "$out" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.2f GB peak RSS, %.1f s wall" % (r["run_peak_rss_bytes"]/1e9, r["run_wall_seconds"]), end="")'
}
for m in $models; do
  case "$m" in
    flux-dev) family=flux; preset=flux-dev; latents="[1, 16, 16, 16]"; guidance=1.0 ;;
    z-image-turbo) family=z-image; preset=z-image-turbo; latents="[1, 16, 16, 16]"; guidance=0.0 ;;
    qwen-image) family=qwen-image; preset=qwen-image; latents="[1, 16, 16, 16]"; guidance=1.0 ;;
    *) family=wan2.1; preset="wan2.1-t2v-$m"; latents="[1, 16, 1, 16, 16]"; guidance=1.0 ;;
  esac
  cfg_tail="${tail_cfg/LATENTS/$latents}"
  cfg_tail="${cfg_tail/GUIDANCE/$guidance}"
  ckpt="$work/$preset-$format"
  if [ ! -d "$ckpt" ]; then
    printf '[model]\nfamily = "%s"\npreset = "%s"\ndtype = "bf16"\n%s' "$family" "$preset" "$cfg_tail" > "$work/export-$m.toml"
    echo "== export $preset ($format) -> $ckpt"
    gguf=(); [ "$format" = bf16 ] || gguf=(--gguf "$format")
    /usr/bin/time -f "   export: %e s, %M KB peak" "$bin" export --config "$work/export-$m.toml" --out "$ckpt" "${gguf[@]}"
  fi
  weights="$ckpt"
  [ "$format" = bf16 ] || weights="$(ls "$ckpt"/*.gguf)"
  for offload in none stream; do
    printf '[model]\nfamily = "%s"\nweights = "%s"\ndtype = "bf16"\noffload = "%s"\n%s\n%s' "$family" "$weights" "$offload" "${RUN_EXTRA:-}" "$cfg_tail" > "$work/run-$m-$format-$offload.toml"
    printf '%-22s offload=%-6s ' "$preset $format" "$offload"
    rss "$work/run-$m-$format-$offload.toml" || echo "(refused or failed: see above)"
    echo
  done
done
