"""Eager reference of LSQ, LSQ+, PACT and DoReFa fake quantisation (docs/math.md §1-§3).

Written for clarity: each quantizer is a torch.autograd.Function whose backward is the closed form of
docs/math.md, computed with plain PyTorch ops in fp32. This is the CPU backend and the oracle the fused
kernels are tested against; it never imports from q2kernels.ops.
"""
from __future__ import annotations

import math

import torch

from ..constants import SCALE_FLOOR
from ._output import output_as

QRANGE_MODES = ("unsigned", "signed", "symmetric")


def qrange(bits: int, mode: str) -> tuple[int, int]:
    """(Qn, Qp) of a b-bit grid: unsigned [0, 2^b-1], signed [-2^(b-1), 2^(b-1)-1],
    symmetric [-(2^(b-1)-1), 2^(b-1)-1]."""
    if mode == "unsigned":
        return 0, 2**bits - 1
    if mode == "signed":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if mode == "symmetric":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    raise ValueError(f"mode: expected one of {QRANGE_MODES}, got {mode!r}")


def lsq_grad_scale(numel_per_scale: int, qp: int) -> float:
    """LSQ's default step-size gradient scale 1/sqrt(N*Qp); 1 for an empty tensor (ds is 0 then)."""
    return 1.0 / math.sqrt(numel_per_scale * qp) if numel_per_scale > 0 else 1.0


