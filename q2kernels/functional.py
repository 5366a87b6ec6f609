"""The public functional API: argument checks, then the backend (_backend.resolve) picks the fused
Triton op or the eager reference. Every nn module calls these."""
from __future__ import annotations

import math

import torch

from . import _backend
from . import reference as ref
from ._validate import check_axis, check_bits, check_choice, check_float_tensor, check_number, check_param
from .gate_controller import GateController, op_arguments
from .ops import ada as _ada  # noqa: F401  (registers q2kernels::q_ada)
from .ops import dorefa as _dorefa  # noqa: F401  (registers q2kernels::dorefa_weight)
from .ops import fake_quant as _fq
from .ops import fusion as _fusion  # noqa: F401  (registers q2kernels::gated_fusion)
from .ops import n2uq as _n2uq  # noqa: F401  (registers q2kernels::n2uq_act, q2kernels::n2uq_weight)


def _check_f32_param(p, name, like, numel):
    """A learnable fp32 parameter of `numel` elements on like's device, checked and made contiguous
    (check_param): use the returned tensor."""
    p = check_param(p, name, like, numel)
    if p.dtype != torch.float32:
        raise TypeError(f"{name}: expected a float32 parameter, got {p.dtype}")
    return p


def _check_scale_param(p, name, x, axis):
    """A quantizer parameter: 1 element, or one per channel of `axis` (_check_f32_param)."""
    return _check_f32_param(p, name, x, 1 if axis is None else x.size(axis))


def _grad_scale(grad_scale, x, axis, qp):
    if grad_scale == "auto":
        # N = the elements sharing one step: all of x, or one channel's (also with 0 channels).
        per_step = 1
        for d in range(x.dim()):
            per_step *= x.size(d) if d != axis else 1
        return ref.lsq_grad_scale(per_step, qp)
    if grad_scale is None:
        return 1.0
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)):
        raise TypeError(f"grad_scale: expected 'auto', None or a number, got {grad_scale!r}")
    if not math.isfinite(grad_scale):
        raise ValueError(f"grad_scale: expected a finite number, got {grad_scale!r}")
    return float(grad_scale)


def lsq_quantize(x, s, bits: int = 4, mode: str = "signed", axis: int | None = None,
                 grad_scale="auto", beta=None):
    """LSQ fake quantisation (docs/math.md §1); with `beta`, LSQ+ (docs/math.md §2).

    x: float32/float16/bfloat16, any layout. s (and beta): float32, 1 element, or size(axis)
    elements for per-channel. mode: "unsigned" | "signed" | "symmetric". grad_scale: "auto"
    (1/sqrt(N*Qp), N = elements per step), a number, or None (no scaling).
    """
    check_float_tensor(x, "x")
    check_bits(bits)
    if axis is not None:
        axis = check_axis(axis, x.dim())
    qn, qp = ref.qrange(bits, mode)
    s = _check_scale_param(s, "s", x, axis)
    if beta is not None:
        beta = _check_scale_param(beta, "beta", x, axis)
    gs = _grad_scale(grad_scale, x, axis, qp)
    if _backend.resolve(x) == "triton":
        kind = _fq.LSQ if beta is None else _fq.LSQ_PLUS
        return torch.ops.q2kernels.fake_quant(x, s, beta, kind, float(qn), float(qp), axis, gs)
    return ref.lsq_fake_quant(x, s, bits=bits, mode=mode, axis=axis, grad_scale=gs, beta=beta)


def lsq_plus_quantize(x, s, beta, bits: int = 4, mode: str = "unsigned", axis: int | None = None,
                      grad_scale="auto"):
    """LSQ+ (docs/math.md §2): y = R(clip((x - beta)/s, Qn, Qp))*s + beta, learnable s and beta."""
    if beta is None:
        raise ValueError("beta: LSQ+ needs an offset tensor, got None")
    return lsq_quantize(x, s, bits=bits, mode=mode, axis=axis, grad_scale=grad_scale, beta=beta)


def pact_quantize(x, alpha, bits: int = 4):
    """PACT activation quantisation (docs/math.md §3): clip to [0, alpha], 2^bits - 1 uniform steps."""
    check_float_tensor(x, "x")
    check_bits(bits)
    alpha = _check_scale_param(alpha, "alpha", x, None)
    n = float(2**bits - 1)
    if _backend.resolve(x) == "triton":
        return torch.ops.q2kernels.fake_quant(x, alpha, None, _fq.PACT, 0.0, n, None, 1.0)
    return ref.pact_fake_quant(x, alpha, bits=bits)


def dorefa_weight_quantize(w, bits: int = 4):
    """DoReFa weight quantisation (docs/math.md §3): tanh, normalise by max|tanh|, 2^bits levels in [-1, 1]."""
    check_float_tensor(w, "w")
    check_bits(bits)
    if _backend.resolve(w) == "triton":
        return torch.ops.q2kernels.dorefa_weight(w, float(2**bits - 1))
    return ref.dorefa_weight_fake_quant(w, bits=bits)


