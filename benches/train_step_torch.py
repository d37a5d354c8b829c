"""PyTorch 1.13 peer of benches/train_step.sh: one SGD step (momentum 0.9, weight decay 1e-4,
lr 0.1) of torchvision's ResNet-18 (10 classes) + cross-entropy on a fresh random batch of 16
images at 224x224, on `--device` (cpu: `--threads` intra-op threads; cuda: cuDNN autotuning on,
as ONNX Runtime's exhaustive convolution search is). Prints {"median_s": ..., "steps": [...],
"losses": [...]}, the median over the steps after the first two."""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    device = torch.device(a.device)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    times, losses = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        x = torch.rand(a.batch, 3, a.size, a.size, device=device)
        y = torch.randint(0, 10, (a.batch,), device=device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))  # waits for the device
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_s": statistics.median(times[2:]), "steps": times, "losses": losses}))


if __name__ == "__main__":
    main()
