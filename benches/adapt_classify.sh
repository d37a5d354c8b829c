#!/usr/bin/env bash
# Classifier adaptation under a camera shift (densa issue 9): `densa train` fits a classifier of
# coloured squares (red, green, blue on grey, 32 px) on the source domain; the device's camera
# swaps red and blue and washes the colours out. Every `densa adapt` method runs from the
# deployed `model.onnx` (30 labeled images for the supervised ones, the same 30 unlabeled for
# the others) and is scored on 60 held-out shifted images.
#
#   benches/adapt_classify.sh
#
# Environment: SEEDS ["0 1"] (adaptation seeds), STEPS [30], DENSA (the binary; default a
# release build), WORK (keep the files there; default a temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1"}
STEPS=${STEPS:-30}
if [[ -z "${DENSA:-}" ]]; then
  cargo build --release --quiet --bin densa
  DENSA="${CARGO_TARGET_DIR:-target}/release/densa"
fi
if [[ -n "${WORK:-}" ]]; then
  work=$WORK
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
python3 - "$work" <<'PY'
import os, sys
import numpy as np
from PIL import Image
root = sys.argv[1]
rng = np.random.default_rng(0)
colours = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 0.9)}
def make(split, n, shifted):
    for name, colour in colours.items():
        os.makedirs(f"{root}/{split}/{name}", exist_ok=True)
        for i in range(n):
            img = np.full((32, 32, 3), 0.5) + rng.uniform(-0.1, 0.1, (32, 32, 3))
            side = rng.integers(8, 17)
            y, x = rng.integers(0, 32 - side, 2)
            img[y:y + side, x:x + side] = np.array(colour) * rng.uniform(0.7, 1.0)
            if shifted:
                img = img[..., ::-1] * 0.6 + 0.3
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
                f"{root}/{split}/{name}/{i:03d}.png")
make("src", 30, False)
make("tgt", 10, True)
make("tgt_val", 20, True)
PY
[[ -f "$work/run/model.onnx" ]] || "$DENSA" train --data "$work/src" --image-size 32 --steps 60 \
  --batch-size 16 --out "$work/run" >&2
acc() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("%.3f %.3f %.3f" % (r["before"]["accuracy"], r["after"]["accuracy"], r["seconds_per_step"]))' "$1"; }
printf '\n| method | trained | seed | accuracy before | after | s/step |\n|---|---|---|---|---|---|\n'
for seed in $SEEDS; do
  for run in "supervised head" "supervised all" "consistency head" "pixpro backbone" \
    "densecl backbone" "bn-stats -"; do
    read -r method train <<<"$run"
    select=(--train "$train")
    [[ $train == backbone || $train == - ]] && select=()
    labels=(--labels none)
    [[ $method == supervised ]] && labels=()
    out="$work/adapted-$method-$train-$seed.onnx"
    "$DENSA" adapt "$work/run/model.onnx" --data "$work/tgt" "${labels[@]}" "${select[@]}" \
      --method "$method" --val-data "$work/tgt_val" --steps "$STEPS" --lr 3e-3 --seed "$seed" \
      --backend tract --out "$out" >&2
    read -r before after sps < <(acc "${out%.onnx}.report.json")
    printf '| %s | %s | %s | %s | %s | %s |\n' "$method" "$train" "$seed" "$before" "$after" "$sps"
  done
done
