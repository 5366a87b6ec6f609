"""Drop-in quantized layers: the float layer's computation on fake-quantised weights and inputs."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .quantizers import Quantizer


def _check_quantizer(q, name):
    if q is not None and not isinstance(q, Quantizer):
        raise TypeError(f"{name}: expected a q2kernels.nn quantizer or None, got {type(q).__name__}")
    return q


class QConv2d(nn.Conv2d):
    """nn.Conv2d whose input passes `act_quantizer` and whose weight passes `weight_quantizer`
    (either may be None: that operand stays float)."""

    def __init__(self, *args, weight_quantizer: Quantizer | None = None,
                 act_quantizer: Quantizer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quantizer = _check_quantizer(weight_quantizer, "weight_quantizer")
        self.act_quantizer = _check_quantizer(act_quantizer, "act_quantizer")

    def forward(self, x):
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        w = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return self._conv_forward(x, w, self.bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight: Quantizer | None = None, act: Quantizer | None = None):
        """A QConv2d with `conv`'s configuration, parameters (shared storage copied) and device."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                weight_quantizer=weight, act_quantizer=act,
                device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(conv.weight)
            if conv.bias is not None:
                q.bias.copy_(conv.bias)
        return q.to(conv.weight.device)


class QLinear(nn.Linear):
    """nn.Linear with an input quantizer and a weight quantizer (either may be None)."""

    def __init__(self, *args, weight_quantizer: Quantizer | None = None,
                 act_quantizer: Quantizer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quantizer = _check_quantizer(weight_quantizer, "weight_quantizer")
        self.act_quantizer = _check_quantizer(act_quantizer, "act_quantizer")

    def forward(self, x):
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        w = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return F.linear(x, w, self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight: Quantizer | None = None, act: Quantizer | None = None):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        q = cls(linear.in_features, linear.out_features, linear.bias is not None,
                weight_quantizer=weight, act_quantizer=act,
                device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(linear.weight)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
        return q.to(linear.weight.device)
