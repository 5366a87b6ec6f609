"""Eager reference of N2UQ (docs/math.md §4): the learnable-threshold activation quantizer (LTQ)
and the N2UQ weight quantizer.

Written for clarity, in the authors' style (one pass over the tensor per level): each quantizer is a
torch.autograd.Function whose backward is the closed form of docs/math.md, in plain fp32 PyTorch. This
is the CPU backend and the oracle of the fused kernels; it never imports from q2kernels.ops.

Exactness. The thresholds and segment edges are two sequential fp32 running sums over the clamped
intervals a+, in the order docs/math.md writes them (`ltq_tables`); the kernels compute the same sums in
the same order, so every level decision agrees bit for bit. The weight quantizer divides by its
per-channel scale as every other quantizer here does (docs/math.md §0): `inv = 1/sf` once, then `w*inv`
(and dW = g*inv); its scale sums |W| in fp64 so that any summation order gives the same fp32 sf.
"""
from __future__ import annotations

import struct

import torch

from ..constants import A_FLOOR
from ._output import output_as


def ltq_levels(bits: int) -> int:
    """n = 2^bits - 1: the number of intervals (and of thresholds) of a b-bit LTQ."""
    return 2**bits - 1


def ltq_interval(bits: int) -> float:
    """I = 2/n rounded to fp32 (a Python float holding that fp32 value exactly). Python arithmetic
    only (no tensor): torch.compile traces it as a constant instead of breaking the graph. 2/n in
    double, then rounded to fp32 by the struct round trip, equals the fp32 quotient: double carries
    more than 2*24 + 2 bits, so the two roundings give the correctly rounded fp32 result."""
    return struct.unpack("f", struct.pack("f", 2.0 / ltq_levels(bits)))[0]


