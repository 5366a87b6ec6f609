"""save_int_model / load_int_model: a converted integer model as plain data.

The file holds only what torch.load(weights_only=True) accepts: the graph as a list of node records
(int_graph's format), each module as its type name, constructor arguments and tensors (packed
codes, scales, epilogues), the conversion report, the format version and the channel alignment, and,
for a detector, optionally its head's decode as a detect_head record (deploy.detect_head.DetectHead).

Loading never turns file content into code. The whole record is checked before anything is built:
its keys, version and alignment, every module record (a type from MODULE_KINDS, plain-data
constructor arguments, tensors; quantizers by their registered kind), every node (int_graph.
parse_graph: identifiers, references that resolve, calls from the allow-lists). Each module is
then built first on the meta device, so that constructor arguments that disagree with the file's
tensors are refused before any memory is allocated for them, and the model runs as an int_graph.
IntGraph, which interprets the checked nodes. Every problem is a ValueError naming the file and
what is wrong.

This module does not import q2kernels.nn (the training code, with Triton): the fake-quant module
kinds a file may hold (a layer kept in float as its QConv2d, a GatedFusion) name their class, which is
imported only when a file holds one. A model of integer layers loads and runs without it.
"""
from __future__ import annotations

import importlib
import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn
from torch.fx.node import _get_qualified_name

from ..ops import int_conv as ic
from .detect_head import DetectHead
from .fixed_fusion import FixedFusion
from .int_graph import DTYPES, FUNCTIONS, MAX_DEPTH, IntGraph, MalformedGraph, is_module_path, parse_graph
from .int_model import IntModel
from .int_modules import IntConv2d, QuantizePack

FORMAT = "q2kernels.int_model"
FORMAT_VERSION = 1
RECORD_KEYS = ("format", "format_version", "channel_align", "nodes", "modules", "attrs", "report")
OPTIONAL_KEYS = ("detect_head",)  # a file without them is read as before they existed


def _conv_config(m: nn.Conv2d) -> dict:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": m.kernel_size,
            "stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups,
            "bias": m.bias is not None, "padding_mode": m.padding_mode}


_NN = "q2kernels.nn"


def _nn():
    """q2kernels.nn, imported on the first record that needs it (module docstring)."""
    return importlib.import_module(_NN)


@dataclass(frozen=True)
class ModuleKind:
    """A module type a file may hold: its class (by module and name, imported when first needed), its
    constructor arguments, and where its tensors go: "state" (load_state_dict), "buffers" (constructor
    arguments, its buffers) or "none"."""
    module: str
    name: str
    config: Callable[[nn.Module], dict]
    tensors: str

    @property
    def cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.name)


def _kind(cls: type, config: Callable[[nn.Module], dict], tensors: str) -> ModuleKind:
    return ModuleKind(cls.__module__, cls.__name__, config, tensors)


def _no_config(m):
    return {}


MODULE_KINDS: dict[str, ModuleKind] = {k.name: k for k in (
    _kind(IntConv2d, IntConv2d.config, "buffers"),
    _kind(QuantizePack, QuantizePack.config, "buffers"),
    _kind(FixedFusion, lambda m: {"channels": m.channels, "fuse": m.fuse}, "buffers"),
    _kind(nn.Conv2d, _conv_config, "state"),
    ModuleKind(_NN, "QConv2d", _conv_config, "state"),
    _kind(nn.BatchNorm2d, lambda m: {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                                     "affine": m.affine, "track_running_stats": m.track_running_stats}, "state"),
    ModuleKind(_NN, "GatedFusion", lambda m: {"channels": m.channels, "mode": m.mode, "fuse": m.fuse,
                                              "affine": m.gamma is not None, "eps": m.eps}, "state"),
    _kind(nn.Upsample, lambda m: {"size": m.size, "scale_factor": m.scale_factor, "mode": m.mode,
                                  "align_corners": m.align_corners}, "none"),
    _kind(nn.MaxPool2d, lambda m: {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                                   "dilation": m.dilation, "ceil_mode": m.ceil_mode}, "none"),
    _kind(nn.LeakyReLU, lambda m: {"negative_slope": m.negative_slope}, "none"),
    *(_kind(c, _no_config, "none") for c in (nn.SiLU, nn.ReLU, nn.Identity, nn.Sigmoid, nn.Hardswish)))}

