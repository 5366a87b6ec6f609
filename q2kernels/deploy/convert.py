"""convert_to_int: a trained (and, with fusion nodes, calibrated) QAT model -> an integer model that
computes what the fake-quant model computed (docs/math.md §5 and 7), from 4-bit codes.

The model is traced with torch.fx (QConv2d, quantizers and fusion nodes are leaves; models whose own
forward fx cannot trace, such as Ultralytics detectors, through the adapters of deploy.trace) and
rebuilt:
- Each QConv2d with a weight and an activation quantizer, with the BatchNorm2d and the activation
  (ReLU, SiLU, identity) that follow it, becomes one IntConv2d. BN folds into the epilogue's scale
  and bias; the activation runs in the epilogue.
- Its outputs are heads (int_modules.IntConv2d): for every consumer conv reached through ops that
  commute with quantisation — nearest upsampling, max pooling, channel concat, a fusion node's
  concat with its calibrated LayerNorm affine and gates — it writes that consumer's codes directly
  (the affine of the path in its epilogue, a concat as a write at a channel offset); for any other
  consumer (a float layer, a residual add, the model output) it writes fp32.
- A quantized conv whose input comes from a float op gets a QuantizePack in front (the same fp32
  decisions as the fake-quant quantizer).
- Everything else stays a float op; GatedFusion nodes left in float are frozen to their calibrated
  affine (deploy.fusion), as the integer path computes them.
A layer that cannot be converted exactly is kept in float (its fake-quant QConv2d), with a warning
naming it and the reason (`strict=True` raises instead); the reasons are in `IntModel.report`.

Each quantizer gives its own integer form through the quantizer protocol (q2kernels/nn/protocol.py):
`int_weight` the weight codes and per-channel step (e.g. LSQ k = R(clip(w/s)); DoReFa 2q - n; N2UQ
2k - (2^b - 1)), `int_activation` the activation codes (e.g. LSQ/LSQ+ R(clip((x - beta)/s)), PACT
R(clip(x, 0, alpha)*n/alpha), N2UQ the count of thresholds below alpha1*x), each with the fp32 values
the fake-quant forward uses. Every weight code is checked against the fake-quant weight here.
Grouped and depthwise convs become grouped IntConv2d (ops.grouped_conv). deploy.verify checks a
converted model against its fake-quant model, layer by layer.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..nn.fusion import GatedFusion
from ..nn.modules import QConv2d
from ..nn.protocol import IntActivation, NoIntegerForm
from ..nn.quantizers import Quantizer
from ..ops import int_conv as ic
from .accumulator import overflow_reason
from . import trace
from .fusion import FixedFusion, layernorm_affine
from .int_modules import (HEAD_CODES, HEAD_FLOAT, IntConv2d, QuantizePack, packed_maxpool2d,
                          packed_upsample_nearest, packed_write)

MAX_THRESHOLDS = 15


class Refusal(Exception):
    """A layer (or node) that has no exact integer form: kept in float."""


class IntModel(nn.Module):
    """A converted model: `net` (a torch.fx GraphModule of IntConv2d heads, packed-code ops and float
    ops; loaded from a file, the same graph as an int_graph.IntGraph) and `report` ({module name: what
    the conversion did with it, and why})."""

    def __init__(self, net: nn.Module, report: dict[str, str]):
        super().__init__()
        self.net = net
        self.report = dict(report)

    def forward(self, *args):
        return self.net(*args)


@dataclass(eq=False)
class _ActSpec(IntActivation):
    """An activation quantizer's integer form (protocol.IntActivation), with the quantizer's name."""
    name: str = ""

    @property
    def signed(self):
        return self.qn < 0


@dataclass(eq=False)
class _Affine:
    """Per-channel x -> scale*x + shift (float64) on the way from a conv to a quantizer."""
    scale: torch.Tensor
    shift: torch.Tensor

    def slice(self, start, length):
        return _Affine(self.scale[start:start + length], self.shift[start:start + length])

    def then(self, outer):
        return self if outer is None else _Affine(outer.scale * self.scale, outer.scale * self.shift + outer.shift)

    @property
    def nonnegative(self):
        return bool((self.scale >= 0).all())


def _fits_nibble(qn, qp):
    return (-8 <= qn and qp <= 7) if qn < 0 else qp <= 15


def _act_spec(q: Quantizer, name: str) -> _ActSpec:
    """The integer form of an activation quantizer (its protocol answer), named for the report."""
    try:
        form = q.int_activation()
    except NoIntegerForm as e:
        raise Refusal(f"its activation quantizer {name!r} {e}") from None
    spec = _ActSpec(name=name, **{f.name: getattr(form, f.name) for f in fields(IntActivation)})
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


_ACT_MODULES = ((nn.SiLU, "silu"), (nn.ReLU, "relu"), (nn.Identity, "identity"))
_ACT_FUNCTIONS = {F.silu: "silu", F.relu: "relu", torch.relu: "relu"}


@dataclass(eq=False)
class _Unit:
    name: str
    conv: QConv2d
    conv_node: fx.Node
    bn: nn.BatchNorm2d | None
    act: str
    act_spec: _ActSpec
    weight: tuple
    padding: tuple
    heads: list


class _Converter:
    def __init__(self, gm: fx.GraphModule, strict: bool):
        self.gm, self.strict = gm, strict
        self.modules = dict(gm.named_modules())
        self.graph = fx.Graph()
        self.targets = {}
        self.report = {}
        self.float_env, self.codes_memo = {}, {}
        self.units = {}  # out_node -> _Unit
        self.keep = []  # objects whose id() keys the memo
        self.n_quant = 0

    # Analysis.
    def refuse(self, name, reason):
        msg = f"kept in float: {reason}"
        if self.strict:
            raise ValueError(f"convert_to_int: layer {name!r} {msg}")
        warnings.warn(f"convert_to_int: layer {name!r} is {msg}", stacklevel=3)
        self.report[name] = msg

    def _only_user(self, node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def find_units(self):
        candidates = [n for n in self.gm.graph.nodes if n.op == "call_module"
                      and isinstance(self.modules[n.target], QConv2d)
                      and self.modules[n.target].weight_quantizer is not None
                      and self.modules[n.target].act_quantizer is not None]
        if not candidates:
            raise ValueError("model: has no QConv2d with both a weight and an activation quantizer, so nothing "
                             "converts to integers (quantize it with q2kernels.nn.quantize_model first)")
        for node in candidates:
            conv = self.modules[node.target]
            try:
                padding = _conv_padding(conv)
                spec = _act_spec(conv.act_quantizer, f"{node.target}.act_quantizer")
                weight = _weight_codes(conv, f"{node.target}.weight_quantizer")
                if why := overflow_reason(conv.kernel_size, conv.in_channels, weight[1], spec.signed, *weight[2:4]):
                    raise Refusal(why)
            except Refusal as r:
                self.refuse(node.target, str(r))
                continue
            out, bn, act = node, None, "identity"
            nxt = self._only_user(out)
            if nxt is not None and nxt.op == "call_module" and isinstance(self.modules[nxt.target], nn.BatchNorm2d):
                m = self.modules[nxt.target]
                if m.running_mean is not None and not m.training:
                    out, bn, nxt = nxt, m, self._only_user(nxt)
            kind = self._activation(nxt)
            if kind is not None:
                out, act = nxt, kind
            elif _is_other_activation(nxt, self.modules):
                what = type(self.modules[nxt.target]).__name__ if nxt.op == "call_module" else nxt.target.__name__
                self.report[f"{node.target}:activation"] = (f"{what} after {node.target!r} has no integer epilogue: "
                                                            "the conv writes floats and it runs in float")
            self.units[out] = _Unit(node.target, conv, node, bn, act, spec, weight, padding, [])
            self.report[node.target] = "integer conv"

    def _activation(self, node):
        if node is None:
            return None
        if node.op == "call_module":
            m = self.modules[node.target]
            return next((k for cls, k in _ACT_MODULES if type(m) is cls), None)
        if node.op == "call_function" and node.target in _ACT_FUNCTIONS and len(node.args) == 1:
            return _ACT_FUNCTIONS[node.target]
        return None

    def channels(self, node):
        return int(node.meta["tensor_meta"].shape[1])

    # The new graph.
    def float_value(self, n):
        if n not in self.float_env:
            unit = self.units.get(n)
            if unit is not None:
                self.float_env[n] = self.call_unit(unit, self.head(unit, HEAD_FLOAT, None, None))
            elif n.op == "call_module" and isinstance(self.modules[n.target], GatedFusion):
                self.float_env[n] = self.float_fusion(n)
            else:
                if n.op in ("call_module", "get_attr"):
                    self.targets[n.target] = self.gm.get_submodule(n.target) if n.op == "call_module" \
                        else getattr(self.gm, n.target)
                self.float_env[n] = self.graph.node_copy(n, self.float_value)
        return self.float_env[n]

    def float_fusion(self, n):
        node = self.modules[n.target]
        try:
            gates, A, B = layernorm_affine(node)
        except ValueError:
            self.report[n.target] = "GatedFusion not calibrated: kept with its LayerNorm, in float"
            self.targets[n.target] = node
            return self.graph.node_copy(n, self.float_value)
        f32 = node.theta.dtype
        fixed = FixedFusion(node.channels, node.fuse, None if gates is None else gates.to(f32), A.to(f32), B.to(f32))
        self.targets[n.target] = fixed
        self.report.setdefault(n.target, "GatedFusion: LayerNorm replaced by its calibrated affine, in float")
        return self.graph.node_copy(n, self.float_value)

    def head(self, unit, kind, spec, aff):
        for i, h in enumerate(unit.heads):
            if h == (kind, spec, aff):
                return i
        unit.heads.append((kind, spec, aff))
        return len(unit.heads) - 1

    def call_unit(self, unit, head, out=None, c_offset=0, total=None):
        x = self.codes(unit.conv_node.args[0], unit.act_spec, None)
        kwargs = {"head": head}
        if total is not None:
            kwargs.update(out=out, c_offset=c_offset, total_channels=total)
        return self.graph.call_module(unit.name, (x,), kwargs)

    def codes(self, n, spec, aff):
        key = (n, id(spec), id(aff))
        if key not in self.codes_memo:
            self.keep.append(aff)
            self.codes_memo[key] = self._codes(n, spec, aff)
        return self.codes_memo[key]

    def _codes(self, n, spec, aff):
        unit = self.units.get(n)
        if unit is not None:
            return self.call_unit(unit, self.head(unit, HEAD_CODES, spec, aff))
        if n.op == "call_module":
            m = self.modules[n.target]
            if isinstance(m, nn.Upsample) and _nearest_factors(m) is not None:
                return self.graph.call_function(packed_upsample_nearest,
                                                (self.codes(n.args[0], spec, aff), *_nearest_factors(m)))
            if isinstance(m, nn.MaxPool2d) and spec.monotone and (aff is None or aff.nonnegative):
                return self.graph.call_function(packed_maxpool2d, (
                    self.codes(n.args[0], spec, aff), self.channels(n), spec.signed, m.kernel_size, m.stride,
                    m.padding, m.dilation, m.ceil_mode))
            if isinstance(m, nn.Identity):
                return self.codes(n.args[0], spec, aff)
            segments = self._fusion_segments(n, m, aff)
            if segments is not None:
                return self.concat(n, segments, spec, aff)
        if n.op == "call_function" and n.target is torch.cat and _cat_dim(n) == 1:
            return self.concat(n, self._cat_segments(n.args[0], aff), spec, aff)
        return self.quantize_float(n, spec, aff)

    def _cat_segments(self, inputs, aff, node_aff=None):
        """(input, the affine its channels pass: the node's own, then the outer one, channels)."""
        segments, off = [], 0
        for s in inputs:
            c = self.channels(s)
            outer = None if aff is None else aff.slice(off, c)
            a = outer if node_aff is None else node_aff.slice(off, c).then(outer)
            segments.append((s, a, c))
            off += c
        return segments

    def _fusion_segments(self, n, m, aff):
        if isinstance(m, FixedFusion) and m.fuse == "concat":
            node_aff = None if m.scale is None else _Affine(m.scale.double(), m.shift.double())
        elif isinstance(m, GatedFusion) and m.fuse == "concat":
            try:
                _, A, B = layernorm_affine(m)
            except ValueError:
                return None
            node_aff = _Affine(A, B)
            self.report[n.target] = "GatedFusion: gates and calibrated LayerNorm affine folded into the producers"
        else:
            return None
        return self._cat_segments(n.args[0], aff, node_aff)

    def concat(self, n, segments, spec, aff):
        if any(c % 2 for _, _, c in segments[:-1]):
            self.report[f"{n.name}:concat"] = ("a concat input with an odd channel count ends mid-byte: "
                                               "the concat runs in float, then quantize")
            return self.quantize_float(n, spec, aff)
        total = sum(c for _, _, c in segments)
        buf, off = None, 0
        for s, a, c in segments:
            unit = self.units.get(s)
            if unit is not None and len(s.users) == 1:
                buf = self.call_unit(unit, self.head(unit, HEAD_CODES, spec, a), buf, off, total)
            else:
                buf = self.graph.call_function(packed_write, (buf, self.codes(s, spec, a), c, off, total))
            off += c
        return buf

    def quantize_float(self, n, spec, aff):
        c = self.channels(n)
        qparams = torch.tensor([[spec.q_mul], [spec.q_off]], dtype=torch.float32).expand(2, c).contiguous()
        module = QuantizePack(c, spec.qn, spec.qp, qparams, spec.thresholds,
                              None if aff is None else aff.scale.float(), None if aff is None else aff.shift.float(),
                              source=spec.name)
        name = f"int_quantize.{self.n_quant}"
        self.n_quant += 1
        self.targets[name] = module.to(_device_of(self.gm))
        return self.graph.call_module(name, (self.float_value(n),))

    def build(self):
        self.find_units()
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                self.float_value(n)
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        self.graph.output(fx.node.map_arg(out.args[0], self.float_value))
        for unit in self.units.values():
            if unit.heads:
                self.targets[unit.name] = _int_conv(unit)
                kinds = ", ".join(k if s is None else f"{k} for {s.name!r}" for k, s, _ in unit.heads)
                self.report[unit.name] = f"integer conv, heads: {kinds}"
        self.graph.lint()
        return fx.GraphModule(self.targets, self.graph)


def _is_other_activation(node, modules):
    """An activation (torch.nn's activation modules, torch.nn.functional) the epilogue does not have."""
    if node is None:
        return False
    if node.op == "call_module":
        return type(modules[node.target]).__module__ == "torch.nn.modules.activation"
    return node.op == "call_function" and getattr(node.target, "__module__", "") == "torch.nn.functional"


def _device_of(module):
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _nearest_factors(m: nn.Upsample):
    if m.mode != "nearest" or m.size is not None or m.scale_factor is None:
        return None
    sf = m.scale_factor if isinstance(m.scale_factor, tuple) else (m.scale_factor, m.scale_factor)
    if len(sf) != 2 or any(float(f) != int(f) or f < 1 for f in sf):
        return None
    return int(sf[0]), int(sf[1])


def _cat_dim(n):
    return n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)


