#!/usr/bin/env bash
# COCO bbox evaluation, 5,000 images x 100 detections (generated deterministically):
# `densa eval coco` vs pycocotools vs faster-coco-eval, end to end on the same files. Prints the
# times, the ratios (> 1: densa is faster) and the largest difference to pycocotools' stats.
#
#   benches/coco_eval.sh [IMAGES] [DETECTIONS_PER_IMAGE]
#
# Needs: pip install pycocotools faster-coco-eval numpy. Builds densa in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
images=${1:-5000}
dets=${2:-100}
cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 benches/coco_eval_bench.py target/release/densa "$work" --images "$images" --dets "$dets"