def n2uq_act_quantize(x, start, a, alpha1, alpha2, bits: int = 4):
    """N2UQ learnable-threshold activation quantisation (LTQ, docs/math.md §4): u = alpha1*x, level
    k = #{thresholds below u} (thresholds from start and the intervals a), y = k*(2/(2^bits-1))*alpha2.

    x: float32/float16/bfloat16, any layout. start, alpha1, alpha2: float32, 1 element each;
    a: float32, 2^bits - 1 elements (the intervals; entries at or below 1e-3 act as 1e-3).
    """
    check_float_tensor(x, "x")
    check_bits(bits)
    start = _check_scale_param(start, "start", x, None)
    alpha1 = _check_scale_param(alpha1, "alpha1", x, None)
    alpha2 = _check_scale_param(alpha2, "alpha2", x, None)
    n = 2**bits - 1
    if isinstance(a, torch.Tensor) and a.numel() != n:
        raise ValueError(f"a: expected 2^bits - 1 = {n} intervals for bits={bits}, got shape {tuple(a.shape)}")
    a = _check_f32_param(a, "a", x, n)
    if _backend.resolve(x) == "triton":
        return torch.ops.q2kernels.n2uq_act(x, start, a, alpha1, alpha2, bits)[0]
    return ref.n2uq_act_fake_quant(x, start, a, alpha1, alpha2, bits=bits)


def n2uq_weight_quantize(w, bits: int = 4):
    """N2UQ weight quantisation (docs/math.md §4): per output channel (dim 0) scale
    sf = mean|W|*(2^bits-1)/2^(bits-1) (not learned, no gradient), 2^bits symmetric levels with no
    zero in [-sf, sf], and dW = g/sf (no clip mask). w: float32/float16/bfloat16, 1-d or more."""
    check_float_tensor(w, "w")
    check_bits(bits)
    if w.dim() == 0:
        raise ValueError("w: expected a tensor with an output-channel dimension (dim >= 1), got a 0-d tensor")
    if _backend.resolve(w) == "triton":
        return torch.ops.q2kernels.n2uq_weight(w, bits)[0]
    return ref.n2uq_weight_fake_quant(w, bits=bits)


def _check_feature(x, name, like=None):
    check_float_tensor(x, name)
    if like is None:
        if x.dim() != 4 or x.shape[2] * x.shape[3] == 0:
            raise ValueError(f"{name}: expected a (B, C, H, W) tensor with H*W >= 1, got shape {tuple(x.shape)}")
    elif x.shape != like.shape:
        raise ValueError(f"{name}: expected the shape of S {tuple(like.shape)}, got {tuple(x.shape)}")
    elif x.device != like.device:
        raise ValueError(f"{name}: is on {x.device} but S is on {like.device}")
    return x


