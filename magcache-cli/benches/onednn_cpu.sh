#!/usr/bin/env bash
# Times one dense run file with the linear layers' products on candle's kernels and on oneDNN
# (`MAGCACHE_ONEDNN=LIB`, a libdnnl.so.3: `pip install onednn-cpu-gomp`), in f32 and in bf16,
# alternated round by round on the same threads; prints seconds per call and the ratios.
# Usage: onednn_cpu.sh RUN.toml LIB [THREADS]   (ROUNDS=N, default 3; MAGCACHE=path to the binary)
set -euo pipefail
# a / b in floating point (awk: `bc` is missing on some machines)
div() { awk -v a="$1" -v b="$2" "BEGIN { print a / b }"; }
cfg="$1"; lib="$2"; threads="${3:-$(nproc)}"; here="$(cd "$(dirname "$0")" && pwd)"; rounds="${ROUNDS:-3}"
bin="${MAGCACHE:-$here/../../target/release/magcache}"
[ -x "$bin" ] || (cd "$here/../.." && cargo build --release -p magcache-cli)
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
sed '/^\[cache\]/,$d; /^dtype *=/d' "$cfg" | sed 's/^\[model\]$/[model]\ndtype = "DTYPE"/' > "$tmp/base.toml"
sed 's/DTYPE/f32/' "$tmp/base.toml" > "$tmp/f32.toml"
sed 's/DTYPE/bf16/' "$tmp/base.toml" > "$tmp/bf16.toml"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) threads available, flags: $(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "config: $cfg   threads: $threads   rounds: $rounds (alternated)"
MAGCACHE_ONEDNN="$lib" RAYON_NUM_THREADS=$threads "$bin" run --quiet --json --config "$tmp/f32.toml" 2>/dev/null |
  python3 -c 'import json,sys; print("oneDNN:", json.load(sys.stdin).get("products"))'
per_call() {
  RAYON_NUM_THREADS=$threads "$@" run --quiet --json --config "$cfgfile" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.3f" % (d["wall_seconds"] / d["total_calls"]))'
}
for r in $(seq 1 "$rounds"); do
  cfgfile="$tmp/f32.toml"; f32=$(per_call env MAGCACHE_ONEDNN=off "$bin")
  cfgfile="$tmp/f32.toml"; f32d=$(per_call env MAGCACHE_ONEDNN="$lib" "$bin")
  cfgfile="$tmp/bf16.toml"; bf16=$(per_call env MAGCACHE_ONEDNN=off "$bin")
  cfgfile="$tmp/bf16.toml"; bf16d=$(per_call env MAGCACHE_ONEDNN="$lib" "$bin")
  printf "round %d: f32 %s s/call, on oneDNN %s (%.2fx)   bf16 %s s/call, on oneDNN %s (%.2fx; %.2fx f32)\n" \
    "$r" "$f32" "$f32d" "$(div "$f32" "$f32d")" "$bf16" "$bf16d" "$(div "$bf16" "$bf16d")" "$(div "$f32" "$bf16d")"
done
