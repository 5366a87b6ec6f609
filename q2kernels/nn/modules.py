"""Drop-in quantized layers: the float layer's computation on fake-quantised weights and inputs."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .._validate import check_bool, check_choice, check_int, check_ints
from .quantizers import Quantizer

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _check_quantizer(q, name):
    if q is not None and not isinstance(q, Quantizer):
        raise TypeError(f"{name}: expected a q2kernels.nn quantizer or None, got {type(q).__name__}")
    return q


class _Quantized:
    """What QConv2d and QLinear share: an input quantizer, a weight quantizer (either may be None:
    that operand stays float), and building one from the float layer. Mixed in before the float
    layer class, whose constructor takes the remaining arguments."""

    def __init__(self, *args, weight_quantizer: Quantizer | None = None,
                 act_quantizer: Quantizer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quantizer = _check_quantizer(weight_quantizer, "weight_quantizer")
        self.act_quantizer = _check_quantizer(act_quantizer, "act_quantizer")

    def _operands(self, x):
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        return x, (self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight))

    @classmethod
    def _from_layer(cls, layer, float_cls, name, config, weight, act):
        if not isinstance(layer, float_cls):
            raise TypeError(f"{name}: expected an nn.{float_cls.__name__}, got {type(layer).__name__}")
        q = cls(*config, weight_quantizer=weight, act_quantizer=act,
                device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(layer.weight)
            if layer.bias is not None:
                q.bias.copy_(layer.bias)
        return q.to(layer.weight.device)


def _check_conv_config(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                       padding_mode) -> None:
    """nn.Conv2d's arguments, checked rather than coerced (nn.Conv2d would take groups=2.5 or
    kernel_size=True and fail, or compute something else, later)."""
    check_int(in_channels, "in_channels", 1)
    check_int(out_channels, "out_channels", 1)
    check_ints(kernel_size, "kernel_size", 2, 1)
    check_ints(stride, "stride", 2, 1)
    if isinstance(padding, str):
        check_choice(padding, "padding", ("valid", "same"))
    else:
        check_ints(padding, "padding", 2, 0)
    check_ints(dilation, "dilation", 2, 1)
    check_int(groups, "groups", 1)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups: {groups} must divide in_channels ({in_channels}) and out_channels ({out_channels})")
    check_bool(bias, "bias")
    check_choice(padding_mode, "padding_mode", PADDING_MODES)


class QConv2d(_Quantized, nn.Conv2d):
    """nn.Conv2d whose input passes `act_quantizer` and whose weight passes `weight_quantizer`."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 weight_quantizer: Quantizer | None = None, act_quantizer: Quantizer | None = None):
        _check_conv_config(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           padding_mode)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype, weight_quantizer=weight_quantizer,
                         act_quantizer=act_quantizer)

    def forward(self, x):
        x, w = self._operands(x)
        return self._conv_forward(x, w, self.bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight: Quantizer | None = None, act: Quantizer | None = None):
        """A QConv2d with `conv`'s configuration, a copy of its parameters, on its device."""
        config = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode) \
            if isinstance(conv, nn.Conv2d) else ()
        return cls._from_layer(conv, nn.Conv2d, "conv", config, weight, act)


class QLinear(_Quantized, nn.Linear):
    """nn.Linear with an input quantizer and a weight quantizer (either may be None)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 weight_quantizer: Quantizer | None = None, act_quantizer: Quantizer | None = None):
        check_int(in_features, "in_features", 1)
        check_int(out_features, "out_features", 1)
        check_bool(bias, "bias")
        super().__init__(in_features, out_features, bias, device, dtype, weight_quantizer=weight_quantizer,
                         act_quantizer=act_quantizer)

    def forward(self, x):
        x, w = self._operands(x)
        return F.linear(x, w, self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight: Quantizer | None = None, act: Quantizer | None = None):
        config = (linear.in_features, linear.out_features, linear.bias is not None) \
            if isinstance(linear, nn.Linear) else ()
        return cls._from_layer(linear, nn.Linear, "linear", config, weight, act)
