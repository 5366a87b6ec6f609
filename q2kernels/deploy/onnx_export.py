"""export_onnx: a converted integer model (convert_to_int, load_int_model) as an ONNX graph whose
integer layers onnxruntime computes bit for bit as q2kernels does.

What each node becomes (one emitter per node kind, in MODULE_EMITTERS and FUNCTION_EMITTERS):
- Between integer layers the codes travel as int8 tensors (N, C, H, W) holding the code values
  (-8..7 signed, 0..15 unsigned): ONNX has no 4-bit packing, and an int8 code is what ConvInteger
  reads.
- IntConv2d: ConvInteger of the codes and the weight's integer levels w_mul·k + w_add (int8, zero
  points 0, so a padded tap reads code 0 as the integer conv does) gives the exact int32 sum I. Its
  zero-point term J (layers whose input has a zero point) is the ConvInteger of a tensor of ones with
  the same weights: the sum of the weight levels over each output's valid taps, as the tap sums give
  it. Then the epilogue of csrc/epilogue.h, operation by operation in float32, its fmas exact
  (deploy/onnx_graph.py explains how), and the head's codes (rounding or thresholds) or its floats.
- QuantizePack: the same quantizer on a float tensor (after its per-channel affine, if any).
- A concat into a shared packed tensor (heads writing at channel offsets, packed_write) is a Concat
  of the pieces in channel order; packed max pooling and nearest upsampling run on the int8 codes
  (MaxPool, Resize), as they run on the packed codes.
- Float layers (a stem conv kept in float, a detector's prediction convs, BatchNorm, SiLU, residual
  adds of float heads) become the ONNX operators of the same names. A float convolution sums in the
  runtime's own order, so its result may differ from PyTorch's in the last bits; exact float ops
  (add, concat, max pooling, nearest upsampling, ReLU) do not. ExportReport says which layers are
  float and how far the outputs are from the q2kernels model's on the example.
- The deterministic float layers of deploy.det_float (DetConv2d, det_matmul, det_softmax, det_silu)
  become their operations spelled out (deploy.onnx_det_float): exact, so a model made deterministic
  exports with no float layer in the report and bit-identical outputs.
A node kind without an emitter (a fake-quant layer the converter kept, an uncalibrated fusion) is
refused by name: the export never writes a graph that computes something else.
"""
from __future__ import annotations

import dataclasses
import json
import operator
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_bool
from ..ops import int_conv as ic
from . import onnx_det_float
from .fixed_fusion import FixedFusion
from .int_graph import _fill, _Ref, parse_graph
from .int_model import IntModel
from .int_modules import (HEAD_CODES, IntConv2d, QuantizePack, channel_affine, packed_maxpool2d,
                          packed_upsample_nearest, packed_write)
from .onnx_graph import GraphBuilder
from .serialize import graph_records

DEFAULT_OPSET = 21
# A layer whose |I| could pass 2^29 is refused: alpha·I must be exact in float64 for the exact fma.
MAX_EXACT_SUM = 2**29


class ExportRefused(ValueError):
    """A node the ONNX export cannot write exactly (the message names it and says why)."""


@dataclasses.dataclass
class Codes:
    """Codes of `channels` channels in an int8 ONNX value (N, C, H, W)."""
    name: str
    channels: int
    signed: bool


@dataclasses.dataclass
class SharedCodes:
    """A packed concat buffer: the pieces written so far, (channel offset, Codes)."""
    total: int
    pieces: list


@dataclasses.dataclass
class ExportReport:
    """What export_onnx wrote and how onnxruntime's outputs on the example compare with the model's."""
    path: str
    opset: int
    integer_layers: int
    float_layers: list[str]
    outputs_identical: list[bool] | None = None   # bitwise, per output; None: not checked
    max_abs_diff: list[float] | None = None
    # With codes_outputs=True: the extra int8 outputs after the model's, one per node that makes codes,
    # as (node name, channel offset in the node's packed output, channels).
    codes_nodes: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
    # The forced nodes, in the order of the graph's inputs after the first.
    forced_inputs: list[str] = dataclasses.field(default_factory=list)


