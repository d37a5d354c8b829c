#!/usr/bin/env bash
# The low-label table of the detector-pretraining family (issue 7). On the same synthetic
# scenes: the DETR-family detector fine-tuned with 1% of the labels and with 10 shots per class,
# from random initialisation, from a wave-1 backbone, and after DetReg / UP-DETR / Pair DETR
# pretraining on the unlabelled scenes; and CCOP's backbone in the dense (FCOS-style) detector
# beside random and the wave-1 backbone there. Prints AP and AP50 on held-out scenes (best
# validation, mean +- standard deviation over seeds), writes $OUT/table.md, and plots AP50
# against fine-tuning epochs ($OUT/ap50-<regime>-s<seed>.png) with `densa plot`: the papers
# claim faster convergence.
#
#   benches/detr_lowlabel.sh
#
# Environment (defaults in brackets):
#   SEEDS        seeds, each a full repetition (pretraining and fine-tuning) ["0 1"]
#   TRAIN        training scenes, all used unlabelled for pretraining [1000]
#   VAL          held-out scenes [200]
#   WAVE1        the wave-1 method whose backbone initialises the "wave-1" rows and is DetReg's
#                frozen embedding encoder [swav]
#   PRETRAIN     detector-family methods to pretrain ["detreg updetr pairdetr"]; CCOP always
#                runs for the dense rows unless DENSE=0
#   PT_STEPS     pretraining steps, the same budget for every method [300]
#   PT_BATCH     pretraining batch [16]      SIZE  DETR input and pretraining view size [128]
#   REGIMES      fine-tuning label regimes ["fraction=0.01 shots=10"]; the README's 10% column:
#                REGIMES=fraction=0.1 FT_EPOCHS=100
#   FT_EPOCHS    DETR fine-tuning epochs [200 at 1% (10 images), 60 at 10 shots]; validation
#                10 times per run
#   DENSE_EPOCHS dense-detector epochs [the same as FT_EPOCHS]
#   BACKEND      ort or tract [ort]     OUT  work directory [a temporary one, kept; re-running
#                with the same OUT skips what is done]
#   DENSA_BIN    the binary [a release build]
# Every initialisation gets the same fine-tuning recipe (the task's defaults, batch 4); the
# number reported is the best validation AP of the run (model selection on the held-out scenes,
# as in benches/pretrain_table.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${DENSA_BIN:-}" ]]; then
  cargo build --release --quiet
  DENSA_BIN="${CARGO_TARGET_DIR:-target}/release/densa"
fi
SEEDS=${SEEDS:-0 1}
TRAIN=${TRAIN:-1000}
VAL=${VAL:-200}
WAVE1=${WAVE1:-swav}
PRETRAIN=${PRETRAIN-detreg updetr pairdetr}
DENSE=${DENSE:-1}
PT_STEPS=${PT_STEPS:-300}
PT_BATCH=${PT_BATCH:-16}
SIZE=${SIZE:-128}
REGIMES=${REGIMES:-fraction=0.01 shots=10}
BACKEND=${BACKEND:-ort}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
echo "work directory: $OUT"
[[ -d "$OUT/data/train" ]] || "$DENSA_BIN" synth --out "$OUT/data/train" --images "$TRAIN" --seed 0 >/dev/null
[[ -d "$OUT/data/val" ]] || "$DENSA_BIN" synth --out "$OUT/data/val" --images "$VAL" --seed 1 >/dev/null
results="$OUT/results.jsonl"
touch "$results"

epochs_for() { # regime -> DETR fine-tuning epochs
  if [[ -n "${FT_EPOCHS:-}" ]]; then echo "$FT_EPOCHS"; elif [[ $1 == fraction=* ]]; then echo 200; else echo 60; fi
}
regime_flag() { # fraction=0.01 -> --label-fraction 0.01; shots=10 -> --shots 10
  case $1 in
    fraction=*) echo "--label-fraction ${1#fraction=}" ;;
    shots=*) echo "--shots ${1#shots=}" ;;
    *) echo "unknown regime $1" >&2; exit 2 ;;
  esac
}
done_already() { # detector init regime seed
  grep -q "\"detector\": \"$1\", \"init\": \"$2\", \"regime\": \"$3\", \"seed\": $4," "$results"
}

pretrain() { # method seed batch size [extra flags...] -> prints the run directory
  local method=$1 seed=$2 batch=$3 size=$4; shift 4
  local pt="$OUT/pretrain/$method-s$seed"
  if [[ ! -f "$pt/backbone.safetensors" ]]; then
    echo "== pretraining $method (seed $seed, $PT_STEPS steps)" >&2
    "$DENSA_BIN" pretrain --method "$method" --data "$OUT/data/train" --steps "$PT_STEPS" \
      --batch "$batch" --image-size "$size" --seed "$seed" --backend "$BACKEND" "$@" \
      --out "$pt" 2>&1 | tail -1 >&2
  fi
  if [[ ! -f "$pt/backbone.safetensors" ]]; then
    echo "pretraining $method failed (see above)" >&2
    exit 1
  fi
  echo "$pt"
}

