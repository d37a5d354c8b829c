"""Reference run of an ONNX model with the `onnx` and `onnxruntime` Python packages.

    python3 tests/py/ort_reference.py MODEL.onnx OUT.npz NAME=INPUT.npy [NAME=INPUT.npy ...]

Checks the model with onnx.checker (full_check=True, i.e. with strict shape inference), runs it
on ONNX Runtime's CPU provider with the given inputs and writes every output to OUT.npz.
"""

import sys

import numpy as np
import onnx
import onnxruntime as ort


def main():
    model_path, out_path, *specs = sys.argv[1:]
    onnx.checker.check_model(onnx.load(model_path), full_check=True)
    feeds = {}
    for spec in specs:
        name, path = spec.split("=", 1)
        feeds[name] = np.load(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, feeds)
    np.savez(out_path, **dict(zip(names, outputs)))


if __name__ == "__main__":
    main()
