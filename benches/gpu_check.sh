#!/usr/bin/env bash
# The GPU check: one short command on an NVIDIA machine (H100/H200, CUDA 13, PyTorch) that can
# download nothing. Build its input on a CPU machine first:
#
#   benches/gpu_bundle.sh .gpu 90      # release densa + ONNX Runtime 1.31.1 GPU build, ~33 MiB
#   (carry .gpu/ and the repository to the GPU machine)
#   benches/gpu_check.sh [.gpu]        # ~4 minutes; prints a table, writes $OUT/gpu_check.md
#
# What it measures (median step time over the steps after the first two, from densa's JSONL
# step log or the peer's own timer; the synthetic batch is made on the host each step and is
# included, as the PyTorch peer's `torch.rand` is):
#   1. One SGD step of ResNet-18 + cross-entropy, 224x224, batch $BATCH: densa on the GPU (state
#      kept on the device by IoBinding), densa on the GPU with the state copied to the host and
#      back every step (DENSA_RESIDENT_STATE=0), densa on the CPU (ONNX Runtime, all cores),
#      and PyTorch on the same GPU (benches/train_step_torch.py). The first steps' losses of the
#      GPU and CPU runs are compared: same data, same initial weights, so they must agree to
#      float (TF32) precision.
#   2. One DenseCL pretraining step (ResNet-18, 128x128, batch $BATCH): densa GPU vs CPU.
#   3. ResNet-50 backbone inference, batch $BATCH at 224 (`densa bench`): densa on ONNX Runtime
#      GPU and CPU, densa on tract-cuda (when the bundle was built with that feature) and tract
#      CPU, and PyTorch (torchvision's ResNet-50 trunk, eval mode) on the same GPU.
# The GPU libraries CUDA's provider needs (cuBLAS, cuDNN...) come from the machine's `nvidia-*`
# Python packages (densa preloads them; see runtime/src/backend/cuda_libs.rs).
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=${1:-.gpu}
batch=${BATCH:-32}
out=${OUT:-$(mktemp -d)}
work=$(mktemp -d)
mkdir -p "$out"
log() { echo "$@" | tee -a "$out/gpu_check.log"; }

unxz() { if command -v xz >/dev/null; then xz -dc "$1"; else python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1"; fi; }
unxz "$bundle/bundle.tar.xz" | tar -C "$work" -xf - || { echo "no bundle in $bundle"; exit 2; }
export ORT_DYLIB_PATH=$work/lib/libonnxruntime.so.1.31.1
export DENSA_ORT_NO_DOWNLOAD=1
densa=$work/densa
python=${PYTHON:-python3}

log "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/gpu_check.log"
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$out/gpu_check.log"
log "cpu cores: $(nproc)"

# Median step seconds (after the first two) and the first losses, from a densa run's log.
summary() { "$python" - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
t = [r["time_s"] for r in rows]
d = [b - a for a, b in zip(t, t[1:])][1:]
print(json.dumps({"median_s": statistics.median(d) if d else None, "losses": [r.get("loss") for r in rows]}))
PY
}

a=$work/artifact
"$densa" export train --arch resnet18 --task classify --classes 10 --optimizer sgd \
  --momentum 0.9 --weight-decay 1e-4 --lr 0.1 --image-size 224 --out "$a" >/dev/null

train() { # tag device steps [env...]
  local tag=$1 device=$2 steps=$3
  shift 3
  env "$@" "$densa" train --artifact "$a" --synthetic 512 --classes 10 --batch-size "$batch" \
    --steps "$steps" --checkpoint-every 0 --holdout-every 0 --backend ort --device "$device" \
    --out "$work/run-$tag" >"$work/$tag.out" 2>"$work/$tag.err"
  local rc=$?
  grep -h "densa:" "$work/$tag.err" | tee -a "$out/gpu_check.log"
  [[ $rc == 0 ]] || { tail -5 "$work/$tag.err"; echo "{}" >"$work/$tag.json"; return; }
  summary "$work/run-$tag/train_log.jsonl" >"$work/$tag.json"
}

log "== 1. ResNet-18 classifier step, 224x224, batch $batch"
train gpu cuda 25
train gpu-host cuda 25 DENSA_RESIDENT_STATE=0
train cpu cpu 6
"$python" benches/train_step_torch.py --device cuda --batch "$batch" --steps 25 >"$work/torch.json" \
  2>"$work/torch.err" || { tail -5 "$work/torch.err"; echo "{}" >"$work/torch.json"; }

log "== 2. DenseCL pretraining step, ResNet-18, 128x128, batch $batch"
"$densa" synth --images 256 --size 128x128 --out "$work/synth" >/dev/null
pretrain() { # tag device steps
  "$densa" pretrain --method densecl --arch resnet18 --data "$work/synth/images" --steps "$3" \
    --batch "$batch" --image-size 128 --checkpoint-every 0 --backend ort --device "$2" \
    --out "$work/pt-$1" >"$work/pt-$1.out" 2>"$work/pt-$1.err"
  local rc=$?
  grep -h "densa: pretraining" "$work/pt-$1.err" | tee -a "$out/gpu_check.log"
  [[ $rc == 0 ]] || { tail -5 "$work/pt-$1.err"; echo "{}" >"$work/pt-$1.json"; return; }
  summary "$(ls "$work/pt-$1"/*.jsonl | head -1)" >"$work/pt-$1.json"
}
pretrain gpu cuda 20
pretrain cpu cpu 5

log "== 3. ResNet-50 backbone inference, batch $batch, 224x224"
"$densa" export backbone --arch resnet50 --out "$work/r50.onnx" >/dev/null
"$densa" bench "$work/r50.onnx" --shape "$batch,3,224,224" --backend ort --device cuda --iters 20 \
  --json >"$work/inf-gpu.json" 2>"$work/inf-gpu.err" || tail -3 "$work/inf-gpu.err"
"$densa" bench "$work/r50.onnx" --shape "$batch,3,224,224" --backend ort --device cpu --iters 3 \
  --warmup 1 --json >"$work/inf-cpu.json" 2>/dev/null
"$densa" bench "$work/r50.onnx" --shape "$batch,3,224,224" --backend tract --device cuda \
  --iters 10 --json >"$work/inf-tgpu.json" 2>"$work/inf-tgpu.err" || tail -3 "$work/inf-tgpu.err"
grep -h "warning" "$work/inf-tgpu.err" | tee -a "$out/gpu_check.log"
"$densa" bench "$work/r50.onnx" --shape "$batch,3,224,224" --backend tract --iters 2 \
  --warmup 1 --json >"$work/inf-tcpu.json" 2>/dev/null
"$python" - "$batch" >"$work/inf-torch.json" 2>"$work/inf-torch.err" <<'PY' || tail -3 "$work/inf-torch.err"
import json, statistics, sys, time
import torch, torchvision
batch = int(sys.argv[1])
torch.backends.cudnn.benchmark = True
m = torchvision.models.resnet50()
trunk = torch.nn.Sequential(*list(m.children())[:-2]).cuda().eval()
x = torch.rand(batch, 3, 224, 224, device="cuda")
times = []
with torch.no_grad():
    for i in range(23):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        trunk(x)
        torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000)
