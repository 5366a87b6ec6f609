"""Class-aware non-maximum suppression in plain torch (no torchvision), deterministic.

Per image, as Ultralytics' non_max_suppression does it for a one-to-many head: each box takes its best
class; boxes scoring above `conf` are candidates (at most MAX_CANDIDATES, the best); then, highest
score first, a box is kept and every later box of its class whose IoU with it exceeds `iou` is dropped,
until `max_det` are kept. Equal scores keep their anchor order (a stable sort), so the result does
not depend on the sort implementation.
"""
from __future__ import annotations

import torch

MAX_CANDIDATES = 30000  # Ultralytics' max_nms


def _area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_iou(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of one xyxy box (4,) with each of boxes (K, 4) (torchvision's formula)."""
    wh = (torch.minimum(box[2:], boxes[:, 2:]) - torch.maximum(box[:2], boxes[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (_area(box) + _area(boxes) - inter)


def check_thresholds(conf, iou, max_det) -> None:
    """The arguments of nms, checked (a ValueError naming the argument)."""
    for name, v in (("conf", conf), ("iou", iou)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"{name}: expected a number from 0 to 1, got {v!r}")
    if type(max_det) is not int or max_det < 1:
        raise ValueError(f"max_det: expected an int >= 1, got {max_det!r}")


def nms(boxes: torch.Tensor, scores: torch.Tensor, conf: float = 0.25, iou: float = 0.7,
        max_det: int = 300) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """boxes (N, A, 4) xyxy and scores (N, A, nc) -> per image (boxes (K, 4), scores (K,), classes (K,)
    int64), best score first (module docstring)."""
    check_thresholds(conf, iou, max_det)
    out = []
    for b, s in zip(boxes, scores):
        best, cls = s.max(1)
        keep = (best > conf).nonzero().flatten()
        order = best[keep].sort(descending=True, stable=True).indices[:MAX_CANDIDATES]
        b, best, cls = b[keep[order]], best[keep[order]], cls[keep[order]]
        remaining, kept = torch.arange(len(best), device=b.device), []
        while len(remaining) and len(kept) < max_det:
            i, rest = remaining[0], remaining[1:]
            kept.append(i)
            suppressed = (cls[rest] == cls[i]) & (box_iou(b[i], b[rest]) > iou)
            remaining = rest[~suppressed]
        k = torch.stack(kept) if kept else torch.zeros(0, dtype=torch.long, device=b.device)
        out.append((b[k], best[k], cls[k]))
    return out
