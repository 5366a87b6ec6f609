"""save_int_model / load_int_model: a converted integer model as plain data.

The file holds only what torch.load(weights_only=True) accepts: the graph as a list of node records
(operation, target name, arguments), each module as its type name, constructor arguments and
tensors (packed codes, scales, epilogues), the conversion report, and the format version. Loading
never unpickles code: modules are rebuilt from a fixed list of types and functions are looked up in
a fixed table, so a file cannot run anything but these.
"""
from __future__ import annotations

import operator
import os

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import _get_qualified_name

from ..nn.fusion import GatedFusion
from ..nn.modules import QConv2d
from ..nn.n2uq import N2UQQuantizer, N2UQWeightQuantizer
from ..nn.quantizers import DoReFaWeightQuantizer, LSQPlusQuantizer, LSQQuantizer, PACTQuantizer
from ..ops import int_conv as ic
from .convert import IntModel
from .fusion import FixedFusion
from .int_modules import (IntConv2d, QuantizePack, channel_affine, packed_maxpool2d, packed_upsample_nearest,
                          packed_write)

FORMAT = "q2kernels.int_model"
FORMAT_VERSION = 1

_FUNCTIONS = {_get_qualified_name(f): f for f in (
    torch.cat, torch.add, torch.mul, torch.relu, torch.sigmoid, torch.flatten, operator.add, operator.mul,
    operator.getitem, operator.matmul, F.silu, F.relu, F.interpolate, F.max_pool2d, packed_upsample_nearest,
    packed_maxpool2d, packed_write, channel_affine)}


def _conv_config(m: nn.Conv2d) -> dict:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": m.kernel_size,
            "stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups,
            "bias": m.bias is not None, "padding_mode": m.padding_mode}


def _quantizer_record(q):
    if q is None:
        return None
    if isinstance(q, LSQQuantizer):
        cfg = {"bits": q.bits, "mode": q.mode, "axis": q.axis, "grad_scale": q.grad_scale,
               "channels": None if q.axis is None else q.s.numel()}
    elif isinstance(q, PACTQuantizer):
        cfg = {"bits": q.bits, "alpha_init": q.alpha_init}
    elif isinstance(q, (DoReFaWeightQuantizer, N2UQQuantizer, N2UQWeightQuantizer)):
        cfg = {"bits": q.bits}
    else:
        raise ValueError(f"save_int_model: a {type(q).__name__} quantizer cannot be saved")
    return {"type": type(q).__name__, "config": cfg, "state": q.state_dict()}


_QUANTIZERS = {c.__name__: c for c in (LSQQuantizer, LSQPlusQuantizer, PACTQuantizer, DoReFaWeightQuantizer,
                                        N2UQQuantizer, N2UQWeightQuantizer)}


def _build_quantizer(rec):
    if rec is None:
        return None
    q = _QUANTIZERS[rec["type"]](**rec["config"])
    q.load_state_dict(rec["state"])
    return q


# Activations without constructor arguments.
_SIMPLE = {c.__name__: c for c in (nn.SiLU, nn.ReLU, nn.Identity, nn.Sigmoid, nn.Hardswish)}


def _module_record(name: str, m: nn.Module) -> dict:
    t = type(m).__name__
    if isinstance(m, (IntConv2d, QuantizePack)):
        return {"type": t, "config": m.config(), "tensors": {k: b for k, b in m._buffers.items()}}
    if type(m) is nn.Conv2d:
        return {"type": t, "config": _conv_config(m), "state": m.state_dict()}
    if type(m) is QConv2d:
        return {"type": t, "config": _conv_config(m), "state": {k: v for k, v in m.state_dict().items()
                                                               if k in ("weight", "bias")},
                "weight_quantizer": _quantizer_record(m.weight_quantizer),
                "act_quantizer": _quantizer_record(m.act_quantizer)}
    if type(m) is nn.BatchNorm2d:
        return {"type": t, "config": {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                                      "affine": m.affine, "track_running_stats": m.track_running_stats},
                "state": m.state_dict()}
    if type(m) is nn.Upsample:
        return {"type": t, "config": {"size": m.size, "scale_factor": m.scale_factor, "mode": m.mode,
                                      "align_corners": m.align_corners}}
    if type(m) is nn.MaxPool2d:
        return {"type": t, "config": {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                                      "dilation": m.dilation, "ceil_mode": m.ceil_mode}}
    if type(m) is nn.LeakyReLU:
        return {"type": t, "config": {"negative_slope": m.negative_slope}}
    if type(m) is FixedFusion:
        return {"type": t, "config": {"channels": m.channels, "fuse": m.fuse},
                "tensors": {k: b for k, b in m._buffers.items()}}
    if type(m) is GatedFusion:
        return {"type": t, "config": {"channels": m.channels, "mode": m.mode, "fuse": m.fuse,
                                      "affine": m.gamma is not None, "eps": m.eps},
                "state": m.state_dict()}
    if type(m) in _SIMPLE.values():
        return {"type": t, "config": {}}
    raise ValueError(f"save_int_model: module {name!r} of type {t} cannot be saved (supported: IntConv2d, "
                     "QuantizePack, Conv2d, QConv2d, BatchNorm2d, Upsample, MaxPool2d, activations, FixedFusion, "
                     "GatedFusion)")


