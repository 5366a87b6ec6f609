"""The conv units of a traced QAT model (deploy.convert): each QConv2d with a weight and an activation
quantizer, with the BatchNorm2d and the activation its one consumer chain gives it, and the integer
forms of its quantizers. A conv with no exact integer form is refused (kept in float), with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.modules import QConv2d
from ..nn.protocol import IntActivation, NoIntegerForm
from ..nn.quantizers import Quantizer
from .accumulator import overflow_reason


class Refusal(Exception):
    """A layer (or node) that has no exact integer form: kept in float."""


@dataclass(eq=False)
class ActSpec(IntActivation):
    """An activation quantizer's integer form (protocol.IntActivation), with the quantizer's name."""
    name: str = ""

    @property
    def signed(self):
        return self.qn < 0


@dataclass(eq=False)
class Unit:
    """One IntConv2d to be: the conv, what it absorbs, its integer forms, and the heads (kind, ActSpec,
    affine) its consumers ask for while the integer graph is built."""
    name: str
    conv: QConv2d
    conv_node: fx.Node
    bn: nn.BatchNorm2d | None
    act: str
    act_spec: ActSpec
    weight: tuple
    padding: tuple
    heads: list


# The activations an IntConv2d epilogue runs, by module type and by function.
_ACT_MODULES = ((nn.SiLU, "silu"), (nn.ReLU, "relu"), (nn.Identity, "identity"))
_ACT_FUNCTIONS = {F.silu: "silu", F.relu: "relu", torch.relu: "relu"}


def find_units(gm: fx.GraphModule, refuse, report: dict[str, str]) -> dict[fx.Node, Unit]:
    """{the node whose value the unit computes (the conv, its BN or its activation): Unit}, in graph
    order. refuse(name, reason) is called for each conv kept in float; report gets an entry per unit."""
    modules = dict(gm.named_modules())
    candidates = [n for n in gm.graph.nodes if n.op == "call_module"
                  and isinstance(modules[n.target], QConv2d)
                  and modules[n.target].weight_quantizer is not None
                  and modules[n.target].act_quantizer is not None]
    if not candidates:
        raise ValueError("model: has no QConv2d with both a weight and an activation quantizer, so nothing "
                         "converts to integers (quantize it with q2kernels.nn.quantize_model first)")
    units = {}
    for node in candidates:
        conv = modules[node.target]
        try:
            padding, spec, weight = _integer_forms(conv, node.target)
        except Refusal as r:
            refuse(node.target, str(r))
            continue
        out, bn, act = _absorbed(node, modules, report)
        units[out] = Unit(node.target, conv, node, bn, act, spec, weight, padding, [])
        report[node.target] = "integer conv"
    return units


def _integer_forms(conv: QConv2d, name: str):
    """(padding, activation spec, weight codes) of a conv; Refusal where one has no exact integer form
    or the accumulator could overflow."""
    padding = _conv_padding(conv)
    spec = _activation_spec(conv.act_quantizer, f"{name}.act_quantizer")
    weight = _weight_codes(conv, f"{name}.weight_quantizer")
    if why := overflow_reason(conv.kernel_size, conv.in_channels, weight[1], spec.signed, *weight[2:4]):
        raise Refusal(why)
    return padding, spec, weight


def _absorbed(node: fx.Node, modules, report: dict[str, str]):
    """(the unit's output node, its BatchNorm2d or None, its epilogue activation): an eval-mode BN that
    is the conv's only consumer, then an activation the epilogue has that is the only consumer of
    that. An activation it does not have is reported: it stays a float op after a float head."""
    out, bn, act = node, None, "identity"
    nxt = _only_user(out)
    if nxt is not None and nxt.op == "call_module" and isinstance(modules[nxt.target], nn.BatchNorm2d):
        m = modules[nxt.target]
        if m.running_mean is not None and not m.training:
            out, bn, nxt = nxt, m, _only_user(nxt)
    kind = _epilogue_activation(nxt, modules)
    if kind is not None:
        out, act = nxt, kind
    elif _is_other_activation(nxt, modules):
        what = type(modules[nxt.target]).__name__ if nxt.op == "call_module" else nxt.target.__name__
        report[f"{node.target}:activation"] = (f"{what} after {node.target!r} has no integer epilogue: "
                                               "the conv writes floats and it runs in float")
    return out, bn, act


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _epilogue_activation(node, modules):
    """The name of the epilogue activation that node is, or None."""
    if node is None:
        return None
    if node.op == "call_module":
        m = modules[node.target]
        return next((k for cls, k in _ACT_MODULES if type(m) is cls), None)
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS and len(node.args) == 1:
        return _ACT_FUNCTIONS[node.target]
    return None


def _is_other_activation(node, modules):
    """An activation (torch.nn's activation modules, torch.nn.functional) the epilogue does not have."""
    if node is None:
        return False
    if node.op == "call_module":
        return type(modules[node.target]).__module__ == "torch.nn.modules.activation"
    return node.op == "call_function" and getattr(node.target, "__module__", "") == "torch.nn.functional"


def _fits_nibble(qn, qp):
    return (-8 <= qn and qp <= 7) if qn < 0 else qp <= 15


def _activation_spec(q: Quantizer, name: str) -> ActSpec:
    """The integer form of an activation quantizer (its protocol answer), named for the report."""
    try:
        form = q.int_activation()
    except NoIntegerForm as e:
        raise Refusal(f"its activation quantizer {name!r} {e}") from None
    spec = ActSpec(name=name, **{f.name: getattr(form, f.name) for f in fields(IntActivation)})
    if not _fits_nibble(spec.qn, spec.qp):
        raise Refusal(f"its activation quantizer {name!r} has levels [{spec.qn}, {spec.qp}]: more than a 4-bit code")
    return spec


def _weight_codes(conv: QConv2d, name: str):
    """(codes k (C_out, C_in, KH, KW) int64, signed, w_mul, w_add, per-channel step (float64)) with
    step*(w_mul*k + w_add) = the fake-quant weight (the quantizer's protocol answer, checked here)."""
    q = conv.weight_quantizer
    w = conv.weight.detach()
    with torch.no_grad():
        wq = q(w).double()
    try:
        form = q.int_weight(w, wq)
    except NoIntegerForm as e:
        raise Refusal(f"its weight quantizer {name!r} {e}") from None
    k, qn, qp = form.codes, form.qn, form.qp
    if not _fits_nibble(qn, qp):
        raise Refusal(f"its weight quantizer {name!r} has levels [{qn}, {qp}]: more than a 4-bit code")
    levels = form.w_mul * k + form.w_add
    recon = form.step.view(-1, 1, 1, 1) * levels
    tol = 1e-5 * wq.abs() + 1e-6 * wq.abs().max()
    if (k < qn).any() or (k > qp).any() or bool(((recon - wq).abs() > tol).any()):
        raise Refusal(f"the codes of its weight quantizer {name!r} do not reproduce its fake-quant weights")
    return k.long(), qn < 0, form.w_mul, form.w_add, form.step


def _conv_padding(conv: nn.Conv2d):
    """The conv's symmetric zero padding (H, W); Refusal for any other."""
    if conv.padding_mode != "zeros":
        raise Refusal(f"padding_mode={conv.padding_mode!r}: only zero padding has an integer form")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        if any(t % 2 for t in total):
            raise Refusal("padding='same' with an even kernel pads asymmetrically")
        return tuple(t // 2 for t in total)
    return tuple(conv.padding)
