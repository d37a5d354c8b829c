"""The Python peer of `densa detect`, and the helpers of benches/detect_e2e.sh.

    python3 benches/detect_e2e.py images OUT_DIR --count 200 [--size 640x480] [--seed 0]
    python3 benches/detect_e2e.py detect MODEL.onnx IMAGE_DIR --json OUT.json --threads 2 \
        [--score-threshold 0.25]
    python3 benches/detect_e2e.py compare A.json B.json

`detect` is the pipeline a Python user would write around the same ONNX file: PIL decode,
PIL bilinear resize (letterbox or stretch, as the model's `densa.spec` metadata says) into a
numpy canvas, numpy normalisation, onnxruntime (intra-op threads as given, like densa's
`--threads`), numpy score filtering, class-aware greedy NMS (torchvision's batched-NMS offset
trick) and mapping back to image pixels, then `json.dump` of COCO results with `file_name`.
One image per run, as `densa detect` with its default `--batch 1`. It prints one JSON object:
images, seconds of the serving loop (decode to detections, as densa's own figure), seconds to
load the model, detections.
"""

import argparse
import json
import math
import os
import sys
import time
import tomllib

import numpy as np


def make_images(out, count, size, seed):
    from PIL import Image, ImageDraw

    w, h = size
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    for i in range(count):
        # A smooth coloured background (low-resolution noise, upsampled) and a few shapes, so
        # that JPEG decoding has realistic work to do.
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 6))):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            s = int(rng.integers(20, min(w, h) // 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.ellipse([x0, y0, x0 + s, y0 + s], fill=colour)
            else:
                draw.rectangle([x0, y0, x0 + s, y0 + s], fill=colour)
        img.save(os.path.join(out, f"img{i:04d}.jpg"), quality=90)


def nms(boxes, scores, labels, iou):
    """Class-aware greedy NMS: indices kept, best first (IoU > iou suppresses)."""
    if len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    offset = labels.astype(np.float32)[:, None] * (boxes.max() + 1.0)
    b = boxes + offset
    order = np.argsort(-scores, kind="stable")
    area = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iw = (np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0])).clip(0)
        ih = (np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1])).clip(0)
        inter = iw * ih
        union = area[i] + area[rest] - inter
        ious = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        order = rest[ious <= iou]
    return np.array(keep, dtype=np.int64)


