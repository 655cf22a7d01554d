#!/usr/bin/env bash
# Builds a current oneDNN for `MAGCACHE_ONEDNN` from a source checkout: the CPU engine on OpenMP
# (libgomp, as PyPI's `onednn-cpu-gomp` 3.2, whose 2024-2026 successors on PyPI need Intel's DPC++
# and TBB runtimes), no GPU, only the primitives the layers call (matmul, and the reorders it uses),
# inference only, no graph API: a 49 MB library (7.5 MB xz-compressed) instead of 110 MB.
# Usage: scripts/build-onednn.sh SRC PREFIX   (SRC: a checkout of github.com/uxlfoundation/oneDNN,
#        e.g. its rls-v3.13 branch; the library lands in PREFIX/lib/libdnnl.so.3; needs a C++
#        compiler; cmake and ninja are installed into a venv under PREFIX when missing).
# About 40 min on 2 cores.
set -euo pipefail
src="$(realpath "$1")"; prefix="$(realpath -m "$2")"
out="$prefix/lib/libdnnl.so.3"
[ ! -e "$out" ] || { echo "build-onednn.sh: $out exists; remove it or pick another PREFIX" >&2; exit 1; }
mkdir -p "$prefix"
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  python3 -m venv "$prefix/tools"
  "$prefix/tools/bin/pip" install --quiet cmake ninja
  export PATH="$prefix/tools/bin:$PATH"
fi
cmake -S "$src" -B "$prefix/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DONEDNN_CPU_RUNTIME=OMP -DONEDNN_GPU_RUNTIME=NONE -DONEDNN_BUILD_GRAPH=OFF \
  -DONEDNN_ENABLE_WORKLOAD=INFERENCE "-DONEDNN_ENABLE_PRIMITIVE=MATMUL;REORDER" \
  -DONEDNN_BUILD_TESTS=OFF -DONEDNN_BUILD_EXAMPLES=OFF -DONEDNN_BUILD_DOC=OFF \
  -DONEDNN_ENABLE_JIT_PROFILING=OFF -DONEDNN_ENABLE_ITT_TASKS=OFF
ninja -C "$prefix/build"
mkdir -p "$prefix/lib"
tmp="$(mktemp "$prefix/lib/.libdnnl.XXXXXX")"
cp -L "$prefix/build/src/libdnnl.so.3" "$tmp"
strip "$tmp"
# Whole or not at all, and never over a file that appeared meanwhile.
ln "$tmp" "$out" && rm -f "$tmp" || { rm -f "$tmp"; echo "build-onednn.sh: $out appeared; left as it was" >&2; exit 1; }
echo "built: $out (MAGCACHE_ONEDNN=$out)"
