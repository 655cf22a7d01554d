#!/usr/bin/env bash
# Regenerates the reference fixtures for other sizes, seeds, prompts, layouts and quant types than the
# committed ones (the specs in scripts/variants/), with the reference's own generators, and runs the
# tests against them (MAGCACHE_TEST_FIXTURES, tests/fixtures/README.md). Needs the shared tools folder
# (SHARED, default ../shared) and a Python with torch, diffusers 0.42.1, transformers 5.23,
# tokenizers, accelerate, peft, gguf, ftfy, sentencepiece and protobuf (PYTHON, default python3).
#
#   scripts/variant-check.sh [OUT]     (OUT default /tmp/magcache-variant; about 2 minutes of Python)
#
# VARIANTS names another folder of specs (default scripts/variants; scripts/variants2 is a second set of
# sizes, seeds and prompts); its file `seeds`, where present, overrides the generators' seeds and the
# reference's shape (the defaults below are the first set's).
#
# The insta snapshot of the reference run's plan (snapshots_cli) is the public fixture's own text,
# so it is skipped. A FLUX.1 spec whose VAE sample_size (the larger of height and width) is not a
# multiple of 32 gets no tiling fixture (diffusers' own tiling cannot join such tiles), and the
# public one then fails against it (flux_vae).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${SHARED:-$here/../shared}
tools=$shared/tools
py=${PYTHON:-python3}
out=${1:-/tmp/magcache-variant}
spec=${VARIANTS:-$here/scripts/variants}
spec=$(cd "$spec" && pwd)
reference_seed=17 reference_shape=layers=4,heads=3,frames=2,h=10,w=6,text=9
digits_seed=7 digits_classes=3,1,4,1,5,9,2
wan_seed=6 i2v_seed=4 flux_seed=8 flux2_seed=3 zimage_seed=5 qwenimage_seed=9
# shellcheck disable=SC1091
[ -f "$spec/seeds" ] && . "$spec/seeds"
export OMP_NUM_THREADS=1
rm -rf "$out"
mkdir -p "$out/pipelines" "$out/reference" "$out/lora" "$out/gguf" "$out/wan" "$out/i2v" "$out/flux"
gen() { echo "== $*" >&2; (cd "$tools" && "$py" "$@") > "$out/$(basename "$1" .py).log" 2>&1 || { tail -20 "$out/$(basename "$1" .py).log"; exit 1; }; }
gen make_reference_fixtures.py "$out/reference" --seed "$reference_seed" --shape "$reference_shape"
gen make_lora_fixtures.py --heldout --variant-file "$spec/lora_variant.json" --out "$out/lora" --reference-dir "$out/reference"
gen make_gguf_fixtures.py --heldout --variant-file "$spec/gguf_variant.json" --out "$out/gguf" --reference-dir "$out/reference"
mkdir -p "$out/trained"
gen make_digits_distilled_fixtures.py "$out/trained" --seed "$digits_seed" --classes "$digits_classes" --with-uncond
gen make_wan_pipeline_fixtures.py "$out/wan" --seed "$wan_seed" --variant heldout --variant-file "$spec/wan_variant.json" --reference-dir "$out/reference"
cp "$spec/i2v_variant.json" "$out/i2v/"
gen make_wan_i2v_fixtures.py "$out/i2v" --seed "$i2v_seed" --variant heldout
gen make_flux_pipeline_fixtures.py "$out/flux" --seed "$flux_seed" --variant heldout --variant-file "$spec/flux_variant.json"
gen make_flux2_pipeline_fixtures.py "$out/pipelines" --seed "$flux2_seed" --variant heldout --variant-file "$spec/flux2_variant.json"
gen make_zimage_pipeline_fixtures.py "$out/pipelines" --seed "$zimage_seed" --variant heldout --variant-file "$spec/zimage_variant.json"
gen make_qwenimage_pipeline_fixtures.py "$out/pipelines" --seed "$qwenimage_seed" --variant heldout --variant-file "$spec/qwenimage_variant.json"
for d in wan i2v flux; do
  for f in "$out/$d"/*; do
    case $(basename "$f") in *_variant.json) ;; *) ln -sfn "$f" "$out/pipelines/$(basename "$f")" ;; esac
  done
done
# The tiling fixtures of this repository's own generators, for the regenerated VAEs.
sed "s#^HERE = .*#HERE = \"$out/pipelines\"#" "$here/tests/fixtures/tools/make_vae_tiling_fixtures.py" > "$out/wan_tiling.py"
(cd "$out" && "$py" wan_tiling.py > wan_tiling.log 2>&1)
sed "s#^HERE = .*#HERE = \"$out/pipelines\"#" "$here/tests/fixtures/tools/make_flux_vae_tiling_fixtures.py" > "$out/flux_tiling.py"
(cd "$out" && "$py" flux_tiling.py > flux_tiling.log 2>&1) || echo "flux VAE tiling fixture not written (see $out/flux_tiling.log)" >&2
cd "$here"
MAGCACHE_TEST_FIXTURES=$out INSTA_UPDATE=no cargo test -p magcache-tests --no-fail-fast -- \
  --skip plan_of_the_reference_magcache_run
