"""Times an ONNX model in the onnxruntime Python package, the way `densa bench` times it.

    python3 benches/ort_python_bench.py MODEL.onnx --shape 8,3,224,224 --threads 2 --iters 20

Prints one JSON object with median/mean/min milliseconds per run.
"""

import argparse
import json
import time

import numpy as np
import onnxruntime as ort


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--shape", required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    shape = [int(d) for d in a.shape.split(",")]
    n = int(np.prod(shape))
    # The same input as `densa bench`: (i mod 251) / 251.
    x = ((np.arange(n) % 251) / 251.0).astype(np.float32).reshape(shape)
    options = ort.SessionOptions()
    if a.threads:
        options.intra_op_num_threads = a.threads
    s = ort.InferenceSession(a.model, options, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    times = []
    for i in range(a.warmup + a.iters):
        t0 = time.perf_counter()
        s.run(None, {name: x})
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    print(json.dumps({"backend": "onnxruntime-python", "median_ms": times[len(times) // 2],
                      "mean_ms": sum(times) / len(times), "min_ms": times[0], "iters": a.iters}))


if __name__ == "__main__":
    main()
