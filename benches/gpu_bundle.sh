#!/usr/bin/env bash
# Packs what benches/gpu_check.sh needs on a GPU machine that can download nothing and receives
# at most 64 MiB: the release densa binary and ONNX Runtime 1.31.1's GPU build (from the
# `onnxruntime-gpu` wheel, fetched here with pip), its CUDA provider cut down to one GPU
# generation by benches/gpu_prune_fatbin.py. Run on the (CPU) build machine:
#
#   benches/gpu_bundle.sh [OUT_DIR=.gpu] [SM=90]
#
# and carry OUT_DIR to the GPU machine (it is ignored by git: add `/.gpu/` to .git/info/exclude).
# Needs pip, readelf, zstd and xz.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.gpu}
sm=${2:-90}
version=1.31.1
cache=${DENSA_CACHE_DIR:-$HOME/.cache/densa}/onnxruntime-gpu/$version
mkdir -p "$out" "$cache"
if ! ls "$cache"/onnxruntime_gpu-*.whl >/dev/null 2>&1; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 "onnxruntime-gpu==$version" -d "$cache"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unzip -q -o "$cache"/onnxruntime_gpu-*.whl 'onnxruntime/capi/libonnxruntime.so*' \
  'onnxruntime/capi/libonnxruntime_providers_shared.so' \
  'onnxruntime/capi/libonnxruntime_providers_cuda.so' -d "$work"
capi=$work/onnxruntime/capi
mkdir -p "$work/lib"
cp "$capi/libonnxruntime.so.$version" "$capi/libonnxruntime_providers_shared.so" "$work/lib/"
python3 benches/gpu_prune_fatbin.py "$capi/libonnxruntime_providers_cuda.so" \
  "$work/lib/libonnxruntime_providers_cuda.so" --arch "$sm" --drop-llm
# tract-cuda rides along so that one bundle checks both GPU paths.
cargo build --release --quiet --features "${FEATURES:-tract-cuda}"
cp "${CARGO_TARGET_DIR:-target}/release/densa" "$work/densa"
strip "$work/densa" 2>/dev/null || true
tar -C "$work" -cf - densa lib | xz -T0 -6 > "$out/bundle.tar.xz"
ls -l "$out/bundle.tar.xz" | awk '{printf "%s: %.1f MiB\n", $NF, $5/1048576}'