def gated_fusion(xs, theta, gamma=None, beta=None, fuse: str = "concat", eps: float = ref.fusion.EPS,
                 controller=None):
    """Gated fusion + LayerNorm over channels (docs/math.md §5; GABFusion / Q-GBFusion).

    xs: K >= 2 tensors (B, C_k, H, W) of one float dtype and device, NCHW or channels_last (ragged
    C_k allowed for concat). theta: (K,) float32 gate logits, a = softmax(theta). fuse: "concat"
    (output C = sum C_k) or "sum" (all C_k equal, output C = C_k). gamma, beta: optional (C,)
    float32 LayerNorm affine. controller: an optional q2kernels.gate_controller.GateController whose
    tensors the backward updates in place with the branch gradient norms G_k = ||dx_k||_2 (and, when
    it holds theta, the closed-loop gate step). Returns y (B, C, H, W) in the inputs' dtype, laid
    out like xs[0].
    """
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"xs: expected a list or tuple of tensors, got {type(xs).__name__}")
    if len(xs) < 2:
        raise ValueError(f"xs: expected at least 2 branches, got {len(xs)}")
    x0 = check_float_tensor(xs[0], "xs[0]")
    for k, x in enumerate(xs):
        check_float_tensor(x, f"xs[{k}]")
        if x.dim() != 4:
            raise ValueError(f"xs[{k}]: expected a 4-d (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if x.dtype != x0.dtype:
            raise TypeError(f"xs[{k}]: dtype {x.dtype} differs from xs[0]'s {x0.dtype}")
        if x.device != x0.device:
            raise ValueError(f"xs[{k}]: is on {x.device} but xs[0] is on {x0.device}")
        if (x.size(0), x.size(2), x.size(3)) != (x0.size(0), x0.size(2), x0.size(3)):
            raise ValueError(f"xs[{k}]: batch and spatial size {(x.size(0), x.size(2), x.size(3))} differ "
                             f"from xs[0]'s {(x0.size(0), x0.size(2), x0.size(3))}")
        if x.size(1) == 0:
            raise ValueError(f"xs[{k}]: has 0 channels")
    check_choice(fuse, "fuse", ref.fusion.FUSE_MODES)
    channels = [x.size(1) for x in xs]
    if fuse == "sum" and len(set(channels)) != 1:
        raise ValueError(f"xs: fuse='sum' needs equal channel counts, got {channels}")
    C = sum(channels) if fuse == "concat" else channels[0]
    theta = _check_f32_param(theta, "theta", x0, len(xs))
    if gamma is not None:
        gamma = _check_f32_param(gamma, "gamma", x0, C)
    if beta is not None:
        beta = _check_f32_param(beta, "beta", x0, C)
    eps = check_number(eps, "eps", 0.0, lo_allowed=False)
    if controller is not None:
        if not isinstance(controller, GateController):
            raise TypeError(f"controller: expected a q2kernels.gate_controller.GateController, "
                            f"got {type(controller).__name__}")
        for field, t in zip(controller._fields, controller):
            if isinstance(t, torch.Tensor) and t.device != x0.device:
                raise ValueError(f"controller.{field}: is on {t.device} but xs[0] is on {x0.device}")
    if _backend.resolve(x0) == "triton":
        gates = torch.softmax(theta.float(), dim=0)
        y, _, _ = torch.ops.q2kernels.gated_fusion(list(xs), gates, gamma, beta, fuse == "concat", eps,
                                                   *op_arguments(controller))
        return y
    return ref.gated_fusion(list(xs), theta, gamma, beta, fuse=fuse, eps=eps,
                            on_energies=None if controller is None else controller.step)


def q_ada_loss(T, S, Sq=None, delta=None, *, Tq=None, form: str = "q2", lam: float = ref.ada.LAMBDA,
              kappa: float = ref.ada.KAPPA, gamma: float = 1.0, divergence: str = "js", reduction: str = "mean"):
    """Q-ADA distillation loss (docs/math.md §6) of student feature S against teacher feature T.

    form: "q2" (the Q2 paper's saliency log(1 + z^2) + gamma log(1 + r^2), the default) or "simam"
    (GABFusion's SimAM energy + gamma r; with Tq=None and gamma = 0 or Sq = None, GABFusion's ADA). T, S: (B, C, H, W),
    float32/float16/bfloat16, NCHW or channels_last. Sq: the student's quantized feature (None: no
    distortion term). Tq: the teacher's quantized feature (needs Sq; None: the teacher side uses the
    student's distortion term). delta: the quantisation step, a positive number or a tensor of 1 or
    C elements (None: each row's own standard deviation); needs Sq. lam > 0 (SimAM), kappa > 0 (Q2),
    gamma >= 0. divergence: "js" | "kl"; reduction: "mean" | "sum" over the B*C rows (a batch of
    no rows gives 0). Returns a 0-d float32 tensor; only S receives a gradient.
    """
    _check_feature(S, "S")
    _check_feature(T, "T", like=S)
    if Sq is not None:
        _check_feature(Sq, "Sq", like=S)
    if Tq is not None:
        if Sq is None:
            raise ValueError("Tq: given without Sq; the teacher's distortion term needs the student's")
        _check_feature(Tq, "Tq", like=S)
    check_choice(form, "form", ref.ada.FORMS)
    lam = check_number(lam, "lam", 0.0, lo_allowed=False)
    kappa = check_number(kappa, "kappa", 0.0, lo_allowed=False)
    gamma = check_number(gamma, "gamma", 0.0, lo_allowed=True)
    check_choice(divergence, "divergence", ref.ada.DIVERGENCES)
    check_choice(reduction, "reduction", ref.ada.REDUCTIONS)
    if delta is not None:
        if Sq is None:
            raise ValueError("delta: given without Sq; the distortion term it scales needs Sq")
        if isinstance(delta, torch.Tensor):
            delta = check_param(delta, "delta", S)
            if delta.numel() not in (1, S.shape[1]):
                raise ValueError(f"delta: expected 1 or C = {S.shape[1]} elements, got shape {tuple(delta.shape)}")
            delta = delta.detach().reshape(-1)
        else:
            delta = torch.full((1,), check_number(delta, "delta", 0.0, lo_allowed=False), device=S.device)
    T = T.detach()
    Sq = None if Sq is None else Sq.detach()
    Tq = None if Tq is None else Tq.detach()
    if _backend.resolve(S) == "triton":
        loss, _ = torch.ops.q2kernels.q_ada(T, S, Sq, delta, lam, gamma, divergence == "kl", reduction == "mean",
                                            Tq, form, kappa)
        return loss
    return ref.q_ada_loss(T, S, Sq, delta, lam=lam, gamma=gamma, divergence=divergence, reduction=reduction,
                          Tq=Tq, form=form, kappa=kappa)