class _Exporter:
    """The state of one export that the emitters share."""

    def __init__(self, builder: GraphBuilder, modules: dict[str, nn.Module]):
        self.g = builder
        self.modules = modules
        self.integer_layers = 0
        self.float_layers: list[str] = []
        self.node = ""                    # the node being written (error messages name it)
        self.forced: list[str] = []
        self.ranks: list[int | None] = []  # each node's value's rank on the example
        self.index_of_first_arg: int | None = None  # a call_method's tensor, as a node index
        self.min_bits = 4                 # the Q/DQ export's narrowest code container

    def refuse(self, why: str):
        raise ExportRefused(f"export_onnx: node {self.node!r}: {why}")

    def codes(self, v) -> Codes:
        """A value read as codes: a SharedCodes buffer becomes the Concat of its pieces."""
        if isinstance(v, Codes):
            return v
        if not isinstance(v, SharedCodes):
            self.refuse(f"expected packed codes, got {type(v).__name__}")
        pieces = sorted(v.pieces, key=lambda p: p[0])
        at = 0
        for offset, c in pieces:
            if offset != at:
                self.refuse(f"a concat buffer of {v.total} channels is read with channels {at}..{offset} "
                            "unwritten or written twice")
            at += c.channels
        if at != v.total or len({c.signed for _, c in pieces}) != 1:
            self.refuse(f"a concat buffer of {v.total} channels is read with {at} written, or with codes of "
                        "mixed signedness")
        if len(pieces) == 1:
            return pieces[0][1]
        name = self.g.op("Concat", [c.name for _, c in pieces], "concat", axis=1)
        return Codes(name, v.total, pieces[0][1].signed)


def _check_sign(ex: _Exporter, x: Codes, signed: bool, channels: int) -> None:
    if x.signed != signed or x.channels != channels:
        ex.refuse(f"reads {x.channels} {'signed' if x.signed else 'unsigned'} codes as {channels} "
                  f"{'signed' if signed else 'unsigned'} ones")


def _place(ex: _Exporter, codes: Codes, out, c_offset: int, total_channels):
    """A codes result, written into a concat buffer when the call asks for one."""
    if out is not None:
        if not isinstance(out, SharedCodes):
            ex.refuse("writes into something that is not a concat buffer")
        return SharedCodes(out.total, out.pieces + [(c_offset, codes)])
    if total_channels is not None:
        return SharedCodes(total_channels, [(c_offset, codes)])
    return codes


