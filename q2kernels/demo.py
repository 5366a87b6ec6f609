"""The main job: quantize a small conv net to W4A4 with each recipe, train it on synthetic data,
and check that the fused kernels and the eager reference agree. `q2k demo [--smoke]`."""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

import q2kernels
from q2kernels.nn import RECIPES, quantize_model


def make_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.SiLU(),
        nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.SiLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )


def synthetic_batches(n: int, batch: int, size: int, device):
    """Images whose label is the quadrant holding the brightest blob: learnable by a small CNN."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        y = torch.randint(0, 4, (batch,), generator=g)
        x = torch.randn(batch, 3, size, size, generator=g) * 0.3
        h = size // 2
        for i, q in enumerate(y.tolist()):
            r, c = divmod(q, 2)
            x[i, :, r * h:(r + 1) * h, c * h:(c + 1) * h] += 1.0
        out.append((x.to(device), y.to(device)))
    return out


def _train(model, batches, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _agreement(model, batch):
    """Max |difference| of the loss and of every parameter grad, fused kernels vs reference."""
    results = {}
    for backend in ("reference", "triton"):
        m = copy.deepcopy(model)
        with q2kernels.use_backend(backend):
            loss = nn.functional.cross_entropy(m(batch[0]), batch[1])
            grads = torch.autograd.grad(loss, [p for p in m.parameters()])
        results[backend] = (loss.detach(), grads)
    (l0, g0), (l1, g1) = results["reference"], results["triton"]
    # Each grad's error relative to its own size, but floored at 1e-3 of the largest grad: a
    # parameter grad that is a sum cancelling to ~0 (N2UQ's alpha2) differs by summation order.
    floor = 1e-3 * max(a.abs().max().item() for a in g0)
    grad_err = max(((a - b).abs().max() / max(a.abs().max().item(), floor)).item() for a, b in zip(g0, g1))
    return (l0 - l1).abs().item(), grad_err


def main(smoke: bool = False, steps: int | None = None) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size, batch = (16, 8) if smoke else (32, 32)
    steps = steps or (6 if smoke else 60)
    torch.manual_seed(0)
    batches = synthetic_batches(8, batch, size, device)
    float_net = make_net().to(device)
    print(f"q2kernels demo on {device}: {steps} float steps, then W4A4 QAT with each recipe")
    float_losses = _train(float_net, batches, steps)
    print(f"float: loss {float_losses[0]:.3f} -> {float_losses[-1]:.3f}")
    header = f"{'recipe':<10}{'bits':>6}{'loss start':>12}{'loss end':>10}{'step ms':>9}{'|dloss|':>10}{'grad rel err':>14}"
    print(header)
    ok = True
    for recipe in RECIPES:
        model = quantize_model(copy.deepcopy(float_net), recipe, 4, 4)
        model(batches[0][0])  # first-batch initialisation of every quantizer
        t = time.perf_counter()
        losses = _train(model, batches, steps)
        step_ms = (time.perf_counter() - t) / steps * 1e3
        dloss, grad_err = _agreement(model, batches[0])
        agree = dloss <= 1e-4 and grad_err <= 1e-3
        ok &= agree
        print(f"{recipe:<10}{'W4A4':>6}{losses[0]:>12.3f}{losses[-1]:>10.3f}{step_ms:>9.1f}{dloss:>10.1e}"
              f"{grad_err:>14.1e}  {'fused == reference' if agree else 'MISMATCH'}")
    print("fused kernels and reference agree" if ok else "fused kernels and reference DISAGREE")
    return 0 if ok else 1
