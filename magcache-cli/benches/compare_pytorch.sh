#!/usr/bin/env bash
# Times the same dense run file in this project (`magcache run`, strategy forced to none) and in the
# PyTorch reference (diffusers), in the run file's dtype (f32 or bf16), one after the other on the
# same CPU and thread count, and prints the ratio.
# Usage: compare_pytorch.sh RUN.toml [THREADS]   (needs python with torch + diffusers: $PYTHON;
# ROUNDS=N repeats the pair N times, default 1; MAGCACHE_BASE=BIN times a second, baseline build
# of `magcache` in each round too, between the two)
set -euo pipefail
# a / b in floating point (awk: `bc` is missing on some machines)
div() { awk -v a="$1" -v b="$2" "BEGIN { print a / b }"; }
cfg="$1"; threads="${2:-$(nproc)}"; here="$(cd "$(dirname "$0")" && pwd)"; py="${PYTHON:-python3}"; rounds="${ROUNDS:-1}"
bin="${MAGCACHE:-$here/../../target/release/magcache}"
[ -x "$bin" ] || (cd "$here/../.." && cargo build --release -p magcache-cli)
dense="$(mktemp --suffix=.toml)"; trap 'rm -f "$dense"' EXIT
sed '/^\[cache\]/,$d' "$cfg" > "$dense"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) threads available, flags: $(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "config: $cfg   threads: $threads   rounds: $rounds (alternated; this machine's speed drifts, so compare within a round)"
for r in $(seq 1 "$rounds"); do
  rust=$(RAYON_NUM_THREADS=$threads "$bin" run --quiet --json --config "$dense" | "$py" -c 'import json,sys; d=json.load(sys.stdin); t=d.get("cpu_time") or {}; n=d["total_calls"]; i=d.get("onednn_implementations") or {}; print(d["wall_seconds"], n, "%.3f %.3f" % (t.get("linear_seconds", 0) / n, t.get("attention_seconds", 0) / n), ",".join("%s=%d" % kv for kv in sorted(i.items())) or "-")')
  if [ -n "${MAGCACHE_BASE:-}" ]; then
    base=$(RAYON_NUM_THREADS=$threads "$MAGCACHE_BASE" run --quiet --json --config "$dense" | "$py" -c 'import json,sys; d=json.load(sys.stdin); print(d["wall_seconds"], d["total_calls"])')
  fi
  torch=$("$py" "$here/pytorch_dense.py" "$dense" --threads "$threads" | "$py" -c 'import json,sys; d=json.load(sys.stdin); print(d["wall_seconds"], d["calls"], d["torch"], d["diffusers"], d["dtype"])')
  read -r rs rc rl ra ri <<<"$rust"; read -r ts tc tv dv tdt <<<"$torch"
  echo "round $r (torch $tv, diffusers $dv, $tdt)"
  printf "  magcache-rs: %6d calls %9.3f s  (%.3f s/call: linear layers %s, attention %s; oneDNN's products: %s)\n" "$rc" "$rs" "$(div "$rs" "$rc")" "$rl" "$ra" "$ri"
  if [ -n "${MAGCACHE_BASE:-}" ]; then
    read -r bs bc <<<"$base"
    printf "  baseline:    %6d calls %9.3f s  (%.3f s/call; baseline / magcache-rs: %.2fx)\n" "$bc" "$bs" "$(div "$bs" "$bc")" "$(div "$bs" "$rs")"
  fi
  printf "  PyTorch:     %6d calls %9.3f s  (%.3f s/call)\n" "$tc" "$ts" "$(div "$ts" "$tc")"
  printf "  PyTorch / magcache-rs: %.2fx\n" "$(div "$ts" "$rs")"
done
