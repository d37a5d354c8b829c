"""Runs onnx-ad (PyPI) as an independent differentiator: reads MODEL (scalar output, the
differentiated values as graph inputs) and FEEDS (npz), builds `onnx_ad.reverse` with the seed
as a trailing axis of size 1, runs it on ONNX Runtime with seed 1 and writes the adjoint of
every input to OUT (npz, keyed by input name).
Usage: onnx_ad_reverse.py MODEL FEEDS OUT"""
import sys

import numpy as np
import onnx
import onnx_ad
import onnxruntime as ort

model = onnx.load(sys.argv[1])
feeds = dict(np.load(sys.argv[2]))
inputs = [i.name for i in model.graph.input]
output = model.graph.output[0].name
rev = onnx_ad.reverse(model, inputs=inputs, outputs=[output], prefix="adj_", layout="onnx")
session = ort.InferenceSession(rev.SerializeToString())
seed_name = [i.name for i in session.get_inputs() if i.name not in feeds][0]
feeds[seed_name] = np.ones((1,), dtype=np.float32)
names = [o.name for o in session.get_outputs()]
values = session.run(None, feeds)
out = {}
for x in inputs:
    v = values[names.index("adj_" + x)]
    out[x] = v.reshape(feeds[x].shape)
np.savez(sys.argv[3], **out)
