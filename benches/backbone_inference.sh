#!/usr/bin/env bash
# Backbone inference: densa-ort vs the onnxruntime Python package (same .onnx file, same thread
# count, same input), and densa-tract vs densa-ort. ResNet-18 and ResNet-50, 224x224, batch 1
# and 8. Prints median milliseconds and the ratios (> 1 means the first is slower).
#
#   benches/backbone_inference.sh [THREADS] [ITERS] [ROUNDS]
#
# densa-ort and the Python package run alternately for ROUNDS rounds (default 3) and each
# reports the median of its per-round medians, so that a load change on the machine affects
# both sides alike.
#
# Needs: pip install onnxruntime==1.31.1 numpy. Builds densa in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
iters=${2:-20}
rounds=${3:-3}
cargo build --release --quiet
densa="${CARGO_TARGET_DIR:-target}/release/densa"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
median() { python3 -c 'import json,sys; print(json.load(sys.stdin)["median_ms"])'; }
middle() { python3 -c 'import sys, statistics; print(statistics.median(float(v) for v in sys.argv[1:]))' "$@"; }

printf '%-9s %5s %12s %12s %12s %10s %10s\n' model batch densa-ort ort-python densa-tract ort/py tract/ort
for arch in resnet18 resnet50; do
  "$densa" export backbone --arch "$arch" --out "$work/$arch.onnx" >/dev/null
  for batch in 1 8; do
    shape="$batch,3,224,224"
    d_runs=(); p_runs=()
    for _ in $(seq "$rounds"); do
      d_runs+=("$("$densa" bench "$work/$arch.onnx" --shape "$shape" --backend ort --threads "$threads" --iters "$iters" --json | median)")
      p_runs+=("$(python3 benches/ort_python_bench.py "$work/$arch.onnx" --shape "$shape" --threads "$threads" --iters "$iters" | median)")
    done
    d_ort=$(middle "${d_runs[@]}")
    py=$(middle "${p_runs[@]}")
    # tract is slower; fewer runs keep the whole script to minutes on 2 cores.
    t_iters=$(( iters / 4 > 3 ? iters / 4 : 3 ))
    d_tract=$("$densa" bench "$work/$arch.onnx" --shape "$shape" --backend tract --iters "$t_iters" --json | median)
    python3 - "$arch" "$batch" "$d_ort" "$py" "$d_tract" <<'PY'
import sys
arch, batch, d_ort, py, d_tract = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
print(f"{arch:<9} {batch:>5} {d_ort:10.2f}ms {py:10.2f}ms {d_tract:10.2f}ms {d_ort/py:10.3f} {d_tract/d_ort:10.2f}")
PY
  done
done
