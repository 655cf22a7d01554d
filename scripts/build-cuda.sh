#!/usr/bin/env bash
# Builds a CUDA `magcache` binary on a machine without a GPU and without a CUDA toolkit, for a GPU
# machine that has a CUDA driver but no Rust toolchain (docs/gpu.md). Idempotent: every step is skipped
# when its result is already there, and cargo rebuilds only what changed.
#
# Usage: scripts/build-cuda.sh [BUILD_DIR]     (default: $HOME/magcache-cuda-build, outside the repo)
# Env:   CUDA_COMPUTE_CAP (default 90 = Hopper, H100/H200), JOBS (cargo -j, default: cargo's),
#        CUDA_TOOLKIT_VERSION (default 13.0.2; keep it at the driver's CUDA version or below),
#        PYTHON (default python3, >= 3.9 with venv).
# Needs: network for pip and cargo on the first run, a C compiler, ~6 GB of disk.
# Prints the path and size of the binary (stripped; device code compressed).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-${BUILD_DIR:-$HOME/magcache-cuda-build}}"
mkdir -p "$build"; build="$(cd "$build" && pwd)"
case "$build/" in "$repo"/*) echo "build-cuda.sh: BUILD_DIR must be outside the repository ($repo)" >&2; exit 2;; esac
cuda_ver="${CUDA_TOOLKIT_VERSION:-13.0.2}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
py="${PYTHON:-python3}"
step() { printf '\n== %s\n' "$*"; }

# 1. nvcc, headers and CUDA libraries from NVIDIA's PyPI wheels, in a venv of the build folder.
if [ ! -f "$build/venv/.cuda-$cuda_ver" ]; then
  step "venv with cuda-toolkit $cuda_ver (NVIDIA's PyPI wheels)"
  [ -x "$build/venv/bin/python" ] || "$py" -m venv "$build/venv"
  "$build/venv/bin/python" -m pip install --quiet --upgrade pip
  "$build/venv/bin/python" -m pip install --quiet \
    "cuda-toolkit[nvcc,cudart,cublas,curand,nvrtc,cccl,crt,nvvm]==$cuda_ver"
  touch "$build/venv/.cuda-$cuda_ver"
fi
nv="$("$build/venv/bin/python" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')/nvidia/cu${cuda_ver%%.*}"
[ -x "$nv/bin/nvcc" ] || { echo "build-cuda.sh: no nvcc under $nv/bin" >&2; exit 1; }
export PATH="$nv/bin:$PATH" NVCC="$nv/bin/nvcc" CUDA_ROOT="$build/cudaroot" CUDA_HOME="$build/cudaroot"
# Device code compressed (about 8x smaller binary); constant across runs, so no needless rebuilds.
export NVCC_APPEND_FLAGS="-Xfatbin=-compress-all"
nvcc --version | tail -2

# 2. The sources cargo needs (cudarc's driver bindings name the libcuda symbols).
step "cargo fetch"
(cd "$repo" && cargo fetch --locked)
cudarc_ver="$(sed -n '/^name = "cudarc"$/{n;s/^version = "\(.*\)"$/\1/p}' "$repo/Cargo.lock")"
cudarc_src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_ver" | head -1)"
[ -f "$cudarc_src/src/driver/sys/mod.rs" ] || { echo "build-cuda.sh: cudarc $cudarc_ver sources not found" >&2; exit 1; }

# 3. A CUDA root for the linker: the wheels' libraries under unversioned names, and a libcuda.so stub
#    (no wheel ships the driver; the real libcuda.so.1 comes from the GPU machine's driver at run time).
step "CUDA root $CUDA_ROOT"
mkdir -p "$CUDA_ROOT/lib64"
ln -sfn "$nv/include" "$CUDA_ROOT/include"
ln -sfn "$nv/bin" "$CUDA_ROOT/bin"
if [ ! -f "$CUDA_ROOT/lib64/libcuda.so" ]; then
  grep -oP '^\s+(pub )?fn \Kcu\w+(?=\()' "$cudarc_src/src/driver/sys/mod.rs" | sort -u \
    | awk '{print "int "$1"(void){return 999;}"}' > "$build/libcuda-stub.c"
  cc -shared -fPIC -o "$CUDA_ROOT/lib64/libcuda.so" "$build/libcuda-stub.c" -Wl,-soname,libcuda.so.1
fi
for l in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do
  [ -e "$nv/lib/lib$l" ] || { echo "build-cuda.sh: $nv/lib/lib$l missing" >&2; exit 1; }
  ln -sf "$nv/lib/lib$l" "$CUDA_ROOT/lib64/lib${l%%.so*}.so"
done

# 4. The release build with the `cuda` feature, in the build folder's own target directory.
step "cargo build --release -p magcache-cli --features cuda (sm_$CUDA_COMPUTE_CAP; ~20 min on 2 cores the first time)"
export CARGO_TARGET_DIR="$build/target"
export LIBRARY_PATH="$CUDA_ROOT/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}"
(cd "$repo" && cargo build --release --locked -p magcache-cli --features cuda ${JOBS:+-j "$JOBS"})

# 5. A stripped copy to carry to the GPU machine.
bin="$build/magcache"
cp "$CARGO_TARGET_DIR/release/magcache" "$bin"
strip "$bin" 2>/dev/null || true
step "done"
echo "binary: $bin"
echo "size:   $(du -h "$bin" | cut -f1) ($(stat -c %s "$bin") bytes)"
echo "needs on the GPU machine: libcuda.so.1 (driver), libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10, glibc >= 2.34"
echo "run:    LD_LIBRARY_PATH=<python site-packages>/nvidia/cu13/lib $bin run --config RUN.toml   (device = \"cuda\")"
