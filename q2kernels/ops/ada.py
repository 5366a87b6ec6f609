"""Fused Q-ADA distillation loss (MATH.md section 6): one forward kernel, one backward kernel.

Rows. A row is one (b, c) of a (B, C, H, W) feature: M = H*W elements at offsets
b*SB + c*SC + m*SM, m = h*W + w. NCHW has (SC, SM) = (M, 1); channels_last has (1, C). Each of T,
S, Sq is read with its own strides, so neither layout (nor a mix) is ever copied. A program owns
BLOCK_R rows of one image (channels c0 .. c0+BLOCK_R-1 of batch b) and walks their pixels in
chunks of BLOCK_M: [BLOCK_R, BLOCK_M] tiles, contiguous along m for NCHW (BLOCK_R = 1 for long
rows, several rows for short ones) and along c for channels_last (BLOCK_R = 16 channels, a full
32-byte sector of a bf16 pixel). Rows of any length run through the same chunked loops; a row
that fits one chunk (M <= BLOCK_M, ONE_CHUNK) is loaded once and kept in registers for all passes.

Forward, per program, three passes over its rows (fp32 accumulation whatever the input dtype):
  1. mean and M2 of T and S (chunk statistics merged with Chan's formula: one read, no
     cancellation of a sum of squares);
  2. the normalisers sum A^T, sum A^S (reads T, S, Sq);
  3. the divergence, and the two row sums the gradient needs, U1 = sum u d and U2 = sum u d^2
     (reference/ada.py has the derivation).
It writes per-row statistics (NSTAT floats per row) and one loss partial per program; the loss is
a torch sum of the partials: deterministic, no atomics, no host sync, no full-size intermediate.

Backward: recompute, from the saved per-row statistics, rather than store dS in the forward. The
sums U1 and U2 are complete at the end of forward pass 3, so dS_j is elementwise given the row's
statistics: the backward is one pass that reads T, S, Sq once and writes dS once, parallel over
(rows x chunks) in either layout. Storing dS instead would need a fourth forward pass (U1, U2 are
known only after the third), would hold a full-size tensor per distillation point from the forward
to the backward (extra peak memory across the whole network's backward), would cost a write the
loss pays even when no backward follows, and would still need a read and a write (g * dS) in the
backward: at best the same bytes, with more memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..constants import DISTORTION_EPS
from . import _layout

# Per-row statistics saved by the forward for the backward, rows of a [NSTAT, B*C] fp32 tensor.
NSTAT = 10
MU_T, K_T, MU_S, K_S, DSCALE, INV_SUM_T, INV_SUM_S, KAPPA, C1, C2 = (tl.constexpr(i) for i in range(NSTAT))

# Tile size and threads. A tile is TILE elements, ELEMS_PER_THREAD of them per thread (8 warps at
# 2048): pass 3 then keeps T/S/Sq-derived tiles and six accumulator tiles live in 75-136 registers
# (sm_90, bf16, no spills; see benchmarks/bench_qada.py --sweep to retune both on a GPU).
TILE = 2048
ELEMS_PER_THREAD = 8
# Channels per program for channels_last: 16 bf16/fp16 values are one 32-byte sector per pixel.
BLOCK_C_LAST = 16

_EPS: tl.constexpr = tl.constexpr(DISTORTION_EPS)


@triton.jit
def _tile(b, c, m0, C, M, SB, SC, SM, BLOCK_M: tl.constexpr, INT64: tl.constexpr):
    """Offsets [BLOCK_R, BLOCK_M] of pixels m0.. of channels c of image b, and their mask."""
    m = m0 + tl.arange(0, BLOCK_M)
    mask = (c < C)[:, None] & (m < M)[None, :]
    if INT64:
        b = b.to(tl.int64)
        c = c.to(tl.int64)
        m = m.to(tl.int64)
    return b * SB + (c * SC)[:, None] + (m * SM)[None, :], mask


@triton.jit
def _load(ptr, b, c, m0, C, M, SB, SC, SM, BLOCK_M: tl.constexpr, INT64: tl.constexpr):
    offs, mask = _tile(b, c, m0, C, M, SB, SC, SM, BLOCK_M, INT64)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_all(t_ptr, s_ptr, q_ptr, b, c, m0, C, M, t_sb, t_sc, t_sm, s_sb, s_sc, s_sm,
              q_sb, q_sc, q_sm, HAS_SQ: tl.constexpr, BLOCK_M: tl.constexpr, INT64: tl.constexpr):
    t = _load(t_ptr, b, c, m0, C, M, t_sb, t_sc, t_sm, BLOCK_M, INT64)
    s = _load(s_ptr, b, c, m0, C, M, s_sb, s_sc, s_sm, BLOCK_M, INT64)
    if HAS_SQ:
        q = _load(q_ptr, b, c, m0, C, M, q_sb, q_sc, q_sm, BLOCK_M, INT64)
    else:
        q = s
    return t, s, q


@triton.jit
def _attention_pair(t, s, q, mu_t, k_t, mu_s, k_s, dscale, HAS_SQ: tl.constexpr):
    """(A^T, A^S, e^S): A = sigmoid(score), e = exp(-score), score = (x - mu)^2 k + 1/2 + gamma*delta,
    gamma*delta = |Sq - S| * dscale (0 without Sq). score >= 1/2, so e <= 1 never overflows."""
    gd = 0.0
    if HAS_SQ:
        gd = tl.abs(q - s) * dscale[:, None]
    d_t = t - mu_t[:, None]
    d_s = s - mu_s[:, None]
    e_t = tl.exp(-(d_t * d_t * k_t[:, None] + 0.5 + gd))
    e_s = tl.exp(-(d_s * d_s * k_s[:, None] + 0.5 + gd))
    return 1.0 / (1.0 + e_t), 1.0 / (1.0 + e_s), e_s


@triton.jit
def _q_ada_fwd_kernel(t_ptr, s_ptr, q_ptr, delta_ptr, stats_ptr, part_ptr, C, M, R, N_CB,
                      t_sb, t_sc, t_sm, s_sb, s_sc, s_sm, q_sb, q_sc, q_sm, delta_sc,
                      lam, gamma, inv_nm1,
                      HAS_SQ: tl.constexpr, HAS_DELTA: tl.constexpr, KL: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, ONE_CHUNK: tl.constexpr,
                      INT64: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // N_CB
    c = (pid % N_CB) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = c < C
    # Row sums mask pixels past M only: a row past C (c >= C) loads zeros, stays finite through
    # every pass, and is never stored.
    if ONE_CHUNK:
        t1, s1, q1 = _load_all(t_ptr, s_ptr, q_ptr, b, c, 0, C, M, t_sb, t_sc, t_sm, s_sb, s_sc, s_sm,
                               q_sb, q_sc, q_sm, HAS_SQ, BLOCK_M, INT64)

    # Pass 1: mean and M2 of T and S, each chunk's (mean, M2) merged into the running pair by
    # Chan's formula (exact centring, where a shifted sum of squares would cancel).
    mu_t = tl.zeros([BLOCK_R], tl.float32)
    mu_s = tl.zeros([BLOCK_R], tl.float32)
    m2_t = tl.zeros([BLOCK_R], tl.float32)
    m2_s = tl.zeros([BLOCK_R], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        if ONE_CHUNK:
            t, s = t1, s1
        else:
            t, s, _ = _load_all(t_ptr, s_ptr, q_ptr, b, c, m0, C, M, t_sb, t_sc, t_sm, s_sb, s_sc, s_sm,
                                q_sb, q_sc, q_sm, False, BLOCK_M, INT64)
        mask = ((m0 + tl.arange(0, BLOCK_M)) < M)[None, :]
        n_b = tl.minimum(M - m0, BLOCK_M).to(tl.float32)
        w_new = n_b / (m0 + n_b)
        w_cross = m0 * w_new
        cmu_t = tl.sum(t, axis=1) / n_b
        cmu_s = tl.sum(s, axis=1) / n_b
        dev_t = tl.where(mask, t - cmu_t[:, None], 0.0)
        dev_s = tl.where(mask, s - cmu_s[:, None], 0.0)
        jump_t = cmu_t - mu_t
        jump_s = cmu_s - mu_s
        mu_t += jump_t * w_new
        mu_s += jump_s * w_new
        m2_t += tl.sum(dev_t * dev_t, axis=1) + jump_t * jump_t * w_cross
        m2_s += tl.sum(dev_s * dev_s, axis=1) + jump_s * jump_s * w_cross
    var_s = m2_s * inv_nm1
    k_t = 1.0 / (4.0 * (m2_t * inv_nm1 + lam))
    k_s = 1.0 / (4.0 * (var_s + lam))
    if HAS_SQ:
        if HAS_DELTA:
            denom = tl.load(delta_ptr + c * delta_sc, mask=rmask, other=1.0).to(tl.float32)
        else:
            denom = tl.sqrt_rn(var_s)
        dscale = gamma / (denom + _EPS)
    else:
        dscale = tl.zeros([BLOCK_R], tl.float32)
    if ONE_CHUNK:  # the attention of a one-chunk row is computed once, for passes 2 and 3
        a_t1, a_s1, e_s1 = _attention_pair(t1, s1, q1, mu_t, k_t, mu_s, k_s, dscale, HAS_SQ)

    # Passes 2 and 3 accumulate per lane, in tiles, and reduce once after the loop.
    # Pass 2: the normalisers sum A.
    sum_t = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    sum_s = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        if ONE_CHUNK:
            a_t, a_s = a_t1, a_s1
        else:
            t, s, q = _load_all(t_ptr, s_ptr, q_ptr, b, c, m0, C, M, t_sb, t_sc, t_sm, s_sb, s_sc, s_sm,
                                q_sb, q_sc, q_sm, HAS_SQ, BLOCK_M, INT64)
            a_t, a_s, _ = _attention_pair(t, s, q, mu_t, k_t, mu_s, k_s, dscale, HAS_SQ)
        mask = ((m0 + tl.arange(0, BLOCK_M)) < M)[None, :]
        sum_t += tl.where(mask, a_t, 0.0)
        sum_s += tl.where(mask, a_s, 0.0)
    inv_sum_t = 1.0 / tl.sum(sum_t, axis=1)
    inv_sum_s = 1.0 / tl.sum(sum_s, axis=1)

    # Pass 3: the divergence and the gradient's row sums. With w = A^S (1 - A^S) = e A^2 and
    # h = G - kappa: u = w h / sum A^S. For JS, G = 1/2 log(P^S/Mx) and kappa = sum G P^S is only
    # known at the end of the pass, so sum w G d and sum w d are kept apart and combined after it
    # (kappa is second order in P^S - P^T where G is first order: no cancellation). For KL,
    # h = (P^S - P^T)/P^S directly and kappa is 0. One reciprocal serves both logs of a pixel.
    div = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    kap = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    wgd = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    wgd2 = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    wd = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    wd2 = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        if ONE_CHUNK:
            s, a_t, a_s, e_s = s1, a_t1, a_s1, e_s1
        else:
            t, s, q = _load_all(t_ptr, s_ptr, q_ptr, b, c, m0, C, M, t_sb, t_sc, t_sm, s_sb, s_sc, s_sm,
                                q_sb, q_sc, q_sm, HAS_SQ, BLOCK_M, INT64)
            a_t, a_s, e_s = _attention_pair(t, s, q, mu_t, k_t, mu_s, k_s, dscale, HAS_SQ)
        mask = ((m0 + tl.arange(0, BLOCK_M)) < M)[None, :]
        p_t = a_t * inv_sum_t[:, None]
        p_s = a_s * inv_sum_s[:, None]
        if KL:
            inv_p_s = 1.0 / p_s
            div += tl.where(mask, p_t * tl.log(p_t * inv_p_s), 0.0)
            h = (p_s - p_t) * inv_p_s
        else:
            two_over_sum = 2.0 / (p_t + p_s)  # 1 / Mx
            h = 0.5 * tl.log(p_s * two_over_sum)
            div += tl.where(mask, 0.5 * p_t * tl.log(p_t * two_over_sum), 0.0)
            kap += tl.where(mask, p_s * h, 0.0)
        d = s - mu_s[:, None]
        w = tl.where(mask, e_s * a_s * a_s, 0.0)
        wgd += w * h * d
        wgd2 += w * h * d * d
        if not KL:
            wd += w * d
            wd2 += w * d * d
    kappa = tl.sum(kap, axis=1)
    u1 = (tl.sum(wgd, axis=1) - kappa * tl.sum(wd, axis=1)) * inv_sum_s
    u2 = (tl.sum(wgd2, axis=1) - kappa * tl.sum(wd2, axis=1)) * inv_sum_s
    row = b * C + c
    stats = stats_ptr + row
    tl.store(stats + MU_T * R, mu_t, mask=rmask)
    tl.store(stats + K_T * R, k_t, mask=rmask)
    tl.store(stats + MU_S * R, mu_s, mask=rmask)
    tl.store(stats + K_S * R, k_s, mask=rmask)
    tl.store(stats + DSCALE * R, dscale, mask=rmask)
    tl.store(stats + INV_SUM_T * R, inv_sum_t, mask=rmask)
    tl.store(stats + INV_SUM_S * R, inv_sum_s, mask=rmask)
    tl.store(stats + KAPPA * R, kappa, mask=rmask)
    tl.store(stats + C1 * R, -2.0 * k_s * u1 / M, mask=rmask)
    tl.store(stats + C2 * R, -8.0 * k_s * k_s * u2 * inv_nm1, mask=rmask)
    tl.store(part_ptr + pid, tl.sum(tl.where(rmask, tl.sum(div, axis=1) + kappa, 0.0), axis=0))


@triton.jit
def _q_ada_bwd_kernel(g_ptr, t_ptr, s_ptr, q_ptr, stats_ptr, ds_ptr, C, M, R, N_CB, N_MB,
                      t_sb, t_sc, t_sm, s_sb, s_sc, s_sm, q_sb, q_sc, q_sm, row_scale,
                      HAS_SQ: tl.constexpr, KL: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_M: tl.constexpr, INT64: tl.constexpr):
    """dS_j = g (2 k u_j d_j + C1 + C2 d_j) on one [BLOCK_R, BLOCK_M] tile; u_j as in pass 3."""
    pid = tl.program_id(0)
    rb = pid // N_MB
    m0 = (pid % N_MB) * BLOCK_M
    b = rb // N_CB
    c = (rb % N_CB) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = c < C
    stats = stats_ptr + b * C + c
    mu_t = tl.load(stats + MU_T * R, mask=rmask, other=0.0)
    k_t = tl.load(stats + K_T * R, mask=rmask, other=0.0)
    mu_s = tl.load(stats + MU_S * R, mask=rmask, other=0.0)
    k_s = tl.load(stats + K_S * R, mask=rmask, other=0.0)
    dscale = tl.load(stats + DSCALE * R, mask=rmask, other=0.0)
    inv_sum_t = tl.load(stats + INV_SUM_T * R, mask=rmask, other=1.0)
    inv_sum_s = tl.load(stats + INV_SUM_S * R, mask=rmask, other=1.0)
    kappa = tl.load(stats + KAPPA * R, mask=rmask, other=0.0)
    c1 = tl.load(stats + C1 * R, mask=rmask, other=0.0)
    c2 = tl.load(stats + C2 * R, mask=rmask, other=0.0)
    t, s, q = _load_all(t_ptr, s_ptr, q_ptr, b, c, m0, C, M, t_sb, t_sc, t_sm, s_sb, s_sc, s_sm,
                        q_sb, q_sc, q_sm, HAS_SQ, BLOCK_M, INT64)
    a_t, a_s, e_s = _attention_pair(t, s, q, mu_t, k_t, mu_s, k_s, dscale, HAS_SQ)
    p_t = a_t * inv_sum_t[:, None]
    p_s = a_s * inv_sum_s[:, None]
    if KL:
        h = (p_s - p_t) / p_s
    else:
        h = 0.5 * tl.log(p_s * (2.0 / (p_t + p_s))) - kappa[:, None]
    u = e_s * a_s * a_s * h * inv_sum_s[:, None]
    scale = tl.load(g_ptr).to(tl.float32) * row_scale
    ds = ((2.0 * scale) * k_s[:, None] * u + (c2 * scale)[:, None]) * (s - mu_s[:, None]) + (c1 * scale)[:, None]
    offs, mask = _tile(b, c, m0, C, M, s_sb, s_sc, s_sm, BLOCK_M, INT64)
    tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)


def _row_strides(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """x (copied only if it is not dense or its H, W do not merge into one stride) and its
    (SB, SC, SM): the batch, channel and pixel strides of the rows of x."""
    x = _layout.dense(x)
    _, _, H, W = x.shape
    if H > 1 and W > 1 and x.stride(2) != W * x.stride(3):
        x = x.contiguous()
    sm = x.stride(3) if W > 1 else (x.stride(2) if H > 1 else 1)
    return x, (x.stride(0), x.stride(1), sm)


def _geometry(s_strides, C: int, M: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_M, num_warps) from S's layout: tiles run along c for channels-innermost
    rows, else along m; small tiles get fewer warps."""
    _, sc, sm = s_strides
    if sc == 1 and sm != 1 and C > 1:
        block_r = min(triton.next_power_of_2(C), BLOCK_C_LAST)
        block_m = min(triton.next_power_of_2(M), TILE // block_r)
    else:
        block_m = min(triton.next_power_of_2(M), TILE)
        block_r = min(triton.next_power_of_2(C), TILE // block_m)
    return block_r, block_m, max(1, block_r * block_m // (32 * ELEMS_PER_THREAD))


def _prepare(T, S, Sq):
    S, s_str = _row_strides(S)
    T, t_str = _row_strides(T)
    if Sq is None:
        q, q_str = S, s_str
    else:
        q, q_str = _row_strides(Sq)
    int64 = any(_layout.needs_int64(x) for x in (T, S, q))
    return T, S, q, (*t_str, *s_str, *q_str), int64


@torch.library.custom_op("q2kernels::q_ada", mutates_args=())
def q_ada(T: torch.Tensor, S: torch.Tensor, Sq: Optional[torch.Tensor], delta: Optional[torch.Tensor],
          lam: float, gamma: float, kl: bool, mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-row statistics [NSTAT, B*C]); the statistics are for the backward only."""
    B, C, H, W = S.shape
    M, R = H * W, B * C
    T, S, q, strides, int64 = _prepare(T, S, Sq)
    stats = torch.empty((NSTAT, R), device=S.device, dtype=torch.float32)
    block_r, block_m, num_warps = _geometry(strides[3:6], C, M)
    n_cb = triton.cdiv(C, block_r)
    part = torch.empty((B * n_cb if R else 0,), device=S.device, dtype=torch.float32)
    if R:
        has_delta = delta is not None
        delta = delta.reshape(-1) if has_delta else stats
        _q_ada_fwd_kernel[(B * n_cb,)](
            T, S, q, delta, stats, part, C, M, R, n_cb, *strides,
            delta.stride(0) if has_delta and delta.numel() > 1 else 0, float(lam), float(gamma), 1.0 / max(M - 1, 1),
            HAS_SQ=Sq is not None, HAS_DELTA=has_delta, KL=kl, BLOCK_R=block_r, BLOCK_M=block_m,
            ONE_CHUNK=M <= block_m, INT64=int64, num_warps=num_warps)
    total = part.sum()
    return (total / R if mean else total), stats


@q_ada.register_fake
def _(T, S, Sq, delta, lam, gamma, kl, mean):
    B, C = S.shape[:2]
    return S.new_empty((), dtype=torch.float32), S.new_empty((NSTAT, B * C), dtype=torch.float32)


@torch.library.custom_op("q2kernels::q_ada_backward", mutates_args=())
def q_ada_backward(g: torch.Tensor, T: torch.Tensor, S: torch.Tensor, Sq: Optional[torch.Tensor],
                   stats: torch.Tensor, kl: bool, mean: bool) -> torch.Tensor:
    """dS of q_ada for the upstream gradient g (0-d), from the forward's statistics."""
    B, C, H, W = S.shape
    M, R = H * W, B * C
    T, S, q, strides, int64 = _prepare(T, S, Sq)
    ds = torch.empty_like(S)
    if S.numel():
        block_r, block_m, num_warps = _geometry(strides[3:6], C, M)
        n_cb, n_mb = triton.cdiv(C, block_r), triton.cdiv(M, block_m)
        _q_ada_bwd_kernel[(B * n_cb * n_mb,)](
            g, T, S, q, stats, ds, C, M, R, n_cb, n_mb, *strides, (1.0 / R if mean else 1.0),
            HAS_SQ=Sq is not None, KL=kl, BLOCK_R=block_r, BLOCK_M=block_m, INT64=int64,
            num_warps=num_warps)
    return ds


@q_ada_backward.register_fake
def _(g, T, S, Sq, stats, kl, mean):
    return torch.empty_like(_row_strides(S)[0])


def _setup_context(ctx, inputs, output):
    T, S, Sq, _, _, _, kl, mean = inputs
    ctx.save_for_backward(T, S, Sq, output[1])
    ctx.kl, ctx.mean = kl, mean
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, g, _g_stats):
    T, S, Sq, stats = ctx.saved_tensors
    dS = torch.ops.q2kernels.q_ada_backward(g, T, S, Sq, stats, ctx.kl, ctx.mean)
    return None, dS, None, None, None, None, None, None


q_ada.register_autograd(_backward, setup_context=_setup_context)
