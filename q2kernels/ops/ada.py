"""Fused Q-ADA distillation loss (docs/math.md §6): one forward kernel, one backward kernel, for
both saliency forms (Q2's log(1 + z^2) and SimAM's energy: the FORM tl.constexpr; reference/ada.py
has the math of both and the derivation of the gradient).

Rows. A row is one (b, c) of a (B, C, H, W) feature: M = H*W elements at offsets
b*SB + c*SC + m*SM, m = h*W + w. NCHW has (SC, SM) = (M, 1); channels_last has (1, C). Each of T,
S, Sq, Tq is read with its own strides, so neither layout (nor a mix) is ever copied. A program owns
BLOCK_R rows of one image (channels c0 .. c0+BLOCK_R-1 of batch b) and walks their pixels in
chunks of BLOCK_M: [BLOCK_R, BLOCK_M] tiles, contiguous along m for NCHW (BLOCK_R = 1 for long
rows, several rows for short ones) and along c for channels_last (BLOCK_R = 16 channels, a full
32-byte sector of a bf16 pixel). Rows of any length run through the same chunked loops; a row
that fits one chunk (M <= BLOCK_M, ONE_CHUNK) is loaded once and kept in registers for all passes.

Forward, per program, three passes over its rows (fp32 accumulation whatever the input dtype):
  1. mean and M2 of T and S (chunk statistics merged with Chan's formula: one read, no
     cancellation of a sum of squares);
  2. the normalisers sum A^T, sum A^S (reads T, S, Sq, Tq);
  3. the divergence, and the two row sums the gradient needs, V1 = sum v d and V2 = sum v d^2.
It writes per-row statistics (NSTAT floats per row) and one loss partial per program; the loss is
a torch sum of the partials: deterministic, no atomics, no host sync, no full-size intermediate.

Backward: recompute, from the saved per-row statistics, rather than store dS in the forward. The
sums V1 and V2 are complete at the end of forward pass 3, so dS_j is elementwise given the row's
statistics: the backward is one pass that reads T, S, Sq, Tq once and writes dS once, parallel over
(rows x chunks) in either layout. Storing dS instead would need a fourth forward pass (V1, V2 are
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

from ..constants import DISTORTION_EPS, KAPPA
from . import _layout
from ._triton_utils import cast_to

# Per-row statistics saved by the forward for the backward, rows of a [NSTAT, B*C] fp32 tensor.
NSTAT = 11
MU_T, K_T, MU_S, K_S, RINV_T, RINV_S, INV_SUM_T, INV_SUM_S, HBAR, C1, C2 = (tl.constexpr(i) for i in range(NSTAT))

# The saliency form, a tl.constexpr of every kernel: SimAM's energy or Q2's log(1 + z^2).
SIMAM: tl.constexpr = tl.constexpr(0)
Q2: tl.constexpr = tl.constexpr(1)
_FORM_ID = {"simam": SIMAM.value, "q2": Q2.value}

# Tile size and threads. A tile is TILE elements, ELEMS_PER_THREAD of them per thread (8 warps at
# 2048): pass 3 then keeps T/S/Sq-derived tiles and six accumulator tiles live in 75-136 registers
# (sm_90, bf16, simam form, no spills; see benchmarks/bench_qada.py --sweep to retune both on a GPU).
TILE = 2048
ELEMS_PER_THREAD = 8
# Channels per program for channels_last: 16 bf16/fp16 values are one 32-byte sector per pixel.
BLOCK_C_LAST = 16

_EPS: tl.constexpr = tl.constexpr(DISTORTION_EPS)

# What the kernels pass between their helpers, grouped as the formulas use it (docs/math.md §6):
# - a feature X (T, S, Sq or Tq): the tuple (ptr, SB, SC, SM), its base pointer and its (batch,
#   channel, pixel) strides: X[b, c, m] is at ptr + b*SB + c*SC + m*SM (_tile);
# - feats = (T, S, Sq, Tq), the four features (S's stands in for an absent Sq or Tq: never read);
# - rows = (b, c, C, M), the rows of a program: image b, channels c (a [BLOCK_R] vector), and the
#   bounds (rows c < C exist, pixels m < M);
# - att_t, att_s: each side's row constants of its attention, (mu, k, rinv) (_attention_pair);
#   gamma, the distortion term's weight, is both sides';
# - one = (S, A^T, A^S, dA^S/dw): the tiles of a one-chunk row, computed once before passes 2 and 3
#   (ONE_CHUNK), else stand-ins that are never read.


@triton.jit
def _tile(X, rows, m0, BLOCK_M: tl.constexpr, INT64: tl.constexpr):
    """Offsets into feature X [BLOCK_R, BLOCK_M] of pixels m0.. of the rows, and their mask."""
    _, sb, sc, sm = X
    b, c, C, M = rows
    m = m0 + tl.arange(0, BLOCK_M)
    mask = (c < C)[:, None] & (m < M)[None, :]
    if INT64:
        b = b.to(tl.int64)
        c = c.to(tl.int64)
        m = m.to(tl.int64)
    return b * sb + (c * sc)[:, None] + (m * sm)[None, :], mask


@triton.jit
def _pixel_mask(m0, M, BLOCK_M: tl.constexpr):
    """[1, BLOCK_M]: which pixels of the chunk at m0 exist (m < M). Row sums mask these only: a row past C
    loads zeros, stays finite, and is never stored."""
    return ((m0 + tl.arange(0, BLOCK_M)) < M)[None, :]


@triton.jit
def _load(X, rows, m0, BLOCK_M: tl.constexpr, INT64: tl.constexpr):
    """The [BLOCK_R, BLOCK_M] tile of feature X at pixel m0, in fp32 (0 outside the rows and pixels)."""
    offs, mask = _tile(X, rows, m0, BLOCK_M, INT64)
    ptr, _, _, _ = X
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_all(feats, rows, m0, HAS_SQ: tl.constexpr, HAS_TQ: tl.constexpr, BLOCK_M: tl.constexpr,
              INT64: tl.constexpr):
    """The tiles of T, S, Sq and Tq at pixel m0 (S stands in for an absent one)."""
    T, S, Sq, Tq = feats
    t = _load(T, rows, m0, BLOCK_M, INT64)
    s = _load(S, rows, m0, BLOCK_M, INT64)
    q = s
    tq = s
    if HAS_SQ:
        q = _load(Sq, rows, m0, BLOCK_M, INT64)
    if HAS_TQ:
        tq = _load(Tq, rows, m0, BLOCK_M, INT64)
    return t, s, q, tq


@triton.jit
def _distortion(x, xq, rinv, gamma, FORM: tl.constexpr):
    """g, the distortion term of one side: r = |x - xq| / (Delta + eps) (rinv = 1 / (Delta + eps)),
    g = gamma log(1 + r^2) for Q2, gamma r for SimAM."""
    r = tl.abs(xq - x) * rinv[:, None]
    if FORM == Q2:
        g = gamma * tl.log(1.0 + r * r)
    else:
        g = gamma * r
    return g


@triton.jit
def _attention(x, mu, k, g, FORM: tl.constexpr):
    """(A, dA/dw): A = sigmoid(score), w = (x - mu)^2 k, score = log(1 + w) + g (Q2) or
    w + 1/2 + g (SimAM). dA/dw = A (1 - A) f'(w) = e A^2 f'(w) with e = exp(-score) <= 1
    (score >= 0), which keeps its precision where A is near 1."""
    d = x - mu[:, None]
    w = d * d * k[:, None]
    if FORM == Q2:
        e = tl.exp(-(tl.log(1.0 + w) + g))
        a = 1.0 / (1.0 + e)
        dadw = e * a * a / (1.0 + w)
    else:
        e = tl.exp(-(w + 0.5 + g))
        a = 1.0 / (1.0 + e)
        dadw = e * a * a
    return a, dadw


@triton.jit
def _attention_pair(t, s, q, tq, att_t, att_s, gamma,
                    FORM: tl.constexpr, HAS_SQ: tl.constexpr, HAS_TQ: tl.constexpr):
    """(A^T, A^S, dA^S/dw) of the tiles t, s (q, tq: their quantized versions). The student's
    distortion term comes from Sq; the teacher's from its own Tq ("own") or, without Tq, is the
    student's ("shared"); 0 without Sq."""
    mu_t, k_t, rinv_t = att_t
    mu_s, k_s, rinv_s = att_s
    g_s = 0.0
    if HAS_SQ:
        g_s = _distortion(s, q, rinv_s, gamma, FORM)
    g_t = g_s
    if HAS_TQ:
        g_t = _distortion(t, tq, rinv_t, gamma, FORM)
    a_t, _ = _attention(t, mu_t, k_t, g_t, FORM)
    a_s, dadw_s = _attention(s, mu_s, k_s, g_s, FORM)
    return a_t, a_s, dadw_s


