"""A procedurally generated shapes dataset (numpy, nothing downloaded) for the demo and examples.

Each image holds 1-3 filled shapes — circle, square, triangle — in random colours, sizes and places
on a noisy background; the target is the class map (0 = background, 1..3 = the shape covering the
pixel, later shapes on top). A detector-like network predicts it at strides 8, 16 and 32; the
metric is the mean IoU of the three shape classes on the stride-8 grid.
"""
from __future__ import annotations

import numpy as np
import torch

CLASSES = ("background", "circle", "square", "triangle")


def _draw(rng: np.random.Generator, size: int):
    img = rng.normal(0.0, 0.15, (3, size, size)).astype(np.float32) + rng.uniform(-0.3, 0.3, (3, 1, 1))
    label = np.zeros((size, size), dtype=np.int64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, 4))
        r = rng.uniform(0.18, 0.32) * size
        cy, cx = rng.uniform(r, size - r, 2)
        if cls == 1:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif cls == 2:
            inside = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
        else:  # an upward triangle: below the apex, above the base, within the two slanted sides
            top, base = cy - r, cy + r
            half = (yy - top) / (2 * r) * r
            inside = (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half)
        colour = rng.uniform(0.4, 1.0, 3) * rng.choice([-1.0, 1.0], 3)
        img[:, inside] = colour[:, None].astype(np.float32) + rng.normal(0, 0.05, (3, int(inside.sum()))).astype(np.float32)
        label[inside] = cls
    return img, label


def make_shapes(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 3, size, size) float32 and their class maps (n, size, size) int64."""
    rng = np.random.default_rng(seed)
    imgs, labels = zip(*(_draw(rng, size) for _ in range(n)))
    return torch.from_numpy(np.stack(imgs).astype(np.float32)), torch.from_numpy(np.stack(labels))


def labels_at_stride(labels: torch.Tensor, stride: int) -> torch.Tensor:
    """The class at the centre pixel of each stride x stride cell."""
    return labels[:, stride // 2::stride, stride // 2::stride]


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int = len(CLASSES)) -> float:
    """Mean IoU over the shape classes (background excluded) that occur in pred or target."""
    ious = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        union = (p | t).sum().item()
        if union:
            ious.append((p & t).sum().item() / union)
    return float(np.mean(ious)) if ious else 1.0
