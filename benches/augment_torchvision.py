"""Two-view MoCo-v2 augmentation in torchvision: the peer of densa's augment_throughput bench.

The pipeline is MoCo-v2's official one (facebookresearch/moco, main_moco.py --aug-plus):
PIL decode (ImageFolder's loader), RandomResizedCrop(224, scale=(0.2, 1)), RandomApply(
ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8), RandomGrayscale(0.2), RandomApply(GaussianBlur
[0.1, 2] via PIL ImageFilter, p=0.5), RandomHorizontalFlip, ToTensor, Normalize; two crops per
image, batched by a DataLoader with `--workers` worker processes (persistent, so worker start-up
is not timed). Prints one JSON line: images (two views each) per second, median over epochs
after one warm-up epoch.

    /usr/bin/python3 benches/augment_torchvision.py DIR [--workers N] [--epochs 5] [--batch 32]

Needs Debian's python3-torch and python3-torchvision (torch 1.13, torchvision 0.14).
"""
import argparse
import json
import os
import random
import time

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter


class GaussianBlur:
    """MoCo's moco.loader.GaussianBlur: PIL blur with a random radius."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, x):
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class TwoCrops:
    def __init__(self, t):
        self.t = t

    def __call__(self, x):
        return [self.t(x), self.t(x)]


class Files(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.transform(img)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    paths = sorted(os.path.join(a.dir, p) for p in os.listdir(a.dir) if p.endswith(".jpg"))
    moco_v2 = T.Compose([
        T.RandomResizedCrop(224, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur([0.1, 2.0])], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    loader = torch.utils.data.DataLoader(
        Files(paths, TwoCrops(moco_v2)), batch_size=a.batch, shuffle=False,
        num_workers=a.workers, persistent_workers=a.workers > 0)
    rates = []
    for epoch in range(a.epochs + 1):
        start = time.perf_counter()
        check = 0.0
        for v1, v2 in loader:
            check += float(v1[0, 0, 0, 0]) + float(v2[0, 2, 5, 5])
        secs = time.perf_counter() - start
        if epoch > 0:
            rates.append(len(paths) / secs)
    rates.sort()
    print(json.dumps({"peer": "torchvision", "images_per_s": round(rates[len(rates) // 2], 2),
                      "workers": a.workers, "images": len(paths), "epochs": a.epochs,
                      "batch": a.batch, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
