"""save_int_model / load_int_model: a converted integer model as plain data.

The file holds only what torch.load(weights_only=True) accepts: the graph as a list of node records
(int_graph's format), each module as its type name, constructor arguments and tensors (packed
codes, scales, epilogues), the conversion report, the format version and the channel alignment, and,
for a detector, optionally its head's decode as a detect_head record (deploy.detect_head.DetectHead).

Loading never turns file content into code, and bounds its memory and time by what the file holds.
Before torch.load, the archive's pickles are scanned (no object is built): a value may not expand
to more than MAX_RECORD_ITEMS items (a shared reference counted at each use: nested shared lists
or tuples would otherwise double the work per level) nor nest deeper than MAX_RECORD_DEPTH, and
no entry may be compressed. The file is read onto the CPU whatever device it was saved from. Then
every tensor is checked where it lies in the record: strided, on the CPU, at most
MAX_TENSOR_ELEMENTS elements, no more elements than its storage holds (an expanded, stride-0
tensor would otherwise turn a few bytes into gigabytes when a module copies it), and together no
more bytes than the file holds. Then the whole record is checked before anything is built:
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
import pickletools
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn
from torch.fx.node import _get_qualified_name

from .._validate import check_bool, check_choice, check_int, check_number
from ..ops import int_conv as ic
from .det_float import DetConv2d
from .detect_head import DetectHead
from .fixed_fusion import FixedFusion
from .int_graph import DTYPES, FUNCTIONS, MAX_DEPTH, IntGraph, MalformedGraph, is_module_path, parse_graph
from .int_model import IntModel
from .int_modules import MAX_CHANNELS, MAX_GEOMETRY, IntConv2d, QuantizePack

FORMAT = "q2kernels.int_model"
FORMAT_VERSION = 1
RECORD_KEYS = ("format", "format_version", "channel_align", "nodes", "modules", "attrs", "report")
OPTIONAL_KEYS = ("detect_head",)  # a file without them is read as before they existed

# What one file may declare (module docstring). A converted YOLO11s record is about 30 000 items and
# nests 12 deep; its largest tensor has 2.4 million elements.
MAX_RECORD_ITEMS = 2**20
MAX_RECORD_DEPTH = MAX_DEPTH + 8
MAX_TENSOR_ELEMENTS = 2**28


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
    _kind(DetConv2d, DetConv2d.config, "buffers"),
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


def graph_records(model: IntModel):
    """(node records, {path: module}, {path: tensor}) of a converted or loaded model: its graph as data."""
    net = model.net
    records = _node_records(net) if isinstance(net, fx.GraphModule) else getattr(net, "records", None)
    if records is None:
        raise TypeError(f"int_model: expected a converted or loaded integer model, got a {type(net).__name__} net")
    modules = {name: m for name, m in net.named_modules() if name}
    attributes = {name: t for name, t in net.named_buffers()}
    return records, modules, attributes


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


# Loading: bound what the file makes torch.load and the checks below do.
class _Size:
    """What a pickled value expands to: items (shared references counted at each use) and depth."""
    __slots__ = ("items", "depth")

    def __init__(self, items=1, depth=1):
        self.items, self.depth = items, depth


_MARK = object()
_MUTATORS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}  # add to the object below them
_PUTS, _GETS = {"PUT", "BINPUT", "LONG_BINPUT"}, {"GET", "BINGET", "LONG_BINGET"}


def _pop_to_mark(stack) -> list:
    k = len(stack) - 1 - stack[::-1].index(_MARK)
    items = stack[k + 1:]
    del stack[k:]
    return items


def _scan_pickle(data: bytes, entry: str) -> None:
    """Simulate the pickle's stack with sizes instead of objects (pickletools: nothing is built) and
    refuse a value that expands past MAX_RECORD_ITEMS items or MAX_RECORD_DEPTH levels: unpickling and
    hashing it (a tuple as a dict key), and every check after, would take time and memory doubling
    with each level of shared references."""
    stack, memo = [], {}
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name == "MARK":
            stack.append(_MARK)
            continue
        if name in _PUTS or name == "MEMOIZE":
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            continue
        if name in _GETS:
            stack.append(memo[arg])
            continue
        if name in ("STOP", "PROTO", "FRAME"):
            continue
        if name in _MUTATORS:
            parts = _pop_to_mark(stack) if any(b.name == "mark" for b in op.stack_before) else \
                [stack.pop() for _ in op.stack_before[1:]]
            target = stack[-1]
            target.items += sum(p.items for p in parts)
            target.depth = max([target.depth, *(p.depth + 1 for p in parts)])
            _check_size(target, entry)
            continue
        marked = any(b.name == "mark" for b in op.stack_before)
        parts = _pop_to_mark(stack) if marked else [stack.pop() for b in op.stack_before]
        for _ in op.stack_after:
            size = _Size(1 + sum(p.items for p in parts), 1 + max((p.depth for p in parts), default=0))
            _check_size(size, entry)
            stack.append(size)


def _check_size(size: _Size, entry: str) -> None:
    if size.items > MAX_RECORD_ITEMS:
        raise MalformedGraph(f"{entry}: holds a value of more than {MAX_RECORD_ITEMS} items (lists, dicts, tuples, "
                             "numbers, strings; a shared reference counted at each use)")
    if size.depth > MAX_RECORD_DEPTH:
        raise MalformedGraph(f"{entry}: holds a value nested deeper than {MAX_RECORD_DEPTH} levels")


def _check_archive(path) -> None:
    """The file is torch.save's zip archive, its entries stored (a compressed entry could inflate past the
    file's size), its pickles bounded (_scan_pickle)."""
    if not zipfile.is_zipfile(path):
        raise MalformedGraph("is truncated or corrupt, or not a model file: it is not a zip archive (the format "
                             "torch.save and save_int_model write)")
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise MalformedGraph(f"entry {info.filename!r} is compressed; torch.save stores every entry as is")
            if info.filename.endswith(".pkl"):
                _scan_pickle(archive.read(info), f"entry {info.filename!r}")


