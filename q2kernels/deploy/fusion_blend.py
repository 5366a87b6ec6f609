"""LayerNorm removal by degrees: a fusion node whose statistics blend from per-pixel to calibrated.

Removing a node's LayerNorm at once (calibrate_fusion + freeze_fusion, docs/math.md §5) swaps the
per-pixel normalisation the network was trained with for one fixed affine; the layers after the node
then see, all in one step, pixels scaled as they never were, and the short fine-tune that follows
has to win the accuracy back. `BlendedFusion` makes the swap a path instead of a step. It normalises
with statistics that move, as a blend weight t goes from 0 to 1, from each pixel's own to the
calibrated averages:

    m = (1 - t)*mu_pixel + t*mubar,   s = (1 - t)*sqrt(var_pixel + eps) + t*sigmabar
    y_c = gamma_c*(h_c - m)/s + beta_c

where h is the gated concat (or sum) the GatedFusion normalises. At t = 0 this is the node's own
LayerNorm; at t = 1 it is the fixed affine freeze_fusion makes, for any h, so `freeze()` then returns
that FixedFusion (`_fixed`, the same code and rounding as freeze_fusion). Gradients reach gamma, beta
and the branches through both terms; the gates are fixed (the controller steps only in the fused
GatedFusion's backward, and a deployed node's gates are constants anyway).

The blend weight t is a buffer that the training loop sets (Q2DetectionTrainer, batch by batch over
its `layernorm_blend_epochs`); a float buffer, so an EMA copy of the model that averages floating-point
state averages it as well, and the loop sets both.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import reference as ref
from ..nn.fusion import GatedFusion
from .fixed_fusion import FixedFusion
from .fusion import _check_calibrated, _fixed


class BlendedFusion(nn.Module):
    """A calibrated GatedFusion `node` (kept as a submodule: its gamma and beta go on training) whose
    LayerNorm statistics are blended into the calibrated ones by the weight `blend` (module docstring).

    blend: the starting t in [0, 1] (0: the node's LayerNorm exactly)."""

    def __init__(self, node: GatedFusion, blend: float = 0.0):
        super().__init__()
        if not isinstance(node, GatedFusion):
            raise TypeError(f"node: expected a GatedFusion, got {type(node).__name__}")
        _check_calibrated("node", node)
        self.node = node
        self.channels, self.fuse = node.channels, node.fuse
        self.register_buffer("blend", torch.zeros((), dtype=torch.float32, device=node.theta.device))
        self.set_blend(blend)

    def set_blend(self, t: float) -> None:
        """Set the blend weight t in [0, 1] (written on the device: no host sync)."""
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"t: expected a number in [0, 1], got {t!r}")
        self.blend.fill_(float(t))

    def forward(self, xs):
        xs = list(xs)
        node = self.node
        if len(xs) != len(node.channels):
            raise ValueError(f"xs: expected {len(node.channels)} branches, got {len(xs)}")
        gates = torch.softmax(node.theta.detach().float(), dim=0)
        h = ref.fusion._fuse(xs, gates, node.fuse == "concat")
        mu = h.mean(dim=1, keepdim=True)
        sigma = torch.sqrt(((h - mu) ** 2).mean(dim=1, keepdim=True) + node.eps)
        t = self.blend
        y = (h - ((1 - t) * mu + t * node.mubar)) / ((1 - t) * sigma + t * node.sigmabar)
        if node.gamma is not None:
            y = y * node.gamma.reshape(1, -1, 1, 1)
        if node.beta is not None:
            y = y + node.beta.reshape(1, -1, 1, 1)
        return y.to(xs[0].dtype)

    def freeze(self) -> FixedFusion:
        """The FixedFusion this node equals at t = 1 (freeze_fusion's, from the node's current gamma,
        beta, gates and calibrated statistics)."""
        return _fixed(self.node, affine=True)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, fuse={self.fuse!r}"
