"""Shrinks ONNX Runtime's CUDA provider library for one GPU generation, so that the GPU check
(benches/gpu_check.sh) fits the 64 MiB a GPU test machine receives.

`libonnxruntime_providers_cuda.so` (onnxruntime-gpu 1.31.1: 284 MB) is mostly its `.nv_fatbin`
section: zstd-compressed cubins for sm_75..sm_120. This script blanks (zero-fills, keeping every
size and offset, so the host code's registration tables stay valid) the payload of
  - every cubin built for another architecture than --arch (the CUDA driver picks the exact
    match, so the blanked ones are never read on that GPU), and
  - with --drop-llm, every sm_<arch> module whose kernels all belong to contrib operators densa
    never emits (flash/paged/sparse attention, MoE, cutlass GEMMs, LLM and low-bit quantisation
    kernels), found by their mangled names.
The zeroed bytes compress to nothing; the result compresses to about 15 MB with xz.

A blanked module that is loaded anyway fails loudly (CUDA reports an invalid image), it cannot
compute wrong numbers; benches/gpu_check.sh also compares the GPU losses with the CPU's.

    python3 benches/gpu_prune_fatbin.py IN.so OUT.so --arch 90 [--drop-llm]

Fatbin layout (as read from the file, CUDA 13): a sequence of containers, each a 16-byte header
(u32 magic 0xBA55ED50, u16 version, u16 header size, u64 payload size) followed by entries,
each with its own header (u16 kind, u16 version, u32 header size, u64 payload size, ..., u32 sm
architecture at offset 28) and payload.
"""
import argparse
import re
import struct
import subprocess
import sys

MAGIC = 0xBA55ED50
LLM = re.compile(
    rb"flash|Moe|moe_|MoE|llm|fpA_intB|Attention|attention|attn|cutlass|Rotary|rotary|GroupQuery"
    rb"|xqa|BeamSearch|beam_search|GreedySearch|Sampling|sampling|DecoderMasked|decoder_masked"
    rb"|Quantiz|quantiz|MatMulNBits|nbits|BlockQuant|Qordered|qordered|SkipLayerNorm|fmha|Fmha"
    rb"|int4|Int4|fp8|Fp8|FP8|fp4|Fp4"
)


def section(path, name):
    out = subprocess.check_output(["readelf", "-S", "-W", path]).decode()
    for line in out.splitlines():
        if f" {name} " in line:
            fields = line.split("]", 1)[1].split()
            return int(fields[3], 16), int(fields[4], 16)
    sys.exit(f"{path}: no {name} section")


def entries(data, start, size):
    pos, end = start, start + size
    while pos < end:
        magic, _, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
        if magic != MAGIC:  # padding between containers
            pos += 8
            continue
        e, eend = pos + hsize, pos + hsize + fsize
        while e < eend:
            kind, _, ehsize, psize = struct.unpack_from("<HHIQ", data, e)
            arch = struct.unpack_from("<I", data, e + 28)[0]
            yield kind, arch, e + ehsize, psize
            e += ehsize + psize
        pos = eend


def kernel_names(payload):
    raw = subprocess.run(["zstd", "-d", "-q", "-c"], input=payload, capture_output=True).stdout
    if not raw.startswith(b"\x7fELF"):
        raw = payload
    return set(re.findall(rb"\.text\.(_Z\w+)", raw))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--arch", type=int, required=True, help="SM version to keep, e.g. 90 (H100/H200)")
    p.add_argument("--drop-llm", action="store_true")
    a = p.parse_args()
    data = bytearray(open(a.input, "rb").read())
    start, size = section(a.input, ".nv_fatbin")
    kept = blanked = 0
    for _, arch, off, psize in list(entries(data, start, size)):
        payload = bytes(data[off : off + psize])
        drop = arch != a.arch
        if not drop and a.drop_llm:
            names = kernel_names(payload)
            drop = bool(names) and all(LLM.search(n) for n in names)
        if drop:
            data[off : off + psize] = bytes(psize)
            blanked += psize
        else:
            kept += psize
    if kept == 0:
        sys.exit(f"{a.input}: no cubin for sm_{a.arch}; nothing would run")
    open(a.output, "wb").write(data)
    print(f"kept {kept / 1e6:.1f} MB of sm_{a.arch} cubins, blanked {blanked / 1e6:.1f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
