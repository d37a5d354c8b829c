#!/usr/bin/env bash
# Domain-shift benchmark of `densa adapt` on synthetic scenes (densa issue 9).
#
#   benches/adapt_shift.sh
#
# 1. Source domain: `densa synth --style a` (light, muted backgrounds); a detector is fine-tuned
#    there (resnet-edge, random init) and exported: the deployed .onnx.
# 2. Shifted domain: `densa synth --style b` (dark, saturated backgrounds, other seeds): a
#    labeled validation set, a pool the 10 labeled adaptation images are drawn from, and 100
#    unlabeled images.
# 3. For each seed in SEEDS, from the same deployed model:
#    - supervised head adaptation on 10 labeled shifted images (`--max-images 10`, a seeded
#      subset of the pool), and the same with `--train all`;
#    - unlabeled consistency adaptation (momentum teacher) on the 100 unlabeled images;
#    - unlabeled `--method pixpro` and `--method densecl` (the pretext objectives on the
#      backbone features, momentum teacher; the backbone trained) on the same images;
#    - bn-stats (AdaBN) on the 100 unlabeled images, on the same weights exported with
#      `--keep-batch-norm`, and bn-stats followed by supervised head adaptation;
#    every adapted model and the deployed one scored with `densa eval detect` on the shifted
#    validation set (and the deployed one on the source validation set, for reference).
# 4. Time per step and peak memory of supervised head adaptation with the tract backend and
#    with ONNX Runtime, pinned to 2 cores (`taskset -c 0,1`, ORT with 2 threads).
#
# Environment (defaults): SEEDS="0 1", SIZE=96 (input px), TRAIN_IMAGES=300, EPOCHS=15,
# VAL_IMAGES=100, STEPS=60 (supervised), USTEPS=100 (consistency), BATCH=4, LR=1e-3,
# ULR=2e-4, BACKEND=ort (adaptation runs of step 3), DENSA=path/to/densa (else a release
# build). Prints one table; nothing is kept (a temporary directory, or WORK=DIR to keep it).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1"}
SIZE=${SIZE:-96}
TRAIN_IMAGES=${TRAIN_IMAGES:-300}
EPOCHS=${EPOCHS:-15}
VAL_IMAGES=${VAL_IMAGES:-100}
STEPS=${STEPS:-60}
USTEPS=${USTEPS:-100}
BATCH=${BATCH:-4}
LR=${LR:-1e-3}
ULR=${ULR:-2e-4}
BACKEND=${BACKEND:-ort}
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
pin() { if command -v taskset >/dev/null; then taskset -c 0,1 "$@"; else "$@"; fi; }
ap() { # MODEL DATA -> "AP AP50"
  "$DENSA" eval detect "$1" --data "$2" --json --backend "$BACKEND" --threads 2 |
    python3 -c 'import json,sys; s=json.loads([l for l in sys.stdin if l.startswith("{")][0]); print("%.4f %.4f" % (s["AP"], s["AP50"]))'
}
field() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r[sys.argv[2]])' "$@"; }

size="${SIZE}x${SIZE}"
echo "data: source style a ($TRAIN_IMAGES train, $VAL_IMAGES val), shifted style b ..." >&2
"$DENSA" synth --out "$work/src_train" --images "$TRAIN_IMAGES" --size "$size" --seed 0 --style a >/dev/null
"$DENSA" synth --out "$work/src_val" --images "$VAL_IMAGES" --size "$size" --seed 1 --style a >/dev/null
"$DENSA" synth --out "$work/shift_val" --images "$VAL_IMAGES" --size "$size" --seed 2 --style b >/dev/null
"$DENSA" synth --out "$work/shift_pool" --images 200 --size "$size" --seed 3 --style b >/dev/null
"$DENSA" synth --out "$work/shift_unlabeled" --images 100 --size "$size" --seed 4 --style b >/dev/null

if [[ ! -f "$work/det.onnx" ]]; then
  echo "deployed model: finetune on style a ($EPOCHS epochs) -> export ..." >&2
  "$DENSA" finetune --task detect --data "$work/src_train/annotations.json" \
    --val-data "$work/src_val/annotations.json" --image-size "$SIZE" --epochs "$EPOCHS" \
    --val-every 5 --batch-size 16 --backend ort --threads 2 --out "$work/run" >&2
  "$DENSA" export detector --ckpt "$work/run" --out "$work/det.onnx" >&2
fi
if [[ ! -f "$work/det_bn.onnx" ]]; then
  "$DENSA" export detector --ckpt "$work/run" --keep-batch-norm --out "$work/det_bn.onnx" >&2