@triton.jit
def _row_scales(m2_t, m2_s, inv_nm1, eps, FORM: tl.constexpr):
    """(k_T, k_S, sd_T, sd_S) of a row from its M2: w = d^2 k, with k = 1/(sd + kappa)^2 (Q2) or
    1/(4 (var + lam)) (SimAM); eps is kappa for Q2, lam for SimAM."""
    var_t = m2_t * inv_nm1
    var_s = m2_s * inv_nm1
    sd_t = tl.sqrt_rn(var_t)
    sd_s = tl.sqrt_rn(var_s)
    if FORM == Q2:
        k_t = 1.0 / ((sd_t + eps) * (sd_t + eps))
        k_s = 1.0 / ((sd_s + eps) * (sd_s + eps))
    else:
        k_t = 1.0 / (4.0 * (var_t + eps))
        k_s = 1.0 / (4.0 * (var_s + eps))
    return k_t, k_s, sd_t, sd_s


@triton.jit
def _dk_times(v2, k_s, sd_s, eps, FORM: tl.constexpr):
    """k' V2, k' = dk/dvar: -4 k^2 V2 (SimAM); -k/(sd + kappa) (V2/sd) (Q2), 0 where sd = 0 (every
    d is 0 there). V2/sd <= max|v| (M-1) sd stays finite where a tiny sd would overflow k'."""
    if FORM == Q2:
        has_sd = sd_s > 0.0
        r = tl.where(has_sd, -k_s / (sd_s + eps) * (v2 / tl.where(has_sd, sd_s, 1.0)), 0.0)
    else:
        r = -4.0 * k_s * k_s * v2
    return r