def detect(model, image_dir, out_json, threads, score_threshold):
    import onnxruntime as ort
    from PIL import Image

    t0 = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    spec = tomllib.loads(session.get_modelmeta().custom_metadata_map["densa.spec"])
    inp, out = spec["input"], spec["output"]
    tw, th = inp["size"]
    mean = np.array(inp["mean"], dtype=np.float32)
    std = np.array(inp["std"], dtype=np.float32)
    scale_px = np.float32(inp["scale"])
    name = inp.get("name") or session.get_inputs()[0].name
    chw = inp.get("layout", "NCHW") == "CHW"
    host_nms = out.get("host_nms", False)
    load_s = time.perf_counter() - t0

    files = sorted(
        f for f in os.listdir(image_dir) if f.lower().endswith((".jpg", ".jpeg", ".png"))
    )
    results = []
    t1 = time.perf_counter()
    for n, f in enumerate(files, start=1):
        img = Image.open(os.path.join(image_dir, f)).convert("RGB")
        iw, ih = img.size
        if inp.get("resize", "stretch") == "letterbox":
            r = min(tw / iw, th / ih)
            nw = min(max(math.floor(iw * r + 0.5), 1), tw)
            nh = min(max(math.floor(ih * r + 0.5), 1), th)
            ox, oy = (tw - nw) // 2, (th - nh) // 2
            canvas = np.full((th, tw, 3), inp.get("pad_value", 114), dtype=np.uint8)
            canvas[oy : oy + nh, ox : ox + nw] = np.asarray(img.resize((nw, nh), Image.BILINEAR))
            sx, sy = nw / iw, nh / ih
        else:
            canvas = np.asarray(img.resize((tw, th), Image.BILINEAR))
            ox = oy = 0
            sx, sy = tw / iw, th / ih
        x = canvas.astype(np.float32) * scale_px
        if inp.get("channels", "RGB") == "BGR":
            x = x[:, :, ::-1]
        x = ((x - mean) / std).transpose(2, 0, 1)
        x = np.ascontiguousarray(x if chw else x[None])
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {name: x})))
        boxes = got[out.get("boxes", "boxes")].reshape(-1, 4)
        scores = got[out.get("scores", "scores")].reshape(-1)
        labels = got[out.get("labels", "labels")].reshape(-1) - out.get("label_offset", 0)
        sel = scores >= score_threshold
        boxes, scores, labels = boxes[sel], scores[sel], labels[sel]
        if host_nms:
            k = nms(boxes, scores, labels, out.get("nms_iou", 0.7))
            boxes, scores, labels = boxes[k], scores[k], labels[k]
        x1 = ((boxes[:, 0] - ox) / sx).clip(0, iw)
        y1 = ((boxes[:, 1] - oy) / sy).clip(0, ih)
        x2 = ((boxes[:, 2] - ox) / sx).clip(0, iw)
        y2 = ((boxes[:, 3] - oy) / sy).clip(0, ih)
        for j in np.argsort(-scores, kind="stable"):
            results.append(
                {
                    "image_id": n,
                    "category_id": int(labels[j]),
                    "bbox": [
                        float(x1[j]),
                        float(y1[j]),
                        float(x2[j] - x1[j]),
                        float(y2[j] - y1[j]),
                    ],
                    "score": float(scores[j]),
                    "file_name": f,
                }
            )
    loop_s = time.perf_counter() - t1
    with open(out_json, "w") as fh:
        json.dump(results, fh)
    print(
        json.dumps(
            {
                "images": len(files),
                "loop_s": loop_s,
                "load_s": load_s,
                "detections": len(results),
            }
        )
    )


def compare(a_path, b_path):
    """How alike two detection files are: counts, and for each detection of A the best IoU
    with a same-label detection of B in the same file (share >= 0.9, median score gap)."""

    def load(p):
        out = {}
        for d in json.load(open(p)):
            x, y, w, h = d["bbox"]
            out.setdefault(d["file_name"], []).append(
                (d["category_id"], d["score"], (x, y, x + w, y + h))
            )
        return out

    def iou(a, b):
        iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
        ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 1.0

    a, b = load(a_path), load(b_path)
    na, nb = sum(map(len, a.values())), sum(map(len, b.values()))
    ious, gaps = [], []
    for f, da in a.items():
        for label, score, box in da:
            cands = [d for d in b.get(f, []) if d[0] == label]
            if not cands:
                ious.append(0.0)
                continue
            best = max(cands, key=lambda d: iou(box, d[2]))
            ious.append(iou(box, best[2]))
            gaps.append(abs(best[1] - score))
    close = sum(v >= 0.9 for v in ious) / max(len(ious), 1)
    gap = float(np.median(gaps)) if gaps else 0.0
    print(
        f"detections {na} vs {nb}; {close:.1%} of the first have a same-label box with IoU >= "
        f"0.9 in the second; median score gap {gap:.1e}"
    )


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("images")
    g.add_argument("out")
    g.add_argument("--count", type=int, default=200)
    g.add_argument("--size", default="640x480")
    g.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("detect")
    d.add_argument("model")
    d.add_argument("images")
    d.add_argument("--json", required=True)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--score-threshold", type=float, default=0.25)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    a = p.parse_args()
    if a.cmd == "images":
        w, h = (int(v) for v in a.size.split("x"))
        make_images(a.out, a.count, (w, h), a.seed)
    elif a.cmd == "detect":
        detect(a.model, a.images, a.json, a.threads, a.score_threshold)
    else:
        compare(a.a, a.b)


if __name__ == "__main__":
    sys.exit(main())
