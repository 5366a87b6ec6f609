"""Eager reference of N2UQ (docs/math.md §4): the learnable-threshold activation quantizer (LTQ)
and the N2UQ weight quantizer.

Written for clarity: each quantizer is a torch.autograd.Function whose backward is the closed form
of docs/math.md, in plain fp32 PyTorch. This is the CPU backend and the oracle of the fused kernels;
it never imports from q2kernels.ops.

Exactness. The thresholds and segment edges are two sequential fp32 running sums over the clamped
intervals a+, in the order docs/math.md writes them (`ltq_tables`); the kernels compute the same sums in
the same order, so every level decision agrees bit for bit. The weight quantizer divides by its
per-channel scale as every other quantizer here does (docs/math.md §0): `inv = 1/sf` once, then `w*inv`
(and dW = g*inv); its scale sums |W| in fp64 so that any summation order gives the same fp32 sf.
"""
from __future__ import annotations

import struct

import torch
import torch.nn.functional as F

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
    half = a_pos / 2
    s0 = start.float().reshape(())
    # The steps between thresholds are rounded elementwise, exactly as one at a time; only the two
    # running sums are sequential (one 0-d add per entry).
    thresholds = [s0 + half[0]]
    for step in (half[:-1] + half[1:]).unbind():
        thresholds.append(thresholds[-1] + step)
    edges = [s0]
    for width in a_pos.unbind():
        edges.append(edges[-1] + width)
    return a_pos, torch.stack(thresholds), torch.stack(edges)


def _count_above(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """#{i : u > table[i]} per element (strict) for a non-NaN u, len(table) + 1 for a NaN u; int64 (the
    index type of a lookup), in one binary search per element.

    The table is a running sum of positive steps (ltq_tables), so it never decreases, except that
    an inf - inf turns it NaN from that entry on. A NaN entry is above no u, and neither is +inf: as
    +inf it keeps the table sorted without changing a count. One more +inf entry at the end changes
    no count either, but torch.bucketize (right=False: #{entries < u}) sorts a NaN u after every
    entry, so a NaN u alone gets len(table) + 1: the callers' lookup tables give that index the
    answer of u > t being false for every t. bucketize reads its input in row-major order, copying
    any other layout: u (an elementwise result, so dense) is searched through a view in its own
    memory order instead."""
    ordered = torch.cat([torch.where(table.isnan(), torch.inf, table), table.new_full((1,), torch.inf)])
    order = sorted(range(u.dim()), key=u.stride, reverse=True)
    inverse = sorted(range(u.dim()), key=order.__getitem__)
    return torch.bucketize(u.permute(order), ordered).permute(inverse)


def _level_units(bits: int, device) -> torch.Tensor:
    """k*I for k = 0..n (fp32), indexed by _count_above over the thresholds: n + 2 entries, the last
    (a NaN u) the level of k = 0."""
    n = ltq_levels(bits)
    k = torch.cat([torch.arange(n + 1, dtype=torch.float32, device=device), torch.zeros(1, device=device)])
    return k * ltq_interval(bits)


class _LTQ(torch.autograd.Function):
    """Each element is one binary search for its level and its segment, then lookups in small tables
    of per-level and per-segment values: the same fp32 operations as the formulas, computed once per
    table entry instead of once per element."""

    @staticmethod
    def forward(ctx, x, start, a, alpha1, alpha2, bits):
        a_pos, thresholds, edges = ltq_tables(start, a)
        u = x.float() * alpha1.float().reshape(())
        levels = _level_units(bits, u.device) * alpha2.float().reshape(())  # (k*I)*alpha2
        y = levels[_count_above(u, thresholds)]
        ctx.save_for_backward(x, a, alpha1, alpha2, a_pos, thresholds, edges)
        ctx.start_shape = start.shape
        ctx.bits = bits
        return output_as(y, x)

    @staticmethod
    def backward(ctx, g):
        x, a, alpha1, alpha2, a_pos, thresholds, edges = ctx.saved_tensors
        n, interval = ltq_levels(ctx.bits), ltq_interval(ctx.bits)
        xf, gf = x.float(), g.float()
        a1, a2 = alpha1.float().reshape(()), alpha2.float().reshape(())
        u = xf * a1
        dalpha2 = (gf * _level_units(ctx.bits, u.device)[_count_above(u, thresholds)]).sum()
        # Segment i (1-based) is d_{i-1} < u <= d_i. e = #{edges below u} is i inside, 0 below d_0,
        # n+1 above d_n and n+2 for a NaN u: the per-segment tables hold n+3 entries, indexed by e,
        # with 0 (or a harmless 1 as divisor) outside.
        e = _count_above(u, edges)
        pad = (1, 2)
        inside = F.pad(torch.ones(n, dtype=torch.bool, device=u.device), pad)[e]
        # I / a+_i, one correctly rounded division per segment (a 0-d tensor numerator: a Python
        # scalar there would turn the division into a reciprocal and a multiply).
        slope = F.pad(a_pos.new_full((), interval) / a_pos, pad)[e]
        w = torch.where(inside, (gf * a2) * slope, 0.0)  # G*I/a+_i inside, 0 outside
        dx = w * a1
        dalpha1 = torch.where(inside, w * xf, 0.0).sum()
        # Per segment: P_i = sum G*I/a+_i and Q_i = sum G*I*(u - d_{i-1})/a+_i^2 over its elements.
        lower = F.pad(edges[:-1], pad)[e]
        width = F.pad(a_pos, pad, value=1.0)[e]
        q = torch.where(inside, w * (u - lower) / width, 0.0)
        # Every element is added, into its segment's slot or an outside one (w and q are 0 outside):
        # a boolean index would have a data-dependent size and break a torch.compile graph.
        idx = e.reshape(-1)
        P = torch.zeros(n + 3, dtype=torch.float32, device=u.device).index_add_(0, idx, w.reshape(-1))[1:n + 1]
        Q = torch.zeros(n + 3, dtype=torch.float32, device=u.device).index_add_(0, idx, q.reshape(-1))[1:n + 1]
        # da_j = -sum_{i>j} P_i - Q_j: the exclusive suffix sum, built without a subtraction.
        suffix = torch.cat([P.flip(0).cumsum(0).flip(0)[1:], P.new_zeros(1)])
        da = torch.where(a.float().reshape(-1) > A_FLOOR, -(suffix + Q), torch.zeros_like(P))
        dstart = -P.sum()
        return (dx.to(x.dtype), dstart.reshape(ctx.start_shape), da.reshape(a.shape),
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
