"""convert_to_int: a trained (and, with fusion nodes, calibrated) QAT model -> an integer model that
computes what the fake-quant model computed (docs/math.md §5 and 7), from 4-bit codes.

The model is traced with torch.fx (QConv2d, quantizers and fusion nodes are leaves; models whose own
forward fx cannot trace, such as Ultralytics detectors, through the adapters of deploy.trace) and
rebuilt:
- Each QConv2d with a weight and an activation quantizer, with the BatchNorm2d and the activation
  (ReLU, SiLU, identity) that follow it, becomes one IntConv2d (these units are found by
  deploy.units). BN folds into the epilogue's scale and bias; the activation runs in the epilogue.
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
the fake-quant forward uses. Every weight code is checked against the fake-quant weight (deploy.units).
Grouped and depthwise convs become grouped IntConv2d (ops.grouped_conv). deploy.verify checks a
converted model against its fake-quant model, layer by layer; convert_to_int runs it on its example
input, and a difference that is not a rounding flip warns, naming the layer (strict=True raises).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..nn.fusion import GatedFusion
from ..nn.modules import QConv2d
from ..nn.quantizers import Quantizer
from ..ops import int_conv as ic
from . import trace
from .fusion import FixedFusion, layernorm_affine
from .int_model import IntModel
from .int_modules import (HEAD_CODES, HEAD_FLOAT, IntConv2d, QuantizePack, packed_maxpool2d,
                          packed_upsample_nearest, packed_write)
from .units import Unit, find_units
from .verify import Verification, verify_int_model

MAX_THRESHOLDS = 15


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


class _GraphBuilder:
    """The integer graph of a traced model: walks back from the model's output, asking each value for
    its float form (float_value) or for the codes of a quantizer, through an affine (codes). A unit
    answers either with a head; ops that commute with quantisation pass codes through; anything else
    is quantized from its float value."""

    def __init__(self, gm: fx.GraphModule, units: dict[fx.Node, Unit], report: dict[str, str]):
        self.gm, self.units, self.report = gm, units, report
        self.modules = dict(gm.named_modules())
        self.graph = fx.Graph()
        self.targets = {}
        self.float_env, self.codes_memo = {}, {}
        self.keep = []  # objects whose id() keys the memo
        self.n_quant = 0

    def build(self) -> fx.GraphModule:
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

    def channels(self, node):
        return int(node.meta["tensor_meta"].shape[1])

    # Float values.
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
        """A GatedFusion left in float: frozen to its calibrated affine, or kept as it is uncalibrated."""
        fixed = _frozen_fusion(self.modules[n.target])
        if fixed is None:
            self.report[n.target] = "GatedFusion not calibrated: kept with its LayerNorm, in float"
            self.targets[n.target] = self.modules[n.target]
        else:
            self.targets[n.target] = fixed
            self.report.setdefault(n.target, "GatedFusion: LayerNorm replaced by its calibrated affine, in float")
        return self.graph.node_copy(n, self.float_value)

    # Unit heads.
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

    # Codes.
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
            packed = self._packed_module(n, self.modules[n.target], spec, aff)
            if packed is not None:
                return packed
        if n.op == "call_function" and n.target is torch.cat and _cat_dim(n) == 1:
            return self.concat(n, self._cat_segments(n.args[0], aff), spec, aff)
        return self.quantize_float(n, spec, aff)

    def _packed_module(self, n, m, spec, aff):
        """The codes out of module m when it commutes with the quantizer (and the affine): computed on
        the codes of its input; None for any other module."""
        if isinstance(m, nn.Upsample) and _nearest_factors(m) is not None:
            return self.graph.call_function(packed_upsample_nearest,
                                            (self.codes(n.args[0], spec, aff), *_nearest_factors(m)))
        if isinstance(m, nn.MaxPool2d) and spec.monotone and (aff is None or aff.nonnegative):
            return self.graph.call_function(packed_maxpool2d, (
                self.codes(n.args[0], spec, aff), self.channels(n), spec.signed, m.kernel_size, m.stride,
                m.padding, m.dilation, m.ceil_mode))
        if isinstance(m, nn.Identity):
            return self.codes(n.args[0], spec, aff)
        is_concat, node_aff = _concat_fusion_affine(m)
        if is_concat:
            if isinstance(m, GatedFusion):
                self.report[n.target] = "GatedFusion: gates and calibrated LayerNorm affine folded into the producers"
            return self.concat(n, self._cat_segments(n.args[0], aff, node_aff), spec, aff)
        return None

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

    def concat(self, n, segments, spec, aff):
        """The codes of a channel concat, written at channel offsets of one buffer: by a unit's head
        directly where the unit has no other consumer, else by packed_write."""
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
        """A QuantizePack of n's float value: the same decisions as the fake-quant quantizer."""
        c = self.channels(n)
        qparams = torch.tensor([[spec.q_mul], [spec.q_off]], dtype=torch.float32).expand(2, c).contiguous()
        module = QuantizePack(c, spec.qn, spec.qp, qparams, spec.thresholds,
                              None if aff is None else aff.scale.float(), None if aff is None else aff.shift.float(),
                              source=spec.name)
        name = f"int_quantize.{self.n_quant}"
        self.n_quant += 1
        self.targets[name] = module.to(_device_of(self.gm))
        return self.graph.call_module(name, (self.float_value(n),))


