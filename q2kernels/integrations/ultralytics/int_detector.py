"""IntDetector: an integer model of a DetectionModel in the form Ultralytics' validators and
predictors take a model.

convert_to_int traces a DetectionModel up to Detect's raw per-level maps (deploy.trace.raw_maps):
everything up to there runs as integer convs. What Detect does after its convs is a decode that
depends on the input size (its anchors) and is float by nature: the DFL softmax over box bins,
anchor offsets times strides, a sigmoid on the class logits. IntDetector runs the integer model,
then that decode, with the trained model's own Detect (Detect._inference; only its decode runs,
not its convs), and carries the attributes Ultralytics reads from a model (stride, names, yaml).
Ultralytics' DetectionValidator(model=IntDetector(...)) then measures the integer model's mAP.

IntDetector.save(path) writes the integer model with its head's decode as plain data (deploy.
detect_head.DetectHead: nc, reg_max, strides, class names, input size): the file that q2kernels.
deploy.detector.load_detector predicts from, with neither Ultralytics nor q2kernels' training code.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn
from ultralytics.nn.modules import Detect

from ...deploy.detect_head import DetectHead
from ...deploy.serialize import save_int_model


class IntDetector(nn.Module):
    """int_model (convert_to_int of `model`) followed by `model`'s Detect decode (module docstring)."""

    def __init__(self, int_model: nn.Module, model: nn.Module):
        super().__init__()
        detect = model.model[-1]
        if not all(hasattr(detect, a) for a in ("reg_max", "nc", "nl", "_inference")):
            raise TypeError(f"model: expected an Ultralytics DetectionModel whose last layer is Detect, got "
                            f"{type(detect).__name__}")
        self.int_model = int_model
        self.detect = copy.deepcopy(detect).eval()
        self.stride, self.names, self.yaml = model.stride, model.names, model.yaml

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.int_model(x)
        d = self.detect
        if len(maps) != d.nl:
            raise ValueError(f"int_model: expected {d.nl} Detect maps (deploy.trace.raw_maps), got {len(maps)}")
        n, box = x.shape[0], 4 * d.reg_max
        # Detect.forward_head's layout: (N, 4*reg_max, anchors) box bins and (N, nc, anchors) logits,
        # the levels' anchors one after another.
        preds = {"boxes": torch.cat([m[:, :box].reshape(n, box, -1) for m in maps], -1),
                 "scores": torch.cat([m[:, box:].reshape(n, d.nc, -1) for m in maps], -1),
                 "feats": list(maps)}
        y = d._inference(preds)
        return d.postprocess(y.permute(0, 2, 1)) if getattr(d, "end2end", False) else y

    def detect_head(self, imgsz: int | tuple[int, int] = 640) -> DetectHead:
        """The decode of this model's Detect as plain data, for inputs letterboxed to `imgsz` (an int for
        a square, or (height, width)). A one-to-one (end2end) or a non-Detect head is refused by name."""
        d = self.detect
        if type(d) is not Detect:
            raise ValueError(f"model: its head is {type(d).__name__}; a file's decode (deploy.detect_head) covers "
                             "Ultralytics' Detect only")
        if getattr(d, "end2end", False):
            raise ValueError("model: its Detect is end2end (a one-to-one, NMS-free head); a file's decode "
                             "(deploy.detect_head) covers one-to-many heads only")
        strides = [float(s) for s in self.stride]
        if any(s != int(s) for s in strides):
            raise ValueError(f"model: its strides {strides} are not whole pixels")
        names = self.names if isinstance(self.names, dict) else dict(enumerate(self.names))
        if sorted(names) != list(range(d.nc)):
            raise ValueError(f"model: names must name the classes 0 to {d.nc - 1}, got the ids {sorted(names)}")
        size = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
        return DetectHead(nc=int(d.nc), reg_max=int(d.reg_max), strides=tuple(int(s) for s in strides),
                          names=tuple(str(names[i]) for i in range(d.nc)), imgsz=size)

    def save(self, path: str | os.PathLike, imgsz: int | tuple[int, int] = 640) -> None:
        """Write the integer model with detect_head(imgsz) (save_int_model; module docstring)."""
        save_int_model(self.int_model, path, detect_head=self.detect_head(imgsz))
