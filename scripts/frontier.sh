#!/usr/bin/env bash
# The speed/quality frontier on the trained digits model (docs/quality.md): one `magcache compare`
# per strategy x estimator x setting, dense and cached on the same noise, written as CSV.
#   scripts/frontier.sh [MAGCACHE_BINARY] > docs/frontier.csv
# Needs python3 (reads compare's JSON). Takes about 10 s per row on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/magcache}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The digits run without its [cache] table.
sed '/^\[cache\]/,$d; s#\.\./tests#'"$PWD"'/tests#' examples/digits_dense.toml > "$WORK/base.toml"
"$BIN" calibrate --config examples/digits_dense.toml --out "$WORK/digits.profile.toml" --quiet
MAG='mag_ratios = [1.0, 1.04849, 1.05746, 1.01075, 0.98227, 0.99323, 0.98343, 0.98784, 0.97444, 0.97310, 0.96874, 0.97284, 0.96876, 0.95817, 0.95688, 0.93777, 0.92705, 0.90578, 0.85853, 0.85214]'
echo "setting,strategy,estimator,computed_calls,total_calls,speedup_calls,psnr_db,ssim"
row() { # row LABEL STRATEGY ESTIMATOR 'toml line' ...
  local label=$1 strategy=$2 est=$3; shift 3
  { cat "$WORK/base.toml"; echo "[cache]"; echo "strategy = \"$strategy\""; printf '%s\n' "$@"; } > "$WORK/run.toml"
  "$BIN" compare --config "$WORK/run.toml" --data-range 2 --json --quiet > "$WORK/out.json"
  python3 - "$label" "$strategy" "$est" "$WORK/out.json" <<'PY'
import json, sys
label, strategy, est, path = sys.argv[1:]
j = json.load(open(path))
q = j["quality"]
psnr = q["psnr_db"] if q["psnr_db"] is not None else float("inf")
print(f'"{label}",{strategy},{est},{j["cached_computed_calls"]},{j["total_calls"]},{j["speedup_calls"]:.2f},{psnr:.2f},{q["ssim"]:.4f}')
PY
}
for est in reuse taylor1 taylor2; do
  row "0.12, K3, r0.2" magcache $est "threshold = 0.12" "max_skip_steps = 3" "retention_ratio = 0.2" "$MAG" "estimator = \"$est\""
  row "0.24, K4, r0.2" magcache $est "threshold = 0.24" "max_skip_steps = 4" "retention_ratio = 0.2" "$MAG" "estimator = \"$est\""
  row "0.5, K6, r0.1" magcache $est "threshold = 0.5" "max_skip_steps = 6" "retention_ratio = 0.1" "$MAG" "estimator = \"$est\""
done
for est in reuse taylor1; do
  for t in 0.3 0.5; do
    row "$t" teacache $est "threshold = $t" "coefficients = [1.0, 0.0]" "estimator = \"$est\""
  done
  for t in 0.2 0.3; do
    row "$t" fbcache $est "threshold = $t" "estimator = \"$est\""
    row "Fn2 Bn1 $t" dbcache $est "front_blocks = 2" "back_blocks = 1" "threshold = $t" "estimator = \"$est\""
  done
  for b in 8 5; do
    row "searched, budget $b" schedule $est "profile = \"$WORK/digits.profile.toml\"" "budget = $b" "estimator = \"$est\""
  done
done
for t in 0.25 0.5; do
  row "$t (residual_order 1)" seacache taylor1 "threshold = $t"
done
row "examples/digits_fast.toml" schedule taylor1 "compute_steps = [0, 2, 4, 8, 11, 14, 16, 18]" 'estimator = "taylor1"'
# Issue 29: schedules searched for estimators in sigma, the fast run files, EasyCache, Spectrum.
for est in taylor1 foca; do
  for b in 6 5 4; do
    row "searched, budget $b, sigma" schedule "$est-sigma" "profile = \"$WORK/digits.profile.toml\"" "budget = $b" "estimator = \"$est\"" 'estimator_axis = "sigma"'
  done
done
row "calls of examples/digits_3x.toml" schedule taylor1 "compute_steps = [0, 4, 9, 13, 16, 18]" 'estimator = "taylor1"'
row "calls of examples/digits_4x.toml" schedule taylor1 "compute_steps = [0, 7, 13, 16, 18]" 'estimator = "taylor1"'
row "calls of examples/digits_5x.toml" schedule taylor1 "compute_steps = [0, 8, 14, 17]" 'estimator = "taylor1"'
# Issue 44: the fitted estimator's shipped profiles (fitted on other noise; held-out figures in
# docs/quality.md, "The fitted estimator").
for n in 3x 4x 5x; do
  row "examples/digits_$n.toml" schedule fitted "profile = \"$PWD/examples/profiles/digits_$n.toml\"" 'estimator = "fitted"'
done
for t in 0.1 0.2; do
  row "$t" easycache reuse "threshold = $t"
done
row "published defaults, w 0.5" spectrum reuse "w = 0.5"
