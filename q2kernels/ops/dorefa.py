"""Fused DoReFa weight fake quantisation (docs/math.md §3).

wq = 2*R(u*n)/n - 1 with u = tanh(w)/(2m) + 1/2 and m = max|tanh(w)| over the whole tensor. m is a
global reduction, so forward and backward each take two passes over w: a first pass reduces per-program
partials (the max of |t|; sum(g*t) and the count of elements at the max), the second is
elementwise. Weights are small (YOLOv5s: 7M parameters in all), and the second stage is a
deterministic torch reduction over one value per program.

tanh is computed from exp in the kernel (libdevice's tanh is not available to the interpreter), so
its last ulp can differ from torch.tanh: the level decisions then agree with the reference except
where u*n lies within a few ulps of a rounding tie.

Degenerate input follows the reference (reference/fake_quant.py): an all-zero tensor (m = 0) gives
u = 1/2 and zero gradients, a NaN weight makes m, and so every output, NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _layout
from ._triton_utils import cast_to, round_clip

BLOCK = 2048
NUM_WARPS = 4


@triton.jit
def _tanh(w):
    e = tl.exp(-2.0 * tl.abs(w))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(w < 0.0, -t, t)


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _block(N, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """This program's BLOCK element offsets (int64 where the tensor needs them) and their mask."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < N


@triton.jit
def _block_tanh_grad(w_ptr, g_ptr, N, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """The backward's inputs at this program's block: offsets, mask, t = tanh(w) and the gradient g
    (fp32; 0 outside the tensor, so masked lanes add nothing to the partial sums)."""
    offs, mask = _block(N, BLOCK, INT64)
    t = _tanh(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, t, g


@triton.jit
def _absmax_kernel(w_ptr, part_ptr, N, BLOCK: tl.constexpr, INT64: tl.constexpr):
    offs, mask = _block(N, BLOCK, INT64)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # A NaN weight makes m NaN, as torch.amax does (tl.max would skip it).
    tl.store(part_ptr + tl.program_id(0), tl.reduce(tl.abs(_tanh(w)), 0, _max_keep_nan))


@triton.jit
def _dorefa_fwd_kernel(w_ptr, wq_ptr, m_ptr, N, n, two_over_n, BLOCK: tl.constexpr, INT64: tl.constexpr):
    offs, mask = _block(N, BLOCK, INT64)
    t = _tanh(tl.load(w_ptr + offs, mask=mask).to(tl.float32))
    m = tl.load(m_ptr)
    inv_2m = tl.where(m == 0.0, 0.0, tl.math.div_rn(1.0, 2.0 * m))  # m = 0: all t are 0, u = 1/2
    q = round_clip((t * inv_2m + 0.5) * n, 0.0, n)
    tl.store(wq_ptr + offs, cast_to(q * two_over_n - 1.0, wq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dorefa_bwd_partials_kernel(w_ptr, g_ptr, m_ptr, gt_part_ptr, ties_part_ptr, N,
                                BLOCK: tl.constexpr, INT64: tl.constexpr):
    offs, mask, t, g = _block_tanh_grad(w_ptr, g_ptr, N, BLOCK, INT64)
    at_max = mask & (tl.abs(t) == tl.load(m_ptr))
    tl.store(gt_part_ptr + tl.program_id(0), tl.sum(g * t, axis=0))
    tl.store(ties_part_ptr + tl.program_id(0), tl.sum(at_max.to(tl.float32), axis=0))


@triton.jit
def _dorefa_bwd_kernel(w_ptr, g_ptr, dw_ptr, m_ptr, gt_ptr, ties_ptr, N,
                       BLOCK: tl.constexpr, INT64: tl.constexpr):
    offs, mask, t, g = _block_tanh_grad(w_ptr, g_ptr, N, BLOCK, INT64)
    m = tl.load(m_ptr)
    # d(wq)/dt = 1/m directly; through m = max|t| the gradient -sum(g*t)/m^2 is shared equally by
    # the elements at the max, with the sign of t (torch.amax's rule).
    # An all-zero tensor (m = 0) passes no gradient.
    dm_share = tl.where(m == 0.0, 0.0, tl.math.div_rn(tl.math.div_rn(-tl.load(gt_ptr), m * m), tl.load(ties_ptr)))
    sign = tl.where(t > 0.0, 1.0, tl.where(t < 0.0, -1.0, 0.0))
    dt = tl.where(m == 0.0, 0.0, tl.math.div_rn(g, m)) + tl.where(tl.abs(t) == m, sign * dm_share, 0.0)
    tl.store(dw_ptr + offs, cast_to(dt * (1.0 - t * t), dw_ptr.dtype.element_ty), mask=mask)


def _grid(w):
    return (triton.cdiv(w.numel(), BLOCK),)


def _absmax(w):
    part = torch.empty(_grid(w)[0], device=w.device, dtype=torch.float32)
    _absmax_kernel[_grid(w)](w, part, w.numel(), BLOCK=BLOCK, INT64=_layout.needs_int64(w), num_warps=NUM_WARPS)
    return part.amax().reshape(1)


@torch.library.custom_op("q2kernels::dorefa_weight", mutates_args=())
def dorefa_weight(w: torch.Tensor, n: float) -> torch.Tensor:
    """DoReFa-quantised weights for n = 2^bits - 1 levels above the lowest."""
    w = _layout.dense(w)
    wq = torch.empty_like(w)
    if w.numel():
        _dorefa_fwd_kernel[_grid(w)](w, wq, _absmax(w), w.numel(), float(n), 2.0 / n,
                                     BLOCK=BLOCK, INT64=_layout.needs_int64(w), num_warps=NUM_WARPS)
    return wq


@dorefa_weight.register_fake
def _(w, n):
    return torch.empty_like(_layout.dense(w))


@torch.library.custom_op("q2kernels::dorefa_weight_backward", mutates_args=())
def dorefa_weight_backward(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    w = _layout.dense(w)
    g = _layout.like(w, g)
    dw = torch.empty_like(w, dtype=g.dtype)
    if w.numel():
        grid, int64 = _grid(w), _layout.needs_int64(w)
        m = _absmax(w)
        gt_part = torch.empty(grid[0], device=w.device, dtype=torch.float32)
        ties_part = torch.empty_like(gt_part)
        _dorefa_bwd_partials_kernel[grid](w, g, m, gt_part, ties_part, w.numel(),
                                          BLOCK=BLOCK, INT64=int64, num_warps=NUM_WARPS)
        _dorefa_bwd_kernel[grid](w, g, dw, m, gt_part.sum().reshape(1), ties_part.sum().reshape(1),
                                 w.numel(), BLOCK=BLOCK, INT64=int64, num_warps=NUM_WARPS)
    return dw


@dorefa_weight_backward.register_fake
def _(g, w):
    return torch.empty_like(_layout.dense(w), dtype=g.dtype)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, g):
    (w,) = ctx.saved_tensors
    return torch.ops.q2kernels.dorefa_weight_backward(g, w), None


dorefa_weight.register_autograd(_backward, setup_context=_setup_context)
