#!/usr/bin/env bash
# Data-parallel throughput on this machine: one process against `mpirun -np 2` (loopback),
# both at the same global batch, and the communication share of a data-parallel step.
#
#   benches/distributed_scaling.sh [ARCH] [IMAGE_SIZE] [BATCH_PER_PROCESS] [STEPS] [BACKEND]
#   defaults:                       resnet-edge 64     16                  12      ort
#
# Rows: one process at batch B (1 x B), one process at batch 2B (1 x 2B: the same global batch
# as two processes), two processes at batch B each (2 x B). Images/s = global batch / median
# step time (the median difference of consecutive `time_s` of rank 0's JSONL log, first two
# steps excluded: graph building and loading are not counted, data loading is). The
# data-parallel row also prints the all-reduce share of a step and the bytes each rank
# all-reduces per step (rank 0's `data parallel:` line). Threads: one process gets every core,
# each of two processes half of them (`--threads`), so the rows compete for the same cores.
# Needs a build with `--features mpi` (DENSA_BIN picks the binary; default: a release build).
#
# METHOD=swav (or another method `densa pretrain` runs on N processes) times pretraining on
# 256 synthetic scenes instead of the classifier; its rank 0 line then also counts the
# method's own exchange (SwAV: the Sinkhorn sums) in the all-reduce share.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-resnet-edge}
size=${2:-64}
batch=${3:-16}
steps=${4:-12}
backend=${5:-ort}
if [[ -z "${DENSA_BIN:-}" ]]; then
  cargo build --release --quiet --features mpi
  DENSA_BIN="${CARGO_TARGET_DIR:-target}/release/densa"
fi
cores=$(nproc)
half=$(( cores > 1 ? cores / 2 : 1 ))
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

step_s() { python3 - "$1" <<'PY'
import json, statistics, sys
t = [json.loads(l)["time_s"] for l in open(sys.argv[1]) if l.strip()]
d = [b - a for a, b in zip(t, t[1:])][1:]
print(statistics.median(d))
PY
}

method=${METHOD:-}
if [[ -n "$method" ]]; then
  "$DENSA_BIN" synth --out "$work/scenes" --images 256 --size 128x128 --seed 0 >/dev/null
fi

train_args() { # OUT BATCH THREADS
  if [[ -n "$method" ]]; then
    echo pretrain --method "$method" --data "$work/scenes" --arch "$arch" --image-size "$size" \
      --batch "$2" --steps "$steps" --checkpoint-every 0 --backend "$backend" --threads "$3" \
      --out "$1"
  else
    echo train --synthetic 1024 --classes 10 --arch "$arch" --image-size "$size" \
      --batch-size "$2" --steps "$steps" --holdout-every 0 --checkpoint-every 0 \
      --backend "$backend" --threads "$3" --out "$1"
  fi
}

# shellcheck disable=SC2046
"$DENSA_BIN" $(train_args "$work/one-b" "$batch" "$cores") >/dev/null
# shellcheck disable=SC2046
"$DENSA_BIN" $(train_args "$work/one-2b" "$((2 * batch))" "$cores") >/dev/null
# shellcheck disable=SC2046
mpirun -np 2 --oversubscribe --bind-to none "$DENSA_BIN" \
  $(train_args "$work/two" "$batch" "$half") >"$work/two.out"

s1=$(step_s "$work/one-b/train_log.jsonl")
s2=$(step_s "$work/one-2b/train_log.jsonl")
sd=$(step_s "$work/two/train_log.jsonl")
dp_line=$(grep '^data parallel:' "$work/two.out" || true)
python3 - "$batch" "$s1" "$s2" "$sd" "$dp_line" "$arch" "$size" "$backend" "$cores" <<'PY'
import re, sys
b, s1, s2, sd = int(sys.argv[1]), *map(float, sys.argv[2:5])
line, arch, size, backend, cores = sys.argv[5:]
import os
what = f"pretraining {os.environ['METHOD']}" if os.environ.get("METHOD") else "classifier"
print(f"{what}: {arch} at {size}px, {backend}, {cores} cores, batch {b} per process")
print(f"{'run':<22}{'global batch':>13}{'step s':>10}{'images/s':>10}")
for name, g, s in [("1 process x B", b, s1), ("1 process x 2B", 2 * b, s2), ("2 processes x B", 2 * b, sd)]:
    print(f"{name:<22}{g:>13}{s:>10.3f}{g / s:>10.1f}")
print(f"ratio 2 processes / 1 process (same global batch {2 * b}): {s2 / sd:.2f}x")
print(f"ratio 2 processes / 1 process at batch {b}: {(2 * b / sd) / (b / s1):.2f}x")
m = re.search(r"all-reduce ([0-9.]+) MB/step in ([0-9.]+) s/step \(([0-9.]+)% of the step, ([0-9.]+) GB/s\), waiting for other ranks ([0-9.]+) s/step", line)
if m:
    print(f"all-reduce: {m.group(1)} MB per rank per step, {m.group(2)} s per step ({m.group(4)} GB/s), "
          f"{m.group(3)}% of a data-parallel step; waiting for the other rank {m.group(5)} s per step")
else:
    print("no `data parallel:` line from rank 0:", line)
PY
