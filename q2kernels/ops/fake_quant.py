"""Fused LSQ / LSQ+ / PACT fake quantisation (docs/math.md §1-§3): one Triton kernel pair.

Forward: one read of x, one write of y. Backward: one read of x and g, one write of dx, and every
parameter gradient (ds, dbeta, dalpha; per channel where per-channel) reduced in the same pass into
fp32 per-program partials, then summed over programs by a column sum — deterministic, no atomics,
no host sync. Which quantizer is a tl.constexpr (KIND), so the three share one kernel source.

Layout: the kernels walk x in memory order through the (OUTER, C, INNER) view of _layout.py, so
NCHW, channels_last and permuted weights are all read in place. A program owns a [BLOCK_K, BLOCK_C]
tile: BLOCK_K elements of each of BLOCK_C channels, 4096 elements in all. Per tensor (C = 1) the
tile is one contiguous run. When the channels are innermost (channels_last activations), BLOCK_C
spans neighbouring channels so loads stay coalesced along C. Otherwise a channel's elements come in
contiguous runs: BLOCK_K covers a channel's elements (NCHW activations: 4096 of them; a conv weight
row: all Cin*k*k) and, when channels are short, BLOCK_C takes several so no lanes idle.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..constants import SCALE_FLOOR
from . import _layout
from ._triton_utils import cast_to, channel_offsets, clip, round_clip

LSQ, LSQ_PLUS, PACT = 0, 1, 2
# The same kinds as the kernels see them (a @triton.jit function reads only constexpr globals).
_LSQ_PLUS: tl.constexpr = tl.constexpr(LSQ_PLUS)
_PACT: tl.constexpr = tl.constexpr(PACT)

_SCALE_FLOOR: tl.constexpr = tl.constexpr(SCALE_FLOOR)

# Elements per program. 4096 fp32 elements are 16 per thread at 8 warps: four 16-byte vectors in
# flight per thread, enough to cover DRAM latency on an H100 while keeping the partial-sum buffer
# (one fp32 per program and channel) under 0.1% of the traffic.
BLOCK_ELEMS = 4096
NUM_WARPS = 8


@triton.jit
def _floored(s):
    """s' = max(s, 1e-8), NaN kept as torch.clamp_min keeps it (a plain maximum would return the floor)."""
    return tl.maximum(s, _SCALE_FLOOR, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _tile(pid, N_K, C, INNER, PER_CHANNEL: tl.constexpr, BLOCK_K: tl.constexpr,
          BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """The tile of program `pid`: its k-block index, memory offsets [BLOCK_K, BLOCK_C], their mask
    and its channel indices [BLOCK_C]. The grid is 1-d (a 2-d grid's second axis stops at 65535
    programs, too few for per-channel tensors of many channels), channel blocks fastest."""
    n_c_blocks = tl.cdiv(C, BLOCK_C)
    pid_k = pid // n_c_blocks
    pid_c = pid % n_c_blocks
    if INT64:
        pid_k = pid_k.to(tl.int64)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if PER_CHANNEL:
        offs = channel_offsets(k[:, None], c[None, :], C, INNER)
    else:
        offs = k[:, None] + c[None, :]
    mask = (k < N_K)[:, None] & (c < C)[None, :]
    return pid_k, offs, mask, c


@triton.jit
def _fake_quant_fwd_kernel(x_ptr, y_ptr, s_ptr, beta_ptr, N_K, C, INNER, qn, qp,
                           KIND: tl.constexpr, PER_CHANNEL: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    _, offs, mask, c = _tile(tl.program_id(0), N_K, C, INNER, PER_CHANNEL, BLOCK_K, BLOCK_C, INT64)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    s = tl.load(s_ptr + c, mask=c < C, other=1.0)[None, :]
    if KIND == _PACT:  # s is the clip alpha, floored as LSQ's step; qp = 2^k - 1
        s = _floored(s)
        q = round_clip(clip(x, 0.0, s) * tl.math.div_rn(qp, s), 0.0, qp)
        y = q * tl.math.div_rn(s, qp)
    else:
        s = _floored(s)
        inv_s = tl.math.div_rn(1.0, s)
        if KIND == _LSQ_PLUS:
            beta = tl.load(beta_ptr + c, mask=c < C, other=0.0)[None, :]
            y = round_clip((x - beta) * inv_s, qn, qp) * s + beta
        else:
            y = round_clip(x * inv_s, qn, qp) * s
    tl.store(y_ptr + offs, cast_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fake_quant_bwd_kernel(x_ptr, g_ptr, dx_ptr, s_ptr, beta_ptr, ds_part_ptr, dbeta_part_ptr,
                           N_K, C, INNER, qn, qp, grad_scale,
                           KIND: tl.constexpr, PER_CHANNEL: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    pid_k, offs, mask, c = _tile(tl.program_id(0), N_K, C, INNER, PER_CHANNEL, BLOCK_K, BLOCK_C, INT64)
    # Masked lanes load x = g = 0, which contributes 0 to every sum below.
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + c, mask=c < C, other=1.0)[None, :]
    part = pid_k * C + c
    # max(s, 1e-8) passes the gradient only where s is at or above the floor.
    s_live = s >= _SCALE_FLOOR
    if KIND == _PACT:
        alpha = _floored(s)
        inside = (x >= 0.0) & (x < alpha)
        dalpha = tl.sum(tl.where((x >= alpha) & s_live, g, 0.0), axis=0)
        tl.store(ds_part_ptr + part, dalpha, mask=c < C)
    else:
        inv_s = tl.math.div_rn(1.0, _floored(s))
        if KIND == _LSQ_PLUS:
            beta = tl.load(beta_ptr + c, mask=c < C, other=0.0)[None, :]
            v = (x - beta) * inv_s
        else:
            v = x * inv_s
        inside = (v >= qn) & (v <= qp)
        q = round_clip(v, qn, qp)
        ds_elem = g * tl.where(inside, q - v, tl.where(v < qn, qn, qp))
        ds = tl.sum(ds_elem * tl.where(s_live, grad_scale, 0.0), axis=0)
        tl.store(ds_part_ptr + part, ds, mask=c < C)
        if KIND == _LSQ_PLUS:
            dbeta = tl.sum(tl.where(inside, 0.0, g), axis=0) * grad_scale
            tl.store(dbeta_part_ptr + part, dbeta, mask=c < C)
    tl.store(dx_ptr + offs, cast_to(tl.where(inside, g, 0.0), dx_ptr.dtype.element_ty), mask=mask)


def _launch_geometry(x: torch.Tensor, axis: Optional[int]):
    C, inner = _layout.channel_view(x, axis)
    per_channel = C > 1
    n_k = x.numel() // C
    if not per_channel:
        block_c, block_k = 1, BLOCK_ELEMS
    elif inner == 1:  # channels innermost: a tile spans neighbouring channels
        block_c = min(triton.next_power_of_2(C), 128)
        block_k = BLOCK_ELEMS // block_c
    else:  # a channel's elements come in runs of INNER: a tile takes whole channels when they are short
        block_k = min(triton.next_power_of_2(n_k), BLOCK_ELEMS)
        block_c = min(triton.next_power_of_2(C), BLOCK_ELEMS // block_k)
    n_k_blocks = triton.cdiv(n_k, block_k)
    grid = (n_k_blocks * triton.cdiv(C, block_c),)
    meta = dict(PER_CHANNEL=per_channel, BLOCK_K=block_k, BLOCK_C=block_c,
                INT64=_layout.needs_int64(x), num_warps=NUM_WARPS)
    return (n_k, C, inner), n_k_blocks, grid, meta


@torch.library.custom_op("q2kernels::fake_quant", mutates_args=())
def fake_quant(x: torch.Tensor, s: torch.Tensor, beta: Optional[torch.Tensor], kind: int,
               qn: float, qp: float, axis: Optional[int], grad_scale: float) -> torch.Tensor:
    """y = fake-quant(x). kind: LSQ / LSQ_PLUS / PACT. grad_scale is used by the backward only."""
    x = _layout.dense(x)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    sizes, _, grid, meta = _launch_geometry(x, axis)
    _fake_quant_fwd_kernel[grid](x, y, s, s if beta is None else beta, *sizes, float(qn), float(qp),
                                 KIND=kind, **meta)
    return y


@fake_quant.register_fake
def _(x, s, beta, kind, qn, qp, axis, grad_scale):
    return torch.empty_like(_layout.dense(x))


@torch.library.custom_op("q2kernels::fake_quant_backward", mutates_args=())
def fake_quant_backward(g: torch.Tensor, x: torch.Tensor, s: torch.Tensor, beta: Optional[torch.Tensor],
                        kind: int, qn: float, qp: float, axis: Optional[int],
                        grad_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, ds, dbeta); ds is dalpha for PACT; dbeta has 0 elements unless kind is LSQ_PLUS."""
    x = _layout.dense(x)
    g = _layout.like(x, g)
    dx = torch.empty_like(x, dtype=g.dtype)
    n_programs = 0  # an empty x (also one with 0 channels) launches nothing: every grad sums to 0
    if x.numel():
        sizes, n_programs, grid, meta = _launch_geometry(x, axis)
    ds_part = torch.empty((n_programs, s.numel()), device=x.device, dtype=torch.float32)
    dbeta_part = torch.empty((n_programs, s.numel()) if kind == LSQ_PLUS else (0,),
                             device=x.device, dtype=torch.float32)
    if n_programs:
        _fake_quant_bwd_kernel[grid](x, g, dx, s, s if beta is None else beta, ds_part, dbeta_part,
                                     *sizes, float(qn), float(qp), float(grad_scale), KIND=kind, **meta)
    ds = ds_part.sum(dim=0).reshape(s.shape)
    dbeta = dbeta_part.sum(dim=0).reshape(beta.shape) if kind == LSQ_PLUS else dbeta_part
    return dx, ds, dbeta


@fake_quant_backward.register_fake
def _(g, x, s, beta, kind, qn, qp, axis, grad_scale):
    x = _layout.dense(x)
    dbeta = torch.empty_like(beta, dtype=torch.float32) if kind == LSQ_PLUS else x.new_empty((0,), dtype=torch.float32)
    return torch.empty_like(x, dtype=g.dtype), torch.empty_like(s, dtype=torch.float32), dbeta


def _setup_context(ctx, inputs, output):
    x, s, beta, *args = inputs
    ctx.save_for_backward(x, s, beta)
    ctx.args = args


def _backward(ctx, g):
    x, s, beta = ctx.saved_tensors
    dx, ds, dbeta = torch.ops.q2kernels.fake_quant_backward(g, x, s, beta, *ctx.args)
    return dx, ds, (dbeta if beta is not None else None), None, None, None, None, None


fake_quant.register_autograd(_backward, setup_context=_setup_context)
