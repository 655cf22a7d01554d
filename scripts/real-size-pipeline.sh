#!/usr/bin/env bash
# Writes a Wan2.1-T2V-1.3B pipeline folder in the released diffusers layout at the released sizes,
# stored in f32 as released (random weights), then runs it as a new user would: no `dtype` key
# (so `auto`), 240x416, 5 frames, 2 steps, MagCache; prints the run's summary (every stage's own
# peak and time, the run's true peak and wall). Issues 30 and 31; figures in docs/benchmarks.md.
#
# Usage: scripts/real-size-pipeline.sh [WORK_DIR] [-- extra run-file lines]
#   WORK_DIR: default /tmp/magcache-real-size. The folder takes 29 GB of disk (UMT5-XXL 22.7 GB in
#             5 shards, the transformer 5.7 GB, the VAE 0.5 GB); kept for re-runs, delete it after.
# Env: MAGCACHE (default target/release/magcache); HEIGHT, WIDTH, FRAMES (default 240, 416, 5);
#      RUN_EXTRA: lines added to the run file's [model] table (e.g. 'offload = "stream"');
#      RUN_TABLES: tables added at the end (e.g. $'[vae]\ntiling = true'); STEPS (default 2),
#      GUIDANCE (default 5.0: CFG, two calls per step; 1.0: one).
#
# The tokenizer and the scheduler config come from the tiny fixture folder (the released scheduler
# config; a small tokenizer whose ids fit the real vocabulary): the tokenizer's size is not what is
# measured.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/magcache-real-size}"
bin="${MAGCACHE:-$repo/target/release/magcache}"
[ -x "$bin" ] || { echo "real-size-pipeline.sh: build first: cargo build --release -p magcache-cli" >&2; exit 2; }
mkdir -p "$work"
work="$(cd "$work" && pwd)"
folder="$work/Wan2.1-T2V-1.3B-Diffusers-random"
echo "date: $(date -u +%F)  cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) threads, $(free -g | awk '/Mem:/{print $2}') GB"
if [ ! -d "$folder" ]; then
  cat > "$work/export.toml" <<TOML
# \`magcache export --pipeline\` of the preset writes the pipeline folder (transformer,
# text_encoder, vae), every tensor in f32 as the release stores them.
[model]
family = "wan2.1"
preset = "wan2.1-t2v-1.3b"
dtype = "f32"

[sampling]
steps = 2
TOML
  echo "writing $folder ..."
  /usr/bin/time -f "export: %e s wall, %M kB peak RSS" "$bin" export --pipeline --config "$work/export.toml" --out "$folder"
  fix="$repo/tests/fixtures/pipelines/wan_tiny_folder"
  cp -r "$fix/tokenizer" "$fix/scheduler" "$folder/"
  cp "$fix/model_index.json" "$folder/model_index.json"
fi
du -sh "$folder"/* | sed 's/^/  /'
cat > "$work/run.toml" <<TOML
# As a new user runs the released folder: no dtype key.
[model]
family = "wan2.1"
weights = "$folder"
${RUN_EXTRA:-}

[prompt]
text = "A red fox trotting through fresh snow in a pine forest, morning light."

[inputs]
height = ${HEIGHT:-240}
width = ${WIDTH:-416}
num_frames = ${FRAMES:-5}

[sampling]
steps = ${STEPS:-2}
guidance_scale = ${GUIDANCE:-5.0}

[cache]
strategy = "magcache"

${RUN_TABLES:-}
TOML
# The summary's `run:` line is the true peak: the runner resets the kernel's high-water mark at each
# stage (to measure each stage's own), so /usr/bin/time would report only the last stage's.
"$bin" run --config "$work/run.toml" --report "$work/report.json"
