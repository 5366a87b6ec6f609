"""The fake-quant model as deploy.verify runs it: traced as convert_to_int traces it, and teacher-forced.

Teacher-forced: every QConv2d that became an integer layer consumes the codes the integer model fed
it, dequantised as its activation quantizer's forward dequantises them (the quantizer protocol's
`dequantize`), so that each layer is compared with the integer model's on identical inputs; its
activation quantizer still decides on its own input (`Forced.seen`). Weight quantizers run on fp32
weights in fp32 whatever the model's dtype (`AsFloat32`): the fake-quant weights, in float64 too. So
do the other q2kernels modules that compute in fp32 only (the quantizers of layers kept in float, an
uncalibrated GatedFusion): the float64 evaluation rounds their inputs to fp32, which the bounds of
deploy.error_bounds allow for (a decision within fp32 rounding of its boundary counts as reachable).
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..nn.fusion import GatedFusion
from ..nn.modules import QConv2d
from ..nn.quantizers import Quantizer
from . import trace
from .fixed_fusion import FixedFusion
from .fusion import freeze_calibrated


def _is_leaf(m: nn.Module) -> bool:
    return isinstance(m, (QConv2d, Quantizer, GatedFusion, FixedFusion))


def traced(model: nn.Module) -> fx.GraphModule:
    """A copy of the fake-quant model as convert_to_int sees it (eval mode, the same trace, so its
    outputs are the integer model's), with each calibrated GatedFusion frozen to the affine the
    integer model folds; an uncalibrated one is kept, as the integer model keeps it."""
    return trace.symbolic_trace(freeze_calibrated(copy.deepcopy(model).eval()), is_leaf=_is_leaf)


class Forced(nn.Module):
    """In place of the activation quantizer q of an integer layer: records q's codes for its input
    (`seen`) and passes on the integer model's codes, dequantised by q."""

    def __init__(self, q: Quantizer, codes: torch.Tensor, name: str):
        super().__init__()
        self.q, self.codes, self.form, self.name = q, codes, q.int_activation(), name

    def values(self) -> torch.Tensor:
        """The fake-quant model's values of the codes (fp32)."""
        return self.q.dequantize(self.codes)

    def grid(self) -> torch.Tensor:
        """The integer model's values of the codes: step*q + offset, float64."""
        return self.codes.double() * self.form.step + self.form.offset

    def forward(self, x):
        if x.shape != self.codes.shape:
            raise ValueError(f"int_model: its layer {self.name!r} received input codes of shape "
                             f"{tuple(self.codes.shape)}, but the model's QConv2d {self.name!r} receives an input of "
                             f"shape {tuple(x.shape)}: was int_model converted from this model?")
        self.seen = self.form.codes(x)
        # In x's dtype and memory layout, as the quantizer's own output: a conv's summation order
        # depends on its input's layout (the unpacked codes are channels last).
        return torch.empty_like(x).copy_(self.values())


class AsFloat32(nn.Module):
    """A module that computes in fp32 only (a weight or activation quantizer, a GatedFusion), run on
    fp32 values inside a model of any dtype: its float inputs (also inside lists) are rounded to fp32
    and its float outputs returned in the dtype of its first float input."""

    def __init__(self, q: nn.Module):
        super().__init__()
        self.q = q

    def forward(self, *args):
        dtype = _first_float_dtype(args)
        return _cast(self.q(*_cast(args, torch.float32)), dtype)

    def int_activation(self):
        """The wrapped activation quantizer's integer form (deploy.error_bounds asks a float layer's)."""
        return self.q.int_activation()

    def grid(self, w: torch.Tensor) -> torch.Tensor:
        """The integer model's values of the fake-quant weight of w: step*(w_mul*k + w_add), float64."""
        w32 = w.float()
        with torch.no_grad():
            form = self.q.int_weight(w32, self.q(w32).double())
        levels = form.w_mul * form.codes.double() + form.w_add
        return form.step.double().view(-1, *[1] * (w.dim() - 1)) * levels


def forced(gm: fx.GraphModule, codes: dict[str, torch.Tensor], dtype: torch.dtype):
    """(a copy of the traced fake-quant model gm in `dtype`, teacher-forced with codes {QConv2d name:
    input codes}, {name: its Forced})."""
    gm = copy.deepcopy(gm)
    wrapped = {}
    for name, m in gm.named_modules():
        if isinstance(m, QConv2d) and m.weight_quantizer is not None:
            m.weight_quantizer = AsFloat32(m.weight_quantizer)
            if name in codes:
                m.act_quantizer = wrapped[name] = Forced(m.act_quantizer, codes[name], name)
    _run_the_rest_in_float32(gm)
    gm.to(dtype)
    # The quantizers' parameters stay fp32 (a quantizer computes in fp32 from fp32 parameters).
    for m in gm.modules():
        if isinstance(m, (Forced, AsFloat32)):
            m.q.float()
    return gm, wrapped


def _run_the_rest_in_float32(gm: nn.Module) -> None:
    """Every quantizer and GatedFusion not yet wrapped (those of layers kept in float, or outside any
    QConv2d) runs in fp32 (AsFloat32): their ops take no float64."""
    slots = [(parent, attr, m) for parent in gm.modules() if not isinstance(parent, (Forced, AsFloat32))
             for attr, m in parent.named_children() if isinstance(m, (Quantizer, GatedFusion))]
    for parent, attr, m in slots:
        setattr(parent, attr, AsFloat32(m))


def _first_float_dtype(v):
    if isinstance(v, torch.Tensor):
        return v.dtype if v.is_floating_point() else None
    if isinstance(v, (list, tuple)):
        return next((d for d in map(_first_float_dtype, v) if d is not None), None)
    return None


def _cast(v, dtype):
    """v with its float tensors (also inside lists and tuples) in dtype; v itself where dtype is None."""
    if dtype is None:
        return v
    if isinstance(v, torch.Tensor):
        return v.to(dtype) if v.is_floating_point() else v
    if isinstance(v, (list, tuple)):
        return type(v)(_cast(x, dtype) for x in v)
    return v