def _record_tensors(rec):
    """(where, tensor) for every tensor in the record, with the bounded nesting of _check_archive."""
    stack = [(rec, ())]
    while stack:
        v, path = stack.pop()
        if isinstance(v, torch.Tensor):
            yield "".join(f"[{k!r}]" for k in path), v
        elif isinstance(v, dict):
            stack.extend((a, (*path, k)) for k, a in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((a, (*path, k)) for k, a in enumerate(v))


def _check_tensor(where: str, t: torch.Tensor) -> int:
    """A tensor a module may copy: strided, on the CPU, and no larger than the storage the file gives
    it; returns its bytes."""
    if t.layout != torch.strided or t.is_quantized:
        raise MalformedGraph(f"tensor {where}: has layout {t.layout}{' (quantized)' if t.is_quantized else ''}; "
                             "a model file holds plain strided tensors")
    if t.device.type != "cpu":
        raise MalformedGraph(f"tensor {where}: is on {t.device}; a model file's tensors are read onto the CPU")
    n = t.numel()
    if n > MAX_TENSOR_ELEMENTS:
        raise MalformedGraph(f"tensor {where}: has {n} elements, more than {MAX_TENSOR_ELEMENTS}")
    stored = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    if n > stored:
        raise MalformedGraph(f"tensor {where}: declares {n} elements (shape {tuple(t.shape)}, stride {t.stride()}) "
                             f"over a storage of {max(stored, 0)}: an expanded or overlapping tensor")
    return n * t.element_size()


def _check_tensors_bounded(rec, file_bytes: int | None) -> None:
    """Every tensor (_check_tensor) and, for a file, all of them together (each reference counted: a
    module copies what it is given) no larger than the file."""
    total = sum(_check_tensor(where, t) for where, t in _record_tensors(rec))
    if file_bytes is not None and total > file_bytes:
        raise MalformedGraph(f"its tensors declare {total} bytes, more than the file's {file_bytes}: a tensor "
                             "is referenced more than once")


# The configuration values of the torch.nn and q2kernels.nn module kinds, checked (never coerced: a
# constructor would turn groups=2.5 into 2 or bias="no" into True) and bounded before a module is
# built. IntConv2d and QuantizePack check their own arguments the same way.
MAX_BRANCHES = 64  # inputs of one fusion node
MAX_MAP_SIZE = 2**14  # an upsampled map's height or width
MAX_UPSAMPLE = 64  # an upsampling factor
MAX_SLOPE = 1e6  # a leaky ReLU's negative slope


def _geometry(lo, hi, words=()):
    """An integer in lo..hi or a pair of them (a conv's kernel_size, stride, ...), or one of `words`."""
    def check(v, name):
        if isinstance(v, str) and v in words:
            return
        for x in v if isinstance(v, (list, tuple)) and len(v) == 2 else [v]:
            check_int(x, name, lo, hi)
    return check


def _optional(check):
    def optional(v, name):
        if v is not None:
            check(v, name)
    return optional


def _number(lo, lo_allowed, hi=None):
    return lambda v, name: check_number(v, name, lo, lo_allowed, hi)


def _upsample_scale(v, name):
    for x in v if isinstance(v, (list, tuple)) and len(v) == 2 else [v]:
        check_number(x, name, 0, False, MAX_UPSAMPLE)


def _channel_list(v, name):
    if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= MAX_BRANCHES:
        raise ValueError(f"{name}: expected a list of 1 to {MAX_BRANCHES} channel counts, got {v!r}")
    for c in v:
        check_int(c, name, 1, MAX_CHANNELS)


_CHANNELS = _geometry(1, MAX_CHANNELS)
_CONV_CONFIG = {"in_channels": _CHANNELS, "out_channels": _CHANNELS, "kernel_size": _geometry(1, MAX_GEOMETRY),
                "stride": _geometry(1, MAX_GEOMETRY), "padding": _geometry(0, MAX_GEOMETRY, ("same", "valid")),
                "dilation": _geometry(1, MAX_GEOMETRY), "groups": _CHANNELS, "bias": check_bool,
                "padding_mode": lambda v, name: check_choice(v, name, ("zeros", "reflect", "replicate", "circular"))}
CONFIG_CHECKS = {
    "Conv2d": _CONV_CONFIG,
    "QConv2d": _CONV_CONFIG,
    "BatchNorm2d": {"num_features": _CHANNELS, "eps": _number(0, False), "momentum": _optional(_number(0, True, 1)),
                    "affine": check_bool, "track_running_stats": check_bool},
    "GatedFusion": {"channels": _channel_list, "mode": lambda v, name: check_choice(v, name, ("learned", "balanced")),
                    "fuse": lambda v, name: check_choice(v, name, ("concat", "sum")), "affine": check_bool,
                    "eps": _number(0, False)},
    "FixedFusion": {"channels": _channel_list, "fuse": lambda v, name: check_choice(v, name, ("concat", "sum"))},
    "Upsample": {"size": _optional(_geometry(1, MAX_MAP_SIZE)), "scale_factor": _optional(_upsample_scale),
                 "mode": lambda v, name: check_choice(v, name, ("nearest", "nearest-exact", "bilinear", "bicubic")),
                 "align_corners": _optional(check_bool)},
    "MaxPool2d": {"kernel_size": _geometry(1, MAX_GEOMETRY), "stride": _optional(_geometry(1, MAX_GEOMETRY)),
                  "padding": _geometry(0, MAX_GEOMETRY), "dilation": _geometry(1, MAX_GEOMETRY),
                  "ceil_mode": check_bool},
    "LeakyReLU": {"negative_slope": _number(-MAX_SLOPE, True, MAX_SLOPE)},
    **{t: {} for t in ("SiLU", "ReLU", "Identity", "Sigmoid", "Hardswish")},
}


def _check_config_values(kind: str, cfg: dict, where: str) -> None:
    """The record's config against CONFIG_CHECKS (a kind without an entry checks its own arguments)."""
    checks = CONFIG_CHECKS.get(kind)
    if checks is None:
        return
    if set(cfg) != set(checks):
        raise MalformedGraph(f"{where} config: expected the keys {sorted(checks)}, got {sorted(cfg)}")
    for key, check in checks.items():
        try:
            check(cfg[key], key)
        except (TypeError, ValueError) as e:
            raise MalformedGraph(f"{where} config {e}") from None


def _check_fixed_fusion(cfg: dict, tensors: dict, where: str) -> None:
    """FixedFusion's buffers fit its channels: gates (K,) for fuse="sum" only, scale and shift together,
    one per output channel (FixedFusion itself does not check them)."""
    channels, fuse = cfg["channels"], cfg["fuse"]
    out = sum(channels) if fuse == "concat" else channels[0]
    if fuse == "sum" and len(set(channels)) != 1:
        raise MalformedGraph(f"{where} config channels: fuse='sum' needs equal channel counts, got {channels}")
    expected = {"gates": (len(channels),) if fuse == "sum" else None, "scale": (out,), "shift": (out,)}
    if set(tensors) != set(expected):
        raise MalformedGraph(f"{where}: expected the tensors {sorted(expected)}, got {sorted(tensors)}")
    if (tensors["scale"] is None) != (tensors["shift"] is None):
        raise MalformedGraph(f"{where}: scale and shift: give both or neither")
    for key, shape in expected.items():
        t = tensors[key]
        if t is not None and (shape is None or tuple(t.shape) != shape or not t.is_floating_point()):
            raise MalformedGraph(f"{where}: {key}: expected {'none' if shape is None else f'a float tensor {shape}'}"
                                 f" for fuse={fuse!r}, got {t.dtype} {tuple(t.shape)}")


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
    _check_config_values(r["type"], r["config"], where)
    if kind.tensors == "buffers":
        _check_tensors(r["tensors"], where, allow_none=True)
    if r["type"] == "FixedFusion":
        _check_fixed_fusion(r["config"], r["tensors"], where)
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


def check_record(rec, file_bytes: int | None = None) -> None:
    """Check a whole file record (module docstring), read from a file of `file_bytes` bytes if given;
    MalformedGraph says what is wrong."""
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
    _check_tensors_bounded(rec, file_bytes)
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


def _optional_entry(module: nn.Module, key: str) -> bool:
    """Whether state entry `key` of `module` is one its owner declares optional (`optional_state_keys`:
    added after files were written without it)."""
    owner, _, leaf = key.rpartition(".")
    return leaf in getattr(module.get_submodule(owner) if owner else module, "optional_state_keys", ())


def _build_module(name: str, r: dict) -> nn.Module:
    try:
        state = _state(r)
        with torch.device("meta"):
            probe = _construct(r)
        for k, v in probe.state_dict().items():
            given = state.get(k)
            if given is None and _optional_entry(probe, k):
                continue  # an entry newer than the file (e.g. a quantizer's settings): the module's default
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
    """Read a model written by save_int_model (torch.load with weights_only=True; module docstring) onto
    the CPU, whatever device it was saved from, then move it to `map_location` (a device) if given."""
    where = f"load_int_model: {os.fspath(path)!r}"
    device = _device(map_location)
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{where} is empty (0 bytes), not a q2kernels integer model file")
    try:
        _check_archive(path)
    except MalformedGraph as e:
        raise ValueError(f"{where}: {e}") from None
    except (ValueError, IndexError, KeyError, EOFError, zipfile.BadZipFile) as e:  # pickletools on a damaged pickle
        raise ValueError(f"{where} is truncated or corrupt: {type(e).__name__}: {e}") from None
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message suggests weights_only=False: not for a model file
        detail = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
        raise ValueError(f"{where} is corrupt or holds objects other than tensors and plain data "
                         f"({detail})") from None
    except Exception as e:  # torch.load's errors on a damaged file are of many types
        raise ValueError(f"{where} is truncated or corrupt: torch.load failed with {type(e).__name__}: {e}") from None
    try:
        check_record(rec, size)
        modules = {name: _build_module(name, r) for name, r in rec["modules"].items()}
        net = IntGraph(rec["nodes"], modules, rec["attrs"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{where}: {e}") from None
    head = DetectHead.from_record(rec["detect_head"]) if "detect_head" in rec else None  # checked above
    model = IntModel(net, rec["report"], head).eval()
    return model if device is None else model.to(device)


def _device(map_location) -> torch.device | None:
    """map_location as a device (torch.load's dict and callable forms do not apply: the file is always
    read onto the CPU)."""
    if map_location is None:
        return None
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location: expected a device (a str or torch.device) or None, got "
                        f"{type(map_location).__name__}")
    try:
        return torch.device(map_location)
    except RuntimeError as e:
        raise ValueError(f"map_location: {e}") from None
