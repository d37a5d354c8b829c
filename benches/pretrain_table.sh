#!/usr/bin/env bash
# The small paper table: every pretext method pretrains the same backbone on the same unlabelled
# synthetic scenes for the same number of steps; then the FCOS-style detector and the
# semantic-FPN segmenter are fine-tuned from each backbone (and from random initialisation) on
# 10% and 1% of the labels. Prints AP, AP50 (detection) and mIoU (segmentation) on the held-out
# scenes, mean +- standard deviation over seeds, and writes the table to $OUT/table.md.
#
#   benches/pretrain_table.sh
#
# Environment (defaults in brackets):
#   METHODS      methods to pretrain [every method of `densa methods`]
#   SEEDS        seeds, each a full repetition (pretraining and fine-tuning) ["0"]
#   TRAIN        training scenes, all used unlabelled for pretraining [3000]
#   VAL          held-out scenes [200]
#   PT_STEPS     pretraining steps, the same budget for every method [600]
#   PT_BATCH     pretraining batch [32]     PT_SIZE  pretraining view size [64]
#   FT_EPOCHS    fine-tuning epochs at 10% labels [24]; at 1% labels 10x as many (same steps)
#   FRACTIONS    label fractions ["0.1 0.01"]
#   QUEUE        length of every method's queues [1024, a third of the 3000 scenes]
#   BACKEND      ort or tract [ort]       OUT  work directory [a temporary one, kept; re-running
#                with the same OUT skips what is done]
#   DENSA_BIN    the binary [a release build]
# Every method uses its paper defaults except the queues (`queue_size`/`queue_length`), shrunk
# to QUEUE keys (the papers' 65536 is half of COCO; a queue longer than the data set holds stale
# keys of the query's own image as negatives). The fine-tuning recipe is the same for every initialisation:
# the task's defaults (the detector's and the segmenter's lr and augmentation), model selection
# on the held-out scenes every quarter of the epochs (the number reported is the best).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${DENSA_BIN:-}" ]]; then
  cargo build --release --quiet
  DENSA_BIN="${CARGO_TARGET_DIR:-target}/release/densa"
fi
all=$("$DENSA_BIN" methods --json | python3 -c 'import json,sys; print(" ".join(m["name"] for m in json.load(sys.stdin)))')
METHODS=${METHODS:-$all}
SEEDS=${SEEDS:-0}
TRAIN=${TRAIN:-3000}
VAL=${VAL:-200}
PT_STEPS=${PT_STEPS:-600}
PT_BATCH=${PT_BATCH:-32}
PT_SIZE=${PT_SIZE:-64}
FT_EPOCHS=${FT_EPOCHS:-24}
FRACTIONS=${FRACTIONS:-0.1 0.01}
BACKEND=${BACKEND:-ort}
QUEUE=${QUEUE:-1024}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
echo "work directory: $OUT"
[[ -d "$OUT/data/train" ]] || "$DENSA_BIN" synth --out "$OUT/data/train" --images "$TRAIN" --seed 0 >/dev/null
[[ -d "$OUT/data/val" ]] || "$DENSA_BIN" synth --out "$OUT/data/val" --images "$VAL" --seed 1 >/dev/null

queue_overrides() {
  "$DENSA_BIN" methods --json | python3 -c "
import json, sys
m = {m['name']: m for m in json.load(sys.stdin)}['$1']['hyperparameters']
print(' '.join(f'--set {k}=$QUEUE' for k in ('queue_size', 'queue_length') if m.get(k, 0) > 0))"
}

results="$OUT/results.jsonl"
for seed in $SEEDS; do
  for init in random $METHODS; do
    init_arg=random
    if [[ $init != random ]]; then
      pt="$OUT/pretrain/$init-s$seed"
      if [[ ! -f "$pt/backbone.safetensors" ]]; then
        echo "== pretraining $init (seed $seed, $PT_STEPS steps)"
        # shellcheck disable=SC2046
        "$DENSA_BIN" pretrain --method "$init" --data "$OUT/data/train" --steps "$PT_STEPS" \
          --batch "$PT_BATCH" --image-size "$PT_SIZE" --seed "$seed" --backend "$BACKEND" \
          $(queue_overrides "$init") --out "$pt" | tail -1
      fi
      init_arg="$pt"
    fi
    for frac in $FRACTIONS; do
      epochs=$(python3 -c "print(max(1, round($FT_EPOCHS * 0.1 / $frac)))")
      for task in detect segment; do
        ft="$OUT/finetune/$task-$init-f$frac-s$seed"
        if [[ -f "$results" ]] && grep -q "\"task\": \"$task\", \"init\": \"$init\", \"fraction\": $(python3 -c "print(float($frac))"), \"seed\": $seed," "$results"; then
          continue
        fi
        echo "== fine-tuning $task from $init on $frac of the labels (seed $seed, $epochs epochs)"
        "$DENSA_BIN" finetune --task "$task" --data "$OUT/data/train/annotations.json" \
          --val-data "$OUT/data/val/annotations.json" --init "$init_arg" \
          --label-fraction "$frac" --epochs "$epochs" --val-every "$(( (epochs + 3) / 4 ))" \
          --seed "$seed" --backend "$BACKEND" --out "$ft" 2>&1 | tail -1
        python3 - "$task" "$init" "$frac" "$seed" "$ft" >>"$results" <<'PY'
import json, os, sys
task, init, frac, seed, ft = sys.argv[1:]
if task == "detect":
    m = json.load(open(os.path.join(ft, "best", "metrics.json")))
    rec = {"AP": m["AP"], "AP50": m["AP50"]}
else:
    rec = {"mIoU": json.load(open(os.path.join(ft, "best.json")))["mIoU"]}
print(json.dumps({"task": task, "init": init, "fraction": float(frac), "seed": int(seed), **rec}))
PY
      done
    done
  done
done

python3 - "$results" "$OUT/table.md" "$PT_STEPS" "$PT_BATCH" "$PT_SIZE" "$FT_EPOCHS" "$SEEDS" <<'PY'
import json, statistics, sys
path, out, steps, batch, size, epochs, seeds = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
inits = list(dict.fromkeys(r["init"] for r in rows))
fracs = sorted({r["fraction"] for r in rows}, reverse=True)
def cell(init, frac, key):
    v = [r[key] for r in rows if r["init"] == init and r["fraction"] == frac and key in r]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}"
head = "| init | " + " | ".join(f"{k} ({f:g})" for f in fracs for k in ("AP", "AP50", "mIoU")) + " |"
lines = [f"Pretraining: {steps} steps, batch {batch}, {size}px views; fine-tuning: {epochs} epochs at 10% "
         f"labels (10x at 1%); seeds: {seeds}.", "", head,
         "|" + " --- |" * (1 + 3 * len(fracs))]
for i in inits:
    lines.append(f"| {i} | " + " | ".join(cell(i, f, k) for f in fracs for k in ("AP", "AP50", "mIoU")) + " |")
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
print(text)
PY
