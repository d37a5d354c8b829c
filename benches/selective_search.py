#!/usr/bin/env python3
"""Selective search, densa vs OpenCV, in one run on the same images.

Peers: `densa proposals --mode fast` (this repository, release build) and OpenCV's
`cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()` with
`switchToSelectiveSearchFast()` (package opencv-contrib-python-headless).

Data:
  * synthetic scenes written by `densa synth` (COCO JSON boxes), and
  * real photographs bundled with scikit-image (`skimage.data`: astronaut, chelsea, coffee,
    rocket, motorcycle_left), whose object boxes were HAND-ANNOTATED by us
    (benches/fixtures/skimage_boxes.json, approximate to a few pixels; not an official
    dataset).

Reports, per data set and peer: images/s and proposals per image (selective search time
only, images already decoded; densa's per-image time comes from its JSON), and the recall of
ground-truth boxes at IoU 0.5 and 0.7 among the top 100, top 300 and all proposals; then the
ratio densa / OpenCV. densa runs three times: one rayon thread (OpenCV's selective search runs
its hierarchies one after the other), all cores, and one thread with OpenCV's 4-connected
segmentation graph (`--connectivity 4`; densa's default is the paper's 8).

    pip install opencv-contrib-python-headless scikit-image
    cargo build --release
    python3 benches/selective_search.py [--densa target/release/densa] [--synth-images 50]

Installs nothing itself; not run in CI.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import cv2
except ImportError:
    sys.exit("needs OpenCV's contrib modules: pip install opencv-contrib-python-headless")

ROOT = Path(__file__).resolve().parent.parent
TOPS = (100, 300, None)
IOUS = (0.5, 0.7)


def iou_matrix(gts, props):
    """IoU of every ground-truth box against every proposal ([x0, y0, x1, y1], x1 exclusive)."""
    if len(props) == 0:
        return np.zeros((len(gts), 0))
    g = np.asarray(gts, dtype=np.float64)[:, None, :]
    p = np.asarray(props, dtype=np.float64)[None, :, :]
    iw = np.clip(np.minimum(g[..., 2], p[..., 2]) - np.maximum(g[..., 0], p[..., 0]), 0, None)
    ih = np.clip(np.minimum(g[..., 3], p[..., 3]) - np.maximum(g[..., 1], p[..., 1]), 0, None)
    inter = iw * ih
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area(g) + area(p) - inter)


def recall_table(samples):
    """samples: list of (gt boxes, ranked proposals). Returns {(top, iou): recall}."""
    out = {}
    for top in TOPS:
        best = []
        for gts, props in samples:
            if not gts:
                continue
            m = iou_matrix(gts, props[:top] if top else props)
            best.extend(m.max(axis=1) if m.shape[1] else np.zeros(len(gts)))
        best = np.asarray(best)
        for t in IOUS:
            out[(top, t)] = float((best >= t).mean()) if len(best) else float("nan")
    return out


def run_opencv(paths):
    """Fast-mode selective search on each image; per-image seconds and xyxy boxes."""
    times, boxes = [], []
    for p in paths:
        img = cv2.imread(str(p))  # BGR, as OpenCV expects
        if img is None:
            sys.exit(f"OpenCV could not read {p}")
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        t = time.perf_counter()
        ss.setBaseImage(img)
        ss.switchToSelectiveSearchFast()
        rects = ss.process()
        times.append(time.perf_counter() - t)
        boxes.append([[x, y, x + w, y + h] for x, y, w, h in np.asarray(rects).tolist()])
    return times, boxes


def run_densa(densa, paths, work, threads, connectivity=8):
    """`densa proposals --json` over all images in one process; per-image seconds and boxes."""
    out = Path(work) / f"densa_{threads or 'all'}_{connectivity}.json"
    env = dict(os.environ)
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    cmd = [str(densa), "proposals", *map(str, paths), "--mode", "fast", "--json", str(out),
           "--connectivity", str(connectivity)]
    subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    by_file = {e["file"]: e for e in data["images"]}
    entries = [by_file[str(p)] for p in paths]
    return [e["seconds"] for e in entries], [e["boxes"] for e in entries]


def synth_set(densa, work, n):
    out = Path(work) / "synth"
    subprocess.run(
        [str(densa), "synth", "--out", str(out), "--images", str(n), "--seed", "0"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    coco = json.loads((out / "annotations.json").read_text())
    files = {im["id"]: out / "images" / im["file_name"] for im in coco["images"]}
    if not all(f.exists() for f in files.values()):
        files = {im["id"]: out / im["file_name"] for im in coco["images"]}
    gts = {i: [] for i in files}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        gts[a["image_id"]].append([x, y, x + w, y + h])
    ids = sorted(files)
    return [files[i] for i in ids], [gts[i] for i in ids]


def skimage_set(work):
    try:
        import skimage.data as data
        from PIL import Image
    except ImportError:
        sys.exit("needs scikit-image (and Pillow): pip install scikit-image")
    ann = json.loads((ROOT / "benches/fixtures/skimage_boxes.json").read_text())["images"]
    loaders = {
        "astronaut": data.astronaut,
        "chelsea": data.chelsea,
        "coffee": data.coffee,
        "rocket": data.rocket,
        "motorcycle_left": lambda: data.stereo_motorcycle()[0],
    }
    out = Path(work) / "skimage"
    out.mkdir()
    paths, gts = [], []
    for name, entry in ann.items():
        img = loaders[name]()
        assert list(img.shape[1::-1]) == entry["size"], name
        p = out / f"{name}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
        gts.append(list(entry["boxes"].values()))
    return paths, gts


def report(name, paths, gts, peers):
    print(f"\n## {name}: {len(paths)} images, {sum(map(len, gts))} ground-truth boxes")
    rows = []
    for peer, (times, boxes) in peers.items():
        rec = recall_table(list(zip(gts, boxes)))
        row = {
            "images/s": len(times) / sum(times),
            "proposals/image": float(np.mean([len(b) for b in boxes])),
        }
        for top in TOPS:
            for t in IOUS:
                row[f"R@{t} top{top or 'all'}"] = rec[(top, t)]
        rows.append((peer, row))
    names = [p for p, _ in rows]
    header = f"{'metric':<18}" + "".join(f"{p:>20}" for p in names)
    header += "".join(f"{'ratio ' + str(i + 1) + '/OpenCV':>18}" for i in range(len(names) - 1))
    print("peers: " + ", ".join(f"{i + 1} = {p}" for i, p in enumerate(names)))
    print(header)
    opencv = rows[-1][1]
    for key in rows[0][1]:
        line = f"{key:<18}" + "".join(f"{r[key]:>20.3f}" for _, r in rows)
        line += "".join(
            f"{(r[key] / opencv[key] if opencv[key] else float('nan')):>18.2f}" for _, r in rows[:-1]
        )
        print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--densa", default=str(ROOT / "target/release/densa"))
    ap.add_argument("--synth-images", type=int, default=50)
    args = ap.parse_args()
    densa = Path(args.densa)
    if not densa.exists():
        sys.exit(f"{densa} not found: cargo build --release")
    print(f"OpenCV {cv2.__version__} (threads {cv2.getNumThreads()}), densa {densa}, "
          f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as work:
        sets = [
            (f"densa synth scenes (128x128, seed 0)", *synth_set(densa, work, args.synth_images)),
            ("skimage.data photographs (hand-annotated boxes)", *skimage_set(work)),
        ]
        for name, paths, gts in sets:
            peers = {
                "densa 1 thread": run_densa(densa, paths, work, 1),
                f"densa {os.cpu_count()} threads": run_densa(densa, paths, work, None),
                "densa 4-conn 1 thr": run_densa(densa, paths, work, 1, connectivity=4),
                "OpenCV fast": run_opencv(paths),
            }
            report(name, paths, gts, peers)


if __name__ == "__main__":
    main()
