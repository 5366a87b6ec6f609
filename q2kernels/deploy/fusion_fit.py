"""LayerNorm removal by a fitted affine: per channel, the fixed affine closest to the LayerNorm on data.

calibrate_fusion + freeze_fusion (the Q2 paper's removal, docs/math.md §5) replace a node's LayerNorm
by the affine that is exact for a pixel whose statistics are the average ones, A_c = a_k(c)·γ_c/σ̄,
B_c = β_c − γ_c·μ̄/σ̄. Pixels far from the average (an object's against the background's) get a
different scale than the LayerNorm gave them. `fitted_fusion(model, batches)` instead fits, per output
channel c, the affine y_c ≈ A_c·h_c + B_c that minimises the squared difference to the LayerNorm's
output y over every pixel of the batches, where h is what FixedFusion computes before its affine
(the plain concat of the branches, or their gated sum):

    A_c = cov(h_c, y_c) / var(h_c),   B_c = mean(y_c) − A_c·mean(h_c)      (float64 sums)

and A_c = 0, B_c = mean(y_c) for a channel that is constant over the data. The result is a FixedFusion
like freeze_fusion's, so conversion to integers folds it exactly the same way.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn.fusion import GatedFusion
from .fixed_fusion import FixedFusion
from .fusion import _fusion_nodes, run_with_hooks


class _Moments:
    """float64 per-channel sums of h, h², y, h·y and the pixel count; `hook` is a GatedFusion forward hook."""

    def __init__(self, channels: int, device):
        self.sums = torch.zeros(4, channels, dtype=torch.float64, device=device)
        self.pixels = 0

    def hook(self, node: GatedFusion, args, kwargs, output):
        xs = list(args[0] if args else kwargs["xs"])
        h = _pre_affine(node, xs).double()
        y = output.double()
        dims = (0, 2, 3)
        self.sums += torch.stack([h.sum(dims), (h * h).sum(dims), y.sum(dims), (h * y).sum(dims)])
        self.pixels += h.numel() // h.shape[1]


def _gates(node: GatedFusion) -> torch.Tensor:
    return torch.softmax(node.theta.detach().float(), dim=0)


def _pre_affine(node: GatedFusion, xs) -> torch.Tensor:
    """What FixedFusion computes before its affine: the concat of the branches (their gates go into
    the affine) or the gated sum."""
    if node.fuse == "concat":
        return torch.cat(xs, dim=1)
    a = _gates(node).to(xs[0].dtype)
    return sum(a[k] * x for k, x in enumerate(xs))


def fitted_fusion(model: nn.Module, batches, forward=None) -> dict[str, FixedFusion]:
    """{GatedFusion name: the FixedFusion with the least-squares affine (module docstring)}, fitted on
    `batches` fed as `forward(model, batch)` (default `model(batch)`) in eval mode without grad. The
    model is not changed. Raises, naming the node, if a node saw no pixel."""
    nodes = _fusion_nodes(model)
    if not nodes:
        raise ValueError("model: contains no GatedFusion to fit")
    moments = {n: _Moments(m.out_channels, m.theta.device) for n, m in nodes}
    run_with_hooks(model, batches, forward,
                   [m.register_forward_hook(moments[n].hook, with_kwargs=True) for n, m in nodes])
    out = {}
    for name, node in nodes:
        acc = moments[name]
        if acc.pixels == 0:
            raise ValueError(f"batches: the GatedFusion {name!r} saw no pixel")
        sh, shh, sy, shy = acc.sums / acc.pixels
        var = shh - sh * sh
        cov = shy - sh * sy
        scale = torch.where(var > 0, cov / torch.where(var > 0, var, 1.0), 0.0)
        shift = sy - scale * sh
        dtype = node.theta.dtype
        gates = _gates(node).to(dtype) if node.fuse == "sum" else None
        out[name] = FixedFusion(node.channels, node.fuse, gates, scale.to(dtype), shift.to(dtype))
    return out