_QUANTIZER_SLOTS = ("weight_quantizer", "act_quantizer")


# Saving.
def _quantizer_record(q):
    """A quantizer as its kind, constructor arguments and state (the quantizer protocol)."""
    return None if q is None else {"type": q.kind, "config": q.config(), "state": q.state_dict()}


def _module_record(name: str, m: nn.Module) -> dict:
    t = type(m).__name__
    kind = MODULE_KINDS.get(t)
    if kind is None or type(m) is not kind.cls:
        raise ValueError(f"save_int_model: module {name!r} of type {t} cannot be saved (supported: "
                         f"{', '.join(MODULE_KINDS)})")
    rec = {"type": t, "config": kind.config(m)}
    if kind.tensors == "buffers":
        rec["tensors"] = dict(m._buffers)
    elif t == "QConv2d":
        rec["state"] = {k: v for k, v in m.state_dict().items() if k in ("weight", "bias")}
        rec.update({slot: _quantizer_record(getattr(m, slot)) for slot in _QUANTIZER_SLOTS})
    elif kind.tensors == "state":
        rec["state"] = m.state_dict()
    return rec


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
    if isinstance(v, torch.dtype) and str(v).removeprefix("torch.") in DTYPES:
        return {"dtype": str(v).removeprefix("torch.")}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"save_int_model: node {where!r} has an argument of type {type(v).__name__} that cannot be saved")


def _node_records(gm: fx.GraphModule) -> list[dict]:
    nodes = []
    for n in gm.graph.nodes:
        target = n.target
        if n.op == "call_function":
            target = _get_qualified_name(n.target)
            if target not in FUNCTIONS:
                raise ValueError(f"save_int_model: node {n.name!r} calls {target}, which cannot be saved "
                                 "(int_graph.FUNCTIONS)")
        nodes.append({"name": n.name, "op": n.op, "target": target, "args": _encode(n.args, n.name),
                      "kwargs": _encode(dict(n.kwargs), n.name)})
    return nodes


def save_int_model(model: IntModel, path: str | os.PathLike, detect_head: DetectHead | None = None) -> None:
    """Write a converted model (convert_to_int, or one load_int_model read) to `path` (module docstring),
    with `detect_head` (default: the model's own, which a model read from a file with one carries)."""
    if not isinstance(model, IntModel):
        raise TypeError(f"model: expected an IntModel from convert_to_int, got {type(model).__name__}")
    if detect_head is not None and not isinstance(detect_head, DetectHead):
        raise TypeError(f"detect_head: expected a DetectHead or None, got {type(detect_head).__name__}")
    head = detect_head if detect_head is not None else model.detect_head
    net = model.net
    nodes = net.records if isinstance(net, IntGraph) else _node_records(net)
    modules, attrs = {}, {}
    for n in nodes:
        if n["op"] == "call_module" and n["target"] not in modules:
            modules[n["target"]] = _module_record(n["target"], net.get_submodule(n["target"]))
        elif n["op"] == "get_attr":
            owner, _, attr = n["target"].rpartition(".")
            attrs[n["target"]] = getattr(net.get_submodule(owner), attr)
    rec = {"format": FORMAT, "format_version": FORMAT_VERSION, "channel_align": ic.CHANNEL_ALIGN,
           "nodes": nodes, "modules": modules, "attrs": attrs, "report": dict(model.report)}
    if head is not None:
        rec["detect_head"] = head.record()
    try:
        check_record(rec)  # what is written loads: the same checks as load_int_model
    except MalformedGraph as e:
        raise ValueError(f"save_int_model: the model cannot be saved: {e}") from None
    torch.save(rec, path)


# Loading: check everything, then build.
def _check_plain(v, where, depth=0):
    """Constructor arguments: None, bool, int, float, str, and lists/tuples/str-keyed dicts of them."""
    if depth > MAX_DEPTH:
        raise MalformedGraph(f"{where}: nested deeper than {MAX_DEPTH}")
    if isinstance(v, (list, tuple)):
        for a in v:
            _check_plain(a, where, depth + 1)
    elif isinstance(v, dict):
        for k, a in v.items():
            if not isinstance(k, str):
                raise MalformedGraph(f"{where}: a key {k!r} that is not a string")
            _check_plain(a, where, depth + 1)
    elif not (v is None or isinstance(v, (bool, int, float, str))):
        raise MalformedGraph(f"{where}: a value of type {type(v).__name__} where plain data belongs")


