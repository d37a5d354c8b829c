"""Writes runtime/src/mask/testdata/pycocotools_rle.json: masks made by pycocotools (polygons,
boxes, uncompressed RLE, encoded arrays) and the IoUs, areas and boxes it computes for them.

Run once (pip install pycocotools numpy); densa's mask unit tests compare against the file.
    python3 tests/py/make_rle_fixture.py
"""
import json
import os
import random

import numpy as np
from pycocotools import mask as M

rng = random.Random(20261107)
H, W = 37, 53


def poly(cx, cy, r, n, spread=1.0):
    pts = []
    for i in range(n):
        a = 2 * np.pi * i / n + rng.uniform(-0.3, 0.3)
        rr = r * rng.uniform(1 - 0.5 * spread, 1 + 0.2 * spread)
        pts += [round(cx + rr * np.cos(a), 3), round(cy + rr * np.sin(a), 3)]
    return pts


cases = []
# Polygon lists (one object, possibly several parts), some leaving the image, tiny, closed.
polys = [
    [poly(20, 15, 8, 6)],
    [poly(5, 5, 3, 3)],
    [poly(0, 0, 10, 5)],  # crosses the top-left corner
    [poly(50, 35, 9, 7)],  # crosses the bottom-right corner
    [poly(26, 18, 40, 9)],  # larger than the image
    [poly(10, 10, 0.4, 4)],  # sub-pixel
    [poly(30, 20, 6, 5), poly(8, 30, 4, 4)],  # two parts
    [poly(30, 20, 6, 5), poly(31, 21, 5, 6)],  # overlapping parts
    [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0, 1.0, 9.0, 1.0, 1.0]],  # closing vertex repeated
    [[2.5, 2.5, 12.5, 2.5, 12.5, 7.5]],  # half-pixel vertices
    [[-3.2, 4.1, 60.0, 4.1, 60.0, 40.0, -3.2, 40.0]],  # the whole image and more
    [[10.0, 5.0, 10.0, 25.0, 10.2, 15.0]],  # sliver
    [[20.0, 2.5, 10.5, 30.0, 4.0, 5.0], [3.0, 4.0, 7.0, 9.0]],  # a 2-point part
]
for i in range(12):
    n = rng.randint(3, 12)
    polys.append([poly(rng.uniform(-5, W + 5), rng.uniform(-5, H + 5), rng.uniform(0.5, 25), n, 1.5)])
for p in polys:
    rles = M.frPyObjects(p, H, W)
    rle = M.merge(rles)
    cases.append({"polygons": p, "counts": rle["counts"].decode(), "area": int(M.area(rle)),
                  "bbox": [float(v) for v in M.toBbox(rle)]})

# Uncompressed RLE -> compressed.
uncompressed = []
for i in range(6):
    mask = (np.random.RandomState(i).rand(H, W) > [0.2, 0.5, 0.8, 0.97, 0.0, 1.0][i]).astype(np.uint8)
    enc = M.encode(np.asfortranarray(mask))
    # The run list of the Fortran-order (column-major) flattening.
    flat = mask.flatten(order="F")
    counts, prev, c = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(c)
            c = 0
            prev = v
        c += 1
    counts.append(c)
    back = M.frPyObjects({"size": [H, W], "counts": counts}, H, W)
    assert back["counts"] == enc["counts"]
    uncompressed.append({"mask_rows": ["".join(map(str, r)) for r in mask], "runs": counts,
                         "counts": enc["counts"].decode(), "area": int(M.area(enc)),
                         "bbox": [float(v) for v in M.toBbox(enc)]})

# IoU between the polygon masks (rows: detections, columns: ground truths) with crowd flags.
rles = [M.merge(M.frPyObjects(p, H, W)) for p in polys]
crowd = [i % 3 == 0 for i in range(len(rles))]
iou = M.iou(rles, rles, crowd)
# Box IoU.
boxes = [[rng.uniform(-5, 50), rng.uniform(-5, 30), rng.uniform(0, 30), rng.uniform(0, 20)] for _ in range(10)]
boxes.append([3.0, 4.0, 0.0, 5.0])
box_crowd = [i % 4 == 1 for i in range(len(boxes))]
box_iou = M.iou(boxes, boxes, box_crowd)
inter = M.merge([rles[6], rles[7]], intersect=True)

out = {
    "height": H,
    "width": W,
    "polygon_cases": cases,
    "encode_cases": uncompressed,
    "iou": {"crowd": crowd, "values": iou.tolist()},
    "box_iou": {"boxes": boxes, "crowd": box_crowd, "values": box_iou.tolist()},
    "intersection_6_7": inter["counts"].decode(),
}
path = os.path.join(os.path.dirname(__file__), "..", "..", "runtime", "src", "mask", "testdata",
                    "pycocotools_rle.json")
with open(path, "w") as f:
    json.dump(out, f)
print(path, os.path.getsize(path))
