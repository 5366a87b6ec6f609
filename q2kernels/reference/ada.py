"""Eager reference of the Q-ADA distillation loss (MATH.md section 6).

Per row (b, c) of a (B, C, H, W) feature, M = H*W, for X in {T, S}:
    mu = mean X,  var = sum (X - mu)^2 / max(M - 1, 1),  z = (X - mu)^2 / (4 (var + lam)) + 1/2,
    score = z + gamma * delta,  A = sigmoid(score),  P = A / sum A,
with the distortion map delta = |Sq - S| / (Delta_c + 1e-6) (or / (sqrt(var_S) + 1e-6) without
Delta; 0 without Sq), shared by teacher and student. Divergence per row: JS(P^T, P^S) or
KL(P^T || P^S); the loss is their mean (or sum) over the B*C rows, returned as a 0-d fp32 tensor.

Gradient: dS only. T, Sq and Delta are constants, and so is the distortion map delta (also where
it divides by sqrt(var_S)): it re-weights the supervision and is not itself trained. With
z_i = d_i^2 k + 1/2, d = S - mu_S, k = 1/(4 (var_S + lam)), and u_i = dL/dz_i:
    dS_j = 2 k (u_j d_j - (1/M) sum_i u_i d_i) - 8 k^2 d_j (sum_i u_i d_i^2) / max(M - 1, 1)
(the mean term of dvar/dS vanishes because sum_i d_i = 0). Through P = A / sum A and the sigmoid,
u_i = A_i (1 - A_i) (G_i - sum_j G_j P^S_j) / sum A^S with G = dL/dP^S:
    JS: G_i = 1/2 log(P^S_i / Mx_i);  KL: G_i = -P^T_i / P^S_i, so G_i - sum_j G_j P^S_j is
    (P^S_i - P^T_i) / P^S_i, written that way because -P^T/P^S + 1 cancels when S is near T.
A (1 - A) is computed as e A^2 with e = exp(-score), which keeps its precision where A is near 1.

Written for clarity in plain fp32 PyTorch (fp16/bf16 inputs are upcast first, so a sum of squares
that would overflow fp16 is exact to fp32). It never imports from q2kernels.ops.
"""
from __future__ import annotations

import torch

from ..constants import DISTORTION_EPS

LAMBDA = 1e-4           # SimAM's lambda
DIVERGENCES = ("js", "kl")
REDUCTIONS = ("mean", "sum")

_ROW = (2, 3)


def _centered(x: torch.Tensor):
    """(x - mu, var) per row, var unbiased with max(M - 1, 1) (finite for 1x1 maps)."""
    m = x.shape[2] * x.shape[3]
    d = x - x.mean(dim=_ROW, keepdim=True)
    var = d.square().sum(dim=_ROW, keepdim=True) / max(m - 1, 1)
    return d, var


def _attention(d, var, lam, gd):
    """(A, e, k): A = sigmoid(z + gd), e = exp(-(z + gd)), k = 1/(4 (var + lam))."""
    k = 1.0 / (4.0 * (var + lam))
    e = torch.exp(-(d * d * k + 0.5 + gd))
    return 1.0 / (1.0 + e), e, k


def _distortion(S, Sq, delta, var_s, gamma):
    """gamma * delta: 0 without Sq; a constant of the loss (no gradient)."""
    if Sq is None:
        return 0.0
    denom = torch.sqrt(var_s) if delta is None else delta.float().reshape(1, -1, 1, 1)
    return gamma * ((Sq.float() - S).abs() / (denom + DISTORTION_EPS))


def _forward_terms(T, S, Sq, delta, lam, gamma):
    t, s = T.float(), S.float()
    d_t, var_t = _centered(t)
    d_s, var_s = _centered(s)
    gd = _distortion(s, Sq, delta, var_s, gamma)
    a_t, _, _ = _attention(d_t, var_t, lam, gd)
    a_s, e_s, k_s = _attention(d_s, var_s, lam, gd)
    sum_s = a_s.sum(dim=_ROW, keepdim=True)
    p_t = a_t / a_t.sum(dim=_ROW, keepdim=True)
    p_s = a_s / sum_s
    return p_t, p_s, a_s, e_s, k_s, d_s, sum_s


class _QADA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, T, S, Sq, delta, lam, gamma, kl, mean):
        p_t, p_s, *_ = _forward_terms(T, S, Sq, delta, lam, gamma)
        if kl:
            rows = (p_t * torch.log(p_t / p_s)).sum(dim=_ROW)
        else:
            mx = 0.5 * (p_t + p_s)
            rows = 0.5 * (p_t * torch.log(p_t / mx) + p_s * torch.log(p_s / mx)).sum(dim=_ROW)
        ctx.save_for_backward(T, S, Sq, delta)
        ctx.lam, ctx.gamma, ctx.kl, ctx.mean = lam, gamma, kl, mean
        return rows.mean() if mean else rows.sum()

    @staticmethod
    def backward(ctx, g):
        T, S, Sq, delta = ctx.saved_tensors
        p_t, p_s, a_s, e_s, k_s, d_s, sum_s = _forward_terms(T, S, Sq, delta, ctx.lam, ctx.gamma)
        if ctx.kl:
            h = (p_s - p_t) / p_s
        else:
            grad_p = 0.5 * torch.log(p_s / (0.5 * (p_t + p_s)))
            h = grad_p - (grad_p * p_s).sum(dim=_ROW, keepdim=True)
        u = e_s * a_s * a_s * h / sum_s
        m = S.shape[2] * S.shape[3]
        u1 = (u * d_s).sum(dim=_ROW, keepdim=True)
        u2 = (u * d_s * d_s).sum(dim=_ROW, keepdim=True)
        ds = 2.0 * k_s * (u * d_s - u1 / m) - 8.0 * k_s * k_s * d_s * u2 / max(m - 1, 1)
        rows = S.shape[0] * S.shape[1]
        ds = ds * (g.float() / rows if ctx.mean else g.float())
        return None, ds.to(S.dtype), None, None, None, None, None, None


def q_ada_loss(T, S, Sq=None, delta=None, lam=LAMBDA, gamma=1.0, divergence="js", reduction="mean"):
    """Q-ADA loss (MATH.md 6) of student S against teacher T, both (B, C, H, W). Sq: the student's
    quantized feature (or None); delta: its step, a tensor of 1 or C elements (or None: the row's
    sqrt(var_S)). gamma = 0 and Sq = None give GABFusion's ADA. Gradient flows to S only."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if Sq is not None:
        Sq = Sq.detach()
    if delta is not None:
        delta = delta.detach()
    return _QADA.apply(T.detach(), S, Sq, delta, float(lam), float(gamma),
                       divergence == "kl", reduction == "mean")
