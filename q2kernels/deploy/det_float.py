"""Deterministic float layers: the float layers of an integer model as one defined sequence of float32
operations, so that every backend computes the same bits.

A converted model keeps some layers in float: a stem conv that reads the image, a detector's
prediction convs, an attention's matmuls and softmax. PyTorch, cuDNN and onnxruntime each sum a conv
or a matmul in their own order and each has its own exp, so these layers' last bits depend on where
the model runs; a value on a rounding boundary of the next quantizer then flips a code, and the
flip travels to the outputs. `deterministic_float(int_model)` replaces each of them by an op of
ops.det_float, whose result is defined operation by operation (a conv's taps summed in one order,
no fma, exp as the epilogue's polynomial): the model then gives the same bits on the CPU, on CUDA
and in onnxruntime (deploy.onnx_export writes the same operations), and an ONNX export of it
reproduces its outputs bit for bit.

What it rewrites:
- nn.Conv2d, with the BatchNorm2d and the ReLU or SiLU that only it feeds, becomes one DetConv2d:
  the BatchNorm folded into the weight and bias (in float64, rounded once to float32).
- A BatchNorm2d on its own becomes a 1x1 depthwise DetConv2d (its per-channel scale and shift).
- SiLU (module or function) becomes det_silu; matmul det_matmul; softmax det_softmax.
What it leaves: every float op that is already exact (adds, products, concats, splits, views, max
pooling, nearest upsampling, ReLU) and the integer layers. A float op it has no deterministic form
for stays as it is; `inexact_float_nodes` names such nodes (deploy.onnx_export reports them too).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.node import _get_qualified_name

from .._validate import check_choice, check_int
from ..ops import det_float as df
from ..ops import int_conv as ic
from .int_graph import FUNCTIONS, IntGraph
from .int_model import IntModel
from .int_modules import MAX_CHANNELS, _pair

ACTIVATIONS = tuple(ic.ACTIVATIONS)  # identity, relu, silu


def _check_weight(t, name: str, shape: tuple) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a float32 tensor of shape {shape}, got {got}")
    if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: has non-finite values (a deterministic conv's weights and bias are finite)")
    return t


class DetConv2d(nn.Module):
    """A float conv computed by ops.det_float.det_conv2d: act(bias + sum of weight·x over the taps,
    the taps in order (input channel, kernel row, kernel column), every product and sum one float32
    rounding). weight (C_out, C_in/groups, KH, KW) and bias (C_out) or None: float32, finite."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int,
                 act: str, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        # Checked, never coerced: a model file gives these values.
        self.in_channels = check_int(in_channels, "in_channels", 1, MAX_CHANNELS)
        self.out_channels = check_int(out_channels, "out_channels", 1, MAX_CHANNELS)
        self.groups = check_int(groups, "groups", 1, MAX_CHANNELS)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups: {groups} does not divide in_channels {in_channels} and out_channels "
                             f"{out_channels}")
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride, self.dilation = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
        self.padding = _pair(padding, "padding", 0)
        self.act = check_choice(act, "act", ACTIVATIONS)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self.register_buffer("weight", _check_weight(weight, "weight", shape))
        self.register_buffer("bias", None if bias is None else _check_weight(bias, "bias", (self.out_channels,)))

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "kernel_size": self.kernel_size,
                "stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups,
                "act": self.act}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return df.det_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                             self.act)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, act={self.act}")


# What deterministic_float turns into det ops (by module type, function or method name), and the
# float ops that are exact as they are (IEEE basic operations, data movement): anything else that
# computes on floats is inexact.
_SILU = (F.silu,)
_MATMUL = (operator.matmul,)
_SOFTMAX = (F.softmax, torch.softmax)
_ACT_MODULES = {nn.SiLU: "silu", nn.ReLU: "relu"}
_ACT_FUNCTIONS = {F.silu: "silu", F.relu: "relu", torch.relu: "relu"}
INEXACT_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Upsample)
INEXACT_FUNCTIONS = frozenset(_get_qualified_name(f) for f in (
    operator.matmul, torch.softmax, F.softmax, F.silu, torch.sigmoid, F.sigmoid, F.interpolate))