def ltq_init(bits: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/math.md §4 initial parameters (start, a, alpha1, alpha2): 0, n entries of I, 1, 1 (fp32)."""
    f32 = dict(dtype=torch.float32, device=device)
    n = ltq_levels(bits)
    return (torch.zeros(1, **f32), torch.full((n,), ltq_interval(bits), **f32),
            torch.ones(1, **f32), torch.ones(1, **f32))


def ltq_tables(start: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a+, thresholds t_1..t_n, edges d_0..d_n), fp32, from the parameters.

    Two separate sequential running sums, in this order (a cumsum would not fix the order):
    d_0 = s0, d_i = d_{i-1} + a+_i;  t_1 = s0 + a+_1/2, t_i = t_{i-1} + (a+_{i-1}/2 + a+_i/2).
    """
    a_pos = torch.where(a.float().reshape(-1) > A_FLOOR, a.float().reshape(-1), A_FLOOR)
    s0 = start.float().reshape(())
    thresholds = [s0 + a_pos[0] / 2]
    edges = [s0]
    for i in range(1, a_pos.numel()):
        thresholds.append(thresholds[-1] + (a_pos[i - 1] / 2 + a_pos[i] / 2))
    for i in range(a_pos.numel()):
        edges.append(edges[-1] + a_pos[i])
    return a_pos, torch.stack(thresholds), torch.stack(edges)


def _count_above(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """#{i : u > table[i]} per element (strict), one pass per entry as the authors' loop does."""
    k = torch.zeros(u.shape, dtype=torch.int64, device=u.device)
    for t in table:
        k += u > t
    return k


class _LTQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, start, a, alpha1, alpha2, bits):
        interval = ltq_interval(bits)
        _, thresholds, _ = ltq_tables(start, a)
        u = x.float() * alpha1.float().reshape(())
        k = _count_above(u, thresholds)
        y = (k.float() * interval) * alpha2.float().reshape(())
        ctx.save_for_backward(x, start, a, alpha1, alpha2)
        ctx.bits = bits
        return output_as(y, x)

    @staticmethod
    def backward(ctx, g):
        x, start, a, alpha1, alpha2 = ctx.saved_tensors
        n, interval = ltq_levels(ctx.bits), ltq_interval(ctx.bits)
        a_pos, thresholds, edges = ltq_tables(start, a)
        xf, gf = x.float(), g.float()
        a1, a2 = alpha1.float().reshape(()), alpha2.float().reshape(())
        u = xf * a1
        k = _count_above(u, thresholds)
        # Segment i (1-based) is d_{i-1} < u <= d_i; e = #{edges below u} is i inside, 0 below
        # d_0 and n+1 above d_n.
        e = _count_above(u, edges)
        inside = (e >= 1) & (e <= n)
        seg = torch.where(inside, e - 1, 0)
        # I / a+_i, one correctly rounded division per segment (a 0-d tensor numerator: a Python
        # scalar there would turn the division into a reciprocal and a multiply).
        slope = a_pos.new_full((), interval) / a_pos
        zero = torch.zeros_like(u)
        w = torch.where(inside, (gf * a2) * slope[seg], zero)  # G*I/a+_i inside, 0 outside
        dx = w * a1
        dalpha1 = torch.where(inside, w * xf, zero).sum()
        dalpha2 = (gf * (k.float() * interval)).sum()
        # Per segment: P_i = sum G*I/a+_i and Q_i = sum G*I*(u - d_{i-1})/a+_i^2 over its elements.
        q = torch.where(inside, w * (u - edges[seg]) / a_pos[seg], zero)
        # Every element is added (w and q are 0 outside, at seg 0: x + 0 is exact): a boolean index
        # would have a data-dependent size and break a torch.compile graph.
        P = torch.zeros(n, dtype=torch.float32, device=u.device).index_add_(0, seg.reshape(-1), w.reshape(-1))
        Q = torch.zeros_like(P).index_add_(0, seg.reshape(-1), q.reshape(-1))
        # da_j = -sum_{i>j} P_i - Q_j: the exclusive suffix sum, built without a subtraction.
        suffix = torch.cat([P.flip(0).cumsum(0).flip(0)[1:], P.new_zeros(1)])
        da = torch.where(a.float().reshape(-1) > A_FLOOR, -(suffix + Q), torch.zeros_like(P))
        dstart = -P.sum()
        return (dx.to(x.dtype), dstart.reshape(start.shape), da.reshape(a.shape),
                dalpha1.reshape(alpha1.shape), dalpha2.reshape(alpha2.shape), None)


def n2uq_act_fake_quant(x, start, a, alpha1, alpha2, bits: int = 4):
    """N2UQ's learnable-threshold activation quantizer (LTQ, docs/math.md §4): y = k*I*alpha2, k = the
    number of thresholds below alpha1*x. start, alpha1, alpha2: 1 element; a: 2^bits - 1."""
    return _LTQ.apply(x, start, a, alpha1, alpha2, bits)


def n2uq_weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """sf_c = ((2^b-1)/2^(b-1)) * (sum|W_c| / K) over each output channel (dim 0, K elements each),
    fp32, shape (C,)."""
    # Accumulated in fp64, then rounded to fp32: the fused kernel sums in another order, and fp64
    # makes both round to the same fp32 sum (except in the rare case of a channel whose exact sum
    # lies within ~K*2^-53 of an fp32 rounding boundary), so their level decisions agree too.
    wf = w.detach().double().abs()
    abs_sum = (wf.flatten(1).sum(dim=1) if w.dim() > 1 else wf).float()
    # Divisors are 0-d tensors: on CUDA a Python scalar divisor becomes a reciprocal multiply.
    per_channel = abs_sum.new_full((), max(w.numel() // max(w.size(0), 1), 1))
    return ((2**bits - 1) / 2 ** (bits - 1)) * (abs_sum / per_channel)


class _N2UQWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, bits):
        sf = n2uq_weight_scale(w, bits)
        view = (-1,) + (1,) * (w.dim() - 1)
        sf_v = sf.reshape(view)
        inv = torch.where(sf_v == 0, 0.0, 1.0 / sf_v)  # an all-zero channel: wq = 0, dW = 0
        m = sf.new_full((), (2**bits - 1) / 2)
        c = (w.float() * inv).clamp(-1.0, 1.0)
        wq = (torch.round((c + 1.0) * m) / m - 1.0) * sf_v
        ctx.save_for_backward(inv)
        return output_as(wq, w)

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        return (g.float() * inv).to(g.dtype), None


def n2uq_weight_fake_quant(w, bits: int = 4):
    """N2UQ weight quantizer (docs/math.md §4): per output channel (dim 0) scale sf = mean|W|*(2^b-1)/2^(b-1),
    2^b symmetric levels with no zero, dW = g/sf (no clip mask).

    An all-zero channel (sf = 0) has no scale to divide by: 1/sf is taken as 0 there, so its
    outputs are 0 (the one zero output; sf*(level) with sf = 0) and its gradient dW is 0. A NaN
    weight makes its channel's sf, outputs and gradients NaN."""
    return _N2UQWeight.apply(w, bits)
