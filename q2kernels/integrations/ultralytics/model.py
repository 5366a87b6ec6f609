"""Q2DetectionModel: an Ultralytics DetectionModel holding q2kernels modules.

prepare() gives the prepared model this class (a subclass with no state of its own) for what
Ultralytics does to every model it validates, predicts with, reloads or exports:

- `fuse()` folds each conv block's BatchNorm into its conv. It must not, anywhere in a Q2 model:
  - a quantized block's quantizers were trained on the unfolded weights (q2kernels.deploy folds
    BatchNorm exactly when it converts to integers), and Ultralytics' fuse_conv_and_bn takes a conv
    with a `weight_quantizer` for a ModelOpt QAT conv and rescales its `amax` (an AttributeError here);
  - a float block (the stem) that feeds a quantizer computes, folded, the same function with other
    fp32 roundings, and the next quantizer's codes move wherever a value lies at a decision boundary.
    Measured on the Ultralytics demo's trained Q2 YOLO11n: the fused model's outputs differed from the
    trained model's by up to 37 px in boxes and 0.06 in class scores (2.6% of outputs by more than
    1e-3), while its integer model equals the unfused model to 1.2e-4 px. Validation (which fuses)
    then measured a model that is neither the trained nor the deployed one.
  So fuse() keeps every block as trained and only drops Detect's unused one-to-one branch.
- Checkpoints: Ultralytics' save_model zeroes every non-finite float of the model it pickles
  (nan_to_num_), which turns an uncalibrated GatedFusion's NaN mubar/sigmabar into 0. A calibrated
  sigmabar is a mean of sqrt(var + eps) > 0, so a 0 there can only be that: unpickling restores NaN
  ("not calibrated").
- Export: no exporter can record the fake-quant model (its quantizers and fusion nodes are autograd
  functions and custom ops; TorchScript tracing reports one as a Python call it cannot export, deep
  inside a quantizer). forward() refuses to run under an exporter and says what to deploy instead.
  Ultralytics' Exporter first runs the model once on a zero image (its "dry run") with its Detect's
  `export` flag and `format` set, before any format's own packages are imported: that run is where
  its exports stop, every format but imx (its FXModel wrapper runs the layer list itself, not the
  model's forward, so this check never sees an imx export). torch.jit.trace and torch.onnx.export
  called directly are recognised by their own flags, and so is torch.export where it gets as far as
  the forward. The layer loop (_predict_once) is left as it is: q2kernels.deploy traces the model
  through it (the DetectionModel adapter of deploy.trace).
"""
from __future__ import annotations

import torch
from ultralytics.nn.modules import Detect
from ultralytics.nn.tasks import DetectionModel

from ...nn import GatedFusion, QConv2d


_DEPLOY = ("deploy the integer model instead: int_model, check = q2kernels.integrations.ultralytics.to_int(model, "
           "images) converts and verifies it; int_model.save(path, imgsz) writes a file that predicts on its own "
           "(q2kernels.deploy.load_detector(path).predict(image)), with no Ultralytics and no training code")


def _exporter(model: DetectionModel) -> str | None:
    """What is exporting `model` now, or None (module docstring)."""
    head = model.model[-1]
    if getattr(head, "export", False):
        return f"Ultralytics' export (format={head.format!r})"
    if torch.onnx.is_in_onnx_export():  # before is_tracing: TorchScript-based ONNX export traces too
        return "torch.onnx.export"
    if torch.compiler.is_exporting():
        return "torch.export"
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    return None


class Q2DetectionModel(DetectionModel):
    """A DetectionModel prepared by q2kernels.integrations.ultralytics.prepare (module docstring)."""

    def forward(self, *args, **kwargs):
        exporter = _exporter(self)
        if exporter is not None:
            raise RuntimeError(f"{exporter} cannot export a q2kernels fake-quant model ({type(self).__name__}): "
                               f"its quantizers and fusion nodes are training-time autograd functions that no "
                               f"exporter records; {_DEPLOY}. For ONNX: q2kernels.deploy.export_onnx("
                               f"deterministic_float(int_model), example, path) writes the integer model, exact "
                               f"in onnxruntime end to end; "
                               f"q2kernels.deploy.onnx_qdq.export_onnx_qdq(model, example, path) writes this "
                               f"fake-quant model as QuantizeLinear/DequantizeLinear (docs/deploy.md)")
        return super().forward(*args, **kwargs)

    def fuse(self, verbose: bool = True, imgsz=640):
        """Fold no BatchNorm (module docstring); drop Detect's unused branch as DetectionModel.fuse does."""
        for m in self.model.modules():
            if isinstance(m, Detect):
                m.fuse()
        self.info(verbose=verbose, imgsz=imgsz)
        return self

    def __setstate__(self, state):
        super().__setstate__(state)
        for m in self.modules():
            if isinstance(m, GatedFusion) and bool((m.sigmabar == 0).item()):
                with torch.no_grad():
                    m.mubar.fill_(float("nan"))
                    m.sigmabar.fill_(float("nan"))