INEXACT_METHODS = frozenset({"softmax", "sigmoid", "sum", "mean"})


def _refs(v, out: list) -> list:
    """The node names an encoded argument value refers to."""
    if isinstance(v, dict):
        if set(v) == {"node"}:
            out.append(v["node"])
        else:
            for a in v.values():
                _refs(a, out)
    elif isinstance(v, list):
        for a in v:
            _refs(a, out)
    return out


def _args(r) -> list:
    return r["args"]["tuple"]


def _kwargs(r) -> dict:
    return r["kwargs"]["dict"]


def _graph(model: IntModel):
    if not isinstance(model, IntModel):
        raise TypeError(f"int_model: expected an IntModel (convert_to_int, load_int_model), got {type(model).__name__}")
    from .serialize import graph_records  # serialize imports this module (DetConv2d is a file's module kind)
    return graph_records(model)


def _is_upsample_nearest(m) -> bool:
    return isinstance(m, nn.Upsample) and m.mode == "nearest"


def inexact_float_nodes(int_model: IntModel) -> list[str]:
    """The nodes of int_model whose float results depend on the backend (a runtime's own conv, matmul,
    softmax, exp): what deterministic_float has not replaced."""
    records, modules, _ = _graph(int_model)
    names = []
    for r in records:
        t = r["target"]
        if r["op"] == "call_module":
            m = modules[t]
            inexact = isinstance(m, INEXACT_MODULES) and not _is_upsample_nearest(m)
        elif r["op"] == "call_function":
            inexact = t in INEXACT_FUNCTIONS and not (t == _get_qualified_name(F.interpolate)
                                                      and _kwargs(r).get("mode", "nearest") == "nearest")
        else:
            inexact = r["op"] == "call_method" and t in INEXACT_METHODS
        if inexact:
            names.append(r["name"])
    return names


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """conv's weight and bias with bn (eval) folded in: computed in float64, rounded once to float32."""
    w = conv.weight.detach().double().cpu()
    b = None if conv.bias is None else conv.bias.detach().double().cpu()
    if bn is None:
        return w.float(), None if b is None else b.float()
    scale, shift = _bn_affine(bn)
    b = shift if b is None else b * scale + shift
    return (w * scale.view(-1, 1, 1, 1)).float(), b.float()


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm2d in float64."""
    if bn.training or bn.running_mean is None:
        raise ValueError("a BatchNorm2d in training mode or without running statistics has no fixed affine")
    n = bn.num_features
    gamma = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones(n, dtype=torch.float64)
    beta = bn.bias.detach().double().cpu() if bn.bias is not None else torch.zeros(n, dtype=torch.float64)
    scale = gamma / torch.sqrt(bn.running_var.detach().double().cpu() + bn.eps)
    return scale, beta - bn.running_mean.detach().double().cpu() * scale


def _det_conv(conv: nn.Conv2d, bn, act: str) -> DetConv2d:
    w, b = _fold(conv, bn)
    return DetConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, act, w, b)


def _bn_conv(bn: nn.BatchNorm2d) -> DetConv2d:
    scale, shift = _bn_affine(bn)
    n = bn.num_features
    return DetConv2d(n, n, (1, 1), (1, 1), (0, 0), (1, 1), n, "identity", scale.float().view(n, 1, 1, 1),
                     shift.float())


def _function_record(name: str, fn, args: list, kwargs: dict | None = None) -> dict:
    return {"name": name, "op": "call_function", "target": _get_qualified_name(fn), "args": {"tuple": args},
            "kwargs": {"dict": kwargs or {}}}


def _softmax_dim(r) -> int | None:
    """The dim of a softmax record, or None where it has settings det_softmax does not take (a dtype)."""
    args, kwargs = _args(r)[1:], dict(_kwargs(r))
    kwargs.pop("_stacklevel", None)
    if kwargs.pop("dtype", None) is not None:
        return None
    dim = args[0] if args else kwargs.pop("dim", None)
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and not kwargs and len(args) <= 1 else None


def _is_eval_bn(m) -> bool:
    return type(m) is nn.BatchNorm2d and not m.training and m.running_mean is not None


def deterministic_float(int_model: IntModel) -> IntModel:
    """int_model with its float layers replaced by deterministic ones (module docstring): a new IntModel
    (loaded-model form, an IntGraph) whose outputs are the same bits on every backend. Its report
    records each replacement; the input model is not changed."""
    records, modules, attributes = _graph(int_model)
    readers: dict[str, list[int]] = {}
    calls: dict[str, int] = {}
    for i, r in enumerate(records):
        for name in set(_refs(r["args"], []) + _refs(r["kwargs"], [])):
            readers.setdefault(name, []).append(i)
        if r["op"] == "call_module":
            calls[r["target"]] = calls.get(r["target"], 0) + 1

    def module_of(i):
        return modules[records[i]["target"]] if records[i]["op"] == "call_module" else None

    def sole_reader(i):
        """The record that alone reads record i's value, and reads only it, or None."""
        u = readers.get(records[i]["name"], [])
        if len(u) != 1:
            return None
        r = records[u[0]]
        extra = {k for k in _kwargs(r) if k != "inplace"}
        return u[0] if _args(r) == [{"node": records[i]["name"]}] and not extra else None

    def act_of(j) -> str | None:
        r = records[j]
        if r["op"] == "call_module":
            return _ACT_MODULES.get(type(module_of(j)))
        return _ACT_FUNCTIONS.get(_target(r)) if r["op"] == "call_function" else None

    new_modules, report = dict(modules), dict(int_model.report)
    replaced: dict[int, dict] = {}   # record index -> the record that takes its place
    absorbed: set[int] = set()       # records folded into a later one
    for i, r in enumerate(records):
        if i in absorbed or i in replaced:  # folded into a conv already
            continue
        m = module_of(i)
        if type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple) \
                and calls[r["target"]] == 1:
            # The conv, then the BatchNorm and the activation that only it feeds: one DetConv2d.
            chain, bn, act = [i], None, "identity"
            j = sole_reader(i)
            if j is not None and _is_eval_bn(module_of(j)):
                bn = module_of(j)
                chain.append(j)
            j = sole_reader(chain[-1])
            if j is not None and act_of(j) is not None:
                act = act_of(j)
                chain.append(j)
            new_modules[r["target"]] = _det_conv(m, bn, act)
            replaced[chain[-1]] = {"name": records[chain[-1]]["name"], "op": "call_module", "target": r["target"],
                                   "args": r["args"], "kwargs": {"dict": {}}}
            absorbed.update(chain[:-1])
            report[r["target"]] = (f"float conv{' + BatchNorm' if bn is not None else ''}"
                                   f"{' + ' + act if act != 'identity' else ''}: DetConv2d (deterministic float)")
        elif _is_eval_bn(m):
            new_modules[r["target"]] = _bn_conv(m)
            report[r["target"]] = "float BatchNorm: DetConv2d 1x1 depthwise (deterministic float)"
        elif type(m) is nn.SiLU or (r["op"] == "call_function" and _target(r) in _SILU and not _kwargs(r)):
            replaced[i] = _function_record(r["name"], df.det_silu, _args(r))
        elif r["op"] == "call_function" and _target(r) in _MATMUL and not _kwargs(r):
            replaced[i] = _function_record(r["name"], df.det_matmul, _args(r))
        elif ((r["op"] == "call_function" and _target(r) in _SOFTMAX)
              or (r["op"] == "call_method" and r["target"] == "softmax")) and _softmax_dim(r) is not None:
            replaced[i] = _function_record(r["name"], df.det_softmax, [_args(r)[0], _softmax_dim(r)])
    out = [replaced.get(i, r) for i, r in enumerate(records) if i not in absorbed]
    called = {r["target"]: new_modules[r["target"]] for r in out if r["op"] == "call_module"}
    read = {r["target"]: attributes[r["target"]] for r in out if r["op"] == "get_attr"}
    return IntModel(IntGraph(out, called, read), report, int_model.detect_head)


def _target(r):
    """A call_function record's function (records hold qualified names; int_graph.FUNCTIONS resolves them)."""
    return FUNCTIONS.get(r["target"])