def _int_conv(unit: _Unit) -> IntConv2d:
    """The IntConv2d of a unit: codes, and one epilogue per head (float64, rounded to fp32 once)."""
    conv, spec = unit.conv, unit.act_spec
    k, w_signed, w_mul, w_add, step = unit.weight
    cout, dev = conv.out_channels, conv.weight.device
    f64 = dict(dtype=torch.float64, device=dev)
    bn_scale, bn_shift = torch.ones(cout, **f64), torch.zeros(cout, **f64)
    if unit.bn is not None:
        bn = unit.bn
        bn_scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            bn_scale = bn_scale * bn.weight.detach().double()
        bn_shift = -bn.running_mean.double() * bn_scale
        if bn.bias is not None:
            bn_shift = bn_shift + bn.bias.detach().double()
    bias = torch.zeros(cout, **f64) if conv.bias is None else conv.bias.detach().double()
    alpha = bn_scale * step * spec.step
    gamma = bn_scale * step * spec.offset
    bias = bn_scale * bias + bn_shift
    epilogues, thresholds, heads = [], torch.zeros(len(unit.heads), MAX_THRESHOLDS, device=dev), []
    for i, (kind, q, aff) in enumerate(unit.heads):
        a = aff or _Affine(torch.ones(cout, **f64), torch.zeros(cout, **f64))
        if kind == HEAD_CODES:
            epilogues.append(ic.epilogue_params(cout, alpha, gamma, bias, a.scale, a.shift, q.q_mul, q.q_off,
                                                device=dev))
            nthr = 0 if q.thresholds is None else q.thresholds.numel()
            if nthr:
                thresholds[i, :nthr] = q.thresholds
            heads.append({"kind": kind, "qn": q.qn, "qp": q.qp, "nthr": nthr, "signed": q.signed})
        else:
            epilogues.append(ic.epilogue_params(cout, alpha, gamma, bias, device=dev))
            heads.append({"kind": kind, "qn": 0, "qp": 15, "nthr": 0, "signed": False})
    return IntConv2d(conv.in_channels, cout, conv.kernel_size, conv.stride, unit.padding, conv.dilation,
                     spec.signed, w_signed, w_mul, w_add, unit.act, heads, ic.pack(k, 4, w_signed),
                     torch.stack(epilogues), thresholds,
                     ic.weight_tap_sums(k).to(dev) if spec.offset != 0.0 else None, source=unit.name,
                     groups=conv.groups)


def convert_to_int(model: nn.Module, example_input, strict: bool = False) -> IntModel:
    """The integer model of a trained QAT `model` (module docstring). example_input: a tensor (or a
    tuple of the model's inputs) it runs on, for the shapes. The model is not changed. strict=True
    raises, naming the layer, where a layer would be kept in float."""
    model = copy.deepcopy(model).eval()
    gm = trace.symbolic_trace(model, is_leaf=lambda m: isinstance(m, (QConv2d, Quantizer, GatedFusion, FixedFusion)))
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    conv = _Converter(gm, strict)
    return IntModel(conv.build(), conv.report).eval()
