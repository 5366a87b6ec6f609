"""FixedFusion: a deployed fusion node (deploy.fusion.freeze_fusion makes it from a calibrated GatedFusion).

It lives apart from deploy.fusion, which imports q2kernels.nn, because a converted model may hold it:
loading such a model from a file (deploy.serialize) then needs this class and not the training code.
"""
from __future__ import annotations

import torch
from torch import nn

from .._validate import check_choice, check_int
from ..reference.fusion import FUSE_MODES


class FixedFusion(nn.Module):
    """A deployed fusion node: h = concat_k(x_k) (or sum_k gates_k*x_k), then y = scale*h + shift per
    channel when scale is given (the frozen LayerNorm), computed in the input's dtype."""

    def __init__(self, channels, fuse: str, gates=None, scale=None, shift=None):
        super().__init__()
        if not isinstance(channels, (list, tuple)) or len(channels) < 2:
            raise ValueError(f"channels: expected a list of at least 2 channel counts, got {channels!r}")
        check_choice(fuse, "fuse", FUSE_MODES)
        self.channels = [check_int(c, f"channels[{k}]", 1) for k, c in enumerate(channels)]
        self.fuse = fuse
        self.register_buffer("gates", gates)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, xs):
        xs = list(xs)
        if self.fuse == "concat":
            h = torch.cat(xs, dim=1)
        else:
            g = self.gates.to(xs[0].dtype)
            h = xs[0] * g[0]
            for k in range(1, len(xs)):
                h = h + xs[k] * g[k]
        if self.scale is None:
            return h
        return h * self.scale.to(h.dtype).reshape(1, -1, 1, 1) + self.shift.to(h.dtype).reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, fuse={self.fuse!r}, affine={self.scale is not None}"
