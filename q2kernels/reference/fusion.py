"""Eager reference of gated fusion + LayerNorm (docs/math.md §5): the oracle of the tests and the
CPU backend.

GABFusion / Q-GBFusion: K >= 2 branches x_k (B, C_k, H, W) are scaled by gates a = softmax(theta),
concatenated along channels (or summed, when every C_k is equal), and normalised over the channels
of every pixel by a LayerNorm with optional affine (gamma, beta). The backward is the closed form of
docs/math.md §5 in plain fp32 PyTorch, and it also computes each branch's gradient energy
E_k = sum(dx_k^2) (from the fp32 dx_k, before any cast to the branch's dtype), which it hands to
the caller's `on_energies` callback (the gate controller, q2kernels/gate_controller.py). This module
holds pure functions only: no state, no communication, no import from q2kernels.ops.
"""
from __future__ import annotations

import torch

from ..constants import LAYERNORM_EPS as EPS
from ._output import output_as

FUSE_MODES = ("concat", "sum")


# --------------------------------------------------------------------------------------------
# The fused op
# --------------------------------------------------------------------------------------------

def _fuse(xs, gates, concat: bool) -> torch.Tensor:
    """h = concat_k(a_k*x_k) or sum_k a_k*x_k in fp32 (summed left to right)."""
    hs = [gates[k] * x.float() for k, x in enumerate(xs)]
    if concat:
        return torch.cat(hs, dim=1)
    h = hs[0]
    for t in hs[1:]:
        h = h + t
    return h


def _channel(p: torch.Tensor) -> torch.Tensor:
    return p.float().reshape(1, -1, 1, 1)


def _stats(h: torch.Tensor, eps: float):
    """Per-pixel mean and 1/sqrt(var + eps) over channels (biased variance), shapes (B, 1, H, W)."""
    mu = h.mean(dim=1, keepdim=True)
    d = h - mu
    var = (d * d).mean(dim=1, keepdim=True)
    # 1/sqrt, both correctly rounded (torch.rsqrt may be approximate).
    return mu, 1.0 / torch.sqrt(var + eps)


class _GatedFusion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates, gamma, beta, concat, eps, on_energies, *xs):
        h = _fuse(xs, gates, concat)
        mu, rstd = _stats(h, eps)
        y = (h - mu) * rstd
        if gamma is not None:
            y = y * _channel(gamma)
        if beta is not None:
            y = y + _channel(beta)
        ctx.save_for_backward(gates, gamma, mu, rstd, *xs)
        ctx.concat, ctx.has_beta, ctx.on_energies = concat, beta is not None, on_energies
        return output_as(y, xs[0])

    @staticmethod
    def backward(ctx, dy):
        gates, gamma, mu, rstd, *xs = ctx.saved_tensors
        h = _fuse(xs, gates, ctx.concat)
        xhat = (h - mu) * rstd
        dyf = dy.float()
        g = dyf * _channel(gamma) if gamma is not None else dyf
        c1 = (g * xhat).mean(dim=1, keepdim=True)
        c2 = g.mean(dim=1, keepdim=True)
        dh = rstd * (g - c2 - xhat * c1)
        if ctx.concat:
            dhs = torch.split(dh, [x.size(1) for x in xs], dim=1)
        else:
            dhs = [dh] * len(xs)
        dxs = [gates[k] * dhs[k] for k in range(len(xs))]
        da = torch.stack([(dhs[k] * x.float()).sum() for k, x in enumerate(xs)])
        energies = torch.stack([(dx * dx).sum() for dx in dxs])
        if ctx.on_energies is not None:
            ctx.on_energies(energies, gates)
        dgamma = (dyf * xhat).sum(dim=(0, 2, 3)) if gamma is not None else None
        dbeta = dyf.sum(dim=(0, 2, 3)) if ctx.has_beta else None
        return (da, dgamma, dbeta, None, None, None) + tuple(dx.to(x.dtype) for dx, x in zip(dxs, xs))


def gated_fusion_gates(xs, gates, gamma=None, beta=None, fuse="concat", eps=EPS, on_energies=None):
    """Gated fusion + LayerNorm from the gates a themselves (K fp32 values); grad flows to a as
    da_k = sum(dh_k*x_k)."""
    return _GatedFusion.apply(gates, gamma, beta, fuse == "concat", float(eps), on_energies, *xs)


def gated_fusion(xs, theta, gamma=None, beta=None, fuse="concat", eps=EPS, on_energies=None):
    """docs/math.md §5: a = softmax(theta); h = concat_k(a_k*x_k) (or sum_k a_k*x_k);
    y = (h - mean_c h)/sqrt(var_c h + eps)*gamma + beta at every pixel. dtheta comes from the
    softmax Jacobian, a*(da - sum_j a_j*da_j), by autograd of torch.softmax. `on_energies`, when
    given, is called in the backward with (E, gates): the (K,) fp32 branch energies E_k = sum(dx_k^2)
    and the gates the forward used."""
    gates = torch.softmax(theta.float(), dim=0)
    return gated_fusion_gates(xs, gates, gamma, beta, fuse, eps, on_energies)


def fusion_stats(xs, theta, fuse="concat", eps=EPS):
    """Per-pixel (mu, sqrt(var + eps)) of the fused, gated input, fp32, shapes (B, H, W): what
    deployment calibration averages into mubar and sigmabar."""
    with torch.no_grad():
        h = _fuse(xs, torch.softmax(theta.float(), dim=0), fuse == "concat")
        mu = h.mean(dim=1)
        var = ((h - mu.unsqueeze(1)) ** 2).mean(dim=1)
        return mu, torch.sqrt(var + eps)
