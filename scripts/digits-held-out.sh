#!/usr/bin/env bash
# PSNR of a digits run file's [cache] against the dense run on held-out inputs: seed 0 with classes
# 0-9 and seeds 1, 7, 11, 42 with other class orders (`compare --data-range 2`); prints each and the
# worst, with each batch's worst sample (`compare`'s `worst_sample`) and its class. Usage: scripts/digits-held-out.sh examples/digits_3x.toml [path/to/magcache]
set -euo pipefail
run=$(realpath "$1")
bin=$(realpath "${2:-target/release/magcache}")
dir=$(dirname "$run")
cache=$(sed -n '/^\[cache\]/,$p' "$run")
worst=1000
for case in "0:[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" "1:[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]" \
            "7:[3, 1, 4, 0, 5, 9, 2, 6, 8, 7]" "11:[5, 8, 2, 9, 0, 7, 4, 1, 6, 3]" \
            "42:[7, 3, 9, 0, 2, 8, 6, 4, 1, 5]"; do
  seed=${case%%:*}; classes=${case#*:}
  tmp=$(mktemp "$dir/.held_out_XXXXXX.toml")
  trap 'rm -f "$tmp" "$tmp.err"' EXIT
  sed -e '/^\[cache\]/,$d' -e "s/^seed = .*/seed = $seed/" -e "s/^classes = .*/classes = $classes/" "$run" > "$tmp"
  printf '%s\n' "$cache" >> "$tmp"
  # compare's stderr (per-call events) is shown only when it fails.
  json=$("$bin" compare --config "$tmp" --data-range 2 --json --quiet 2>"$tmp.err") || {
    cat "$tmp.err" >&2
    exit 1
  }
  rm -f "$tmp" "$tmp.err"
  read -r psnr sample < <(python3 -c 'import json,sys
q = json.loads(sys.argv[1])["quality"]
c = json.loads(sys.argv[2])
w = q.get("worst_sample")
s = "%.2f_dB_(sample_%d,_class_%d)" % (w["psnr_db"], w["index"], c[w["index"]]) if w else "-"
print("%.2f" % q["psnr_db"], s)' "$json" "$classes")
  echo "seed $seed classes $classes: $psnr dB; worst sample ${sample//_/ }"
  worst=$(python3 -c "print(min($worst, $psnr))")
done
echo "worst: $worst dB"