def _weight_levels(ex: _Exporter, m: IntConv2d) -> np.ndarray:
    codes = ic.unpack(m.weight.cpu(), m.in_channels // m.groups, m.w_signed).to(torch.int64)
    levels = m.w_mul * codes + m.w_add
    if levels.abs().max() > 127:
        ex.refuse(f"weight levels w_mul*k + w_add up to {int(levels.abs().max())} do not fit int8")
    if m.tap_sums is not None and not torch.equal(m.tap_sums.cpu(), ic.weight_tap_sums(codes)):
        ex.refuse("its tap_sums are not the prefix sums of its weight codes")
    return levels.to(torch.int8).contiguous().numpy()


def _conv_attrs(m) -> dict:
    (ph, pw) = m.padding
    return {"pads": [ph, pw, ph, pw], "strides": list(m.stride), "dilations": list(m.dilation),
            "group": m.groups, "kernel_shape": list(m.kernel_size)}


def _int_conv(ex: _Exporter, m: IntConv2d, x, head: int = 0, out=None, c_offset: int = 0, total_channels=None):
    g = ex.g
    x = ex.codes(x)
    _check_sign(ex, x, m.x_signed, m.in_channels)
    if ic.fp32_bound(m.kernel_size, m.in_channels // m.groups, m.x_signed, m.w_signed, m.w_mul, m.w_add) \
            > MAX_EXACT_SUM:
        ex.refuse(f"its integer sums may reach past 2^29, where the exact fma of the export does not hold")
    ex.integer_layers += 1
    w = g.const(_weight_levels(ex, m), np.int8, "levels")
    zero = g.const(np.int8(0), np.int8)
    attrs = _conv_attrs(m)
    h = m.heads[head]
    acc = g.cast(g.op("ConvInteger", [x.name, w, zero, zero], "acc", **attrs), "float32")
    taps = None
    if m.tap_sums is not None:
        # J: the weight levels summed over each output's valid taps (a conv of ones).
        shape = g.op("Concat", [g.const([1], np.int64), g.op("Shape", [x.name], start=1)], axis=0)
        ones = g.op("ConstantOfShape", [shape], value=g.numpy_helper.from_array(np.ones(1, np.int8)))
        taps = g.cast(g.op("ConvInteger", [ones, w, zero, zero], "taps", **attrs), "float32")
    thresholds = m.thresholds[head, :h["nthr"]].cpu().numpy() if h["nthr"] else None
    out_value = g.epilogue(acc, taps, m.epilogues[head].cpu().numpy(), m.act, h["kind"] == HEAD_CODES, h["qn"],
                           h["qp"], thresholds)
    if h["kind"] != HEAD_CODES:
        return out_value
    return _place(ex, Codes(out_value, m.out_channels, h["qn"] < 0), out, c_offset, total_channels)


def _quantize_pack(ex: _Exporter, m: QuantizePack, x, out=None, c_offset: int = 0, total_channels=None):
    g = ex.g
    x = g.cast(_float(ex, x), "float32")
    if m.scale is not None:
        x = g.op("Add", [g.op("Mul", [x, g.channel_const(m.scale.float().cpu().numpy())]),
                         g.channel_const(m.shift.float().cpu().numpy())])
    qp = m.qparams.cpu().numpy()
    q_mul, q_off = g.channel_const(qp[0]), g.channel_const(qp[1])
    if m.thresholds is not None:
        codes = g.quantize_thresholds(x, q_mul, q_off, m.thresholds.cpu().numpy(), m.qn)
    else:
        codes = g.quantize_round(x, q_mul, q_off, m.qn, m.qp)
    return _place(ex, Codes(codes, m.channels, m.qn < 0), out, c_offset, total_channels)


def _float(ex: _Exporter, v) -> str:
    if not isinstance(v, str):
        ex.refuse(f"expected a float tensor, got {type(v).__name__}")
    return v


def _float_module(ex: _Exporter, name: str):
    ex.float_layers.append(ex.node)
    return name


def _conv(ex: _Exporter, m: nn.Conv2d, x):
    if not isinstance(m.padding, tuple) or m.padding_mode != "zeros":
        ex.refuse(f"a float conv with padding {m.padding!r} ({m.padding_mode}) is not exported")
    g = ex.g
    inputs = [_float(ex, x), g.const(m.weight.detach().float().cpu().numpy(), np.float32, "weight")]
    if m.bias is not None:
        inputs.append(g.const(m.bias.detach().float().cpu().numpy(), np.float32, "bias"))
    return _float_module(ex, g.op("Conv", inputs, "conv", **_conv_attrs(m)))


def _batchnorm(ex: _Exporter, m: nn.BatchNorm2d, x):
    if m.training or m.running_mean is None:
        ex.refuse("a BatchNorm in training mode or without running statistics is not exported")
    g = ex.g
    n = m.num_features
    weight = m.weight if m.weight is not None else torch.ones(n)
    bias = m.bias if m.bias is not None else torch.zeros(n)
    args = [g.const(t.detach().float().cpu().numpy(), np.float32, "bn") for t in
            (weight, bias, m.running_mean, m.running_var)]
    return _float_module(ex, g.op("BatchNormalization", [_float(ex, x)] + args, "bn", epsilon=float(m.eps)))


def _silu(ex: _Exporter, x: str) -> str:
    return ex.g.op("Mul", [x, ex.g.op("Sigmoid", [x])])


def _hardswish(ex: _Exporter, x: str) -> str:
    # PyTorch's x * min(max(x + 3, 0), 6) / 6, operation by operation.
    g = ex.g
    c = lambda v: g.const(np.float32(v), np.float32)  # noqa: E731
    return g.op("Div", [g.op("Mul", [x, g.op("Min", [g.op("Max", [g.op("Add", [x, c(3)]), c(0)]), c(6)])]), c(6)])


def _leaky_relu(ex: _Exporter, m: nn.LeakyReLU, x):
    return _float_module(ex, ex.g.op("LeakyRelu", [_float(ex, x)], alpha=float(m.negative_slope)))


def _upsample(ex: _Exporter, m: nn.Upsample, x):
    sf = m.scale_factor
    sf = (sf, sf) if not isinstance(sf, (tuple, list)) else tuple(sf)
    if m.mode != "nearest" or m.size is not None or any(float(s) != int(s) or s < 1 for s in sf):
        ex.refuse(f"Upsample: only nearest upsampling by integer scale factors is exported, got mode={m.mode!r}, "
                  f"size={m.size!r}, scale_factor={m.scale_factor!r}")
    return _nearest(ex, _float(ex, x), int(sf[0]), int(sf[1]))


def _nearest(ex: _Exporter, x: str, sh: int, sw: int) -> str:
    g = ex.g
    scales = g.const([1.0, 1.0, float(sh), float(sw)], np.float32, "scales")
    return g.op("Resize", [x, "", scales], "upsample", mode="nearest", coordinate_transformation_mode="asymmetric",
                nearest_mode="floor")


def _maxpool_attrs(ex: _Exporter, kernel_size, stride, padding, dilation, ceil_mode) -> dict:
    pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
    (kh, kw), (ph, pw), (dh, dw) = pair(kernel_size), pair(padding), pair(dilation)
    s = pair(stride if stride not in (None, [], ()) else kernel_size)
    return {"kernel_shape": [kh, kw], "strides": s, "pads": [ph, pw, ph, pw], "dilations": [dh, dw],
            "ceil_mode": int(bool(ceil_mode))}


def _maxpool(ex: _Exporter, m: nn.MaxPool2d, x):
    if m.return_indices:
        ex.refuse("MaxPool2d with return_indices is not exported")
    attrs = _maxpool_attrs(ex, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    return ex.g.op("MaxPool", [_float(ex, x)], "maxpool", **attrs)


def _fixed_fusion(ex: _Exporter, m: FixedFusion, xs):
    g = ex.g
    xs = [_float(ex, x) for x in xs]
    if m.fuse == "concat":
        h = g.op("Concat", xs, "concat", axis=1)
    else:
        gates = m.gates.float().cpu().numpy()
        h = g.op("Mul", [xs[0], g.const(gates[0], np.float32)])
        for k in range(1, len(xs)):
            h = g.op("Add", [h, g.op("Mul", [xs[k], g.const(gates[k], np.float32)])])
    if m.scale is None:
        return h
    return g.op("Add", [g.op("Mul", [h, g.channel_const(m.scale.float().cpu().numpy())]),
                        g.channel_const(m.shift.float().cpu().numpy())])


def _activation(fn):
    return lambda ex, m, x: _float_module(ex, fn(ex, _float(ex, x)))


MODULE_EMITTERS = {
    IntConv2d: _int_conv,
    QuantizePack: _quantize_pack,
    nn.Conv2d: _conv,
    nn.BatchNorm2d: _batchnorm,
    nn.SiLU: _activation(_silu),
    nn.ReLU: _activation(lambda ex, x: ex.g.op("Relu", [x])),
    nn.Sigmoid: _activation(lambda ex, x: ex.g.op("Sigmoid", [x])),
    nn.Hardswish: _activation(_hardswish),
    nn.Identity: lambda ex, m, x: x,
    nn.LeakyReLU: _leaky_relu,
    nn.Upsample: _upsample,
    nn.MaxPool2d: _maxpool,
    FixedFusion: _fixed_fusion,
    **onnx_det_float.MODULE_EMITTERS,
}


def _packed_write(ex: _Exporter, out, src, channels: int, c_offset: int, total_channels: int):
    src = ex.codes(src)
    if src.channels != channels:
        ex.refuse(f"writes {channels} channels of codes that have {src.channels}")
    return _place(ex, src, out, c_offset, total_channels if out is None else None)


def _packed_upsample(ex: _Exporter, x, scale_h: int, scale_w: int):
    x = ex.codes(x)
    return Codes(_nearest(ex, x.name, scale_h, scale_w), x.channels, x.signed)


def _packed_maxpool(ex: _Exporter, x, channels, signed, kernel_size, stride, padding, dilation, ceil_mode):
    x = ex.codes(x)
    _check_sign(ex, x, signed, channels)
    attrs = _maxpool_attrs(ex, kernel_size, stride, padding, dilation, ceil_mode)
    return Codes(ex.g.op("MaxPool", [x.name], "maxpool", **attrs), x.channels, x.signed)


def _channel_affine(ex: _Exporter, x, scale, shift):
    g = ex.g
    return g.op("Add", [g.op("Mul", [_float(ex, x), g.channel_const(scale.float().cpu().numpy())]),
                        g.channel_const(shift.float().cpu().numpy())])


def _binary(op_type: str):
    def emit(ex: _Exporter, a, b, **kwargs):
        if kwargs:
            ex.refuse(f"{op_type} with {sorted(kwargs)} is not exported")
        names = [v if isinstance(v, str) else ex.g.const(np.float32(v), np.float32)
                 for v in (a, b) if isinstance(v, (str, int, float)) and not isinstance(v, bool)]
        if len(names) != 2:
            ex.refuse(f"{op_type} of {type(a).__name__} and {type(b).__name__} is not exported")
        return ex.g.op(op_type, names)
    return emit


def _getitem(ex: _Exporter, seq, index):
    if not isinstance(seq, (list, tuple)) or not isinstance(index, int) or isinstance(index, bool):
        ex.refuse(f"indexing a {type(seq).__name__} with {index!r} is not exported (only items of a split)")
    return seq[index]


def _matmul(ex: _Exporter, a, b):
    ex.float_layers.append(ex.node)
    return ex.g.op("MatMul", [_float(ex, a), _float(ex, b)])


def _cat(ex: _Exporter, tensors, dim: int = 0):
    tensors = [_float(ex, t) for t in tensors]
    return ex.g.op("Concat", tensors, "concat", axis=dim)


FUNCTION_EMITTERS = {
    packed_write: _packed_write,
    packed_upsample_nearest: _packed_upsample,
    packed_maxpool2d: _packed_maxpool,
    channel_affine: _channel_affine,
    operator.add: _binary("Add"), torch.add: _binary("Add"),
    operator.sub: _binary("Sub"),
    operator.mul: _binary("Mul"), torch.mul: _binary("Mul"),
    torch.cat: _cat,
    operator.getitem: _getitem,
    operator.matmul: _matmul,
    F.silu: lambda ex, x: _silu(ex, _float(ex, x)),
    F.relu: lambda ex, x: ex.g.op("Relu", [_float(ex, x)]),
    torch.relu: lambda ex, x: ex.g.op("Relu", [_float(ex, x)]),
    torch.sigmoid: lambda ex, x: ex.g.op("Sigmoid", [_float(ex, x)]),
    **onnx_det_float.FUNCTION_EMITTERS,
}


def _split(ex: _Exporter, x, sizes, dim: int = 0):
    if not isinstance(sizes, (list, tuple)) or not all(isinstance(v, int) and v > 0 for v in sizes):
        ex.refuse(f"split into {sizes!r}: only a list of sizes is exported")
    g = ex.g
    outs = [g.name("split") for _ in sizes]
    g.nodes.append(g.helper.make_node("Split", [_float(ex, x), g.const(list(sizes), np.int64)], outs,
                                      name=g.name("n_split"), axis=_axis(ex, dim)))
    return outs


def _axis(ex: _Exporter, dim: int) -> int:
    rank = ex.ranks[ex.index_of_first_arg]
    if not isinstance(dim, int) or not -rank <= dim < rank:
        ex.refuse(f"dim {dim!r} of a rank-{rank} tensor")
    return dim % rank


def _flatten(ex: _Exporter, x, start_dim: int = 0, end_dim: int = -1):
    g = ex.g
    start, end = _axis(ex, start_dim), _axis(ex, end_dim)
    rank = ex.ranks[ex.index_of_first_arg]
    x = _float(ex, x)
    parts = ([g.op("Shape", [x], end=start)] if start else []) + [g.const([-1], np.int64)]
    if end < rank - 1:
        parts.append(g.op("Shape", [x], start=end + 1))
    return g.op("Reshape", [x, g.op("Concat", parts, axis=0)], "flatten")


def _unflatten(ex: _Exporter, x, dim: int, sizes):
    g = ex.g
    d = _axis(ex, dim)
    if not isinstance(sizes, (list, tuple)) or not all(isinstance(v, int) for v in sizes):
        ex.refuse(f"unflatten into {sizes!r}")
    x = _float(ex, x)
    parts = ([g.op("Shape", [x], end=d)] if d else []) + [g.const(list(sizes), np.int64),
                                                          g.op("Shape", [x], start=d + 1)]
    return g.op("Reshape", [x, g.op("Concat", parts, axis=0)], "unflatten")


def _transpose(ex: _Exporter, x, dim0: int, dim1: int):
    rank = ex.ranks[ex.index_of_first_arg]
    perm = list(range(rank))
    a, b = _axis(ex, dim0), _axis(ex, dim1)
    perm[a], perm[b] = perm[b], perm[a]
    return ex.g.op("Transpose", [_float(ex, x)], perm=perm)


def _softmax(ex: _Exporter, x, dim: int):
    ex.float_layers.append(ex.node)
    return ex.g.op("Softmax", [_float(ex, x)], axis=_axis(ex, dim))


def _reshape_as(ex: _Exporter, x, other):
    g = ex.g
    return g.op("Reshape", [_float(ex, x), g.op("Shape", [_float(ex, other)])])


# call_method targets (a method of the tensor in the first argument).
METHOD_EMITTERS = {
    "split": _split, "flatten": _flatten, "unflatten": _unflatten, "transpose": _transpose, "softmax": _softmax,
    "view_as": _reshape_as, "reshape_as": _reshape_as,
    "mul": _binary("Mul"), "add": _binary("Add"), "sub": _binary("Sub"),
    "sigmoid": lambda ex, x: ex.g.op("Sigmoid", [_float(ex, x)]),
}


def _values(parsed, modules, attributes, x) -> list:
    """Each node's value on input x, from one run of the parsed graph (None after the output)."""
    env = [None] * len(parsed)
    with torch.no_grad():
        for i, (op, target, args, kwargs) in enumerate(parsed):
            args, kwargs = _fill(args, env), _fill(kwargs, env)
            if op == "placeholder":
                env[i] = x
            elif op == "call_module":
                env[i] = modules[target](*args, **kwargs)
            elif op == "call_function":
                env[i] = target(*args, **kwargs)
            elif op == "call_method":
                env[i] = getattr(args[0], target)(*args[1:], **kwargs)
            elif op == "get_attr":
                env[i] = attributes[target]
            if isinstance(env[i], torch.Tensor):
                env[i] = env[i].clone()  # a concat buffer is written again by later nodes
    return env


def node_values(int_model: IntModel, x: torch.Tensor) -> dict:
    """{node name: its value} of int_model on x (packed codes as the graph holds them): what `forced`
    inputs of export_onnx are fed with, and what its codes outputs compare with."""
    records, modules, attributes = graph_records(int_model)
    values = _values(parse_graph(records, modules, attributes), modules, attributes, x)
    return {r["name"]: v for r, v in zip(records, values)}


def quantized_float_nodes(int_model: IntModel) -> list[str]:
    """The nodes whose float values a QuantizePack quantizes, other than the graph's input: the float
    layers' outputs that integer layers read, which `forced` feeds from the model (teacher forcing)."""
    records, modules, _ = graph_records(int_model)
    inputs = {r["name"] for r in records if r["op"] == "placeholder"}
    names = []
    for r in records:
        if r["op"] == "call_module" and isinstance(modules[r["target"]], QuantizePack):
            src = r["args"]["tuple"][0]
            if isinstance(src, dict) and src.get("node") not in inputs and src.get("node") not in names:
                names.append(src["node"])
    return names


def _flat(v) -> list:
    if isinstance(v, (list, tuple)):
        return [x for a in v for x in _flat(a)]
    return [v]


def export_onnx(int_model: IntModel, example: torch.Tensor, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                check: bool = True, codes_outputs: bool = False, forced: tuple[str, ...] = ()) -> ExportReport:
    """Write int_model as ONNX to path (module docstring): one float32 input (N, C, H, W), any batch
    and size, the model's float outputs in order (with codes_outputs, then every integer layer's codes:
    ExportReport.codes_nodes). `forced` names nodes whose float values become extra inputs, in that
    order, instead of being computed (teacher forcing: tests feed them from the q2kernels model, so that
    the runtime's own float kernels cannot change what the integer layers receive). `example` fixes the input's channel count and, with
    check=True, is run through onnxruntime and compared with the model's outputs (ExportReport).
    Raises ExportRefused naming the first node that cannot be exported exactly."""
    if not isinstance(int_model, IntModel):
        raise TypeError(f"int_model: expected an IntModel (convert_to_int, load_int_model), got "
                        f"{type(int_model).__name__}")
    if not isinstance(example, torch.Tensor) or example.dim() != 4 or not example.is_floating_point():
        raise ValueError(f"example: expected a float (N, C, H, W) tensor, got {getattr(example, 'shape', example)!r}")
    if not isinstance(opset, int) or isinstance(opset, bool) or not 21 <= opset <= 26:
        raise ValueError(f"opset: expected an int in 21..26, got {opset!r}")
    check, codes_outputs = check_bool(check, "check"), check_bool(codes_outputs, "codes_outputs")
    if not isinstance(forced, (tuple, list)) or not all(isinstance(n, str) for n in forced):
        raise TypeError(f"forced: expected a tuple of node names, got {forced!r}")
    records, modules, attributes = graph_records(int_model)
    parsed = parse_graph(records, modules, attributes)
    unknown = set(forced) - {r["name"] for r in records}
    if unknown:
        raise ValueError(f"forced: no such nodes {sorted(unknown)}")
    g = GraphBuilder(opset)
    ex = _Exporter(g, modules)
    # One run of the graph on the example gives each node's rank (a call_method's dims need them), the
    # outputs to compare with, and the forced nodes' values.
    values = _values(parsed, modules, attributes, example)
    ex.ranks = [v.dim() if isinstance(v, torch.Tensor) else None for v in values]
    env = [None] * len(parsed)
    outputs, codes = [], []
    for i, ((op, target, args, kwargs), rec) in enumerate(zip(parsed, records)):
        ex.node = rec["name"]
        args, kwargs = _fill(args, env), _fill(kwargs, env)
        if rec["name"] in forced:
            if ex.ranks[i] is None:
                ex.refuse("only a tensor can be a forced input")
            name = g.name(f"forced.{rec['name']}")
            ex.forced.append(rec["name"])
            g.inputs.append(g.helper.make_tensor_value_info(name, g.TensorProto.FLOAT,
                                                            [f"{name}_dim{d}" for d in range(ex.ranks[i] or 0)]))
            env[i] = name
        elif op == "placeholder":
            name = g.name(rec["name"])
            g.inputs.append(g.helper.make_tensor_value_info(name, g.TensorProto.FLOAT,
                                                            ["batch", example.shape[1], "height", "width"]))
            env[i] = name
        elif op == "call_module":
            m = modules[target]
            emit = MODULE_EMITTERS.get(type(m))
            if emit is None:
                ex.refuse(f"a {type(m).__name__} module ({target}) has no exact ONNX form (the converter kept "
                          "it in float or fake-quant)")
            env[i] = emit(ex, m, *args, **kwargs)
            if codes_outputs and isinstance(env[i], (Codes, SharedCodes)):
                offset, made = (0, env[i]) if isinstance(env[i], Codes) else env[i].pieces[-1]
                codes.append((rec["name"], offset, made))
        elif op in ("call_function", "call_method"):
            emit = (FUNCTION_EMITTERS if op == "call_function" else METHOD_EMITTERS).get(target)
            if emit is None:
                what = f"function {getattr(target, '__name__', target)}" if op == "call_function" else \
                    f"tensor method {target}"
                ex.refuse(f"the {what} has no ONNX form here")
            first = parsed[i][2][0] if parsed[i][2] else None
            ex.index_of_first_arg = first.index if isinstance(first, _Ref) else None
            env[i] = emit(ex, *args, **kwargs)
        elif op == "output":
            outputs = _flat(args[0])
        else:
            ex.refuse(f"{op} nodes are not exported")
    ours = [t.float().cpu() for t in _flat(_fill(parsed[-1][2][0], values))]
    if len(ours) != len(outputs):
        raise ExportRefused(f"export_onnx: the graph has {len(outputs)} outputs, the model returned {len(ours)}")
    for k, (v, t) in enumerate(zip(outputs, ours)):
        ex.node = f"output {k}"
        name = g.op("Identity", [_float(ex, v)], f"output{k}")
        g.outputs.append(g.helper.make_tensor_value_info(name, g.TensorProto.FLOAT,
                                                         [f"output{k}_dim{d}" for d in range(t.dim())]))
    for node, offset, made in codes:
        name = g.op("Identity", [made.name], f"codes.{node}")
        g.outputs.append(g.helper.make_tensor_value_info(name, g.TensorProto.INT8, ["batch", made.channels, "h", "w"]))
    model = g.model("q2kernels.export_onnx")
    if int_model.detect_head is not None:
        # The decode after the raw maps (docs/integer-format.md, "The detect head record"), for the user's runtime.
        g.onnx.helper.set_model_props(model, {"q2kernels.detect_head": json.dumps(int_model.detect_head.record())})
    g.onnx.checker.check_model(model)
    path = os.fspath(path)
    g.onnx.save(model, path)
    report = ExportReport(path, opset, ex.integer_layers, ex.float_layers,
                          codes_nodes=[(node, offset, made.channels) for node, offset, made in codes],
                          forced_inputs=ex.forced)
    if check:
        _compare(report, {r["name"]: v for r, v in zip(records, values)}, ours, example)
    return report


def onnx_session(path: str | os.PathLike, threads: int = 0):
    """An onnxruntime CPU session of an exported model (threads: intra-op threads, 0: onnxruntime's choice)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("running the exported model needs onnxruntime: pip install \"q2kernels[onnx]\"") from e
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: str | os.PathLike, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """onnxruntime (CPU) on the graph's inputs in order (the image, then any forced values): the
    graph's outputs as CPU tensors."""
    session = onnx_session(path)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"inputs: the graph takes {len(names)} ({', '.join(names)}), got {len(inputs)}")
    feed = {n: t.detach().float().cpu().contiguous().numpy() for n, t in zip(names, inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def _compare(report: ExportReport, values: dict, ours: list[torch.Tensor], example: torch.Tensor) -> None:
    theirs = run_onnx(report.path, example, *(values[n] for n in report.forced_inputs))
    theirs = theirs[:len(ours)]
    report.outputs_identical = [a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))
                                for a, b in zip(ours, theirs)]
    report.max_abs_diff = [float((a - b).abs().nan_to_num(0.0).max()) if a.numel() else 0.0
                           for a, b in zip(ours, theirs)]
