#!/usr/bin/env bash
# Two-view MoCo-v2 augmentation throughput: densa (rayon over samples) vs torchvision/PIL (a
# DataLoader with as many worker processes as densa has threads), on the same ~64 JPEGs
# (about 640x480, generated deterministically into a temp dir). Each image is decoded once and
# gives two normalised 224x224 views, batched [32, 3, 224, 224]. Prints images/s and the ratio
# (> 1 means densa is faster), for densa filling a reused batch (what a training loop does) and
# allocating a fresh one per batch (as the DataLoader must).
#
#   benches/augment_throughput.sh [THREADS] [EPOCHS] [COUNT]
#
# Needs Debian's /usr/bin/python3 with python3-torch and python3-torchvision. Builds the bench
# in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-$(nproc)}
epochs=${2:-5}
count=${3:-64}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bench() { cargo bench --quiet -p densa-runtime --bench augment_throughput -- "$@"; }
bench --generate "$work/jpegs" --count "$count"
densa=$(bench --dir "$work/jpegs" --threads "$threads" --epochs "$epochs")
torch=$(/usr/bin/python3 benches/augment_torchvision.py "$work/jpegs" --workers "$threads" --epochs "$epochs")
echo "$densa"
echo "$torch"
python3 - "$densa" "$torch" <<'PY'
import json, sys
d, t = (json.loads(s) for s in sys.argv[1:])
print(f"two-view MoCo-v2, {d['images']} JPEGs, {d['threads']} threads/workers: "
      f"densa {d['images_per_s']:.1f} img/s (fresh batches {d['images_per_s_fresh_batches']:.1f}), "
      f"torchvision {t['images_per_s']:.1f} img/s; densa/torchvision = "
      f"{d['images_per_s'] / t['images_per_s']:.2f}x "
      f"({d['images_per_s_fresh_batches'] / t['images_per_s']:.2f}x with fresh batches)")
PY