finetune() { # detector init-name init-arg regime seed
  local detector=$1 name=$2 init=$3 regime=$4 seed=$5
  done_already "$detector" "$name" "$regime" "$seed" && return 0
  local epochs
  epochs=$(epochs_for "$regime")
  [[ $detector == fcos ]] && epochs=${DENSE_EPOCHS:-$epochs}
  local ft="$OUT/finetune/$detector-$name-$regime-s$seed"
  echo "== fine-tuning $detector from $name, $regime (seed $seed, $epochs epochs)"
  local t0=$SECONDS
  # shellcheck disable=SC2046
  "$DENSA_BIN" finetune --task detect --detector "$detector" \
    --data "$OUT/data/train/annotations.json" --val-data "$OUT/data/val/annotations.json" \
    --init "$init" $(regime_flag "$regime") --epochs "$epochs" --batch-size 4 \
    --val-every "$(( (epochs + 9) / 10 ))" --seed "$seed" --backend "$BACKEND" \
    --out "$ft" 2>&1 | tail -1
  python3 - "$detector" "$name" "$regime" "$seed" "$ft" "$(( SECONDS - t0 ))" >>"$results" <<'PY'
import json, os, sys
detector, name, regime, seed, ft, secs = sys.argv[1:]
m = json.load(open(os.path.join(ft, "best", "metrics.json")))
print(json.dumps({"detector": detector, "init": name, "regime": regime, "seed": int(seed),
                  "AP": m["AP"], "AP50": m["AP50"], "best_epoch": m["epoch"],
                  "seconds": int(secs)}))
PY
}

for seed in $SEEDS; do
  wave1=$(pretrain "$WAVE1" "$seed" 32 64)
  [[ -n $wave1 ]]
  inits=("random=random" "$WAVE1=$wave1")
  for m in $PRETRAIN; do
    extra=()
    # Every detector method starts from the wave-1 backbone (the papers': SwAV), frozen.
    case $m in
      detreg) extra=(--set "encoder=$wave1/backbone.safetensors") ;;
      updetr | pairdetr) extra=(--set "backbone=$wave1/backbone.safetensors") ;;
    esac
    pt=$(pretrain "$m" "$seed" "$PT_BATCH" "$SIZE" "${extra[@]}")
    inits+=("$m=$pt")
  done
  for regime in $REGIMES; do
    for entry in "${inits[@]}"; do
      finetune detr "${entry%%=*}" "${entry#*=}" "$regime" "$seed"
    done
    if [[ $DENSE == 1 ]]; then
      ccop=$(pretrain ccop "$seed" 32 64)
      for entry in "random=random" "$WAVE1=$wave1" "ccop=$ccop"; do
        finetune fcos "${entry%%=*}" "${entry#*=}" "$regime" "$seed"
      done
    fi
    logs=()
    for entry in "${inits[@]}"; do
      name=${entry%%=*}
      logs+=("$OUT/finetune/detr-$name-$regime-s$seed/val.jsonl=$name")
    done
    "$DENSA_BIN" plot "${logs[@]}" --x epoch --y AP50 \
      --title "DETR fine-tuning, $regime, seed $seed: AP50 vs epochs" \
      --out "$OUT/ap50-$regime-s$seed.png"
  done
done

python3 - "$results" "$OUT/table.md" "$PT_STEPS" "$PT_BATCH" "$SIZE" "$SEEDS" "$TRAIN" <<'PY'
import json, statistics, sys
path, out, steps, batch, size, seeds, train = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
regimes = list(dict.fromkeys(r["regime"] for r in rows))
def cell(det, init, regime, key):
    v = [r[key] for r in rows if (r["detector"], r["init"], r["regime"]) == (det, init, regime)]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.4f}"
    return f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}"
lines = [f"Pretraining on {train} unlabelled scenes: {steps} steps, batch {batch} (wave-1 and "
         f"CCOP: batch 32, 64 px views), DETR input {size} px. Mean ± std over the seeds listed.", ""]
head = "| detector | init | seeds | " + " | ".join(f"{k} ({g})" for g in regimes for k in ("AP", "AP50")) + " |"
lines += [head, "|" + " --- |" * (3 + 2 * len(regimes))]
for det in dict.fromkeys(r["detector"] for r in rows):
    for init in dict.fromkeys(r["init"] for r in rows if r["detector"] == det):
        seeds_of = sorted({r["seed"] for r in rows if (r["detector"], r["init"]) == (det, init)})
        lines.append(f"| {det} | {init} | {','.join(map(str, seeds_of))} | " + " | ".join(
            cell(det, init, g, k) for g in regimes for k in ("AP", "AP50")) + " |")
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
print(text)
PY
