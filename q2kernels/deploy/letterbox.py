"""Images in, boxes out: read an image, letterbox it to a model's input size, map boxes back.

The letterbox is Ultralytics' (LetterBox with its predictor's defaults, auto=False): scale by
r = min(H/h, W/w), each side rounded (at least 1 pixel), bilinear with half-pixel centres like OpenCV's
INTER_LINEAR and rounded back to uint8, then padded with 114 on both sides, (H - new_h)/2 each, the
odd pixel at the bottom/right. Images are RGB: a file or a PIL image is converted to it, and an array
or a tensor (H, W, 3) uint8 is taken as RGB (not OpenCV's BGR).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PAD_VALUE = 114


def read_image(image) -> torch.Tensor:
    """An image file path, a PIL image, or a (H, W, 3) uint8 array or tensor -> a (H, W, 3) uint8 RGB tensor."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return torch.from_numpy(np.array(im.convert("RGB")))
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image.convert("RGB")))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if (not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3
            or 0 in image.shape):
        what = (f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__)
        raise ValueError(f"image: expected a file path, a PIL image, or a (H, W, 3) uint8 RGB array or tensor, "
                         f"got {what}")
    return image.cpu()


@dataclass(frozen=True)
class Letterbox:
    """Where an image of `shape` (h, w) went in the letterboxed input: resized to `resized` (h, w),
    placed at (`top`, `left`)."""
    shape: tuple[int, int]
    resized: tuple[int, int]
    top: int
    left: int

    def to_image(self, boxes: torch.Tensor) -> torch.Tensor:
        """xyxy boxes (K, 4) in input pixels -> in the original image's pixels, clipped to it."""
        (h, w), (rh, rw) = self.shape, self.resized
        x = ((boxes[:, 0::2] - self.left) / (rw / w)).clamp(0, w)
        y = ((boxes[:, 1::2] - self.top) / (rh / h)).clamp(0, h)
        return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), 1)


def letterbox(image: torch.Tensor, imgsz: tuple[int, int]) -> tuple[torch.Tensor, Letterbox]:
    """A (H, W, 3) uint8 image -> the (3, imgsz) uint8 letterboxed input and where the image went."""
    h, w = image.shape[:2]
    r = min(imgsz[0] / h, imgsz[1] / w)
    rh, rw = max(round(h * r), 1), max(round(w * r), 1)
    chw = image.permute(2, 0, 1)
    if (rh, rw) != (h, w):
        resized = F.interpolate(chw[None].float(), size=(rh, rw), mode="bilinear", align_corners=False)[0]
        chw = resized.round().clamp(0, 255).to(torch.uint8)
    # Ultralytics' split of the padding: round(d - 0.1) before, the rest after.
    top, left = round((imgsz[0] - rh) / 2 - 0.1), round((imgsz[1] - rw) / 2 - 0.1)
    out = torch.full((3, *imgsz), PAD_VALUE, dtype=torch.uint8)
    out[:, top:top + rh, left:left + rw] = chw
    return out, Letterbox((h, w), (rh, rw), top, left)