fi
read -r src_ap src_ap50 < <(ap "$work/det.onnx" "$work/src_val/annotations.json")
read -r dep_ap dep_ap50 < <(ap "$work/det.onnx" "$work/shift_val/annotations.json")

printf '\n| run | seed | AP (shifted val) | AP50 (shifted val) | s/step | peak MB |\n|---|---|---|---|---|---|\n'
printf '| deployed, source val (style a) | - | %s | %s | - | - |\n' "$src_ap" "$src_ap50"
printf '| deployed, shifted val (style b) | - | %s | %s | - | - |\n' "$dep_ap" "$dep_ap50"
for seed in $SEEDS; do
  for run in "supervised head 10 labeled" "supervised all 10 labeled" "consistency head 100 unlabeled" \
    "pixpro backbone 100 unlabeled" "densecl backbone 100 unlabeled"; do
    read -r method train count _ <<<"$run"
    # The pretext objectives train the backbone by default (no --train).
    select=(--train "$train")
    [[ $train == backbone ]] && select=()
    out="$work/adapted-$method-$train-$seed.onnx"
    if [[ $method == supervised ]]; then
      args=(--data "$work/shift_pool/annotations.json" --max-images 10 --steps "$STEPS" --lr "$LR")
    else
      args=(--data "$work/shift_unlabeled/images" --steps "$USTEPS" --lr "$ULR")
    fi
    "$DENSA" adapt "$work/det.onnx" "${args[@]}" --method "$method" "${select[@]}" \
      --batch "$BATCH" --seed "$seed" --no-eval --backend "$BACKEND" --threads 2 --out "$out" >&2
    read -r a_ap a_ap50 < <(ap "$out" "$work/shift_val/annotations.json")
    rep="${out%.onnx}.report.json"
    printf '| %s | %s | %s | %s | %.3f | %.0f |\n' "$run" "$seed" "$a_ap" "$a_ap50" \
      "$(field "$rep" seconds_per_step)" "$(field "$rep" peak_memory_mb)"
  done
done

# bn-stats (AdaBN) needs the batch norms unfolded: the same weights exported with
# --keep-batch-norm (scores as the folded export), then optionally supervised head adaptation.
"$DENSA" adapt "$work/det_bn.onnx" --data "$work/shift_unlabeled/images" --method bn-stats \
  --batch 16 --no-eval --backend "$BACKEND" --threads 2 --out "$work/adapted-bnstats.onnx" >&2
read -r a_ap a_ap50 < <(ap "$work/adapted-bnstats.onnx" "$work/shift_val/annotations.json")
printf '| bn-stats 100 unlabeled | - | %s | %s | - | %.0f |\n' "$a_ap" "$a_ap50" \
  "$(field "$work/adapted-bnstats.report.json" peak_memory_mb)"
for seed in $SEEDS; do
  out="$work/adapted-bnstats-head-$seed.onnx"
  "$DENSA" adapt "$work/adapted-bnstats.onnx" --data "$work/shift_pool/annotations.json" \
    --max-images 10 --steps "$STEPS" --lr "$LR" --train head --batch "$BATCH" --seed "$seed" \
    --no-eval --backend "$BACKEND" --threads 2 --out "$out" >&2
  read -r a_ap a_ap50 < <(ap "$out" "$work/shift_val/annotations.json")
  printf '| bn-stats, then supervised head 10 labeled | %s | %s | %s | %.3f | %.0f |\n' "$seed" \
    "$a_ap" "$a_ap50" "$(field "${out%.onnx}.report.json" seconds_per_step)" \
    "$(field "${out%.onnx}.report.json" peak_memory_mb)"
done

echo
echo "time per step and peak memory, supervised --train head and --train all, batch $BATCH, 2 cores:"
printf '| backend | train | s/step | peak MB |\n|---|---|---|---|\n'
for train in head all; do
  for backend in tract ort; do
    out="$work/timing-$backend-$train.onnx"
    pin "$DENSA" adapt "$work/det.onnx" --data "$work/shift_pool/annotations.json" --max-images 10 \
      --steps 10 --batch "$BATCH" --train "$train" --no-eval --backend "$backend" --threads 2 --out "$out" >&2
    rep="${out%.onnx}.report.json"
    printf '| %s | %s | %.3f | %.0f |\n' "$backend" "$train" "$(field "$rep" seconds_per_step)" \
      "$(field "$rep" peak_memory_mb)"
  done
done