def _build_module(rec: dict) -> nn.Module:
    t, cfg = rec["type"], rec["config"]
    if t == "IntConv2d":
        return IntConv2d(**{k: v for k, v in cfg.items()}, **rec["tensors"])
    if t == "QuantizePack":
        return QuantizePack(**cfg, **rec["tensors"])
    if t == "FixedFusion":
        return FixedFusion(cfg["channels"], cfg["fuse"], **rec["tensors"])
    classes = {"Conv2d": nn.Conv2d, "BatchNorm2d": nn.BatchNorm2d, "Upsample": nn.Upsample,
               "MaxPool2d": nn.MaxPool2d, "LeakyReLU": nn.LeakyReLU, "GatedFusion": GatedFusion, **_SIMPLE}
    if t == "QConv2d":
        m = QConv2d(**cfg, weight_quantizer=_build_quantizer(rec["weight_quantizer"]),
                    act_quantizer=_build_quantizer(rec["act_quantizer"]))
        m.load_state_dict({**m.state_dict(), **rec["state"]})
        return m
    if t not in classes:
        raise ValueError(f"load_int_model: unknown module type {t!r} in the file")
    m = classes[t](**cfg)
    if "state" in rec:
        m.load_state_dict(rec["state"])
    return m


def _encode(v, where):
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, tuple):
        return {"tuple": [_encode(a, where) for a in v]}
    if isinstance(v, list):
        return [_encode(a, where) for a in v]
    if isinstance(v, dict):
        return {"dict": {k: _encode(a, where) for k, a in v.items()}}
    if isinstance(v, slice):
        return {"slice": [_encode(v.start, where), _encode(v.stop, where), _encode(v.step, where)]}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"save_int_model: node {where!r} has an argument of type {type(v).__name__} that cannot be saved")


def _decode(v, env):
    if isinstance(v, list):
        return [_decode(a, env) for a in v]
    if isinstance(v, dict):
        if "node" in v:
            return env[v["node"]]
        if "tuple" in v:
            return tuple(_decode(a, env) for a in v["tuple"])
        if "slice" in v:
            return slice(*(_decode(a, env) for a in v["slice"]))
        return {k: _decode(a, env) for k, a in v["dict"].items()}
    return v


def save_int_model(model: IntModel, path: str | os.PathLike) -> None:
    """Write a converted model (convert_to_int) to `path` (module docstring)."""
    if not isinstance(model, IntModel):
        raise TypeError(f"model: expected an IntModel from convert_to_int, got {type(model).__name__}")
    gm = model.net
    nodes, modules, attrs = [], {}, {}
    for n in gm.graph.nodes:
        target = n.target
        if n.op == "call_function":
            target = _get_qualified_name(n.target)
            if target not in _FUNCTIONS:
                raise ValueError(f"save_int_model: node {n.name!r} calls {target}, which cannot be saved")
        elif n.op == "call_module" and target not in modules:
            modules[target] = _module_record(target, gm.get_submodule(target))
        elif n.op == "get_attr":
            attrs[target] = getattr(gm, target)
        nodes.append({"name": n.name, "op": n.op, "target": target, "args": _encode(n.args, n.name),
                      "kwargs": _encode(dict(n.kwargs), n.name)})
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "channel_align": ic.CHANNEL_ALIGN,
                "nodes": nodes, "modules": modules, "attrs": attrs, "report": dict(model.report)}, path)


def load_int_model(path: str | os.PathLike, map_location=None) -> IntModel:
    """Read a model written by save_int_model (torch.load with weights_only=True)."""
    rec = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise ValueError(f"path: {os.fspath(path)!r} is not a q2kernels integer model (save_int_model) file")
    if rec.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"path: {os.fspath(path)!r} has format version {rec.get('format_version')!r}, this version "
                         f"of q2kernels reads version {FORMAT_VERSION}: convert and save the model again")
    if rec.get("channel_align") != ic.CHANNEL_ALIGN:
        raise ValueError(f"path: {os.fspath(path)!r} packs channels in multiples of {rec.get('channel_align')!r}, "
                         f"this build of q2kernels._C in multiples of {ic.CHANNEL_ALIGN}")
    targets = {name: _build_module(r) for name, r in rec["modules"].items()}
    targets.update(rec["attrs"])
    graph, env = fx.Graph(), {}
    for n in rec["nodes"]:
        op, target = n["op"], n["target"]
        args, kwargs = _decode(n["args"], env), _decode(n["kwargs"], env)
        if op == "placeholder":
            node = graph.placeholder(target)
        elif op == "output":
            node = graph.output(args[0])
        elif op == "call_function":
            if target not in _FUNCTIONS:
                raise ValueError(f"load_int_model: the file calls {target!r}, which is not an operation of "
                                 "integer models")
            node = graph.call_function(_FUNCTIONS[target], tuple(args), kwargs)
        elif op == "call_module":
            node = graph.call_module(target, tuple(args), kwargs)
        elif op == "call_method":
            node = graph.call_method(target, tuple(args), kwargs)
        else:
            node = graph.get_attr(target)
        env[n["name"]] = node
    return IntModel(fx.GraphModule(targets, graph), rec["report"]).eval()
