"""Q2DetectionModel: an Ultralytics DetectionModel holding q2kernels modules.

prepare() gives the prepared model this class (a subclass with no state of its own) for two
things Ultralytics does to every model it validates, predicts with or reloads:

- `fuse()` folds each conv block's BatchNorm into its conv. Ultralytics' fuse_conv_and_bn takes a
  conv with a `weight_quantizer` attribute for a ModelOpt QAT conv and rescales that quantizer's
  `amax` (an AttributeError on a q2kernels quantizer). Folding is wrong for a Q2 conv anyway: the
  trained quantizers see the unfolded weights, and q2kernels.deploy folds BatchNorm exactly
  when it converts to integers. So fuse() leaves every block whose conv quantizes (a QConv2d) as
  trained, and fuses the float ones as usual.
- Checkpoints: Ultralytics' save_model zeroes every non-finite float of the model it pickles
  (nan_to_num_), which turns an uncalibrated GatedFusion's NaN mubar/sigmabar into 0. A calibrated
  sigmabar is a mean of sqrt(var + eps) > 0, so a 0 there can only be that: unpickling restores NaN
  ("not calibrated").
"""
from __future__ import annotations

import torch
from ultralytics.nn.tasks import DetectionModel

from ...nn import GatedFusion, QConv2d


class Q2DetectionModel(DetectionModel):
    """A DetectionModel prepared by q2kernels.integrations.ultralytics.prepare (module docstring)."""

    def fuse(self, *args, **kwargs):
        held = []
        for m in self.modules():
            if isinstance(getattr(m, "conv", None), QConv2d) and "bn" in m._modules:
                held.append((m, dict(m._modules)))
                del m._modules["bn"]  # hidden from fuse()'s hasattr(m, "bn")
        try:
            return super().fuse(*args, **kwargs)
        finally:
            for m, children in held:  # back as they were, in their order (state_dict key order)
                m._modules.clear()
                m._modules.update(children)

    def __setstate__(self, state):
        super().__setstate__(state)
        for m in self.modules():
            if isinstance(m, GatedFusion) and bool((m.sigmabar == 0).item()):
                with torch.no_grad():
                    m.mubar.fill_(float("nan"))
                    m.sigmabar.fill_(float("nan"))
