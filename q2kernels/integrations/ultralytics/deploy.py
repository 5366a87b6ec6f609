"""After Q2 training: a checkpoint to an integer detector, and Ultralytics' own validator and predictor
for any of the three models (float, fake-quant, integer), each one call.

    model = load_q2_checkpoint("runs/detect/train/weights/best.pt")   # LayerNorm-free if trained so
    int_model, check = to_int(model, images)                          # convert_to_int + verify_int_model
    validate(int_model, "data.yaml", imgsz=640)                       # (mAP50, mAP50-95)
    predict(int_model, "bus.jpg", imgsz=640, save_dir="out")          # Ultralytics Results, boxes drawn

`to_int` refuses a model that still has LayerNorms (train with `layernorm_free_epochs`, or run
q2kernels.deploy's calibrate_fusion and freeze_fusion / finetune_without_layernorm first): the
integer model folds the fixed affine that replaces them, never a per-pixel normalisation.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionPredictor, DetectionValidator
from ultralytics.nn.tasks import load_checkpoint

from ...deploy import convert_to_int, verify_int_model
from ...deploy.convert import check_example
from ...deploy.verify import Verification
from ...nn import GatedFusion
from .int_detector import IntDetector


def load_q2_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The model of an Ultralytics checkpoint written by Q2DetectionTrainer, in fp32 and eval mode,
    with the training arguments its loss reads (`model.args`)."""
    model, ckpt = load_checkpoint(str(path), device=device)
    if not hasattr(model, "q2"):
        raise ValueError(f"path: {path} holds a model that q2kernels did not prepare (no `q2` record)")
    model = model.float().eval()
    train_args = ckpt.get("train_args") if isinstance(ckpt, dict) else None
    if train_args:
        model.args = {**(model.args if isinstance(model.args, dict) else vars(model.args)), **train_args}
    return model


def to_int(model: nn.Module, images: torch.Tensor, verify_images: torch.Tensor | None = None,
           strict: bool = False) -> tuple[IntDetector, Verification]:
    """convert_to_int(model, images), checked by verify_int_model on `verify_images` (default `images`):
    the integer detector and the verification. The model is not changed. `images` are verified once:
    the conversion's own self-check is the verification returned when verify_images is None."""
    nodes = [n for n, m in model.named_modules() if isinstance(m, GatedFusion)]
    if nodes:
        raise ValueError(f"model: the fusion nodes {nodes} still apply LayerNorm; remove it first (train with "
                         "Q2DetectionTrainer's layernorm_free_epochs, or q2kernels.deploy.calibrate_fusion then "
                         "freeze_fusion)")
    model = copy.deepcopy(model).float().eval()
    int_model = convert_to_int(model, images, strict=strict, check=False)
    check = check_example(model, int_model, images, strict)
    if verify_images is not None:
        check = verify_int_model(model, int_model, verify_images)
    return IntDetector(int_model, model), check


def _device(device) -> str:
    if device is not None:
        return str(device)
    return "0" if torch.cuda.is_available() else "cpu"


def validate(model: nn.Module, data: str | os.PathLike, imgsz: int, batch: int = 16, device=None) -> tuple[float, float]:
    """(mAP50, mAP50-95) of `model` on the validation split of `data` (a data.yaml), by Ultralytics'
    DetectionValidator. Runs on a copy: validation fuses a float model's conv blocks."""
    validator = DetectionValidator(args=dict(data=str(data), imgsz=imgsz, batch=batch, device=_device(device),
                                             plots=False, save_json=False, verbose=False))
    metrics = validator(model=copy.deepcopy(model).eval())
    return float(metrics["metrics/mAP50(B)"]), float(metrics["metrics/mAP50-95(B)"])


def predict(model: nn.Module, source, imgsz: int, conf: float = 0.25, save_dir: str | os.PathLike | None = None,
            device=None) -> list:
    """Ultralytics Results of `model` on `source` (an image path, folder, array, ...), by its
    DetectionPredictor; with `save_dir`, each image is also saved there with its boxes drawn."""
    overrides = dict(imgsz=imgsz, conf=conf, device=_device(device), verbose=False, save=save_dir is not None)
    if save_dir is not None:
        save_dir = Path(save_dir)
        overrides.update(project=str(save_dir.parent.resolve()), name=save_dir.name, exist_ok=True)
    predictor = DetectionPredictor(overrides=overrides)
    return list(predictor(source=source, model=copy.deepcopy(model).eval()))
