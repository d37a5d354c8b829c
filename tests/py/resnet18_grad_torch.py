"""ResNet-18 + fc(10) + cross-entropy(class 3) in float64 PyTorch with densa's weights: prints
the worst relative difference of densa's gradients (ONNX Runtime, float32) and exits 1 above
1e-4. Usage: resnet18_grad_torch.py DIR (w.npz: parameters, g.npz: loss and grad.<name>,
x.npy: the image)."""
import sys

import numpy as np
import torch
import torchvision

d = sys.argv[1]
W = np.load(f"{d}/w.npz")
G = np.load(f"{d}/g.npz")
net = torchvision.models.resnet18(num_classes=10).double().eval()
sd = net.state_dict()
for k in sd:
    if k.endswith("num_batches_tracked"):
        continue
    sd[k] = torch.from_numpy(W[k].astype(np.float64))
net.load_state_dict(sd)
x = torch.from_numpy(np.load(f"{d}/x.npy").astype(np.float64))
loss = -torch.log_softmax(net(x), -1)[0, 3]
loss.backward()
params = dict(net.named_parameters())
worst = abs(float(G["loss"]) - loss.item()) / abs(loss.item())
for name in G.files:
    if name == "loss":
        continue
    g = params[name[len("grad."):]].grad.numpy()
    worst = max(worst, np.abs(G[name] - g).max() / max(np.abs(g).max(), 1e-12))
print(f"worst relative difference {worst:.2e} over {len(G.files) - 1} gradients")
sys.exit(0 if worst < 1e-4 else 1)
