"""Rounding bounds for deploy.verify (docs/math.md §7, "What verify certifies").

`ErrorBounds(gm, record).run(*inputs)` evaluates the traced, teacher-forced fake-quant model gm
(teacher_forcing.forced) in float64 and carries, with every tensor it computes, an elementwise bound
e >= 0 such that the fp32 evaluations verify compares, the fake-quant model's and the integer
model's, each lie within e of the float64 value. Each op has a rule: the input bounds propagated
(through |w| for a conv, the product rule, an activation's spread over [x - e, x + e]) plus the op's
own fp32 rounding, gamma_n = n*u/(1 - n*u) times the magnitudes involved (u = 2^-24: any summation
order, so cuDNN's or oneDNN's too). At the input of
every integer layer `record(name, x, e, why)` gets the float64 input of its activation quantizer and
the bound. An op with no rule (or a float layer's quantizer with no integer form) leaves its output
unbounded: e = inf, and `why` names the op.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.protocol import NoIntegerForm
from .fixed_fusion import FixedFusion
from .teacher_forcing import Forced

U = 2.0**-24  # fp32 unit roundoff
# SiLU and sigmoid are evaluated to a relative accuracy, except where exp saturates: the integer
# epilogue's exp is 0 below -87, the float one's underflows, so |silu(y)| < 2^-118 is lost there.
UNDERFLOW = 2.0**-118
SILU_ARGMIN = -1.2784645427610738  # silu decreases below it, increases above it
SILU_MIN = SILU_ARGMIN / (1 + math.exp(-SILU_ARGMIN))


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


class _NoBound(Exception):
    """An op whose error this module cannot bound; the message names it."""


def _abs(v):
    return v.abs() if isinstance(v, torch.Tensor) else abs(v)


# Ops that only move, copy or select elements: the bound moves with them (max pooling too:
# |max a - max b| <= max |a - b|).
_STRUCTURAL_FUNCTIONS = {operator.getitem, torch.cat, torch.stack, torch.flatten, torch.split, torch.chunk,
                         torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                         F.max_pool2d}
_STRUCTURAL_METHODS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "view_as",
                       "reshape_as", "split", "chunk", "squeeze", "unsqueeze", "expand", "expand_as", "repeat",
                       "repeat_interleave", "narrow"}
_STRUCTURAL_MODULES = (nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Flatten)
_ADD = {operator.add, operator.sub, torch.add, torch.sub, "add", "sub", operator.iadd}
_MUL = {operator.mul, torch.mul, "mul", operator.imul}
_DIV = {operator.truediv, torch.div, "div"}
_MATMUL = {operator.matmul, torch.matmul, "matmul"}
_SOFTMAX = {F.softmax, torch.softmax, "softmax"}
_UNARY = {F.relu: "relu", torch.relu: "relu", "relu": "relu", F.silu: "silu", "silu": "silu",
                torch.sigmoid: "sigmoid", "sigmoid": "sigmoid", operator.neg: "neg", "neg": "neg"}


class ErrorBounds(fx.Interpreter):
    """The float64 evaluation of a teacher-forced, traced fake-quant model with its error bounds
    (module docstring)."""

    def __init__(self, gm: fx.GraphModule, record):
        super().__init__(gm)
        self.record = record
        self.bounds: dict[fx.Node, object] = {}
        self.why: dict[fx.Node, str] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.op != "output":
            try:
                bound = self._bound(n, out)
                why = self._inherited_why(n)
            except _NoBound as e:
                bound, why = _map(out, lambda t: torch.full_like(t, torch.inf, dtype=torch.float64)), str(e)
            self.bounds[n] = bound
            if why is not None and not _finite(bound):
                self.why[n] = why  # only an unbounded value carries the reason
        for gone in self.user_to_last_uses.get(n, []):
            self.bounds.pop(gone, None)
        return out

    def _inherited_why(self, n: fx.Node):
        return next((self.why[a] for a in n.all_input_nodes if a in self.why), None)

    # The value and the bound of an argument (a node, or a constant: a Python float is rounded to fp32
    # where an fp32 model uses it).
    def _value(self, a):
        return self.env[a] if isinstance(a, fx.Node) else a

    def _bound_of(self, a):
        if isinstance(a, fx.Node):
            b = self.bounds.get(a)
            return 0.0 if b is None else b
        return U * abs(a) if isinstance(a, float) else 0.0

    def _bound(self, n: fx.Node, out):
        if not _has_tensor(out):
            return None
        if n.op in ("placeholder", "get_attr"):
            return _map(out, lambda t: torch.zeros_like(t, dtype=torch.float64))
        if n.op == "call_module":
            return self._module(n, self.fetch_attr(n.target), out)
        key = n.target
        if key in _STRUCTURAL_FUNCTIONS or (n.op == "call_method" and key in _STRUCTURAL_METHODS):
            return self._same_op(n)
        args = n.args
        if key in _ADD and len(args) == 2 and "alpha" not in n.kwargs:
            return self._rounded(out, self._bound_of(args[0]) + self._bound_of(args[1]), 1)
        if key in _MUL and len(args) == 2:
            return self._product(args[0], args[1], out)
        if key in _DIV and len(args) == 2 and not n.kwargs:
            return self._quotient(args[0], args[1], out)
        if key in _MATMUL and len(args) == 2:
            return self._matmul(args[0], args[1])
        if key in _SOFTMAX and len(args) >= 1:
            dim = n.kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim is not None and set(n.kwargs) <= {"dim"}:
                return self._softmax(args[0], out, dim)
        if key in _UNARY and len(args) == 1 and set(n.kwargs) <= {"inplace"}:
            return _unary(_UNARY[key], self._value(args[0]), self._bound_of(args[0]), out)
        raise _NoBound(f"the {n.op} {getattr(key, '__name__', key)!r} (node {n.name!r}), which has no error rule")

    def _same_op(self, n: fx.Node):
        """The op applied to the bounds of its tensor arguments (constants and sizes as they are)."""
        def swap(a):
            return self.bounds[a] if _has_tensor(self.env[a]) else self.env[a]
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), swap)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return n.target(*args, **kwargs)

    def _rounded(self, out, propagated, n_roundings):
        """propagated + the fp32 rounding of an op with n roundings per element (relative to the
        magnitude of its result, which is within `propagated` of |out|)."""
        return propagated + gamma(n_roundings) * (out.abs() + propagated)

    def _product(self, a, b, out):
        ea, eb = self._bound_of(a), self._bound_of(b)
        va, vb = _abs(self._value(a)), _abs(self._value(b))
        return self._rounded(out, va * eb + vb * ea + ea * eb, 1)

    def _quotient(self, a, b, out):
        ea, eb = self._bound_of(a), self._bound_of(b)
        vb = _abs(self._value(b))
        # |a'/b' - a/b| <= (ea + |a/b|*eb)/(|b| - eb) for eb < |b|; fp32 may divide via the reciprocal.
        margin = vb - eb
        lin = (ea + out.abs() * eb) / margin
        if isinstance(margin, torch.Tensor):
            lin = torch.where(margin > 0, lin, torch.inf)
        elif margin <= 0:
            raise _NoBound("a division by a value not bounded away from 0")
        return self._rounded(out, lin, 3)

    def _matmul(self, a, b):
        ea, eb = self._bound_of(a), self._bound_of(b)
        va, vb = self._value(a).abs(), self._value(b).abs()
        k = va.shape[-1]
        lin = va @ _full(eb, vb) + _full(ea, va) @ vb + _full(ea, va) @ _full(eb, vb)
        return lin + gamma(k) * ((va + ea) @ (vb + eb))

    def _softmax(self, a, out, dim):
        """Inputs off by at most m along the row change each p by a factor within exp(+-2m), and by no
        more than max(p, 1 - p) (both lie in [0, 1]); the fp32 evaluation (exp, the sum of the row,
        the division) adds gamma_{K+4} relative."""
        m = _full(self._bound_of(a), self._value(a)).amax(dim=dim, keepdim=True)
        p = out.abs()
        moved = torch.nan_to_num(p * torch.expm1(2 * m), nan=torch.inf)  # 0*inf: p underflowed
        lin = torch.minimum(moved, torch.maximum(p, 1 - p))
        return lin + gamma(out.shape[dim] + 4) * (p + lin)

    def _module(self, n: fx.Node, m: nn.Module, out):
        x = n.args[0] if n.args else None
        if isinstance(m, nn.Conv2d):  # QConv2d too
            if isinstance(getattr(m, "act_quantizer", None), Forced):
                self.record(n.target, self._value(x), self._bound_of(x), self.why.get(x))
            return self._conv(n.target, m, self._value(x), self._bound_of(x))
        if isinstance(m, nn.BatchNorm2d) and not m.training and m.running_var is not None:
            return self._batchnorm(m, self._value(x), self._bound_of(x))
        if isinstance(m, FixedFusion):
            return self._fixed_fusion(m, n.args[0])
        if isinstance(m, _STRUCTURAL_MODULES) or (isinstance(m, nn.Upsample) and m.mode == "nearest"):
            return m(self.bounds[x])
        kind = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid"}.get(type(m))
        if kind is not None:
            return _unary(kind, self._value(x), self._bound_of(x), out)
        if isinstance(m, nn.LeakyReLU):
            return self._rounded(out, max(1.0, abs(m.negative_slope)) * self._bound_of(x), 2)
        raise _NoBound(f"the module {n.target!r} ({type(m).__name__}), which has no error rule")

    def _conv(self, name: str, m: nn.Conv2d, x, e):
        """A conv of K = C_in/groups*kh*kw products in fp32: gamma_{K+1}*(sum |w*x| + |bias|), plus the
        input's bound through |w|. An integer layer (teacher-forced input) also covers the integer
        model's epilogue (gamma_{K+4}, with the zero-point sum |offset|*sum|w|) and the difference of
        its operands (the integer form's grid values) from the fake-quant model's fp32 values."""
        kh, kw = m.kernel_size
        k = m.in_channels // m.groups * kh * kw
        q = getattr(m, "act_quantizer", None)
        wq = getattr(m, "weight_quantizer", None)
        w = m.weight if wq is None else wq(m.weight)
        conv = lambda a, b: nn.Conv2d._conv_forward(m, a, b, None)  # noqa: E731 (its padding mode too)
        bias = 0.0 if m.bias is None else m.bias.abs().view(1, -1, 1, 1)
        aw = w.abs()
        if isinstance(q, Forced):
            xhat = q.values().double()
            dx, dw = (xhat - q.grid()).abs(), (w - wq.grid(m.weight)).abs()
            ax = xhat.abs()
            magnitude = conv(ax, aw) + bias
            if q.form.offset != 0.0:
                magnitude = magnitude + abs(q.form.offset) * conv(torch.ones_like(ax), aw)
            return gamma(k + 4) * magnitude + conv(dx, aw + dw) + conv(ax, dw)
        if q is not None:
            x, e = self._quantized(name, q, x, e)
        lin = conv(_full(e, x), aw)
        return lin + gamma(k + 1) * (conv(x.abs(), aw) + lin + bias)

    def _quantized(self, name, q, x, e):
        """A float layer's activation quantizer, its input known within e: its output (the float64
        model's) and a bound, a step per decision boundary within reach."""
        try:
            form = q.int_activation()
        except NoIntegerForm as err:
            raise _NoBound(f"the activation quantizer of {name!r}, kept in float, which {err}") from None
        y = q(x)
        reach = e + gamma(2) * (x.abs() + e + abs(form.q_off))
        return y, form.boundaries_within(x, reach) * abs(form.step) + gamma(2) * y.abs()

    def _batchnorm(self, m: nn.BatchNorm2d, x, e):
        """y = A*x + B, A = weight/sqrt(var + eps): A's and B's fp32 evaluation, the product and the
        sum, in any of the usual orders, within gamma_6 of the magnitudes."""
        view = (1, -1, 1, 1)
        a = torch.rsqrt(m.running_var.double() + m.eps)
        if m.weight is not None:
            a = a * m.weight.double()
        b = 0.0 if m.bias is None else m.bias.double().abs().view(view)
        a, mean = a.abs().view(view), m.running_mean.double().abs().view(view)
        return a * e + gamma(6) * (a * (x.abs() + e + mean) + b)

    def _fixed_fusion(self, m: FixedFusion, xs):
        xs = list(xs)
        values, bounds = [self._value(a) for a in xs], [_full(self._bound_of(a), self._value(a)) for a in xs]
        if m.fuse == "concat":
            h, eh = torch.cat(values, 1), torch.cat(bounds, 1)
        else:
            g = m.gates.double().abs()
            h = sum(gk * v for gk, v in zip(g, values))
            terms = sum(gk * (v.abs() + ev) for gk, v, ev in zip(g, values, bounds))
            eh = sum(gk * ev for gk, ev in zip(g, bounds)) + gamma(2 * len(xs)) * terms
        if m.scale is None:
            return eh
        scale, shift = m.scale.double().abs().view(1, -1, 1, 1), m.shift.double().abs().view(1, -1, 1, 1)
        return scale * eh + gamma(3) * (scale * (h.abs() + eh) + shift)


def _unary(kind: str, x, e, out):
    """Negation, or an activation of x known within e: how far its value over [x - e, x + e] is from out = f(x)
    (ReLU, sigmoid: monotone; SiLU: monotone on either side of its minimum), plus the fp32
    evaluation: ReLU and negation are exact, SiLU and sigmoid within gamma_8 relative."""
    if kind == "neg":
        return e
    if kind == "relu":
        return torch.where(x + e <= 0, 0.0, _full(e, x))
    f = F.silu if kind == "silu" else torch.sigmoid
    lo, hi = x - e, x + e
    lin = torch.maximum((f(lo) - out).abs(), (f(hi) - out).abs())
    if kind == "silu":
        inside = (lo < SILU_ARGMIN) & (SILU_ARGMIN < hi)
        lin = torch.where(inside, torch.maximum(lin, (SILU_MIN - out).abs()), lin)
    return lin + gamma(8) * (out.abs() + lin) + UNDERFLOW


def _has_tensor(v) -> bool:
    if isinstance(v, (tuple, list)):
        return any(_has_tensor(x) for x in v)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _map(v, fn):
    if isinstance(v, (tuple, list)):
        return type(v)(_map(x, fn) for x in v)
    return fn(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else None


def _finite(b) -> bool:
    if isinstance(b, (tuple, list)):
        return all(_finite(x) for x in b)
    return not isinstance(b, torch.Tensor) or bool(torch.isfinite(b).all())


def _full(e, like: torch.Tensor) -> torch.Tensor:
    """A bound as a tensor of like's shape (a constant's bound is a number)."""
    return e.expand_as(like) if isinstance(e, torch.Tensor) else torch.full_like(like, e, dtype=torch.float64)
