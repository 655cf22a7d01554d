#!/usr/bin/env bash
# Wan2.2-I2V-A14B at its released size on this machine (issue 25; figures in docs/benchmarks.md):
# exports ONE expert (the 14B architecture with 36 input channels, as the preset's
# `cfg_i2v_a14b`; seeded random weights, bf16, 28.6 GB of disk) and runs the two-expert pipeline
# streamed from it (both experts read the same folder: the same random weights, which is not what
# is measured), 2 steps switched at boundary_ratio 0.9, one call per step, a small latent so that
# the weights dominate. Prints the run's summary (peak RSS and wall).
#
# Usage: scripts/i2v-a14b-real-size.sh [WORK_DIR]   (default /tmp/magcache-i2v-a14b; delete after)
# Env: MAGCACHE (default target/release/magcache).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/magcache-i2v-a14b}"
bin="${MAGCACHE:-$repo/target/release/magcache}"
[ -x "$bin" ] || { echo "i2v-a14b-real-size.sh: build first: cargo build --release -p magcache-cli" >&2; exit 2; }
mkdir -p "$work"
work="$(cd "$work" && pwd)"
echo "date: $(date -u +%F)  cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) threads, $(free -g | awk '/Mem:/{print $2}') GB"
if [ ! -d "$work/expert" ]; then
  cat > "$work/export.toml" <<'TOML'
# One Wan2.2-I2V-A14B expert: the 14B architecture with 36 input channels, bf16.
[model]
family = "wan2.1"
preset = "wan2.1-t2v-14b"
dtype = "bf16"

[model.overrides]
in_channels = 36

[sampling]
steps = 2
TOML
  /usr/bin/time -f "export: %e s wall" "$bin" export --quiet --config "$work/export.toml" --out "$work/expert"
fi
cat > "$work/run.toml" <<'TOML'
# Wan2.2-I2V-A14B streamed: two 14B experts (36 input channels) switched at boundary_ratio 0.9.
[model]
family = "wan2.2"
weights = ["expert", "expert"]
dtype = "bf16"
offload = "stream"

[inputs]
latent_shape = [1, 16, 2, 16, 16]
text_len = 64

[sampling]
steps = 2
shift = 5.0
guidance_scale = 1.0
boundary_ratio = 0.9
TOML
"$bin" plan --config "$work/run.toml" | tail -2
"$bin" run --config "$work/run.toml"
