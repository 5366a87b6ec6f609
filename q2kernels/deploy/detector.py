"""load_detector: a saved integer detector predicting on images, with no training code.

    from q2kernels.deploy.detector import load_detector

    detector = load_detector("yolo11n_w4a4.q2k")               # a file with a detect_head record
    for found in detector.predict(["bus.jpg", "street.png"], conf=0.25):
        print(found.boxes, found.scores, found.labels)           # xyxy in each image's own pixels
        found.save("bus_boxes.jpg")                              # the boxes drawn

Per call: each image is read as RGB and letterboxed to the head's imgsz (deploy.letterbox, as
Ultralytics does), all of them run as one batch through the integer model, whose raw maps are
decoded (deploy.detect_decode) and suppressed (deploy.nms), and the boxes are mapped back to each
image's pixels. The file is written by save_int_model with a DetectHead, e.g. by Ultralytics'
IntDetector.save (q2kernels.integrations.ultralytics).

Nothing here imports Ultralytics, torchvision or q2kernels.nn (the training code, with Triton): the
import chain is deploy.serialize, the integer modules and the C++ extension q2kernels._C (built on
first use), plus PIL for image files and drawing. A file whose model kept a layer in fake-quant
float (a QConv2d, refused for conversion) imports q2kernels.nn when it loads, to run that layer.
"""
from __future__ import annotations

import os

import torch

from .detect_decode import decode
from .detections import Detections
from .int_model import IntModel
from .letterbox import letterbox, read_image
from .nms import check_thresholds, nms
from .serialize import load_int_model


class Detector:
    """An integer model with its head's decode (module docstring); `model.detect_head` says how."""

    def __init__(self, model: IntModel):
        if not isinstance(model, IntModel):
            raise TypeError(f"model: expected an IntModel, got {type(model).__name__}")
        if model.detect_head is None:
            raise ValueError("model: has no detect_head (load_int_model of a file saved with one carries it)")
        self.model = model.eval()
        self.head = model.detect_head

    def to(self, device: str | torch.device) -> Detector:
        """Run on `device` (the integer convs have CPU and CUDA kernels)."""
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the model's tensors are (the letterboxed batch goes there)."""
        tensors = self.model.state_dict().values()
        return next(iter(tensors)).device if tensors else torch.device("cpu")

    def predict(self, images, conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> list[Detections]:
        """Detections for an image or a list of them (file paths, PIL images, (H, W, 3) uint8 RGB arrays or
        tensors): per image, boxes scoring above `conf` after class-wise NMS at IoU `iou`, at most `max_det`."""
        check_thresholds(conf, iou, max_det)
        pictures = [read_image(im) for im in (images if isinstance(images, (list, tuple)) else [images])]
        if not pictures:
            raise ValueError("images: expected at least one image")
        boxed = [letterbox(p, self.head.imgsz) for p in pictures]
        x = torch.stack([b for b, _ in boxed]).to(self.device, torch.float32) / 255
        with torch.no_grad():
            found = nms(*decode(self.model(x), self.head), conf=conf, iou=iou, max_det=max_det)
        return [Detections(where.to_image(boxes.cpu()), scores.cpu(), classes.cpu(), self.head.names, picture)
                for (_, where), (boxes, scores, classes), picture in zip(boxed, found, pictures)]


def load_detector(path: str | os.PathLike, device: str | torch.device = "cpu") -> Detector:
    """The Detector of a file that save_int_model wrote with a detect_head (module docstring)."""
    model = load_int_model(path, map_location="cpu")
    if model.detect_head is None:
        raise ValueError(f"load_detector: {os.fspath(path)!r} holds an integer model without a detect_head record; "
                         "write it with IntDetector.save (q2kernels.integrations.ultralytics) or "
                         "save_int_model(..., detect_head=DetectHead(...))")
    return Detector(model).to(device)
