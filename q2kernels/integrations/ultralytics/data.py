"""A tiny synthetic detection dataset in Ultralytics' own format, written to a folder: for smoke
runs and tests of the training integration with no download.

    root/images/{train,val}/000.png   noise background with 1..3 filled rectangles
    root/labels/{train,val}/000.txt   one "class cx cy w h" line per rectangle (normalised)
    root/data.yaml                    path, train, val, names

Class k is drawn in one colour per class, so the task is learnable.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

_COLOURS = ((230, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 40), (200, 60, 220), (40, 210, 210))


def write_synthetic_dataset(root, train: int = 8, val: int = 4, imgsz: int = 64, classes: int = 2,
                            seed: int = 0) -> Path:
    """Write the dataset under `root` and return the path of its data.yaml."""
    for name, v, lo in (("train", train, 1), ("val", val, 1), ("imgsz", imgsz, 16)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
    if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= len(_COLOURS):
        raise ValueError(f"classes: expected an integer in 1..{len(_COLOURS)}, got {classes!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        images, labels = root / "images" / split, root / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = rng.integers(0, 60, (imgsz, imgsz, 3), dtype=np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                k = int(rng.integers(classes))
                w, h = (int(s) for s in rng.integers(imgsz // 6, imgsz // 2, 2))
                x0, y0 = int(rng.integers(0, imgsz - w)), int(rng.integers(0, imgsz - h))
                img[y0:y0 + h, x0:x0 + w] = _COLOURS[k]
                lines.append(f"{k} {(x0 + w / 2) / imgsz:.6f} {(y0 + h / 2) / imgsz:.6f} "
                             f"{w / imgsz:.6f} {h / imgsz:.6f}")
            Image.fromarray(img).save(images / f"{i:03d}.png")
            (labels / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    names = "\n".join(f"  {k}: class{k}" for k in range(classes))
    data = root / "data.yaml"
    data.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data