print(json.dumps({"median_ms": statistics.median(times)}))
PY

"$python" - "$work" "$batch" <<'PY' | tee "$out/gpu_check.md"
import json, os, sys
work, batch = sys.argv[1], sys.argv[2]
def load(name):
    try:
        return json.load(open(os.path.join(work, name)))
    except Exception:
        return {}
def ms(v):
    return f"{v * 1000:.1f} ms" if v else "failed"
def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"
gpu, host, cpu, torch = (load(f) for f in ("gpu.json", "gpu-host.json", "cpu.json", "torch.json"))
g, h, c, t = (x.get("median_s") for x in (gpu, host, cpu, torch))
print(f"## ResNet-18 classifier SGD step, 224x224, batch {batch}\n")
print("| run | step | vs densa GPU |\n| --- | --- | --- |")
print(f"| densa, GPU, state on the device | {ms(g)} | 1.00x |")
print(f"| densa, GPU, state through the host | {ms(h)} | {ratio(h, g)} |")
print(f"| densa, CPU ({os.cpu_count()} cores, ONNX Runtime) | {ms(c)} | {ratio(c, g)} |")
print(f"| PyTorch, same GPU | {ms(t)} | {ratio(t, g)} |")
gl, cl = gpu.get("losses") or [], cpu.get("losses") or []
pairs = [(a, b) for a, b in zip(gl, cl) if a is not None and b is not None]
if pairs:
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in pairs]
    print(f"\nloss, GPU vs CPU (same data, same initial weights): step 1 relative difference "
          f"{rel[0]:.2e}, steps 1-{len(pairs)}: {', '.join(f'{r:.1e}' for r in rel)}")
    print(f"GPU {[round(a, 5) for a, _ in pairs]}\nCPU {[round(b, 5) for _, b in pairs]}")
pg, pc = load("pt-gpu.json").get("median_s"), load("pt-cpu.json").get("median_s")
print(f"\n## DenseCL pretraining step, ResNet-18, 128x128, batch {batch}\n")
print("| run | step |\n| --- | --- |")
print(f"| densa, GPU | {ms(pg)} |\n| densa, CPU | {ms(pc)} |")
print(f"\nCPU / GPU = {ratio(pc, pg)}")
print(f"\n## ResNet-50 backbone inference, batch {batch}, 224x224\n")
print("| run | median | vs densa ONNX Runtime GPU |\n| --- | --- | --- |")
ig = load("inf-gpu.json").get("median_ms")
for name, f in (("densa, ONNX Runtime, GPU", "inf-gpu.json"), ("densa, ONNX Runtime, CPU", "inf-cpu.json"),
                ("densa, tract-cuda, GPU", "inf-tgpu.json"), ("densa, tract, CPU", "inf-tcpu.json"),
                ("PyTorch, same GPU", "inf-torch.json")):
    v = load(f).get("median_ms")
    print(f"| {name} | {f'{v:.1f} ms' if v else 'failed'} | {ratio(v, ig)} |")
PY
