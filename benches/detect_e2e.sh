#!/usr/bin/env bash
# End-to-end detection serving: a folder of JPEG files -> detections JSON (COCO results), densa
# (`densa detect MODEL DIR --json OUT`, ONNX Runtime and tract backends) vs the same pipeline
# in Python (PIL decode + resize, numpy normalisation, the onnxruntime Python package on the
# same .onnx file, numpy NMS, json.dump; benches/detect_e2e.py). Same thread count for both
# ONNX Runtimes (intra-op threads; densa's `--threads`), one image per run for all.
#
#   benches/detect_e2e.sh [IMAGES] [THREADS] [ROUNDS] [SCORE_THRESHOLD]
#
# Defaults: 200 JPEGs of 640x480, 2 threads, 3 rounds, score threshold 0.1. The model is made
# here: `densa synth` scenes (64 at 128x128) -> a 3-epoch `densa finetune --task detect`
# (resnet-edge, 128x128 input) -> `densa export detector` (top-100, host NMS in the spec).
# The runs alternate for ROUNDS rounds; each figure is the median over rounds. Two figures per
# pipeline: "loop" images/s (decode to detections, what densa prints itself; the Python script
# times the same span) and "process" images/s (the whole command: start-up, model load,
# serving, JSON written). Ratios > 1 mean densa is faster. The detections of densa-ort and
# Python are compared at the end (counts, matched IoU, score gap) to show both did the same
# work.
#
# Needs: pip install onnxruntime==1.31.1 numpy pillow. Builds densa in release mode
# (DENSA=path/to/densa uses that binary instead).
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-200}
threads=${2:-2}
rounds=${3:-3}
threshold=${4:-0.1}
if [[ -z "${DENSA:-}" ]]; then
  cargo build --release --quiet --bin densa
  DENSA="${CARGO_TARGET_DIR:-target}/release/densa"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
now() { python3 -c 'import time; print(time.perf_counter())'; }
middle() { python3 -c 'import sys, statistics; print(statistics.median(float(v) for v in sys.argv[1:]))' "$@"; }

echo "model: synth -> finetune (3 epochs) -> export ..." >&2
"$DENSA" synth --out "$work/synth" --images 64 --size 128x128 --seed 0 >/dev/null 2>&1
"$DENSA" finetune --task detect --data "$work/synth/annotations.json" --image-size 128 \
  --epochs 3 --batch-size 8 --out "$work/run" --backend ort --threads "$threads" >/dev/null 2>&1
"$DENSA" export detector --ckpt "$work/run" --out "$work/det.onnx" 2>/dev/null
echo "images: $count JPEGs of 640x480 ..." >&2
python3 benches/detect_e2e.py images "$work/jpegs" --count "$count"

d_loop=(); d_proc=(); t_loop=(); t_proc=(); p_loop=(); p_proc=()
densa_run() { # backend json -> "loop_images_per_s process_images_per_s"
  local t0 t1 line
  t0=$(date +%s.%N)
  "$DENSA" detect "$work/det.onnx" "$work/jpegs" --json "$2" --backend "$1" --threads "$threads" \
    --score-threshold "$threshold" 2>"$work/err"
  t1=$(date +%s.%N)
  line=$(grep "image(s) served" "$work/err")
  python3 - "$line" "$t0" "$t1" "$count" <<'PY'
import re, sys
line, t0, t1, n = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
print(re.search(r"\(([0-9.]+) images/s\)", line).group(1), n / (t1 - t0))
PY
}
for r in $(seq "$rounds"); do
  read -r a b < <(densa_run ort "$work/densa-ort.json"); d_loop+=("$a"); d_proc+=("$b")
  t0=$(date +%s.%N)
  py=$(python3 benches/detect_e2e.py detect "$work/det.onnx" "$work/jpegs" --json "$work/python.json" \
    --threads "$threads" --score-threshold "$threshold")
  t1=$(date +%s.%N)
  read -r a b < <(python3 -c 'import json,sys; o=json.loads(sys.argv[1]); n=o["images"]; print(n/o["loop_s"], n/(float(sys.argv[3])-float(sys.argv[2])))' "$py" "$t0" "$t1")
  p_loop+=("$a"); p_proc+=("$b")
  read -r a b < <(densa_run tract "$work/densa-tract.json"); t_loop+=("$a"); t_proc+=("$b")
  echo "round $r done" >&2
done

dl=$(middle "${d_loop[@]}"); dp=$(middle "${d_proc[@]}")
pl=$(middle "${p_loop[@]}"); pp=$(middle "${p_proc[@]}")
tl=$(middle "${t_loop[@]}"); tp=$(middle "${t_proc[@]}")
python3 - "$count" "$threads" "$dl" "$dp" "$pl" "$pp" "$tl" "$tp" <<'PY'
import sys
n, threads = sys.argv[1], sys.argv[2]
dl, dp, pl, pp, tl, tp = map(float, sys.argv[3:])
print(f"{n} JPEGs 640x480 -> detections JSON, {threads} threads (images/s, median of rounds)")
print(f"{'pipeline':<24} {'loop':>10} {'process':>10}")
print(f"{'densa detect (ort)':<24} {dl:10.1f} {dp:10.1f}")
print(f"{'python (PIL+numpy+ort)':<24} {pl:10.1f} {pp:10.1f}")
print(f"{'densa detect (tract)':<24} {tl:10.1f} {tp:10.1f}")
print(f"densa-ort / python:   loop {dl/pl:.2f}x, process {dp/pp:.2f}x")
print(f"densa-tract / python: loop {tl/pl:.2f}x, process {tp/pp:.2f}x")
PY
echo -n "densa-ort vs python: " && python3 benches/detect_e2e.py compare "$work/densa-ort.json" "$work/python.json"
echo -n "densa-tract vs densa-ort: " && python3 benches/detect_e2e.py compare "$work/densa-tract.json" "$work/densa-ort.json"
