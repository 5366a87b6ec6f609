"""A generated detection task in Ultralytics' own format, written to a folder: a task a small YOLO
can learn offline in CPU minutes, hard enough that recipes differ (no download, deterministic).

    root/images/{train,val}/000.png   a textured, cluttered background with 1..6 shapes
    root/labels/{train,val}/000.txt   one "class cx cy w h" line per shape (normalised)
    root/data.yaml                    path, train, val, names

The classes differ in shape only (circle, ring, triangle, square, cross, star, in that order): every
shape takes a random colour from one palette, a random size from 1/16 to 1/3 of the image (small
objects included) and a random rotation. The background is smooth random texture plus clutter
drawn from the same palette (line segments and arcs: edges like the shapes' own, never a whole
shape), and later shapes may occlude earlier ones by up to half their box. A shape's label is its
whole box, occluded or not.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "ring", "triangle", "square", "cross", "star")
_PALETTE = ((230, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 40), (200, 60, 220), (40, 210, 210),
            (240, 240, 240), (250, 140, 30))
_MAX_OVERLAP = 0.5  # of the smaller box's area: above it a new shape is redrawn elsewhere


def _polygon(cx, cy, r, corners, angle, inner=None):
    """Vertices of a regular polygon (or a star when `inner` gives the inner radius ratio)."""
    pts = []
    steps = corners * (2 if inner else 1)
    for i in range(steps):
        radius = r * (inner if inner and i % 2 else 1.0)
        a = angle + 2 * math.pi * i / steps
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def _cross(cx, cy, r, angle):
    t = 0.3  # the arms' half-width as a fraction of r
    arm = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t),
           (-t, -t)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in arm]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, cx: float, cy: float, r: float, angle: float, colour):
    """Draw shape `kind` of radius r; return its tight box (x0, y0, x1, y1)."""
    name = SHAPES[kind]
    if name in ("circle", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        if name == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.ellipse(box, outline=colour, width=max(2, int(r * 0.35)))
        return box
    if name == "triangle":
        pts = _polygon(cx, cy, r, 3, angle)
    elif name == "square":
        pts = _polygon(cx, cy, r, 4, angle)
    elif name == "cross":
        pts = _cross(cx, cy, r, angle)
    else:
        pts = _polygon(cx, cy, r, 5, angle, inner=0.45)
    draw.polygon(pts, fill=colour)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def _background(rng: np.random.Generator, imgsz: int) -> Image.Image:
    """Smooth colour texture (bilinearly upsampled coarse noise) plus fine noise, dark to mid grey."""
    coarse = rng.uniform(0, 110, (max(2, imgsz // 16), max(2, imgsz // 16), 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((imgsz, imgsz), Image.BILINEAR), dtype=np.int16)
    img = img + rng.integers(-25, 26, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, imgsz: int):
    """Line segments and open arcs in the shapes' palette: edges, never a closed shape."""
    for _ in range(int(rng.integers(3, 9))):
        colour = _PALETTE[int(rng.integers(len(_PALETTE)))]
        width = int(rng.integers(1, 4))
        x0, y0 = (float(v) for v in rng.uniform(0, imgsz, 2))
        if rng.random() < 0.5:
            length, a = rng.uniform(imgsz / 10, imgsz / 2), rng.uniform(0, 2 * math.pi)
            draw.line((x0, y0, x0 + length * math.cos(a), y0 + length * math.sin(a)), fill=colour, width=width)
        else:
            r = rng.uniform(imgsz / 20, imgsz / 6)
            start = float(rng.uniform(0, 360))
            draw.arc((x0 - r, y0 - r, x0 + r, y0 + r), start, start + float(rng.uniform(60, 200)), fill=colour,
                     width=width)


def _overlap(a, b) -> float:
    """Intersection area over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def _image(rng: np.random.Generator, imgsz: int, classes: int):
    img = _background(rng, imgsz)
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, imgsz)
    boxes, lines = [], []
    for _ in range(int(rng.integers(1, 7))):
        for _attempt in range(10):
            r = imgsz * float(rng.uniform(1 / 32, 1 / 6))
            cx, cy = (float(v) for v in rng.uniform(r, imgsz - r, 2))
            probe = (cx - r, cy - r, cx + r, cy + r)
            if all(_overlap(probe, b) <= _MAX_OVERLAP for b in boxes):
                break
        else:
            continue
        kind = int(rng.integers(classes))
        colour = _PALETTE[int(rng.integers(len(_PALETTE)))]
        x0, y0, x1, y1 = _draw_shape(draw, kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi)), colour)
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(imgsz), x1), min(float(imgsz), y1)
        boxes.append((x0, y0, x1, y1))
        lines.append(f"{kind} {(x0 + x1) / 2 / imgsz:.6f} {(y0 + y1) / 2 / imgsz:.6f} "
                     f"{(x1 - x0) / imgsz:.6f} {(y1 - y0) / imgsz:.6f}")
    return img, lines


def write_synthetic_dataset(root, train: int = 8, val: int = 4, imgsz: int = 64, classes: int = len(SHAPES),
                            seed: int = 0) -> Path:
    """Write the dataset under `root` (module docstring) and return the path of its data.yaml. The
    same arguments write the same files; `classes` takes the first that many of SHAPES."""
    for name, v, lo in (("train", train, 1), ("val", val, 1), ("imgsz", imgsz, 32)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
    if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= len(SHAPES):
        raise ValueError(f"classes: expected an integer in 1..{len(SHAPES)}, got {classes!r}")
    root = Path(root)
    for split, count, split_seed in (("train", train, seed), ("val", val, seed + 1_000_003)):
        rng = np.random.default_rng(split_seed)  # the splits never share an image
        images, labels = root / "images" / split, root / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, lines = _image(rng, imgsz, classes)
            img.save(images / f"{i:03d}.png")
            (labels / f"{i:03d}.txt").write_text("".join(line + "\n" for line in lines))
    names = "\n".join(f"  {k}: {SHAPES[k]}" for k in range(classes))
    data = root / "data.yaml"
    data.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data
