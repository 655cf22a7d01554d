#!/usr/bin/env bash
# Writes a FLUX.1-dev pipeline folder in the released diffusers layout at the released sizes
# (random weights): the transformer (12B, bf16, 5 GB shards) from the preset with `magcache
# export`, CLIP-L and T5-XXL (bf16) and the VAE (f32) with `scripts/flux-real-size-parts.py`
# (transformers / diffusers), tokenizers and scheduler config from the tiny fixture folder. Then runs
# it as a user on a 24 GB machine would: bf16, the transformer streamed (23.8 GB does not fit held),
# 1024x1024, 1 step, prompt of up to 512 T5 tokens, and prints the summary (every stage's own peak
# and time). Issue 30; figures in docs/benchmarks.md.
#
# Usage: scripts/flux-real-size-pipeline.sh [WORK_DIR]
#   WORK_DIR: default /tmp/magcache-flux-real-size. The folder takes 34 GB of disk; kept for
#             re-runs, delete it after.
# Env: MAGCACHE (default target/release/magcache); PYTHON (a Python with torch, transformers and
#      diffusers; default python3); HEIGHT, WIDTH (default 1024); STEPS (default 1);
#      RUN_EXTRA: lines added to the run file's [model] table; RUN_TABLES: tables added at the end
#      (e.g. $'[vae]\ntiling = true').
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/magcache-flux-real-size}"
bin="${MAGCACHE:-$repo/target/release/magcache}"
py="${PYTHON:-python3}"
[ -x "$bin" ] || { echo "flux-real-size-pipeline.sh: build first: cargo build --release -p magcache-cli" >&2; exit 2; }
mkdir -p "$work"
work="$(cd "$work" && pwd)"
folder="$work/FLUX.1-dev-random"
echo "date: $(date -u +%F)  cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) threads, $(free -g | awk '/Mem:/{print $2}') GB"
if [ ! -d "$folder" ]; then
  mkdir "$folder.partial"
  cat > "$work/export.toml" <<TOML
[model]
family = "flux"
preset = "flux-dev"
dtype = "bf16"

[sampling]
steps = 1
TOML
  echo "writing $folder ..."
  /usr/bin/time -f "transformer export: %e s wall, %M kB peak RSS" "$bin" export --quiet --config "$work/export.toml" --out "$folder.partial/transformer"
  /usr/bin/time -f "text encoders and VAE: %e s wall, %M kB peak RSS" "$py" "$repo/scripts/flux-real-size-parts.py" "$folder.partial"
  fix="$repo/tests/fixtures/pipelines/flux_tiny_folder"
  cp -r "$fix/tokenizer" "$fix/tokenizer_2" "$fix/scheduler" "$folder.partial/"
  cp "$fix/model_index.json" "$folder.partial/model_index.json"
  mv "$folder.partial" "$folder"
fi
du -sh "$folder"/* | sed 's/^/  /'
cat > "$work/run.toml" <<TOML
[model]
family = "flux"
weights = "$folder"
dtype = "bf16"
offload = "stream"
${RUN_EXTRA:-}

[prompt]
text = "A photo of a tiny cat sitting on a stack of old books, soft window light."
max_sequence_length = 512

[inputs]
height = ${HEIGHT:-1024}
width = ${WIDTH:-1024}
seed = 0

[sampling]
steps = ${STEPS:-1}
guidance_scale = 3.5

[cache]
strategy = "magcache"

${RUN_TABLES:-}
TOML
"$bin" plan --config "$work/run.toml" | sed -n '/^memory/,$p'
# The summary's `run:` line is the true peak (the runner resets the high-water mark at each stage).
"$bin" run --config "$work/run.toml" --report "$work/report.json" --out "$work/image.safetensors"
