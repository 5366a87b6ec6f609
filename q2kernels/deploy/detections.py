"""Detections: one image's predictions from deploy.detector, as plain tensors, and the image with them drawn."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

# One outline colour per class id (cycling): Ultralytics' palette, so that pictures look alike.
PALETTE = ((255, 56, 56), (255, 157, 151), (255, 112, 31), (255, 178, 29), (207, 210, 49), (72, 249, 10),
           (146, 204, 23), (61, 219, 134), (26, 147, 52), (0, 212, 187), (44, 153, 168), (0, 194, 255),
           (52, 69, 147), (100, 115, 255), (0, 24, 236), (132, 56, 255), (82, 0, 133), (203, 56, 255),
           (255, 149, 200), (255, 55, 199))


@dataclass(frozen=True, eq=False)
class Detections:
    """One image's detections, best score first: `boxes` (K, 4) xyxy in the original image's pixels,
    `scores` (K,), `classes` (K,) int64 class ids, `names` the model's class names by id, and `image`
    the (H, W, 3) uint8 RGB image they were found in."""
    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    names: tuple[str, ...]
    image: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def labels(self) -> list[str]:
        """The class name of each detection."""
        return [self.names[c] for c in self.classes.tolist()]

    def draw(self, width: int = 2) -> Image.Image:
        """The image with each box outlined and labelled with its class name and score."""
        picture = Image.fromarray(self.image.numpy())
        pen = ImageDraw.Draw(picture)
        for (x1, y1, x2, y2), score, c in zip(self.boxes.tolist(), self.scores.tolist(), self.classes.tolist()):
            colour = PALETTE[c % len(PALETTE)]
            # Ordered corners: PIL refuses an inverted rectangle, which raw distances (reg_max 1) can give.
            left, top = min(x1, x2), min(y1, y2)
            pen.rectangle((left, top, max(x1, x2), max(y1, y2)), outline=colour, width=width)
            pen.text((left + width, top + width), f"{self.names[c]} {score:.2f}", fill=colour)
        return picture

    def save(self, path: str | os.PathLike) -> None:
        """Write draw()'s picture to `path` (the format from its extension, e.g. .jpg, .png)."""
        self.draw().save(path)
