"""The quantizer protocol: what deployment, model files and training ask of a quantizer kind, and the
registries.

A quantizer kind is one class in one file (a subclass of q2kernels.nn.Quantizer). It answers, itself:
- `config()`: the constructor arguments that rebuild it (a model file stores them);
- `state_keys`: the settings a state_dict must match to load into it (its kind always);
- `int_activation()`: its integer form as an input quantizer (an `IntActivation`), or NoIntegerForm;
- `int_weight(w, wq)`: the integer codes of a fake-quant weight (an `IntWeight`), or NoIntegerForm;
- `dequantize(codes)`: the fp32 values its forward outputs for activation codes (the base class
  derives them from the integer form as step*q + offset; a kind whose forward rounds its levels
  otherwise, as N2UQ's (q*I)*alpha2, says so itself).
And what training asks of it:
- `step_size()`: the step of its output levels (a tensor of 1 or C elements) that Q-ADA's distortion
  term divides by, or None (the base class's answer: a kind without one, as DoReFa's and N2UQ's
  weight quantizers, supplies no quantized feature to Q-ADA);
- `scale_free`: True for a weight quantizer whose outputs carry no scale of the float weights
  (DoReFa's lie in [-1, 1]) and leave it to a BatchNorm after the conv (the base class: False). The
  Ultralytics integration gives a conv no BatchNorm follows a scale-carrying weight quantizer
  instead, and rescales the statistics of a BatchNorm that follows one.
Its decisions are those of its integer form (`IntActivation.codes`, `.decision`): the form holds
exactly the fp32 values the forward uses. Subclassing Quantizer registers the class under its `kind`
(QUANTIZER_KINDS), and the file may add a quantize_model recipe with `register_recipe`.
deploy/convert.py, deploy/verify.py, deploy/serialize.py, quantize_model, nn/ada.py and the
Ultralytics integration ask only through these, never by class, by private parameter or by hasattr.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class NoIntegerForm(Exception):
    """A quantizer has no exact integer form in the role asked. The message completes the sentence
    "its activation (weight) quantizer ...", e.g. "is per channel: ..."."""


@dataclass(eq=False)
class IntActivation:
    """An activation quantizer as the integer path computes it (docs/math.md §7), with exactly the fp32
    values its forward uses. Codes: q = R(clip((x - q_off)*q_mul, qn, qp)), or, with thresholds,
    q = qn + #{i : thresholds_i < (x - q_off)*q_mul}. The consumer sees xhat = step*q + offset.
    monotone: q is non-decreasing in x (max pooling may then run on the codes)."""
    qn: int
    qp: int
    q_mul: float
    q_off: float
    step: float
    offset: float
    thresholds: torch.Tensor | None = None
    monotone: bool = True

    # The decisions, evaluated in x's dtype: fp32 gives the forward's codes bit for bit; float64 gives
    # the exact decision of the same fp32 parameters, which deploy.verify measures distances with.
    def _variable(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.q_off) * self.q_mul

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The int64 codes of x."""
        v = self._variable(x)
        if self.thresholds is None:
            return torch.round(v.clamp(self.qn, self.qp)).to(torch.int64)
        return self.qn + (v.unsqueeze(-1) > self.thresholds.to(v)).sum(-1)

    def decision(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, distance, unit) of x: the distance of its decision variable to the nearest decision
        boundary in code units, and the length in x of one code unit there. A code unit is one step of
        the rounding grid, or with thresholds the local spacing of the thresholds (the mean of the two
        gaps beside the nearest one)."""
        v = self._variable(x)
        if self.thresholds is None:
            k = torch.floor(v).clamp(self.qn, self.qp - 1)  # the boundaries are k + 1/2, qn <= k < qp
            return self.codes(x), (v - (k + 0.5)).abs(), torch.full_like(v, 1.0 / abs(self.q_mul))
        t = self.thresholds.to(v)
        gaps = t[1:] - t[:-1]
        spacing = (torch.cat([gaps[:1], gaps]) + torch.cat([gaps, gaps[-1:]])) / 2 if t.numel() > 1 \
            else torch.ones_like(t)
        gap, nearest = (v.unsqueeze(-1) - t).abs().min(-1)
        return self.codes(x), gap / spacing[nearest], spacing[nearest] / abs(self.q_mul)

    def boundaries_within(self, x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """How many decision boundaries lie within `radius` (in x, elementwise) of x: how many codes a
        value known only to that accuracy may be away from x's code."""
        v, r = self._variable(x), radius * abs(self.q_mul)
        if self.thresholds is None:
            lo = torch.ceil(v - r - 0.5).clamp_min(self.qn)
            hi = torch.floor(v + r - 0.5).clamp_max(self.qp - 1)
            return (hi - lo + 1).clamp_min(0)
        return ((v.unsqueeze(-1) - self.thresholds.to(v)).abs() <= r.unsqueeze(-1)).sum(-1).to(v.dtype)


@dataclass(eq=False)
class IntWeight:
    """The codes of a fake-quant weight wq: codes k (int64, wq's shape) in [qn, qp], integer levels
    w_mul*k + w_add, and a float64 step per output channel (dim 0) with
    step_c * (w_mul*k + w_add) = wq (the converter checks this to 1e-5)."""
    codes: torch.Tensor
    qn: int
    qp: int
    w_mul: int
    w_add: int
    step: torch.Tensor


QUANTIZER_KINDS: dict[str, type] = {}


def register_quantizer(cls: type) -> type:
    """Register a quantizer class under cls.kind (Quantizer subclasses are registered when defined).
    Another class may not take a kind already registered: a model file names its quantizers by kind."""
    old = QUANTIZER_KINDS.get(cls.kind)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"quantizer kind {cls.kind!r}: already registered by {old.__module__}.{old.__qualname__}; "
                        f"give {cls.__qualname__} another `kind`")
    QUANTIZER_KINDS[cls.kind] = cls
    return cls


def quantizer_class(kind: str) -> type:
    """The registered quantizer class of `kind` (KeyError naming the known kinds otherwise)."""
    if not isinstance(kind, str) or kind not in QUANTIZER_KINDS:
        raise KeyError(f"unknown quantizer kind {kind!r} (registered: {sorted(QUANTIZER_KINDS)})")
    return QUANTIZER_KINDS[kind]


@dataclass(frozen=True)
class Recipe:
    """weight(layer, bits) and act(layer, bits) build the two quantizers of one layer."""
    weight: Callable[[nn.Module, int], nn.Module]
    act: Callable[[nn.Module, int], nn.Module]


RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, recipe: Recipe) -> None:
    """Make `name` available to quantize_model."""
    RECIPES[name] = recipe