def _check_config(cfg, where):
    if not isinstance(cfg, dict) or not all(isinstance(k, str) and k.isidentifier() for k in cfg):
        raise MalformedGraph(f"{where}: config must be a dict with identifier keys")
    _check_plain(cfg, f"{where} config")


def _check_tensors(d, where, allow_none=False):
    if not isinstance(d, dict) or not all(isinstance(k, str) and k for k in d):
        raise MalformedGraph(f"{where}: expected a dict of named tensors")
    for k, v in d.items():
        if isinstance(v, torch.Tensor) or (allow_none and v is None):
            continue
        raise MalformedGraph(f"{where}: {k} is a {type(v).__name__}, not a tensor")


def _check_module_record(name, r):
    where = f"module {name!r}"
    if not is_module_path(name):
        raise MalformedGraph(f"{where}: the name is not a dotted path of identifiers")
    if not isinstance(r, dict) or not isinstance(r.get("type"), str) or r["type"] not in MODULE_KINDS:
        t = r.get("type") if isinstance(r, dict) else r
        raise MalformedGraph(f"{where}: unknown module type {t!r} (known: {', '.join(MODULE_KINDS)})")
    kind = MODULE_KINDS[r["type"]]
    where = f"{where} ({r['type']})"
    qconv = r["type"] == "QConv2d"
    expected = {"type", "config", *({"buffers": ["tensors"], "state": ["state"], "none": []}[kind.tensors])}
    if qconv:
        expected |= set(_QUANTIZER_SLOTS)
    if set(r) != expected:
        raise MalformedGraph(f"{where}: expected the keys {sorted(expected)}, got {sorted(r, key=str)}")
    _check_config(r["config"], where)
    if kind.tensors == "buffers":
        _check_tensors(r["tensors"], where, allow_none=True)
    elif kind.tensors == "state":
        _check_tensors(r["state"], where)
    for slot in _QUANTIZER_SLOTS if qconv else ():
        q = r[slot]
        if q is None:
            continue
        kinds = _nn().QUANTIZER_KINDS
        if (not isinstance(q, dict) or set(q) != {"type", "config", "state"} or not isinstance(q["type"], str)
                or q["type"] not in kinds):
            raise MalformedGraph(f"{where} {slot}: expected a quantizer record of a registered kind "
                                 f"({', '.join(kinds)})")
        _check_config(q["config"], f"{where} {slot}")
        _check_tensors(q["state"], f"{where} {slot}")


def check_record(rec) -> None:
    """Check a whole file record (module docstring); MalformedGraph says what is wrong."""
    if not isinstance(rec, dict) or not isinstance(rec.get("format"), str) or rec["format"] != FORMAT:
        raise MalformedGraph("is not a q2kernels integer model (save_int_model) file")
    if "format_version" not in rec:
        raise MalformedGraph("has no format_version")
    if type(rec["format_version"]) is not int or rec["format_version"] != FORMAT_VERSION:
        raise MalformedGraph(f"has format version {rec['format_version']!r}, this version of q2kernels reads "
                             f"version {FORMAT_VERSION}: convert and save the model again")
    if "channel_align" not in rec:
        raise MalformedGraph("has no channel_align")
    if type(rec["channel_align"]) is not int or rec["channel_align"] != ic.CHANNEL_ALIGN:
        raise MalformedGraph(f"packs channels in multiples of {rec['channel_align']!r}, this build of "
                             f"q2kernels._C in multiples of {ic.CHANNEL_ALIGN}")
    if not set(RECORD_KEYS) <= set(rec) <= {*RECORD_KEYS, *OPTIONAL_KEYS}:
        raise MalformedGraph(f"has the keys {sorted(rec, key=str)}; expected {sorted(RECORD_KEYS)} and optionally "
                             f"{sorted(OPTIONAL_KEYS)}")
    modules, attrs, report = rec["modules"], rec["attrs"], rec["report"]
    if not isinstance(modules, dict):
        raise MalformedGraph(f"modules: expected a dict, got {type(modules).__name__}")
    for name, r in modules.items():
        _check_module_record(name, r)
    _check_tensors(attrs, "attrs")
    bad = [k for k in attrs if not is_module_path(k)]
    if bad:
        raise MalformedGraph(f"attrs: {bad[0]!r} is not a dotted path of identifiers")
    if not isinstance(report, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in report.items()):
        raise MalformedGraph("report: expected a dict of strings")
    parse_graph(rec["nodes"], modules, attrs)
    if "detect_head" in rec:
        try:
            DetectHead.from_record(rec["detect_head"])
        except (TypeError, ValueError) as e:
            raise MalformedGraph(str(e)) from None


