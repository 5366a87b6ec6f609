"""Eager reference of the Q-ADA distillation loss (docs/math.md §6), in both saliency forms.

Per row (b, c) of a (B, C, H, W) feature, M = H*W, for X in {T, S}: d = X - mean X,
var = sum d^2 / max(M - 1, 1), sd = sqrt(var), and with w = d^2 k the score of a pixel is
    form "q2"    (Q2, Eq. 13-15):  k = 1/(sd + kappa)^2,   score = log(1 + w) + g     (w = z^2)
    form "simam" (GABFusion's ADA): k = 1/(4 (var + lam)), score = w + 1/2 + g       (SimAM)
then A = sigmoid(score), P = A / sum A. g is the distortion term of that side, from a quantized
version Xq and the step Delta_c (or the row's sd when Delta is not given), r = |X - Xq| / (Delta + eps):
    "q2": g = gamma log(1 + r^2), eps = kappa;   "simam": g = gamma r, eps = 1e-6;   g = 0 without Xq.
The student's side uses Sq; the teacher's uses its own Tq when given ("own" distortion), else the
student's g ("shared", GABFusion's and this library's original form). Divergence per row: JS(P^T, P^S)
or KL(P^T || P^S); the loss is their mean (or sum) over the B*C rows, returned as a 0-d fp32 tensor.
A batch of no rows has loss 0 under either reduction: an empty batch adds nothing to a training step.

Gradient: dS only. T, Sq, Tq and Delta are constants, and so is every distortion term g (also where
it divides by sd): it re-weights the supervision and is not itself trained. With u_i = dL/dscore_i,
v_i = u_i f'(w_i) (f = log(1 + w): f' = 1/(1 + w); SimAM: f' = 1) and k' = dk/dvar:
    dS_j = 2 k (v_j d_j - (1/M) sum_i v_i d_i) + 2 k' d_j (sum_i v_i d_i^2) / max(M - 1, 1)
(the mean term of dvar/dS vanishes because sum_i d_i = 0); SimAM: k' = -4 k^2; "q2":
k' = -k / ((sd + kappa) sd), and 0 where sd = 0 (every d_i is 0 there, so the term is 0 in the limit).
Through P = A / sum A and the sigmoid, u_i = A_i (1 - A_i) (G_i - sum_j G_j P^S_j) / sum A^S with
G = dL/dP^S:
    JS: G_i = 1/2 log(P^S_i / Mx_i);  KL: G_i = -P^T_i / P^S_i, so G_i - sum_j G_j P^S_j is
    (P^S_i - P^T_i) / P^S_i, written that way because -P^T/P^S + 1 cancels when S is near T.
A (1 - A) is computed as e A^2 with e = exp(-score), which keeps its precision where A is near 1.

Written for clarity in plain fp32 PyTorch (fp16/bf16 inputs are upcast first, so a sum of squares
that would overflow fp16 is exact to fp32). It never imports from q2kernels.ops.
"""
from __future__ import annotations

import torch

from ..constants import DISTORTION_EPS, KAPPA

LAMBDA = 1e-4           # SimAM's lambda
FORMS = ("q2", "simam")
DIVERGENCES = ("js", "kl")
REDUCTIONS = ("mean", "sum")

_ROW = (2, 3)


def _centered(x: torch.Tensor):
    """(x - mu, var) per row, var unbiased with max(M - 1, 1) (finite for 1x1 maps)."""
    m = x.shape[2] * x.shape[3]
    d = x - x.mean(dim=_ROW, keepdim=True)
    var = d.square().sum(dim=_ROW, keepdim=True) / max(m - 1, 1)
    return d, var


def _scale(var, form, lam, kappa):
    """k of the row: w = d^2 k."""
    if form == "simam":
        return 1.0 / (4.0 * (var + lam))
    return 1.0 / (torch.sqrt(var) + kappa).square()


def _dk_times(v2, var, k, form, kappa):
    """k' V2 with k' = dk/dvar, written so that a tiny sd cannot overflow it: V2/sd <= max|v| (M-1) sd."""
    if form == "simam":
        return -4.0 * k * k * v2
    sd = torch.sqrt(var)
    return torch.where(sd > 0, -k / (sd + kappa) * (v2 / sd), torch.zeros_like(sd))


def _attention(d, k, g, form):
    """(A, e, f'(w)): A = sigmoid(score), e = exp(-score), score = f(w) + g, w = d^2 k."""
    w = d * d * k
    if form == "simam":
        score, fprime = w + 0.5, torch.ones_like(w)
    else:
        score, fprime = torch.log1p(w), 1.0 / (1.0 + w)
    e = torch.exp(-(score + g))
    return 1.0 / (1.0 + e), e, fprime


