"""Fused N2UQ (docs/math.md §4): the learnable-threshold activation quantizer (LTQ) and the N2UQ
weight quantizer.

LTQ. A one-program kernel first turns the parameters into a table of 6 * 2^b + 1 fp32 entries (see
_ltq_tables_kernel): the thresholds t_1..t_n, the segment edges d_0..d_n, both merged, the slopes
I/a+ and a+. The two running sums are sequential fp32 loops in docs/math.md's order, exactly as the
reference computes them, so level decisions agree bit for bit; a cumsum (a tree) would not. The
table is at most 6 KiB and stays in L1/L2 for the main kernels:
- forward: one read of x, one write of y. The level k = #{i : u > t_i} comes from a branchless
  binary search of the table (b gathers per element, not n compares): the thresholds are
  non-decreasing (each is the previous plus a positive a+), so the entries below u form a prefix and
  its length is the count.
- backward: one read of x and g, one write of dx; the same pass reduces dalpha1, dalpha2, ds0 and
  the n per-segment partials of da into one fp32 row per program. The suffix sum over segments is
  folded into those partials element by element (see the kernel), and the per-segment partials are
  a loop of n reductions over the registers of the program (no pass over memory per segment): at
  b = 8 that loop, not memory, bounds the backward. A one-program finishing kernel sums the rows in
  a fixed order: deterministic, no atomics, no host sync.
The forward returns the table as a second output so autograd saves it (6 KiB at most) instead of
the backward rebuilding it.

Weights. sf_c = mean|W_c| * (2^b-1)/2^(b-1) is a reduction over each output channel, needed before
any element of the channel can be quantised. One program per output channel reads its channel twice:
once to reduce |W|, once to quantise. A channel is at most tens of KiB (YOLOv5s: 4608 elements), so
the second read comes from L2 and device memory sees one read and one write; two launches with a
partial buffer in between would cost more than the re-read. |W| is summed in fp64 (the reference
too), so both round to the same fp32 sf whatever their order. The forward returns sf, which autograd
saves (C floats, and nothing else) so the backward dW = g/sf is a single elementwise pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..constants import A_FLOOR
from ..reference.n2uq import ltq_interval, ltq_levels
from . import _layout
from ._triton_utils import cast_to, channel_offsets, clip, round_clip

_A_FLOOR: tl.constexpr = tl.constexpr(A_FLOOR)

# Elements per block of the LTQ kernels (16 per thread at 8 warps, as the fake-quant kernels).
BLOCK = 4096
NUM_WARPS = 8
# At most this many backward programs (a few waves of an H100's 132 SMs), each looping over
# consecutive blocks: it bounds the partial rows that the one-program second stage sums.
MAX_PROGRAMS = 1024
# Elements per loop step of the weight kernels (one program per output channel).
W_BLOCK = 1024
W_NUM_WARPS = 4


def table_size(bits: int) -> int:
    return 6 * 2**bits + 1


@triton.jit
def _a_pos(a):
    return tl.where(a > _A_FLOOR, a, _A_FLOOR)


@triton.jit
def _ltq_tables_kernel(start_ptr, a_ptr, tab_ptr, interval, BITS: tl.constexpr):
    """The table, M = 2^b entries per part:
    [0, M)   thresholds t_1..t_n, +inf        [M, 2M)  edges d_0..d_n
    [2M, 3M) slopes I/a+_1..I/a+_n            [3M, 4M) a+_1..a+_n
    [4M, 6M) d_0, t_1, d_1, t_2, ..., t_n, d_n, +inf (merged)
    6M       1.0 where the merged sequence is non-decreasing, else 0.0."""
    M: tl.constexpr = 1 << BITS
    n: tl.constexpr = M - 1
    offs = tl.arange(0, M)
    a_pos = _a_pos(tl.load(a_ptr + offs, mask=offs < n, other=1.0))
    tl.store(tab_ptr + 2 * M + offs, tl.math.div_rn(interval, a_pos))
    tl.store(tab_ptr + 3 * M + offs, a_pos)
    tl.store(tab_ptr + offs, float("inf"), mask=offs == n)
    tl.store(tab_ptr + 4 * M + 2 * offs + 1, float("inf"), mask=offs == n)
    # The running sums: scalar, sequential, in docs/math.md's order (the reference's loop).
    s0 = tl.load(start_ptr)
    prev = _a_pos(tl.load(a_ptr))
    t = s0 + prev * 0.5
    d = s0
    ordered = d <= t
    tl.store(tab_ptr, t)
    tl.store(tab_ptr + M, d)
    tl.store(tab_ptr + 4 * M, d)
    tl.store(tab_ptr + 4 * M + 1, t)
    for i in range(1, n):
        cur = _a_pos(tl.load(a_ptr + i))
        d = d + prev
        ordered = ordered & (t <= d)
        t = t + (prev * 0.5 + cur * 0.5)
        ordered = ordered & (d <= t)
        tl.store(tab_ptr + i, t)
        tl.store(tab_ptr + M + i, d)
        tl.store(tab_ptr + 4 * M + 2 * i, d)
        tl.store(tab_ptr + 4 * M + 2 * i + 1, t)
        prev = cur
    d = d + prev
    ordered = ordered & (t <= d)
    tl.store(tab_ptr + M + n, d)
    tl.store(tab_ptr + 4 * M + 2 * n, d)
    tl.store(tab_ptr + 6 * M, tl.where(ordered, 1.0, 0.0))


@triton.jit
def _count_below(table_ptr, u, BITS: tl.constexpr):
    """min(#{i : table[i] < u}, 2^b - 1) for 2^b non-decreasing entries: a branchless binary search
    (the entries below u are a prefix; each step halves the range it can end in)."""
    k = tl.zeros(u.shape, dtype=tl.int32)
    for s in tl.static_range(BITS):
        step = 1 << (BITS - 1 - s)
        k = tl.where(u > tl.load(table_ptr + k + (step - 1)), k + step, k)
    return k


@triton.jit
def _ltq_fwd_kernel(x_ptr, y_ptr, tab_ptr, alpha1_ptr, alpha2_ptr, N, interval,
                    BITS: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    u = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(alpha1_ptr)
    # Padded with +inf at index n, the threshold table never counts past n.
    k = _count_below(tab_ptr, u, BITS)
    y = (k.to(tl.float32) * interval) * tl.load(alpha2_ptr)
    tl.store(y_ptr + offs, cast_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ltq_bwd_kernel(x_ptr, g_ptr, dx_ptr, tab_ptr, alpha1_ptr, alpha2_ptr, part_ptr, N, iters, interval,
                    inv_interval, BITS: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """dx over `iters` consecutive blocks of BLOCK elements, and one row of M + 2 fp32 partials per
    program: [D_0..D_{n-1}, sum w, dalpha1, dalpha2], where da_j = -(sum of D_j over programs)."""
    M: tl.constexpr = 1 << BITS
    n: tl.constexpr = M - 1
    alpha1 = tl.load(alpha1_ptr)
    alpha2 = tl.load(alpha2_ptr)
    merged = tl.load(tab_ptr + 6 * M) != 0.0
    cols = tl.arange(0, M)
    acc = tl.zeros([M], dtype=tl.float32)
    acc_alpha1 = tl.zeros([], dtype=tl.float32)
    acc_alpha2 = tl.zeros([], dtype=tl.float32)
    for it in range(iters):
        block = tl.program_id(0) * iters + it
        if INT64:
            block = block.to(tl.int64)
        offs = block * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        # Masked lanes load x = g = 0, which contributes 0 to every sum below.
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = x * alpha1
        # k = #{thresholds below u} and e = #{edges below u}. Edges and thresholds interleave
        # (d_{i-1} < t_i < d_i in exact arithmetic), so one search of the merged sequence gives
        # both, exactly whenever that sequence is non-decreasing in fp32 too -- the table kernel
        # checked. Otherwise (extreme parameters: |start| so large that a+ is a few ulps of it,
        # and the two running sums round apart) two separate searches do.
        if merged:
            p = _count_below(tab_ptr + 4 * M, u, BITS + 1)
            k = p // 2
            e = (p + 1) // 2
        else:
            k = _count_below(tab_ptr, u, BITS)
            # the M edges fill the search, so the last one is checked apart
            e = _count_below(tab_ptr + M, u, BITS) + (u > tl.load(tab_ptr + M + n)).to(tl.int32)
        inside = (e >= 1) & (e <= n)  # d_0 < u <= d_n
        seg = tl.where(inside, e - 1, 0)  # 0-based segment: d_seg < u <= d_{seg+1}
        left = tl.load(tab_ptr + M + seg)
        slope = tl.load(tab_ptr + 2 * M + seg)
        w = tl.where(inside, (g * alpha2) * slope, 0.0)  # G*I/a+_seg
        tl.store(dx_ptr + offs, cast_to(w * alpha1, dx_ptr.dtype.element_ty), mask=mask)
        acc_alpha1 += tl.sum(w * tl.where(inside, x, 0.0), axis=0)
        acc_alpha2 += tl.sum(g * (k.to(tl.float32) * interval), axis=0)
        acc += tl.where(cols == n, tl.sum(w, axis=0), 0.0)
        # docs/math.md's da_j = -sum_{segments i>j} P_i - Q_j, element by element: an element of
        # segment seg, with f = (u - d_seg)/a+_seg, adds w to every D_j with j < seg (the suffix
        # sum) and w*f to D_seg (Q), so each segment costs a select and a multiply-add per
        # element and one reduction, and no suffix pass is left for the second stage. f is not
        # clamped to 1: in fp32 the edge spacing d_{seg+1} - d_seg can exceed a+_seg, and
        # docs/math.md's Q keeps that f. It is computed as (u - d_seg)*slope/I, within a few ulps of
        # the quotient, without a division.
        f = tl.where(inside, (u - left) * slope * inv_interval, 0.0)
        seg_f = seg.to(tl.float32)
        for j in range(n):
            cover = tl.where(seg_f == j, f, tl.minimum(tl.maximum(seg_f - j, 0.0), 1.0))
            acc += tl.where(cols == j, tl.sum(w * cover, axis=0), 0.0)
    row = part_ptr + tl.program_id(0).to(tl.int64) * (M + 2)
    tl.store(row + cols, acc)
    tl.store(row + M, acc_alpha1)
    tl.store(row + M + 1, acc_alpha2)


@triton.jit
def _ltq_bwd_finish_kernel(part_ptr, tab_ptr, da_ptr, dstart_ptr, dalpha1_ptr, dalpha2_ptr, n_rows,
                           BITS: tl.constexpr, ROWS: tl.constexpr):
    """Column sums of the partial rows, in a fixed order, then da, dstart, dalpha1, dalpha2."""
    M: tl.constexpr = 1 << BITS
    n: tl.constexpr = M - 1
    cols = tl.arange(0, M)
    acc = tl.zeros([M], dtype=tl.float32)
    acc_1 = tl.zeros([ROWS], dtype=tl.float32)
    acc_2 = tl.zeros([ROWS], dtype=tl.float32)
    for r0 in range(0, n_rows, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        live = rows < n_rows
        base = part_ptr + rows.to(tl.int64) * (M + 2)
        acc += tl.sum(tl.load(base[:, None] + cols[None, :], mask=live[:, None], other=0.0), axis=0)
        acc_1 += tl.load(base + M, mask=live, other=0.0)
        acc_2 += tl.load(base + M + 1, mask=live, other=0.0)
    a_pos = tl.load(tab_ptr + 3 * M + cols, mask=cols < n, other=1.0)
    # da_j only where a_j > 1e-3 (a+ = a there); the clamp passes no gradient.
    tl.store(da_ptr + cols, tl.where(a_pos > _A_FLOOR, -acc, 0.0), mask=cols < n)
    tl.store(dstart_ptr, -tl.sum(tl.where(cols == n, acc, 0.0), axis=0))
    tl.store(dalpha1_ptr, tl.sum(acc_1, axis=0))
    tl.store(dalpha2_ptr, tl.sum(acc_2, axis=0))


def _ltq_tables(start: torch.Tensor, a: torch.Tensor, bits: int) -> torch.Tensor:
    tab = torch.empty(table_size(bits), device=a.device, dtype=torch.float32)
    _ltq_tables_kernel[(1,)](start, a.reshape(-1).contiguous(), tab, ltq_interval(bits), BITS=bits, num_warps=1)
    return tab


@torch.library.custom_op("q2kernels::n2uq_act", mutates_args=())
def n2uq_act(x: torch.Tensor, start: torch.Tensor, a: torch.Tensor, alpha1: torch.Tensor,
             alpha2: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, table): y = LTQ(x); the fp32 table of _ltq_tables_kernel, returned for the backward."""
    x = _layout.dense(x)
    y = torch.empty_like(x)
    tab = _ltq_tables(start, a, bits)
    if x.numel():
        _ltq_fwd_kernel[(triton.cdiv(x.numel(), BLOCK),)](
            x, y, tab, alpha1, alpha2, x.numel(), ltq_interval(bits),
            BITS=bits, BLOCK=BLOCK, INT64=_layout.needs_int64(x), num_warps=NUM_WARPS)
    return y, tab


@n2uq_act.register_fake
def _(x, start, a, alpha1, alpha2, bits):
    return torch.empty_like(_layout.dense(x)), x.new_empty(table_size(bits), dtype=torch.float32)


@torch.library.custom_op("q2kernels::n2uq_act_backward", mutates_args=())
def n2uq_act_backward(g: torch.Tensor, x: torch.Tensor, tab: torch.Tensor, alpha1: torch.Tensor,
                      alpha2: torch.Tensor, bits: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dstart, da, dalpha1, dalpha2); the parameter grads are fp32 of 1, 2^bits-1, 1, 1 elements."""
    x = _layout.dense(x)
    g = _layout.like(x, g)
    dx = torch.empty_like(x, dtype=g.dtype)
    M = 2**bits
    # Each program takes `iters` consecutive blocks, so that there are at most MAX_PROGRAMS rows of
    # partials: the one-program finishing kernel then reads at most MAX_PROGRAMS * (M + 2) floats.
    n_blocks = triton.cdiv(x.numel(), BLOCK)
    iters = triton.cdiv(n_blocks, MAX_PROGRAMS)
    n_programs = triton.cdiv(n_blocks, iters) if n_blocks else 0
    part = torch.empty((n_programs, M + 2), device=x.device, dtype=torch.float32)
    if x.numel():
        _ltq_bwd_kernel[(n_programs,)](x, g, dx, tab, alpha1, alpha2, part, x.numel(), iters,
                                       ltq_interval(bits), ltq_levels(bits) / 2,
                                       BITS=bits, BLOCK=BLOCK, INT64=_layout.needs_int64(x),
                                       num_warps=NUM_WARPS)
    f32 = dict(device=x.device, dtype=torch.float32)
    dstart, da, dalpha1, dalpha2 = (torch.empty(1, **f32), torch.empty(ltq_levels(bits), **f32),
                                    torch.empty(1, **f32), torch.empty(1, **f32))
    # ~4096 fp32 per loop step whatever the table size.
    _ltq_bwd_finish_kernel[(1,)](part, tab, da, dstart, dalpha1, dalpha2, n_programs,
                                 BITS=bits, ROWS=max(4096 // M, 16), num_warps=4)
    return dx, dstart, da, dalpha1, dalpha2


@n2uq_act_backward.register_fake
def _(g, x, tab, alpha1, alpha2, bits):
    dx = torch.empty_like(_layout.dense(x), dtype=g.dtype)
    scalar = x.new_empty(1, dtype=torch.float32)
    return dx, scalar, x.new_empty(ltq_levels(bits), dtype=torch.float32), torch.empty_like(scalar), \
        torch.empty_like(scalar)


def _act_setup_context(ctx, inputs, output):
    x, start, a, alpha1, alpha2, bits = inputs
    ctx.save_for_backward(x, alpha1, alpha2, output[1])
    ctx.bits = bits
    ctx.shapes = (start.shape, a.shape, alpha1.shape, alpha2.shape)


def _act_backward(ctx, g, _g_tab):
    x, alpha1, alpha2, tab = ctx.saved_tensors
    grads = torch.ops.q2kernels.n2uq_act_backward(g, x, tab, alpha1, alpha2, ctx.bits)
    dx, param_grads = grads[0], grads[1:]
    return (dx, *(p.reshape(shape) for p, shape in zip(param_grads, ctx.shapes)), None)


n2uq_act.register_autograd(_act_backward, setup_context=_act_setup_context)


@triton.jit
def _inverse_scale(sf):
    """1/sf, and 0 for an all-zero channel (sf = 0): its outputs and gradients are 0, as in the reference."""
    return tl.where(sf == 0.0, 0.0, tl.math.div_rn(1.0, sf))


@triton.jit
def _n2uq_weight_fwd_kernel(w_ptr, wq_ptr, sf_ptr, K, C, INNER, k_float, gamma, m,
                            BLOCK: tl.constexpr, INT64: tl.constexpr):
    c = tl.program_id(0)
    if INT64:
        c = c.to(tl.int64)
    # sum|W| in fp64, rounded once to fp32, as the reference does: the two sum in different orders,
    # and fp64 makes them round to the same fp32 value, so sf and every level decision agree.
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        acc += tl.abs(tl.load(w_ptr + channel_offsets(k, c, C, INNER), mask=k < K, other=0.0).to(tl.float64))
    sf = gamma * tl.math.div_rn(tl.sum(acc, axis=0).to(tl.float32), k_float)
    tl.store(sf_ptr + c, sf)
    inv = _inverse_scale(sf)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        offs = channel_offsets(k, c, C, INNER)
        w = tl.load(w_ptr + offs, mask=k < K, other=0.0).to(tl.float32)
        q = round_clip((clip(w * inv, -1.0, 1.0) + 1.0) * m, 0.0, 2.0 * m)
        tl.store(wq_ptr + offs, cast_to((tl.math.div_rn(q, m) - 1.0) * sf, wq_ptr.dtype.element_ty), mask=k < K)


@triton.jit
def _n2uq_weight_bwd_kernel(g_ptr, dw_ptr, sf_ptr, K, C, INNER, BLOCK: tl.constexpr, INT64: tl.constexpr):
    c = tl.program_id(0)
    if INT64:
        c = c.to(tl.int64)
    inv = _inverse_scale(tl.load(sf_ptr + c))
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        offs = channel_offsets(k, c, C, INNER)
        g = tl.load(g_ptr + offs, mask=k < K, other=0.0).to(tl.float32)
        tl.store(dw_ptr + offs, cast_to(g * inv, dw_ptr.dtype.element_ty), mask=k < K)


def _weight_geometry(w: torch.Tensor):
    """(K, C, INNER) of the per-output-channel view of dense w: dim 0 is the channel axis."""
    C, inner = _layout.channel_view(w, 0)
    return w.numel() // max(C, 1), C, inner


@torch.library.custom_op("q2kernels::n2uq_weight", mutates_args=())
def n2uq_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(wq, sf): N2UQ-quantised weights and the per-output-channel scale sf (fp32, size(0))."""
    w = _layout.dense(w)
    wq = torch.empty_like(w)
    K, C, inner = _weight_geometry(w)
    sf = torch.zeros(C, device=w.device, dtype=torch.float32)
    if w.numel():
        # K goes in as a float too: the mean divides by it in fp32, as the reference does.
        _n2uq_weight_fwd_kernel[(C,)](w, wq, sf, K, C, inner, float(K), (2**bits - 1) / 2 ** (bits - 1),
                                      (2**bits - 1) / 2,
                                      BLOCK=W_BLOCK, INT64=_layout.needs_int64(w), num_warps=W_NUM_WARPS)
    return wq, sf


@n2uq_weight.register_fake
def _(w, bits):
    w = _layout.dense(w)
    return torch.empty_like(w), w.new_empty(_weight_geometry(w)[1], dtype=torch.float32)


@torch.library.custom_op("q2kernels::n2uq_weight_backward", mutates_args=())
def n2uq_weight_backward(g: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """dW = g/sf per output channel (dim 0; computed as g * (1/sf)), no clip mask, in g's layout."""
    g = _layout.dense(g)
    dw = torch.empty_like(g)
    K, C, inner = _weight_geometry(g)
    if g.numel():
        _n2uq_weight_bwd_kernel[(C,)](g, dw, sf, K, C, inner, BLOCK=W_BLOCK, INT64=_layout.needs_int64(g),
                                      num_warps=W_NUM_WARPS)
    return dw


@n2uq_weight_backward.register_fake
def _(g, sf):
    return torch.empty_like(_layout.dense(g))


def _weight_setup_context(ctx, inputs, output):
    # Only sf (C floats): the backward needs neither w nor its layout.
    ctx.save_for_backward(output[1])


def _weight_backward(ctx, g, _g_sf):
    (sf,) = ctx.saved_tensors
    return torch.ops.q2kernels.n2uq_weight_backward(g, sf), None


n2uq_weight.register_autograd(_weight_backward, setup_context=_weight_setup_context)
