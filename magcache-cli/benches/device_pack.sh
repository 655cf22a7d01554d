#!/usr/bin/env bash
# Packs what a timing sitting on a lent machine needs into `.dev/` at the repository root, under the
# 64 MiB a device call carries (`carry: [".dev"]`): the release `magcache` and the `bf16_gemm` and
# `attention_cpu` examples, stripped and xz-compressed; one or more oneDNN libraries to compare (`LABEL=PATH` to a
# libdnnl.so.3 each); libgomp; a copy of diffusers without its pipelines (the timing scripts need
# only the transformers); and `.dev/run.sh`, which unpacks them there and runs, alternated on the
# same threads, the one-product figures (`bf16_gemm` against `pytorch_linear.py`), the attention
# alone at 4 680 tokens (`attention_cpu`, stage `attention`) and the dense
# 6-block Wan2.1-1.3B call at 720 and 4 680 tokens in bf16 (`compare_pytorch.sh`, ours on each
# oneDNN against PyTorch). The machine needs python3 with torch; nothing else is installed there.
#
# Usage: device_pack.sh [LABEL=LIB ...]   (default: 3.2=target/onednn/lib/libdnnl.so.3;
#        PYTHON: a python whose diffusers is copied, default python3)
# Then:  device command `bash .dev/sitting.sh` (device_sitting.sh: the next sitting's stages in
#        order, each under a timeout) or `bash .dev/run.sh 2>&1 | tee $OUT/log` with carry [".dev"]
#        (STAGES="products attention probe short long f32 parity" picks stages, THREADS=2 by default,
#        ROUNDS=2; `f32` is stage `short` in f32; `denoise` is the full model's 480x832x9 call, bf16
#        against PyTorch and ours in f32 (DENOISE_F32=off skips the f32 run), one round; BASELINE_ENV="VAR=value ..." times the same
#        binary under those variables as well in the whole-call stages, the baseline of an A/B,
#        e.g. MAGCACHE_ONEDNN_GELU=off; `parity` runs the digits model dense in f32, bf16, and
#        bf16 under BASELINE_ENV, and prints how far each bf16 final is from the f32 one).
# The tracked files travel too: with them the 64 MiB hold this build, one oneDNN and the rest,
# not a second binary (hence BASELINE_ENV).
# `attention` times ours at several blocks of queries and keys (ATTENTION_CPU_BLOCKS) and PyTorch's;
# `probe` times the 720 x 1536 by 1536 x 1536 product alone under three OpenMP settings and with
# the system's allocator as it is, with oneDNN's own timing and the page faults, and PyTorch's.
# `.dev/` is added to .git/info/exclude so that git never sees it; remove it after the sitting.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"; cd "$root"
py="${PYTHON:-python3}"
[ $# -gt 0 ] || set -- "3.2=target/onednn/lib/libdnnl.so.3"
mkdir -p .git/info .dev
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
rm -rf .dev/*
cargo build --release --offline -p magcache-cli
cargo build --release --offline -p magcache-layers --example bf16_gemm --example attention_cpu
pack() { # pack SRC DEST.xz: stripped (binaries and libraries), then xz
  local tmp; tmp="$(mktemp)"
  cp "$1" "$tmp"; strip "$tmp" 2>/dev/null || true
  mkdir -p "$(dirname "$2")"; xz -9 -T0 -c "$tmp" > "$2"; rm -f "$tmp"
}
pack target/release/magcache .dev/magcache.xz
pack target/release/examples/bf16_gemm .dev/bf16_gemm.xz
pack target/release/examples/attention_cpu .dev/attention_cpu.xz
labels=()
for arg in "$@"; do
  label="${arg%%=*}"; lib="${arg#*=}"
  [ -f "$lib" ] || { echo "device_pack.sh: $lib: no such library (argument $arg)" >&2; exit 1; }
  pack "$lib" ".dev/dnnl/$label/libdnnl.so.3.xz"; labels+=("$label")
done
gomp="$(ldconfig -p | sed -n 's/.*libgomp.so.1 (libc6,x86-64) => //p' | head -1)"
[ -n "$gomp" ] || { echo "device_pack.sh: no libgomp.so.1 here (ldconfig -p)" >&2; exit 1; }
pack "$gomp" .dev/lib/libgomp.so.1.xz
site="$("$py" -c 'import diffusers, os; print(os.path.dirname(os.path.dirname(diffusers.__file__)))')"
ver="$("$py" -c 'import diffusers; print(diffusers.__version__)')"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
cp -r "$site/diffusers" "$tmp/"
rm -rf "$tmp/diffusers/pipelines" "$tmp/diffusers/modular_pipelines" "$tmp/diffusers/experimental"
find "$tmp/diffusers" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p "$tmp/diffusers/pipelines"; : > "$tmp/diffusers/pipelines/__init__.py"
cp -r "$site/diffusers-$ver.dist-info" "$tmp/" 2>/dev/null || true
tar -C "$tmp" -cJf .dev/diffusers.tar.xz .
cat > .dev/run.sh <<EOF
#!/usr/bin/env bash
# Written by magcache-cli/benches/device_pack.sh; run from the repository root on the device.
set -euo pipefail
labels="${labels[*]}"
EOF
cat >> .dev/run.sh <<'EOF'
w=/tmp/w; mkdir -p "$w/site"
( cd .dev && find . -name '*.xz' ! -name diffusers.tar.xz ) | while read -r f; do
  mkdir -p "$w/$(dirname "$f")"; xz -dc ".dev/$f" > "$w/${f%.xz}"
done
tar -C "$w/site" -xJf .dev/diffusers.tar.xz
chmod +x "$w/magcache" "$w/bf16_gemm" "$w/attention_cpu"
export LD_LIBRARY_PATH="$w/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PYTHONPATH="$w/site" MAGCACHE="$w/magcache"
if [ -n "${BASELINE_ENV:-}" ]; then
  printf '#!/bin/sh\nexec env %s "%s" "$@"\n' "$BASELINE_ENV" "$w/magcache" > "$w/magcache-baseline"
  chmod +x "$w/magcache-baseline"; export MAGCACHE_BASE="$w/magcache-baseline"
  echo "baseline: this binary under $BASELINE_ENV"
fi
threads="${THREADS:-2}"; rounds="${ROUNDS:-2}"; stages="${STAGES:-products attention short long}"
b=magcache-cli/benches
python3 -c 'import torch; print("torch", torch.__version__, "|", [l.strip() for l in torch.__config__.show().splitlines() if "MKL-DNN" in l or "oneDNN" in l])'
cfg() { # cfg NAME LATENT STEPS: the dense 6-block Wan2.1-1.3B in bf16
  sed -e 's/^dtype = .*/dtype = "bf16"/' -e "s/^latent_shape = .*/latent_shape = $2/" \
      -e "s/^steps = .*/steps = $3/" $b/runs/wan_short.toml > "$w/$1.toml"
}
cfg short "[1, 16, 3, 24, 40]" 2
cfg long "[1, 16, 3, 60, 104]" 1
sed -e 's/^dtype = .*/dtype = "f32"/' "$w/short.toml" > "$w/f32.toml"
for stage in $stages; do
  case $stage in
  products)
    for dims in "4680 1536 8960" "720 1536 1536"; do
      for r in $(seq 1 "$rounds"); do
        for l in $labels; do
          echo "== product $dims, oneDNN $l"
          MAGCACHE_ONEDNN="$w/dnnl/$l/libdnnl.so.3" RAYON_NUM_THREADS=$threads "$w/bf16_gemm" $dims 2
        done
        echo "== product $dims, PyTorch"
        python3 $b/pytorch_linear.py $dims --rounds 2 --threads "$threads"
      done
    done ;;
  attention)
    # Ours at the default blocks (queries sized by the keys: 112 at 4 680; all keys in one
    # product) against blocks of keys with the softmax carried across them (FlashAttention's
    # way: a block's scores stay in the core's cache) and larger blocks of queries, alternated in
    # one process (ATTENTION_CPU_BLOCKS, queries:keys), then PyTorch's fused attention.
    for l in $labels; do
      echo "== attention alone, oneDNN $l, by blocks (queries:keys)"
      ATTENTION_CPU_ONLY=onednn ATTENTION_CPU_BLOCKS="-:all 512:all -:512 256:512 512:512 128:256 256:1024" \
        MAGCACHE_ONEDNN="$w/dnnl/$l/libdnnl.so.3" RAYON_NUM_THREADS=$threads "$w/attention_cpu" 4680 12 128 3
    done
    echo "== attention alone, PyTorch"
    python3 $b/pytorch_attention.py 4680 12 128 --rounds 3 --threads "$threads" ;;
  probe)
    # The small products on AMX (2026-11-27: oneDNN 3.2's 720 x 1536 by 1536 x 1536 took 2.5 ms
    # in oneDNN's own timing on a process's first run, then 6.6-7.1 ms; PyTorch's 2.5): that
    # product alone, repeated, with oneDNN's timing and the process's page faults, under OpenMP's
    # defaults, passive waiting, threads bound to cores, and the system's allocator as it is (the
    # example's buffers otherwise start on 64-byte lines, as PyTorch's tensors do:
    # magcache_layers::alloc); then PyTorch's. And the same
    # projection at 4 680 tokens (36 of them a call there too), once each.
    faults='import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; print("  minor page faults: %d" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt); sys.exit(r)'
    for omp in "" "OMP_WAIT_POLICY=passive" "OMP_PROC_BIND=close OMP_PLACES=cores" "BF16_GEMM_ALIGN=off"; do
      for l in $labels; do
        echo "== probe: 720 1536 1536, oneDNN $l bf16 rows alone, ${omp:-OpenMP as it comes}"
        env $omp ONEDNN_VERBOSE=profile_exec MAGCACHE_ONEDNN="$w/dnnl/$l/libdnnl.so.3" MAGCACHE_ONEDNN_BF16=on \
          BF16_GEMM_ONLY="oneDNN bf16 rows" RAYON_NUM_THREADS=$threads python3 -c "$faults" "$w/bf16_gemm" 720 1536 1536 8 |
          sed -n -e 's/^onednn_verbose,.*exec,cpu,matmul,.*,\([0-9.]*\)$/  oneDNN exec \1 ms/p' -e '/^round/p' -e '/page faults/p' | tr '\n' ' '
        echo
      done
    done
    echo "== probe: 720 1536 1536, PyTorch"
    python3 $b/pytorch_linear.py 720 1536 1536 --rounds 8 --threads "$threads"
    for l in $labels; do
      echo "== probe: 4680 1536 1536, oneDNN $l bf16 rows alone"
      MAGCACHE_ONEDNN="$w/dnnl/$l/libdnnl.so.3" MAGCACHE_ONEDNN_BF16=on BF16_GEMM_ONLY="oneDNN bf16 rows" \
        RAYON_NUM_THREADS=$threads "$w/bf16_gemm" 4680 1536 1536 6 | grep '^round' | tr '\n' ' '
      echo
    done
    echo "== probe: 4680 1536 1536, PyTorch"
    python3 $b/pytorch_linear.py 4680 1536 1536 --rounds 6 --threads "$threads" ;;
  parity)
    # The digits model dense (examples/digits_dense.toml: 10 samples, 20 steps, CFG): bf16's
    # finals against f32's, on each oneDNN.
    sed -e 's#^weights = .*#weights = "'"$PWD"'/tests/fixtures/trained/digits_wan"#' examples/digits_dense.toml > "$w/digits.toml"
    sed -e '/^\[model\]/a dtype = "bf16"' "$w/digits.toml" > "$w/digits16.toml"
    sed -e '/^\[model\]/a dtype = "f32"' "$w/digits.toml" > "$w/digits32.toml"
    for l in $labels; do
      export MAGCACHE_ONEDNN="$w/dnnl/$l/libdnnl.so.3" RAYON_NUM_THREADS=$threads
      "$w/magcache" run --quiet --config "$w/digits32.toml" --out "$w/f32.safetensors"
      "$w/magcache" run --quiet --config "$w/digits16.toml" --out "$w/bf16.safetensors"
      echo "== parity, oneDNN $l: digits bf16 against f32"; python3 $b/latent_diff.py "$w/f32.safetensors" "$w/bf16.safetensors"
      if [ -n "${MAGCACHE_BASE:-}" ]; then
        "$MAGCACHE_BASE" run --quiet --config "$w/digits16.toml" --out "$w/base.safetensors"
        echo "== parity, oneDNN $l: digits bf16 under $BASELINE_ENV against f32"; python3 $b/latent_diff.py "$w/f32.safetensors" "$w/base.safetensors"
        echo "== parity, oneDNN $l: digits bf16 against bf16 under $BASELINE_ENV"; python3 $b/latent_diff.py "$w/base.safetensors" "$w/bf16.safetensors"
      fi
      unset MAGCACHE_ONEDNN
    done ;;
  denoise)
    # The 480x832x9 denoising call of docs/benchmarks.md: the full 30-block Wan2.1-1.3B at 4 680
    # tokens, text 512, one call; bf16 against PyTorch's bf16, then ours in f32 on the same oneDNN.
    sed -e 's/^dtype = .*/dtype = "bf16"/' $b/runs/wan_480x832x9.toml > "$w/denoise.toml"
    sed -e 's/^dtype = .*/dtype = "f32"/' $b/runs/wan_480x832x9.toml > "$w/denoise32.toml"
    for l in $labels; do
      echo "== denoise 480x832x9, bf16, oneDNN $l"
      MAGCACHE_ONEDNN="$w/dnnl/$l/libdnnl.so.3" MAGCACHE_BASE= ROUNDS=1 bash $b/compare_pytorch.sh "$w/denoise.toml" "$threads" | grep -v '^config'
      [ "${DENOISE_F32:-on}" = off ] && continue
      echo "== denoise 480x832x9, f32, oneDNN $l (ours alone)"
      MAGCACHE_ONEDNN="$w/dnnl/$l/libdnnl.so.3" RAYON_NUM_THREADS=$threads "$w/magcache" run --quiet --json --config "$w/denoise32.toml" |
        python3 -c 'import json,sys; d=json.load(sys.stdin); t=d.get("cpu_time") or {}; print("  magcache-rs f32: %.3f s/call (linear layers %.3f, attention %.3f)" % (d["wall_seconds"] / d["total_calls"], t.get("linear_seconds", 0), t.get("attention_seconds", 0)))'
    done ;;
  short|long|f32)
    for r in $(seq 1 "$rounds"); do
      for l in $labels; do
        echo "== $stage, oneDNN $l, round $r"
        MAGCACHE_ONEDNN="$w/dnnl/$l/libdnnl.so.3" ROUNDS=1 bash $b/compare_pytorch.sh "$w/$stage.toml" "$threads" | grep -v '^config'
      done
    done ;;
  *) echo "run.sh: unknown stage $stage (products, attention, probe, short, long, f32, parity, denoise)" >&2; exit 1 ;;
  esac
done
EOF
chmod +x .dev/run.sh
cp magcache-cli/benches/device_sitting.sh .dev/sitting.sh
du -sh .dev; du -ab .dev | sort -n | tail -8
echo "tracked files: $(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1) bytes (the carry limit, 64 MiB, counts both)"