def _per_channel_view(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """p (1 or C elements) shaped to broadcast against x along `axis`."""
    if axis is None:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def _reduce_like(t: torch.Tensor, p: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Sum t over every element that shares an entry of p (per tensor, or per channel on `axis`)."""
    if axis is None:
        return t.sum().reshape(p.shape)
    dims = [d for d in range(t.dim()) if d != axis]
    return t.sum(dim=dims).reshape(p.shape)


def _centered(x: torch.Tensor, beta: torch.Tensor | None, axis: int | None) -> torch.Tensor:
    """x - beta in fp32, or x itself for LSQ (no offset: subtracting 0 would be a pass that changes
    nothing, as the kernels skip it too)."""
    return x.float() if beta is None else x.float() - _per_channel_view(beta.float(), x, axis)


class _LSQ(torch.autograd.Function):
    """LSQ (beta is None) and LSQ+ (learnable offset beta), per tensor or per channel."""

    @staticmethod
    def forward(ctx, x, s, beta, qn, qp, axis, grad_scale):
        s_ = _per_channel_view(s.float(), x, axis).clamp_min(SCALE_FLOOR)
        q = torch.round((_centered(x, beta, axis) * (1.0 / s_)).clamp(qn, qp))
        y = q * s_ if beta is None else q * s_ + _per_channel_view(beta.float(), x, axis)
        ctx.save_for_backward(x, s, beta)
        ctx.qn, ctx.qp, ctx.axis, ctx.grad_scale = qn, qp, axis, grad_scale
        return output_as(y, x)

    @staticmethod
    def backward(ctx, g):
        x, s, beta = ctx.saved_tensors
        qn, qp, axis = ctx.qn, ctx.qp, ctx.axis
        gf = g.float()
        s_raw = _per_channel_view(s.float(), x, axis)
        s_ = s_raw.clamp_min(SCALE_FLOOR)
        v = _centered(x, beta, axis) * (1.0 / s_)
        inside = (v >= qn) & (v <= qp)
        q = torch.round(v.clamp(qn, qp))
        dx = torch.where(inside, gf, 0.0)
        ds_elem = gf * torch.where(inside, q - v, torch.where(v < qn, float(qn), float(qp)))
        # clamp_min passes the gradient only where s >= the floor, as autograd of max(s, 1e-8) does.
        ds = _reduce_like(ds_elem, s, axis) * ctx.grad_scale * (s.float() >= SCALE_FLOOR)
        dbeta = None
        if beta is not None:
            dbeta = _reduce_like(torch.where(inside, 0.0, gf), beta, axis) * ctx.grad_scale
            dbeta = dbeta.to(beta.dtype)
        return dx.to(x.dtype), ds.to(s.dtype), dbeta, None, None, None, None


def lsq_fake_quant(x, s, bits=4, mode="signed", axis=None, grad_scale="auto", beta=None):
    """LSQ (docs/math.md §1) or, with `beta`, LSQ+ (docs/math.md §2). `s` (and `beta`) hold 1 element per
    tensor, or one per channel of `axis`. grad_scale: "auto" = 1/sqrt(N*Qp), a float, or None (1)."""
    qn, qp = qrange(bits, mode)
    if grad_scale == "auto":
        grad_scale = lsq_grad_scale(x.numel() // max(s.numel(), 1), qp)
    elif grad_scale is None:
        grad_scale = 1.0
    return _LSQ.apply(x, s, beta, qn, qp, axis, float(grad_scale))


class _PACT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, n):
        a = alpha.float().reshape(()).clamp_min(SCALE_FLOOR)
        c = torch.minimum(torch.clamp_min(x.float(), 0.0), a)
        # Both divisions correctly rounded (Tensor.__rtruediv__ would multiply by a reciprocal).
        y = torch.round(c * (a.new_full((), n) / a)) * (a / n)
        ctx.save_for_backward(x, alpha)
        return output_as(y, x)

    @staticmethod
    def backward(ctx, g):
        x, alpha = ctx.saved_tensors
        xf, gf, a_raw = x.float(), g.float(), alpha.float().reshape(())
        a = a_raw.clamp_min(SCALE_FLOOR)
        dx = torch.where((xf >= 0) & (xf < a), gf, 0.0)
        # clamp_min passes the gradient only where alpha >= the floor (as LSQ's s).
        dalpha = torch.where(xf >= a, gf, 0.0).sum() * (a_raw >= SCALE_FLOOR)
        dalpha = dalpha.reshape(alpha.shape)
        return dx.to(x.dtype), dalpha.to(alpha.dtype), None


def pact_fake_quant(x, alpha, bits=4):
    """PACT activation quantizer (docs/math.md §3): clip to [0, alpha], 2^bits-1 uniform steps.

    alpha is floored as LSQ's step is, alpha' = max(alpha, 1e-8) (no gradient below the floor):
    n/alpha then stays finite (a denormal alpha would make it inf, and 0*inf a NaN level), so a
    tiny or non-positive alpha gives outputs in [0, 1e-8] and a NaN alpha NaN outputs."""
    return _PACT.apply(x, alpha, float(2**bits - 1))


def _absmax(t: torch.Tensor) -> torch.Tensor:
    """m = max|t| (NaN if any t is NaN); 0 for an empty t, which then has nothing to quantise."""
    return t.abs().amax() if t.numel() else t.new_zeros(())


class _DoReFaWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, n):
        t = torch.tanh(w.float())
        m = _absmax(t)
        inv_2m = torch.where(m == 0, 0.0, 1.0 / (2.0 * m))  # m = 0: every t is 0, u = 1/2
        q = torch.round((t * inv_2m + 0.5) * n)
        wq = q * (2.0 / n) - 1.0
        ctx.save_for_backward(w)
        return output_as(wq, w)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        gf = g.float()
        t = torch.tanh(w.float())
        m = _absmax(t)
        # wq = 2u - 1 through the straight-through round, u = t/(2m) + 1/2:
        # dt = g/m directly, and through m = max|t| (shared among ties, as torch.amax does):
        # dm = -sum(g*t)/m^2, handed to the argmax elements with the sign of t.
        # An all-zero tensor (m = 0) passes no gradient; a NaN m makes every gradient NaN.
        is_max = t.abs() == m
        dm = torch.where(m == 0, 0.0, -(gf * t).sum() / (m * m))
        dt = torch.where(m == 0, 0.0, gf / m) + torch.where(is_max, torch.sign(t) * dm / is_max.sum(),
                                                             torch.zeros_like(t))
        return (dt * (1.0 - t * t)).to(w.dtype), None


def dorefa_weight_fake_quant(w, bits=4):
    """DoReFa weight quantizer (docs/math.md §3), used with PACT activations.

    Degenerate tensors: all-zero weights have m = 0, and every u is taken as 1/2 (t/(2m) with t = 0),
    so wq = 2*R(n/2)/n - 1 = 1/n (n/2 is a tie, rounded to the even 2^(bits-1)), with zero
    gradients; an empty w gives an empty wq; one NaN weight makes m, hence every output, NaN."""
    return _DoReFaWeight.apply(w, float(2**bits - 1))


# The first-batch initialisations (docs/math.md §1-§2), from a batch's statistics: the quantizer
# modules (q2kernels.nn) gather the statistics, all-reduced across ranks, and call these.
def lsq_init_scale(mean_abs: torch.Tensor, bits: int, mode: str) -> torch.Tensor:
    """LSQ's initial step s = 2*mean|x|/sqrt(Qp), from mean|x| (one value per step: per tensor or per
    channel)."""
    _, qp = qrange(bits, mode)
    return 2.0 * mean_abs / math.sqrt(qp)


def lsq_plus_init(lo: torch.Tensor, hi: torch.Tensor, bits: int,
                  mode: str = "unsigned") -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ+'s initial (s, beta) from the batch's min `lo` and max `hi` (per tensor or per channel):
    s = (max - min)/(Qp - Qn), beta = min - Qn*s, so that min lands on level Qn and max on Qp."""
    qn, qp = qrange(bits, mode)
    s = (hi - lo) / (qp - qn)
    return s, lo - qn * s
