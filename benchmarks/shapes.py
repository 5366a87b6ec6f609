"""Real workload shapes (the conv lists of benchmarks/data/): every conv of YOLOv5s and YOLO11s at
640x640, the fusion (Concat) nodes of their necks, and the Q-ADA distillation points. Per image;
batch prepended."""
from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
MODELS = ("yolov5s", "yolo11s")
BATCHES = (16, 64)
SMOKE_BATCH = 1


def conv_layers(model: str = "yolov5s") -> list[dict]:
    """Each conv: name, cin, cout, k, stride, pad, groups, h_in, w_in, h_out, w_out."""
    return json.loads((DATA / f"{model}_convs_640.json").read_text())["convs"]


def activation_shapes(model: str, batch: int) -> list[tuple[int, int, int, int]]:
    """The distinct conv input activations (B, C, H, W): what an activation quantizer sees."""
    seen = []
    for c in conv_layers(model):
        shape = (batch, c["cin"], c["h_in"], c["w_in"])
        if shape not in seen:
            seen.append(shape)
    return seen


def weight_shapes(model: str) -> list[tuple[int, int, int, int]]:
    return [(c["cout"], c["cin"] // c["groups"], c["k"], c["k"]) for c in conv_layers(model)]


# (model, node, branch channels, H = W) of the neck Concat nodes at 640x640.
FUSION_NODES = [
    ("yolov5s", 12, (256, 256), 40),
    ("yolov5s", 16, (128, 128), 80),
    ("yolov5s", 19, (128, 128), 40),
    ("yolov5s", 22, (256, 256), 20),
    ("yolo11s", 12, (512, 256), 40),
    ("yolo11s", 15, (256, 256), 80),
    ("yolo11s", 18, (128, 256), 40),
    ("yolo11s", 21, (256, 512), 20),
]

# Q-ADA distillation points (neck outputs feeding Detect): (name, C, H = W).
ADA_POINTS = [("P3", 128, 80), ("P4", 256, 40), ("P5", 512, 20)]
