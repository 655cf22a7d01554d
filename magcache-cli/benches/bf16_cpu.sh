#!/usr/bin/env bash
# Times one dense run file in f32, in bf16 on the CPU's bf16 kernel (AVX512-BF16, `nn::bf16_gemm`)
# in bf16 with the kernel off (`MAGCACHE_CPU_BF16=off`: weights widened to f32 per product), and
# f32 weights with `matmul_precision = "bf16"` (rounded once at load, products on the kernel),
# alternated round by round on the same threads, and prints seconds per call and the ratios.
# The kernel runs are forced on (`MAGCACHE_CPU_BF16=on`: on CPUs with AMX it is off by default).
# Usage: bf16_cpu.sh RUN.toml [THREADS]   (ROUNDS=N, default 3; MAGCACHE=path to the binary)
set -euo pipefail
# a / b in floating point (awk: `bc` is missing on some machines)
div() { awk -v a="$1" -v b="$2" "BEGIN { print a / b }"; }
cfg="$1"; threads="${2:-$(nproc)}"; here="$(cd "$(dirname "$0")" && pwd)"; rounds="${ROUNDS:-3}"
bin="${MAGCACHE:-$here/../../target/release/magcache}"
[ -x "$bin" ] || (cd "$here/../.." && cargo build --release -p magcache-cli)
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
# Dense, and the dtype set per variant.
sed '/^\[cache\]/,$d; /^dtype *=/d' "$cfg" | sed 's/^\[model\]$/[model]\ndtype = "DTYPE"/' > "$tmp/base.toml"
sed 's/DTYPE/f32/' "$tmp/base.toml" > "$tmp/f32.toml"
sed 's/DTYPE/bf16/' "$tmp/base.toml" > "$tmp/bf16.toml"
sed 's/DTYPE/f32/; s/^\[model\]$/[model]\nmatmul_precision = "bf16"/' "$tmp/base.toml" > "$tmp/f32mm.toml"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) threads available, flags: $(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "config: $cfg   threads: $threads   rounds: $rounds (alternated)"
per_call() {
  RAYON_NUM_THREADS=$threads "$@" run --quiet --json --config "$cfgfile" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.3f" % (d["wall_seconds"] / d["total_calls"]))'
}
for r in $(seq 1 "$rounds"); do
  cfgfile="$tmp/f32.toml"; f32=$(per_call "$bin")
  cfgfile="$tmp/bf16.toml"; bf16=$(per_call env MAGCACHE_CPU_BF16=on "$bin")
  cfgfile="$tmp/bf16.toml"; widened=$(per_call env MAGCACHE_CPU_BF16=off "$bin")
  cfgfile="$tmp/f32mm.toml"; f32mm=$(per_call env MAGCACHE_CPU_BF16=on "$bin")
  printf "round %d: f32 %s s/call   bf16 kernel %s s/call (%.2fx f32)   bf16 widened %s s/call (%.2fx f32)   f32 weights, bf16 products %s s/call (%.2fx f32)\n" \
    "$r" "$f32" "$bf16" "$(div "$f32" "$bf16")" "$widened" "$(div "$f32" "$widened")" "$f32mm" "$(div "$f32" "$f32mm")"
done