@triton.jit
def _row_moments(T, S, rows, t1, s1, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, ONE_CHUNK: tl.constexpr,
                 INT64: tl.constexpr):
    """Pass 1: (mu_T, M2_T, mu_S, M2_S) of the rows, M2 = sum (X - mu)^2. Each chunk's (mean, M2) is
    merged into the running pair by Chan's formula (exact centring, where a shifted sum of squares
    would cancel). t1, s1: the tiles of a one-chunk row."""
    _, _, _, M = rows
    mu_t = tl.zeros([BLOCK_R], tl.float32)
    mu_s = tl.zeros([BLOCK_R], tl.float32)
    m2_t = tl.zeros([BLOCK_R], tl.float32)
    m2_s = tl.zeros([BLOCK_R], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        if ONE_CHUNK:
            t, s = t1, s1
        else:
            t = _load(T, rows, m0, BLOCK_M, INT64)
            s = _load(S, rows, m0, BLOCK_M, INT64)
        mask = _pixel_mask(m0, M, BLOCK_M)
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
    return mu_t, m2_t, mu_s, m2_s


@triton.jit
def _distortion_rinv(delta_ptr, c, delta_sc, rmask, sd_t, sd_s, eps, FORM: tl.constexpr, HAS_DELTA: tl.constexpr):
    """(rinv_T, rinv_S) = 1 / (Delta + eps) of each side's distortion term: Delta_c, or the row's own sd
    without it; eps is kappa for Q2, 1e-6 (DISTORTION_EPS) for SimAM."""
    if FORM == Q2:
        r_eps = eps
    else:
        r_eps = _EPS
    if HAS_DELTA:
        den_s = tl.load(delta_ptr + c * delta_sc, mask=rmask, other=1.0).to(tl.float32)
        den_t = den_s
    else:
        den_s = sd_s
        den_t = sd_t
    rinv_s = 1.0 / (den_s + r_eps)
    rinv_t = 1.0 / (den_t + r_eps)
    return rinv_t, rinv_s


@triton.jit
def _chunk_attention(feats, rows, m0, att_t, att_s, gamma, one, FORM: tl.constexpr, HAS_SQ: tl.constexpr,
                     HAS_TQ: tl.constexpr, BLOCK_M: tl.constexpr, ONE_CHUNK: tl.constexpr, INT64: tl.constexpr):
    """(S, A^T, A^S, dA^S/dw, pixel mask) of the chunk at pixel m0: loaded and computed, or, for a
    one-chunk row, those computed once before passes 2 and 3 (one)."""
    if ONE_CHUNK:
        s, a_t, a_s, dadw = one
    else:
        t, s, q, tq = _load_all(feats, rows, m0, HAS_SQ, HAS_TQ, BLOCK_M, INT64)
        a_t, a_s, dadw = _attention_pair(t, s, q, tq, att_t, att_s, gamma, FORM, HAS_SQ, HAS_TQ)
    _, _, _, M = rows
    return s, a_t, a_s, dadw, _pixel_mask(m0, M, BLOCK_M)


@triton.jit
def _attention_sums(feats, rows, att_t, att_s, gamma, one, FORM: tl.constexpr, HAS_SQ: tl.constexpr,
                    HAS_TQ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, ONE_CHUNK: tl.constexpr,
                    INT64: tl.constexpr):
    """Pass 2: the normalisers (1 / sum A^T, 1 / sum A^S) of the rows, summed per lane in tiles and
    reduced once after the loop."""
    _, _, _, M = rows
    sum_t = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    sum_s = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        _s, a_t, a_s, _dadw, mask = _chunk_attention(feats, rows, m0, att_t, att_s, gamma, one,
                                                     FORM, HAS_SQ, HAS_TQ, BLOCK_M, ONE_CHUNK, INT64)
        sum_t += tl.where(mask, a_t, 0.0)
        sum_s += tl.where(mask, a_s, 0.0)
    return 1.0 / tl.sum(sum_t, axis=1), 1.0 / tl.sum(sum_s, axis=1)


@triton.jit
def _divergence_terms(p_t, p_s, KL: tl.constexpr):
    """(the divergence's term, h) of each pixel. KL: P^T log(P^T/P^S), and h = (P^S - P^T)/P^S. JS:
    1/2 P^T log(P^T/Mx), and h = G = 1/2 log(P^S/Mx), whose sum weighted by P^S (hbar) is the
    divergence's other half. One reciprocal serves both logs of a pixel."""
    if KL:
        inv_p_s = 1.0 / p_s
        term = p_t * tl.log(p_t * inv_p_s)
        h = (p_s - p_t) * inv_p_s
    else:
        two_over_sum = 2.0 / (p_t + p_s)  # 1 / Mx
        h = 0.5 * tl.log(p_s * two_over_sum)
        term = 0.5 * p_t * tl.log(p_t * two_over_sum)
    return term, h


@triton.jit
def _divergence_sums(feats, rows, att_t, att_s, gamma, inv_sum_t, inv_sum_s, one, FORM: tl.constexpr,
                     HAS_SQ: tl.constexpr, HAS_TQ: tl.constexpr, KL: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_M: tl.constexpr, ONE_CHUNK: tl.constexpr, INT64: tl.constexpr):
    """Pass 3: the divergence's terms but hbar (summed per lane), and hbar, V1 = sum v d and
    V2 = sum v d^2 of each row, with dA/dw as in _attention, h = G - hbar and v = dA/dw h / sum A^S.
    For JS, hbar = sum G P^S is only known at the end of the pass, so sum w G d and sum w d are kept
    apart and combined after it (hbar is second order in P^S - P^T where G is first order: no
    cancellation); for KL, h = (P^S - P^T)/P^S directly and hbar is 0."""
    _, _, _, M = rows
    mu_s, _, _ = att_s
    div = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    hb = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    wgd = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    wgd2 = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    wd = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    wd2 = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        s, a_t, a_s, dadw, mask = _chunk_attention(feats, rows, m0, att_t, att_s, gamma, one,
                                                   FORM, HAS_SQ, HAS_TQ, BLOCK_M, ONE_CHUNK, INT64)
        p_t = a_t * inv_sum_t[:, None]
        p_s = a_s * inv_sum_s[:, None]
        term, h = _divergence_terms(p_t, p_s, KL)
        div += tl.where(mask, term, 0.0)
        if not KL:
            hb += tl.where(mask, p_s * h, 0.0)
        d = s - mu_s[:, None]
        w = tl.where(mask, dadw, 0.0)
        wgd += w * h * d
        wgd2 += w * h * d * d
        if not KL:
            wd += w * d
            wd2 += w * d * d
    hbar = tl.sum(hb, axis=1)
    v1 = (tl.sum(wgd, axis=1) - hbar * tl.sum(wd, axis=1)) * inv_sum_s
    v2 = (tl.sum(wgd2, axis=1) - hbar * tl.sum(wd2, axis=1)) * inv_sum_s
    return div, hbar, v1, v2


@triton.jit
def _store_row_stats(stats, R, rmask, M, att_t, att_s, sd_s, inv_sum_t, inv_sum_s, hbar, v1, v2, eps, inv_nm1,
                     FORM: tl.constexpr):
    """The NSTAT per-row statistics the backward recomputes dS from, row i of each at stats + i*R; with
    the gradient's row constants C1 and C2 of dS_j = g (2 k v_j d_j + C1 + C2 d_j)."""
    mu_t, k_t, rinv_t = att_t
    mu_s, k_s, rinv_s = att_s
    tl.store(stats + MU_T * R, mu_t, mask=rmask)
    tl.store(stats + K_T * R, k_t, mask=rmask)
    tl.store(stats + MU_S * R, mu_s, mask=rmask)
    tl.store(stats + K_S * R, k_s, mask=rmask)
    tl.store(stats + RINV_T * R, rinv_t, mask=rmask)
    tl.store(stats + RINV_S * R, rinv_s, mask=rmask)
    tl.store(stats + INV_SUM_T * R, inv_sum_t, mask=rmask)
    tl.store(stats + INV_SUM_S * R, inv_sum_s, mask=rmask)
    tl.store(stats + HBAR * R, hbar, mask=rmask)
    tl.store(stats + C1 * R, -2.0 * k_s * v1 / M, mask=rmask)
    tl.store(stats + C2 * R, 2.0 * _dk_times(v2, k_s, sd_s, eps, FORM) * inv_nm1, mask=rmask)


@triton.jit
def _load_row_stats(stats, R, rmask):
    """What _store_row_stats wrote for the rows: (att_t, att_s, 1 / sum A^T, 1 / sum A^S, hbar, C1, C2)."""
    mu_t = tl.load(stats + MU_T * R, mask=rmask, other=0.0)
    k_t = tl.load(stats + K_T * R, mask=rmask, other=0.0)
    mu_s = tl.load(stats + MU_S * R, mask=rmask, other=0.0)
    k_s = tl.load(stats + K_S * R, mask=rmask, other=0.0)
    rinv_t = tl.load(stats + RINV_T * R, mask=rmask, other=0.0)
    rinv_s = tl.load(stats + RINV_S * R, mask=rmask, other=0.0)
    inv_sum_t = tl.load(stats + INV_SUM_T * R, mask=rmask, other=1.0)
    inv_sum_s = tl.load(stats + INV_SUM_S * R, mask=rmask, other=1.0)
    hbar = tl.load(stats + HBAR * R, mask=rmask, other=0.0)
    c1 = tl.load(stats + C1 * R, mask=rmask, other=0.0)
    c2 = tl.load(stats + C2 * R, mask=rmask, other=0.0)
    return (mu_t, k_t, rinv_t), (mu_s, k_s, rinv_s), inv_sum_t, inv_sum_s, hbar, c1, c2


@triton.jit
def _q_ada_fwd_kernel(t_ptr,      # [B, C, H, W] teacher, any dtype, strides (t_sb, t_sc, t_sm)
                      s_ptr,      # [B, C, H, W] student, strides (s_sb, s_sc, s_sm)
                      q_ptr,      # [B, C, H, W] Sq, strides (q_sb, q_sc, q_sm); read if HAS_SQ
                      tq_ptr,     # [B, C, H, W] Tq, strides (tq_sb, tq_sc, tq_sm); read if HAS_TQ
                      delta_ptr,  # [1] or [C] the step Delta, element stride delta_sc; read if HAS_DELTA
                      stats_ptr,  # [NSTAT, R] fp32 out: per-row statistics for the backward
                      part_ptr,   # [B * N_CB] fp32 out: one loss partial per program
                      C, M, R, N_CB,  # channels, pixels per row, rows B*C, channel blocks per image
                      t_sb, t_sc, t_sm, s_sb, s_sc, s_sm, q_sb, q_sc, q_sm, tq_sb, tq_sc, tq_sm, delta_sc,
                      eps,      # lam (SimAM) or kappa (Q2)
                      gamma,    # weight of the distortion term
                      inv_nm1,  # 1 / max(M - 1, 1)
                      FORM: tl.constexpr, HAS_SQ: tl.constexpr, HAS_TQ: tl.constexpr,
                      HAS_DELTA: tl.constexpr, KL: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, ONE_CHUNK: tl.constexpr,
                      INT64: tl.constexpr):
    """docs/math.md §6 on BLOCK_R rows of image b: the rows' moments, their scores' scales, the
    normalisers, the divergence and the gradient's row sums; the per-row statistics, and the program's
    loss partial."""
    pid = tl.program_id(0)
    b = pid // N_CB
    c = (pid % N_CB) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = c < C
    rows = (b, c, C, M)
    T = (t_ptr, t_sb, t_sc, t_sm)
    S = (s_ptr, s_sb, s_sc, s_sm)
    feats = (T, S, (q_ptr, q_sb, q_sc, q_sm), (tq_ptr, tq_sb, tq_sc, tq_sm))
    if ONE_CHUNK:  # the row is loaded once, for all three passes
        t1, s1, q1, tq1 = _load_all(feats, rows, 0, HAS_SQ, HAS_TQ, BLOCK_M, INT64)
    else:  # each pass loads its chunks: stand-ins, never read
        t1, s1, q1, tq1 = 0.0, 0.0, 0.0, 0.0

    mu_t, m2_t, mu_s, m2_s = _row_moments(T, S, rows, t1, s1, BLOCK_R, BLOCK_M, ONE_CHUNK, INT64)
    k_t, k_s, sd_t, sd_s = _row_scales(m2_t, m2_s, inv_nm1, eps, FORM)
    rinv_t, rinv_s = _distortion_rinv(delta_ptr, c, delta_sc, rmask, sd_t, sd_s, eps, FORM, HAS_DELTA)
    att_t = (mu_t, k_t, rinv_t)
    att_s = (mu_s, k_s, rinv_s)
    if ONE_CHUNK:  # the attention of a one-chunk row is computed once, for passes 2 and 3
        a_t1, a_s1, dadw1 = _attention_pair(t1, s1, q1, tq1, att_t, att_s, gamma, FORM, HAS_SQ, HAS_TQ)
        one = (s1, a_t1, a_s1, dadw1)
    else:
        one = (0.0, 0.0, 0.0, 0.0)

    inv_sum_t, inv_sum_s = _attention_sums(feats, rows, att_t, att_s, gamma, one,
                                           FORM, HAS_SQ, HAS_TQ, BLOCK_R, BLOCK_M, ONE_CHUNK, INT64)
    div, hbar, v1, v2 = _divergence_sums(feats, rows, att_t, att_s, gamma, inv_sum_t, inv_sum_s, one,
                                         FORM, HAS_SQ, HAS_TQ, KL, BLOCK_R, BLOCK_M, ONE_CHUNK, INT64)
    _store_row_stats(stats_ptr + (b * C + c), R, rmask, M, att_t, att_s, sd_s, inv_sum_t, inv_sum_s, hbar, v1, v2,
                     eps, inv_nm1, FORM)
    tl.store(part_ptr + pid, tl.sum(tl.where(rmask, tl.sum(div, axis=1) + hbar, 0.0), axis=0))


@triton.jit
def _gradient_h(p_t, p_s, hbar, KL: tl.constexpr):
    """h_j of v_j = dA/dw h_j / sum A^S (pass 3): (P^S - P^T)/P^S for KL, G - hbar = 1/2 log(P^S/Mx) -
    hbar for JS. Not _divergence_terms' h: that one multiplies by the reciprocal it shares with the
    divergence's term where this divides (the last bit can differ); dS has always been computed so."""
    if KL:
        h = (p_s - p_t) / p_s
    else:
        h = 0.5 * tl.log(p_s * (2.0 / (p_t + p_s))) - hbar[:, None]
    return h


@triton.jit
def _q_ada_bwd_kernel(g_ptr,      # [] upstream gradient of the loss
                      t_ptr, s_ptr, q_ptr, tq_ptr,  # [B, C, H, W] T, S, Sq, Tq as in the forward
                      stats_ptr,  # [NSTAT, R] fp32: the forward's per-row statistics
                      ds_ptr,     # [B, C, H, W] out: dS, S's dtype and strides
                      C, M, R, N_CB, N_MB,  # channels, pixels per row, rows, channel and pixel blocks
                      t_sb, t_sc, t_sm, s_sb, s_sc, s_sm, q_sb, q_sc, q_sm, tq_sb, tq_sc, tq_sm,
                      gamma,      # weight of the distortion term
                      row_scale,  # 1/R for a mean over rows, else 1
                      FORM: tl.constexpr, HAS_SQ: tl.constexpr, HAS_TQ: tl.constexpr, KL: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, INT64: tl.constexpr):
    """dS_j = g (2 k v_j d_j + C1 + C2 d_j) on one [BLOCK_R, BLOCK_M] tile; v_j as in pass 3."""
    pid = tl.program_id(0)
    rb = pid // N_MB
    m0 = (pid % N_MB) * BLOCK_M
    b = rb // N_CB
    c = (rb % N_CB) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = c < C
    rows = (b, c, C, M)
    S = (s_ptr, s_sb, s_sc, s_sm)
    feats = ((t_ptr, t_sb, t_sc, t_sm), S, (q_ptr, q_sb, q_sc, q_sm), (tq_ptr, tq_sb, tq_sc, tq_sm))
    att_t, att_s, inv_sum_t, inv_sum_s, hbar, c1, c2 = _load_row_stats(stats_ptr + b * C + c, R, rmask)
    mu_s, k_s, _ = att_s
    t, s, q, tq = _load_all(feats, rows, m0, HAS_SQ, HAS_TQ, BLOCK_M, INT64)
    a_t, a_s, dadw = _attention_pair(t, s, q, tq, att_t, att_s, gamma, FORM, HAS_SQ, HAS_TQ)
    h = _gradient_h(a_t * inv_sum_t[:, None], a_s * inv_sum_s[:, None], hbar, KL)
    v = dadw * h * inv_sum_s[:, None]
    scale = tl.load(g_ptr).to(tl.float32) * row_scale
    ds = ((2.0 * scale) * k_s[:, None] * v + (c2 * scale)[:, None]) * (s - mu_s[:, None]) + (c1 * scale)[:, None]
    offs, mask = _tile(S, rows, m0, BLOCK_M, INT64)  # dS has S's strides
    tl.store(ds_ptr + offs, cast_to(ds, ds_ptr.dtype.element_ty), mask=mask)


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


def _prepare(T, S, Sq, Tq):
    """(T, S, Sq, Tq, their 12 strides, int64): S stands in for an absent Sq or Tq (never read)."""
    S, s_str = _layout.rows(S)
    T, t_str = _layout.rows(T)
    q, q_str = (S, s_str) if Sq is None else _layout.rows(Sq)
    tq, tq_str = (S, s_str) if Tq is None else _layout.rows(Tq)
    int64 = any(_layout.needs_int64(x) for x in (T, S, q, tq))
    return T, S, q, tq, (*t_str, *s_str, *q_str, *tq_str), int64


def _form_id(form: str) -> int:
    if form not in _FORM_ID:
        raise ValueError(f"form: expected one of {tuple(_FORM_ID)}, got {form!r}")
    return _FORM_ID[form]


@torch.library.custom_op("q2kernels::q_ada", mutates_args=())
def q_ada(T: torch.Tensor, S: torch.Tensor, Sq: Optional[torch.Tensor], delta: Optional[torch.Tensor],
          lam: float, gamma: float, kl: bool, mean: bool, Tq: Optional[torch.Tensor] = None,
          form: str = "simam", kappa: float = KAPPA) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-row statistics [NSTAT, B*C]); the statistics are for the backward only. Tq
    (needs Sq) gives the teacher its own distortion term; lam is SimAM's, kappa Q2's."""
    B, C, H, W = S.shape
    M, R = H * W, B * C
    if R and not M:  # rows of no pixels have no attention distribution (q2kernels.functional refuses them too)
        raise ValueError(f"S: expected a (B, C, H, W) tensor with H*W >= 1, got shape {tuple(S.shape)}")
    form_id = _form_id(form)
    T, S, q, tq, strides, int64 = _prepare(T, S, Sq, Tq)
    stats = torch.empty((NSTAT, R), device=S.device, dtype=torch.float32)
    part = torch.zeros((0,), device=S.device, dtype=torch.float32)
    # No rows (B or C is 0): nothing to launch, and no geometry (a 0-channel tile is 0 wide). The
    # loss of no rows is 0 under either reduction, as the reference defines it.
    if R:
        block_r, block_m, num_warps = _geometry(strides[3:6], C, M)
        n_cb = triton.cdiv(C, block_r)
        part = torch.empty((B * n_cb,), device=S.device, dtype=torch.float32)
        has_delta = delta is not None
        delta = delta.reshape(-1) if has_delta else stats
        _q_ada_fwd_kernel[(B * n_cb,)](
            T, S, q, tq, delta, stats, part, C, M, R, n_cb, *strides,
            delta.stride(0) if has_delta and delta.numel() > 1 else 0,
            float(kappa if form == "q2" else lam), float(gamma), 1.0 / max(M - 1, 1),
            FORM=form_id, HAS_SQ=Sq is not None, HAS_TQ=Tq is not None, HAS_DELTA=has_delta, KL=kl,
            BLOCK_R=block_r, BLOCK_M=block_m, ONE_CHUNK=M <= block_m, INT64=int64, num_warps=num_warps)
    total = part.sum()
    return (total / max(R, 1) if mean else total), stats


@q_ada.register_fake
def _(T, S, Sq, delta, lam, gamma, kl, mean, Tq=None, form="simam", kappa=KAPPA):
    B, C = S.shape[:2]
    return S.new_empty((), dtype=torch.float32), S.new_empty((NSTAT, B * C), dtype=torch.float32)


@torch.library.custom_op("q2kernels::q_ada_backward", mutates_args=())
def q_ada_backward(g: torch.Tensor, T: torch.Tensor, S: torch.Tensor, Sq: Optional[torch.Tensor],
                   Tq: Optional[torch.Tensor], stats: torch.Tensor, form: str, gamma: float, kl: bool,
                   mean: bool) -> torch.Tensor:
    """dS of q_ada for the upstream gradient g (0-d), from the forward's statistics."""
    B, C, H, W = S.shape
    M, R = H * W, B * C
    form_id = _form_id(form)
    T, S, q, tq, strides, int64 = _prepare(T, S, Sq, Tq)
    ds = torch.empty_like(S)
    if S.numel():
        block_r, block_m, num_warps = _geometry(strides[3:6], C, M)
        n_cb, n_mb = triton.cdiv(C, block_r), triton.cdiv(M, block_m)
        _q_ada_bwd_kernel[(B * n_cb * n_mb,)](
            g, T, S, q, tq, stats, ds, C, M, R, n_cb, n_mb, *strides, float(gamma),
            (1.0 / R if mean else 1.0),
            FORM=form_id, HAS_SQ=Sq is not None, HAS_TQ=Tq is not None, KL=kl, BLOCK_R=block_r,
            BLOCK_M=block_m, INT64=int64, num_warps=num_warps)
    return ds


@q_ada_backward.register_fake
def _(g, T, S, Sq, Tq, stats, form, gamma, kl, mean):
    return torch.empty_like(_layout.rows(S)[0])


def _setup_context(ctx, inputs, output):
    T, S, Sq, _, _, gamma, kl, mean, Tq, form, _ = inputs
    ctx.save_for_backward(T, S, Sq, Tq, output[1])
    ctx.form, ctx.gamma, ctx.kl, ctx.mean = form, gamma, kl, mean
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, g, _g_stats):
    T, S, Sq, Tq, stats = ctx.saved_tensors
    dS = torch.ops.q2kernels.q_ada_backward(g, T, S, Sq, Tq, stats, ctx.form, ctx.gamma, ctx.kl, ctx.mean)
    return None, dS, None, None, None, None, None, None, None, None, None


q_ada.register_autograd(_backward, setup_context=_setup_context)