def _construct(r: dict) -> nn.Module:
    kind, cfg = MODULE_KINDS[r["type"]], r["config"]
    if kind.cls is FixedFusion:
        return FixedFusion(cfg["channels"], cfg["fuse"], **r["tensors"])
    if kind.tensors == "buffers":
        return kind.cls(**cfg, **r["tensors"])
    if r["type"] == "QConv2d":
        quantizers = {slot: None if r[slot] is None else _nn().quantizer_class(r[slot]["type"])(**r[slot]["config"])
                      for slot in _QUANTIZER_SLOTS}
        return kind.cls(**cfg, **quantizers)
    return kind.cls(**cfg)


def _state(r: dict) -> dict:
    """Every tensor the file gives the module, by its state_dict key; the metadata a quantizer's state
    was saved with goes along (load_state_dict then checks the settings against the record's config)."""
    state = OrderedDict(r.get("state", r.get("tensors", {})))
    state._metadata = {}
    for slot in _QUANTIZER_SLOTS:
        if r.get(slot) is not None:
            state.update({f"{slot}.{k}": v for k, v in r[slot]["state"].items()})
            state._metadata[slot] = _saved_metadata(r[slot]["state"])
    return state


def _saved_metadata(state) -> dict:
    """The metadata a quantizer's state_dict was saved with: a dict of plain data, or {} if it has none."""
    metadata = getattr(state, "_metadata", None)
    local = {} if metadata is None else metadata.get("", {}) if isinstance(metadata, dict) else None
    if not isinstance(local, dict):
        raise MalformedGraph("a quantizer state's metadata is not a dict")
    _check_plain(local, "a quantizer state's metadata")
    return local


def _build_module(name: str, r: dict) -> nn.Module:
    try:
        state = _state(r)
        with torch.device("meta"):
            probe = _construct(r)
        for k, v in probe.state_dict().items():
            given = state.get(k)
            if isinstance(v, torch.Tensor) and (not isinstance(given, torch.Tensor) or given.shape != v.shape):
                got = tuple(given.shape) if isinstance(given, torch.Tensor) else "none"
                raise MalformedGraph(f"its configuration needs a tensor {k} of shape {tuple(v.shape)}, the file "
                                     f"has {got}")
        m = _construct(r)
        if MODULE_KINDS[r["type"]].tensors == "state":
            # Every tensor is there (the probe checked); the record's type and config are the settings.
            unexpected = m.load_state_dict(state, strict=False).unexpected_keys
            if unexpected:
                raise MalformedGraph(f"the file has tensors the module does not: {unexpected}")
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError, IndexError, OverflowError) as e:
        raise MalformedGraph(f"module {name!r} ({r['type']}): {e}") from None
    return m


def load_int_model(path: str | os.PathLike, map_location=None) -> IntModel:
    """Read a model written by save_int_model (torch.load with weights_only=True; module docstring)."""
    where = f"load_int_model: {os.fspath(path)!r}"
    if os.path.getsize(path) == 0:
        raise ValueError(f"{where} is empty (0 bytes), not a q2kernels integer model file")
    try:
        rec = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message suggests weights_only=False: not for a model file
        detail = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
        raise ValueError(f"{where} is corrupt or holds objects other than tensors and plain data "
                         f"({detail})") from None
    except Exception as e:  # torch.load's errors on a damaged file are of many types
        raise ValueError(f"{where} is truncated or corrupt: torch.load failed with {type(e).__name__}: {e}") from None
    try:
        check_record(rec)
        modules = {name: _build_module(name, r) for name, r in rec["modules"].items()}
        net = IntGraph(rec["nodes"], modules, rec["attrs"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{where}: {e}") from None
    head = DetectHead.from_record(rec["detect_head"]) if "detect_head" in rec else None  # checked above
    return IntModel(net, rec["report"], head).eval()
