#!/usr/bin/env bash
# One SGD training step (momentum 0.9, weight decay 1e-4) of ResNet-18 + cross-entropy at
# 224x224, batch 16: densa on ONNX Runtime vs PyTorch 1.13 CPU (same thread count), and
# densa-tract vs densa-ort. Prints the median step time of each, the ratios (> 1 means the first
# is slower) and the peak resident memory of each process (/usr/bin/time -v).
#
#   benches/train_step.sh [THREADS] [STEPS]
#
# densa runs `densa train` on the artifact of `densa export train` (synthetic data, generated
# on the host each step and included in the step time, as the PyTorch peer's batch is); the
# step time is the median difference of consecutive `time_s` in the JSONL log, first two steps
# excluded. DENSA_BIN picks the binary (default: a release build); PYTORCH picks the Python
# with torch 1.13 (default /usr/bin/python3).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
steps=${2:-8}
python=${PYTORCH:-/usr/bin/python3}
if [[ -z "${DENSA_BIN:-}" ]]; then
  cargo build --release --quiet
  DENSA_BIN="${CARGO_TARGET_DIR:-target}/release/densa"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=$threads

"$DENSA_BIN" export train --arch resnet18 --task classify --classes 10 --optimizer sgd \
  --momentum 0.9 --weight-decay 1e-4 --lr 0.1 --image-size 224 --out "$work/artifact" >/dev/null

# densa: median step seconds from a run's log.
step_s() { python3 - "$1" <<'PY'
import json, statistics, sys
t = [json.loads(l)["time_s"] for l in open(sys.argv[1]) if l.strip()]
d = [b - a for a, b in zip(t, t[1:])][1:]
print(statistics.median(d))
PY
}
rss_mb() { awk -F: '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$1"; }

densa_run() { # backend steps
  local out="$work/run-$1"
  /usr/bin/time -v "$DENSA_BIN" train --artifact "$work/artifact" --synthetic 64 --classes 10 \
    --batch-size 16 --steps "$2" --checkpoint-every 0 --holdout-every 0 --backend "$1" \
    --threads "$threads" --out "$out" >/dev/null 2>"$work/time-$1.txt"
  echo "$(step_s "$out/train_log.jsonl") $(rss_mb "$work/time-$1.txt")"
}

read -r ort_s ort_rss < <(densa_run ort "$steps")
/usr/bin/time -v "$python" benches/train_step_torch.py --threads "$threads" --steps "$steps" \
  >"$work/torch.json" 2>"$work/time-torch.txt"
torch_s=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["median_s"])' "$work/torch.json")
torch_rss=$(rss_mb "$work/time-torch.txt")
# tract is slower: 4 steps (the median of the 2 after the first two).
read -r tract_s tract_rss < <(densa_run tract 5)

python3 - "$threads" "$ort_s" "$torch_s" "$tract_s" "$ort_rss" "$torch_rss" "$tract_rss" <<'PY'
import sys
threads = sys.argv[1]
ort, torch, tract = map(float, sys.argv[2:5])
ort_rss, torch_rss, tract_rss = sys.argv[5:8]
print(f"ResNet-18, 224x224, batch 16, one SGD step, {threads} threads")
print(f"{'':14} {'step':>10} {'peak RSS':>10}")
print(f"{'densa-ort':14} {ort*1000:8.0f}ms {ort_rss:>8}MB")
print(f"{'pytorch-1.13':14} {torch*1000:8.0f}ms {torch_rss:>8}MB")
print(f"{'densa-tract':14} {tract*1000:8.0f}ms {tract_rss:>8}MB")
print(f"densa-ort / pytorch = {ort/torch:.2f}   densa-tract / densa-ort = {tract/ort:.2f}")
PY
