#!/usr/bin/env bash
# One timing sitting for issue 45 on a lent machine's CPU, as one device call of under 9 minutes:
# `device_pack.sh` copies this to `.dev/sitting.sh`; then the device command
# `bash .dev/sitting.sh` with carry [".dev"] and timeout_s 600. Each stage runs under its own
# timeout (seconds: T_PROBE, T_ATTENTION, T_SHORT, T_LONG, T_DENOISE), in the order of what the
# last sitting left open, so that a cut-off sitting still brings back what it measured; the log is
# $OUT/log. The machine, its flags and each stage's start are printed first.
export PYTHONUNBUFFERED=1
stage() { # stage TIMEOUT ENV... : run.sh under a timeout, with the JSON event lines left out
  local t="$1"; shift
  echo "##### $* ($(date -u +%H:%M:%S))"
  timeout "$t" env "$@" bash .dev/run.sh 2>&1 | grep -v '^{'
}
{
  date -u
  lscpu | sed -n -e 's/^Model name: *//p' -e 's/^CPU family: *//p' -e 's/^Model: *//p' | tr '\n' ' '; echo
  grep -o -w -E 'amx_bf16|amx_tile|amx_int8|amx_fp16|avx512_bf16|avx512_fp16' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
  # Why the small products slow down after a process's first (probe), and whether blocks of
  # keys (the softmax carried across them) or larger blocks of queries close the attention's gap
  # at 4 680 tokens (attention).
  stage "${T_PROBE:-70}" STAGES=probe
  stage "${T_ATTENTION:-110}" STAGES=attention
  # The bar: the 6-block call at 720 and 4 680 tokens against PyTorch, alternated; the
  # baselines are the same binary with OpenMP's idle threads spinning as libgomp's default does
  # (720 tokens; `magcache` now sets them passive) and with the attention on blocks of 512 keys
  # and 256 queries (4 680 tokens; at 720 tokens one block of keys holds them all).
  stage "${T_SHORT:-110}" STAGES=short ROUNDS=4 BASELINE_ENV=GOMP_SPINCOUNT=300000
  stage "${T_LONG:-140}" STAGES=long ROUNDS=2 BASELINE_ENV="MAGCACHE_ONEDNN_KEY_ROWS=512 MAGCACHE_ONEDNN_QUERY_ROWS=256"
  stage "${T_DENOISE:-100}" STAGES=denoise DENOISE_F32=off
  date -u
} 2>&1 | tee "${OUT:-/tmp}/log"
