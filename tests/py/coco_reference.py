"""pycocotools' COCOeval on (ground truth, detections, iouType) triples, for densa's parity test.

    python3 tests/py/coco_reference.py GT.json DT.json bbox [GT2.json DT2.json segm ...]

Prints one JSON line per triple: {"stats": [12 numbers], "per_class": {"<cat id>": AP or null}},
per-class AP being the mean of precision[:, :, k, all areas, maxDets 100] over entries > -1.
pycocotools' own progress messages go to stderr.
"""
import contextlib
import json
import sys

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def evaluate(gt_path, dt_path, iou_type):
    with contextlib.redirect_stdout(sys.stderr):
        gt = COCO(gt_path)
        dt = gt.loadRes(dt_path)
        e = COCOeval(gt, dt, iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    per_class = {}
    for k, cat in enumerate(e.params.catIds):
        p = e.eval["precision"][:, :, k, 0, -1]
        p = p[p > -1]
        per_class[str(cat)] = float(np.mean(p)) if p.size else None
    return {"stats": [float(s) for s in e.stats], "per_class": per_class}


def main(argv):
    if len(argv) % 3 != 0 or not argv:
        sys.exit(__doc__)
    for i in range(0, len(argv), 3):
        print(json.dumps(evaluate(*argv[i:i + 3])))


if __name__ == "__main__":
    main(sys.argv[1:])
