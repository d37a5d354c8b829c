"""COCO bbox evaluation time: `densa eval coco` vs pycocotools vs faster-coco-eval.

    python3 benches/coco_eval_bench.py DENSA_BINARY WORKDIR [--images 5000] [--dets 100]

Writes a deterministic case into WORKDIR (80 categories, about 7 ground truths and exactly
--dets detections per image, 5% crowds, objects of every size), then times each tool end to
end on the same two files (reading the JSON, evaluating, accumulating, summarising; Python's
own start-up excluded, densa's process included). densa and faster-coco-eval run 3 times
(median), pycocotools once. Prints the times, the ratios, and the largest stat difference.
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import time

import numpy as np


def make_case(workdir, n_images, n_dets):
    rng = np.random.RandomState(0)
    images, anns, dets = [], [], []
    for img in range(1, n_images + 1):
        w, h = 640, 480
        images.append({"id": img, "file_name": f"{img}.jpg", "width": w, "height": h})
        boxes = []
        for _ in range(rng.randint(1, 14)):
            size = rng.choice([8, 24, 60, 150, 300])
            bw, bh = (size * rng.uniform(0.5, 1.5, 2)).clip(1, [w, h])
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = int(rng.randint(1, 81))
            box = [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)]
            crowd = int(rng.rand() < 0.05)
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat, "bbox": box,
                         "area": round(bw * bh * 0.8, 2), "iscrowd": crowd, "segmentation": []})
            boxes.append((cat, box))
        for j in range(n_dets):
            if j < len(boxes) * 2:
                cat, (x, y, bw, bh) = boxes[j % len(boxes)]
                jit = rng.normal(0, 0.1, 4) * [bw, bh, bw, bh]
                box = [x + jit[0], y + jit[1], max(bw + jit[2], 1), max(bh + jit[3], 1)]
                score = rng.uniform(0.3, 1.0)
            else:
                cat = int(rng.randint(1, 81))
                bw, bh = rng.uniform(4, 200, 2)
                box = [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh]
                score = rng.uniform(0.0, 0.7)
            dets.append({"image_id": img, "category_id": cat,
                         "bbox": [round(float(v), 2) for v in box],
                         "score": round(float(score), 4)})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)]}
    gt_path, dt_path = os.path.join(workdir, "gt.json"), os.path.join(workdir, "dt.json")
    with open(gt_path, "w") as f:
        json.dump(gt, f)
    with open(dt_path, "w") as f:
        json.dump(dets, f)
    return gt_path, dt_path, len(anns), len(dets)


def run_densa(binary, gt, dt):
    t = time.perf_counter()
    out = subprocess.run([binary, "eval", "coco", "--gt", gt, "--dt", dt, "--json"],
                         check=True, capture_output=True, text=True).stdout
    elapsed = time.perf_counter() - t
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    stats = json.loads(out)
    return elapsed, [stats[k] for k in keys]


def run_python(module, gt, dt):
    if module == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval as Eval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as Eval
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO(gt)
        d = g.loadRes(dt)
        e = Eval(g, d, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return time.perf_counter() - t, [float(s) for s in e.stats]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("densa")
    ap.add_argument("workdir")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--dets", type=int, default=100)
    args = ap.parse_args()
    gt, dt, n_gt, n_dt = make_case(args.workdir, args.images, args.dets)
    print(f"case: {args.images} images, {n_gt} ground truths, {n_dt} detections, 80 categories")
    runs = {"densa": [run_densa(args.densa, gt, dt) for _ in range(3)],
            "faster-coco-eval": [run_python("faster", gt, dt) for _ in range(3)],
            "pycocotools": [run_python("pycocotools", gt, dt)]}
    times = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    stats = {k: v[0][1] for k, v in runs.items()}
    for name, t in times.items():
        diff = max(abs(a - b) for a, b in zip(stats[name], stats["pycocotools"]))
        print(f"{name:<17} {t:8.2f} s   AP {stats[name][0]:.6f}   max |stat - pycocotools| {diff:.2e}")
    d = times["densa"]
    print(f"pycocotools / densa       {times['pycocotools'] / d:6.1f}x")
    print(f"faster-coco-eval / densa  {times['faster-coco-eval'] / d:6.1f}x")


if __name__ == "__main__":
    main()
