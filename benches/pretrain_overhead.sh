#!/usr/bin/env bash
# Step time of every pretext method against MoCo-v2 on the same backbone, batch and view size
# (DenseCL's paper: under 1% slower than MoCo-v2 with ResNet-50 at 224 px on GPUs). Prints the
# median step time of each method and its ratio to MoCo-v2 (> 1: slower).
#
#   benches/pretrain_overhead.sh [ARCH] [IMAGE_SIZE] [BATCH] [STEPS] [BACKEND]
#   defaults:                     resnet-edge 64     32      12      ort
#
# Data: 1024 `densa synth` scenes (the step time does not depend on the content). Every method
# runs with its paper defaults except `queue_size`/`queue_length`, shrunk to 1024 so the queue
# is not the thing measured (MoCo-v2 gets the same). The step time is the median difference of
# consecutive `time_s` in the JSONL log, first two steps excluded, so graph building and
# loading are not counted; view augmentation on the host is. DENSA_BIN picks the binary
# (default: a release build); METHODS a subset (default every method; include mocov2, the
# reference).
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-resnet-edge}
size=${2:-64}
batch=${3:-32}
steps=${4:-12}
backend=${5:-ort}
if [[ -z "${DENSA_BIN:-}" ]]; then
  cargo build --release --quiet
  DENSA_BIN="${CARGO_TARGET_DIR:-target}/release/densa"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$DENSA_BIN" synth --out "$work/scenes" --images 1024 --size "${size}x${size}" --seed 0 >/dev/null

step_s() { python3 - "$1" <<'PY'
import json, statistics, sys
t = [json.loads(l)["time_s"] for l in open(sys.argv[1]) if l.strip()]
d = [b - a for a, b in zip(t, t[1:])][1:]
print(statistics.median(d))
PY
}

methods=${METHODS:-$("$DENSA_BIN" methods --json | python3 -c 'import json,sys; print(" ".join(m["name"] for m in json.load(sys.stdin)))')}
declare -A secs
for m in $methods; do
  extra=()
  for key in queue_size queue_length; do
    if "$DENSA_BIN" methods --json | python3 -c "import json,sys; ms={m['name']:m for m in json.load(sys.stdin)}; sys.exit(0 if '$key' in ms['$m']['hyperparameters'] and ms['$m']['hyperparameters']['$key'] > 0 else 1)"; then
      extra+=(--set "$key=1024")
    fi
  done
  # DetReg's box embeddings come from a frozen self-supervised encoder: the SwAV run above.
  if [[ $m == detreg ]]; then
    extra+=(--set "encoder=$work/swav")
  fi
  if ! "$DENSA_BIN" pretrain --method "$m" --arch "$arch" --data "$work/scenes" --steps "$steps" \
      --batch "$batch" --image-size "$size" --backend "$backend" --checkpoint-every 0 \
      "${extra[@]}" --out "$work/$m" >"$work/$m.log" 2>&1; then
    echo "$m: failed (see below)"; tail -3 "$work/$m.log"; continue
  fi
  secs[$m]=$(step_s "$work/$m/train_log.jsonl")
done
echo "pretext step time: $arch, ${size}px views, batch $batch, $backend, $(nproc) cores"
printf "%-10s %10s %12s\n" method "step (s)" "vs mocov2"
for m in $methods; do
  [[ -n "${secs[$m]:-}" ]] || continue
  python3 -c "print(f'%-10s %10.3f %11.2fx' % ('$m', ${secs[$m]}, ${secs[$m]} / ${secs[mocov2]}))"
done
