"""The decode of a one-to-many YOLO Detect head (deploy.detect_head.DetectHead), in plain torch.

The integer model ends at the head's raw maps, one per level, each (N, 4*reg_max + nc, H, W). Per
cell, as Ultralytics' Detect._inference computes it:
- each box side's distance is the expectation of a softmax over its reg_max bins (DFL; with
  reg_max = 1 the map holds the distance itself);
- the box is (anchor - left/top, anchor + right/bottom), the anchor being the cell's centre
  (x + 0.5, y + 0.5), times the level's stride: input pixels, xyxy;
- the class scores are the sigmoid of the logits.
"""
from __future__ import annotations

import torch

from .detect_head import DetectHead


def anchor_points(sizes: list[tuple[int, int]], strides, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell centres of every level's (H, W) map, level after level and row-major within a level, in
    cells (A, 2 as x, y), and each one's stride (A, 1)."""
    points, point_strides = [], []
    for (h, w), s in zip(sizes, strides):
        y, x = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) + 0.5,
                              torch.arange(w, device=device, dtype=torch.float32) + 0.5, indexing="ij")
        points.append(torch.stack((x, y), -1).reshape(-1, 2))
        point_strides.append(torch.full((h * w, 1), float(s), device=device))
    return torch.cat(points), torch.cat(point_strides)


def _check_maps(maps, head: DetectHead) -> None:
    if not isinstance(maps, (list, tuple)) or len(maps) != len(head.strides):
        got = f"{len(maps)} maps" if isinstance(maps, (list, tuple)) else f"a {type(maps).__name__}"
        raise ValueError(f"maps: expected {len(head.strides)} maps, one per stride of the detect_head, got {got}")
    for i, m in enumerate(maps):
        if (not isinstance(m, torch.Tensor) or not m.is_floating_point() or m.ndim != 4
                or m.shape[1] != head.channels or m.shape[0] != maps[0].shape[0]):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"maps[{i}]: expected a float (N, {head.channels}, H, W) map (4*reg_max + nc channels "
                             f"of the detect_head), got {shape}")


def decode(maps, head: DetectHead) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (N, A, 4; xyxy, input pixels, fp32) and class scores (N, A, nc) of the raw maps (module
    docstring), A being the cells of all levels."""
    _check_maps(maps, head)
    n, bins = maps[0].shape[0], 4 * head.reg_max
    flat = torch.cat([m.float().reshape(n, head.channels, -1) for m in maps], -1)  # (N, C, A)
    raw, logits = flat[:, :bins], flat[:, bins:]
    if head.reg_max == 1:
        dist = raw
    else:
        p = raw.reshape(n, 4, head.reg_max, -1).softmax(2)
        dist = (p * torch.arange(head.reg_max, device=p.device, dtype=p.dtype).reshape(1, 1, -1, 1)).sum(2)
    points, strides = anchor_points([tuple(m.shape[2:]) for m in maps], head.strides, flat.device)
    dist = dist.transpose(1, 2)  # (N, A, 4): left, top, right, bottom
    boxes = torch.cat((points - dist[..., :2], points + dist[..., 2:]), -1) * strides
    return boxes, logits.transpose(1, 2).sigmoid()