def _frozen_fusion(node: GatedFusion) -> FixedFusion | None:
    """The FixedFusion of a calibrated GatedFusion (its LayerNorm as the calibrated affine, deploy.fusion),
    as the integer path computes it; None when it is not calibrated."""
    try:
        gates, A, B = layernorm_affine(node)
    except ValueError:
        return None
    f32 = node.theta.dtype
    return FixedFusion(node.channels, node.fuse, None if gates is None else gates.to(f32), A.to(f32), B.to(f32))


def _concat_fusion_affine(m) -> tuple[bool, _Affine | None]:
    """(whether m is a fusion node whose concat its producers can write, the per-channel affine on the
    way: a FixedFusion's scale and shift, or a calibrated GatedFusion's gates and LayerNorm affine)."""
    if isinstance(m, FixedFusion) and m.fuse == "concat":
        return True, None if m.scale is None else _Affine(m.scale.double(), m.shift.double())
    if isinstance(m, GatedFusion) and m.fuse == "concat":
        try:
            _, A, B = layernorm_affine(m)
        except ValueError:
            return False, None
        return True, _Affine(A, B)
    return False, None


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


def _folded_bn(bn: nn.BatchNorm2d | None, cout: int, f64: dict):
    """(scale, shift) of an eval-mode BatchNorm2d (float64): ones and zeros without one."""
    if bn is None:
        return torch.ones(cout, **f64), torch.zeros(cout, **f64)
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _int_conv(unit: Unit) -> IntConv2d:
    """The IntConv2d of a unit: codes, and one epilogue per head (float64, rounded to fp32 once)."""
    conv, spec = unit.conv, unit.act_spec
    k, w_signed, w_mul, w_add, step = unit.weight
    cout, dev = conv.out_channels, conv.weight.device
    f64 = dict(dtype=torch.float64, device=dev)
    bn_scale, bn_shift = _folded_bn(unit.bn, cout, f64)
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


def _refuser(strict: bool, report: dict[str, str]):
    """refuse(name, reason) for find_units: raises (strict), or warns and reports the layer kept in float."""
    def refuse(name, reason):
        msg = f"kept in float: {reason}"
        if strict:
            raise ValueError(f"convert_to_int: layer {name!r} {msg}")
        warnings.warn(f"convert_to_int: layer {name!r} is {msg}", stacklevel=3)
        report[name] = msg
    return refuse


def check_example(model: nn.Module, int_model: IntModel, example_input, strict: bool = False) -> Verification:
    """convert_to_int's self-check: verify_int_model on the example input, where a difference from the
    fake-quant model that is not a rounding flip (or a kernel that is not the reference mode) warns,
    naming the layers, or raises (strict). Returns the verification."""
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    check = verify_int_model(model, int_model, *inputs)
    problems = check.failures()
    if problems:
        msg = "convert_to_int: on example_input, " + "; ".join(problems)
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)
    return check


def convert_to_int(model: nn.Module, example_input, strict: bool = False, check: bool = True) -> IntModel:
    """The integer model of a trained QAT `model` (module docstring). example_input: a tensor (or a
    tuple of the model's inputs) it runs on, for the shapes, and on which the result is checked
    against the fake-quant model (check_example). The model is not changed. strict=True raises,
    naming the layer, where a layer would be kept in float or the check fails; otherwise both warn.
    check=False leaves out the self-check, for a caller that runs check_example itself and keeps
    its verification (so the example is not verified twice)."""
    model = copy.deepcopy(model).eval()
    gm = trace.symbolic_trace(model, is_leaf=lambda m: isinstance(m, (QConv2d, Quantizer, GatedFusion, FixedFusion)))
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    report = {}
    units = find_units(gm, _refuser(strict, report), report)
    int_model = IntModel(_GraphBuilder(gm, units, report).build(), report).eval()
    if check:
        check_example(model, int_model, inputs, strict)
    return int_model