def _distortion(x, xq, delta, var, form, gamma, kappa):
    """g of one side: 0 without xq; a constant of the loss (no gradient)."""
    if xq is None:
        return 0.0
    denom = torch.sqrt(var) if delta is None else delta.float().reshape(1, -1, 1, 1)
    if form == "simam":
        return gamma * ((xq.float() - x).abs() / (denom + DISTORTION_EPS))
    r = (xq.float() - x).abs() / (denom + kappa)
    return gamma * torch.log1p(r * r)


def _forward_terms(T, S, Sq, Tq, delta, form, lam, gamma, kappa):
    t, s = T.float(), S.float()
    d_t, var_t = _centered(t)
    d_s, var_s = _centered(s)
    k_t = _scale(var_t, form, lam, kappa)
    k_s = _scale(var_s, form, lam, kappa)
    g_s = _distortion(s, Sq, delta, var_s, form, gamma, kappa)
    g_t = g_s if Tq is None else _distortion(t, Tq, delta, var_t, form, gamma, kappa)
    a_t, _, _ = _attention(d_t, k_t, g_t, form)
    a_s, e_s, fprime_s = _attention(d_s, k_s, g_s, form)
    sum_s = a_s.sum(dim=_ROW, keepdim=True)
    p_t = a_t / a_t.sum(dim=_ROW, keepdim=True)
    p_s = a_s / sum_s
    return p_t, p_s, a_s, e_s, fprime_s, k_s, var_s, d_s, sum_s


class _QADA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, T, S, Sq, Tq, delta, form, lam, gamma, kappa, kl, mean):
        p_t, p_s, *_ = _forward_terms(T, S, Sq, Tq, delta, form, lam, gamma, kappa)
        if kl:
            rows = (p_t * torch.log(p_t / p_s)).sum(dim=_ROW)
        else:
            mx = 0.5 * (p_t + p_s)
            rows = 0.5 * (p_t * torch.log(p_t / mx) + p_s * torch.log(p_s / mx)).sum(dim=_ROW)
        ctx.save_for_backward(T, S, Sq, Tq, delta)
        ctx.args = (form, lam, gamma, kappa)
        ctx.kl, ctx.mean = kl, mean
        return rows.sum() / max(rows.numel(), 1) if mean else rows.sum()

    @staticmethod
    def backward(ctx, g):
        T, S, Sq, Tq, delta = ctx.saved_tensors
        form, _, _, kappa = ctx.args
        p_t, p_s, a_s, e_s, fprime_s, k_s, var_s, d_s, sum_s = _forward_terms(T, S, Sq, Tq, delta, *ctx.args)
        if ctx.kl:
            h = (p_s - p_t) / p_s
        else:
            grad_p = 0.5 * torch.log(p_s / (0.5 * (p_t + p_s)))
            h = grad_p - (grad_p * p_s).sum(dim=_ROW, keepdim=True)
        v = e_s * a_s * a_s * h / sum_s * fprime_s
        m = S.shape[2] * S.shape[3]
        v1 = (v * d_s).sum(dim=_ROW, keepdim=True)
        v2 = (v * d_s * d_s).sum(dim=_ROW, keepdim=True)
        ds = 2.0 * k_s * (v * d_s - v1 / m) + 2.0 * d_s * _dk_times(v2, var_s, k_s, form, kappa) / max(m - 1, 1)
        rows = S.shape[0] * S.shape[1]
        ds = ds * (g.float() / max(rows, 1) if ctx.mean else g.float())
        return None, ds.to(S.dtype), *(None,) * 9


def q_ada_loss(T, S, Sq=None, delta=None, lam=LAMBDA, gamma=1.0, divergence="js", reduction="mean",
               *, Tq=None, form="simam", kappa=KAPPA):
    """Q-ADA loss (docs/math.md §6) of student S against teacher T, both (B, C, H, W). Sq: the student's
    quantized feature (or None); Tq: the teacher's own quantized feature (or None: the teacher side
    uses the student's distortion term); delta: their step, a tensor of 1 or C elements (or None:
    each row's own sd). form: "q2" | "simam" (the default here, so that the positional signature
    keeps its original meaning). lam is SimAM's, kappa Q2's. Gradient flows to S only."""
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    const = (lambda x: None if x is None else x.detach())
    return _QADA.apply(T.detach(), S, const(Sq), const(Tq), const(delta), form, float(lam), float(gamma),
                       float(kappa), divergence == "kl", reduction == "mean")
