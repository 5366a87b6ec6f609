"""IntGraph: a converted model's graph as data, run by walking its node list — no generated code.

A graph is a list of node records, {"name", "op", "target", "args", "kwargs"} (torch.fx's node
kinds), with argument values encoded as plain data: None, bool, int, float, str, lists, and
{"node": name} (an earlier node's value), {"tuple": [...]}, {"slice": [start, stop, step]},
{"dict": {key: value}}, {"dtype": name} (one of DTYPES). `parse_graph` checks every record before
anything is built: names are identifiers, every reference names an earlier node, module and
attribute targets exist, and what a node may call is on the allow-list below — FUNCTIONS
(call_function, by qualified name), METHODS (call_method on a tensor) and TENSOR_ATTRIBUTES (getattr
of a tensor). Adding a safe operation is one line in one of these tables. IntGraph then interprets
the parsed nodes in order; no value from a graph is ever turned into source code or looked up
outside these tables.
"""
from __future__ import annotations

import builtins
import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.node import _get_qualified_name

from .int_modules import channel_affine, packed_maxpool2d, packed_upsample_nearest, packed_write

# The dtypes an argument may name, by their torch name without "torch.".
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8,
    torch.bool)}

# What getattr(tensor, name) may read (e.g. YOLO heads read x.shape).
TENSOR_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim"})


def tensor_attribute(obj, name: str):
    """getattr as a graph may call it: only TENSOR_ATTRIBUTES of a tensor."""
    if not isinstance(obj, torch.Tensor) or name not in TENSOR_ATTRIBUTES:
        raise ValueError(f"getattr: a graph may read {sorted(TENSOR_ATTRIBUTES)} of a tensor, not {name!r} "
                         f"of a {type(obj).__name__}")
    return getattr(obj, name)


# call_function targets, by the qualified name torch.fx gives them. One line per safe operation.
FUNCTIONS = {_get_qualified_name(f): f for f in (
    torch.cat, torch.stack, torch.add, torch.mul, torch.relu, torch.sigmoid, torch.softmax, torch.flatten,
    torch.chunk, torch.split,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.getitem, operator.matmul,
    F.silu, F.relu, F.sigmoid, F.softmax, F.interpolate, F.max_pool2d,
    packed_upsample_nearest, packed_maxpool2d, packed_write, channel_affine)}
FUNCTIONS[_get_qualified_name(builtins.getattr)] = tensor_attribute

# call_method targets: methods of torch.Tensor (the receiver is checked to be a tensor).
METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "contiguous",
    "unsqueeze", "squeeze", "expand", "chunk", "split", "size", "sigmoid", "softmax", "float", "double", "half",
    "add", "sub", "mul", "div", "sum", "mean"})

OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
MAX_DEPTH = 32  # nesting of an argument value


class MalformedGraph(ValueError):
    """A graph record that does not describe a valid graph (the message says where and what)."""


class _Ref:
    """An argument that is the value of the node at `index`."""
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def is_module_path(path) -> bool:
    """A dotted module path: identifiers or non-negative integers (nn.Sequential's children)."""
    return isinstance(path, str) and all(p.isidentifier() or (p.isdigit() and p.isascii())
                                         for p in path.split("."))


def _parse_value(v, names: dict[str, int], where: str, depth: int = 0):
    if depth > MAX_DEPTH:
        raise MalformedGraph(f"{where}: an argument nested deeper than {MAX_DEPTH}")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_parse_value(a, names, where, depth + 1) for a in v]
    if isinstance(v, dict) and len(v) == 1:
        (tag, body), = v.items()
        if tag == "node":
            if not isinstance(body, str) or body not in names:
                raise MalformedGraph(f"{where}: refers to {body!r}, which is not an earlier node")
            return _Ref(names[body])
        if tag == "tuple" and isinstance(body, list):
            return tuple(_parse_value(a, names, where, depth + 1) for a in body)
        if tag == "slice" and isinstance(body, list) and len(body) == 3:
            return slice(*(_parse_value(a, names, where, depth + 1) for a in body))
        if tag == "dtype" and isinstance(body, str) and body in DTYPES:
            return DTYPES[body]
        if tag == "dict" and isinstance(body, dict) and all(isinstance(k, str) for k in body):
            return {k: _parse_value(a, names, where, depth + 1) for k, a in body.items()}
    raise MalformedGraph(f"{where}: bad argument value {_short(v)}")


def _short(v) -> str:
    r = repr(v) if not isinstance(v, torch.Tensor) else f"a tensor of shape {tuple(v.shape)}"
    return r if len(r) <= 80 else r[:77] + "..."


def parse_graph(nodes, modules, attributes) -> list[tuple]:
    """Check a list of node records against the allow-lists, the module paths `modules` and the tensor
    attribute paths `attributes`; return the nodes as (op, target or function, args, kwargs) with
    references resolved to indices. Raises MalformedGraph naming the node and what is wrong."""
    if not isinstance(nodes, list) or not nodes:
        raise MalformedGraph(f"nodes: expected a non-empty list of node records, got {_short(nodes)}")
    names, parsed = {}, []
    for i, n in enumerate(nodes):
        if not isinstance(n, dict) or set(n) != {"name", "op", "target", "args", "kwargs"}:
            raise MalformedGraph(f"node {i}: expected a record with keys name, op, target, args, kwargs, "
                                 f"got {_short(n)}")
        name, op, target = n["name"], n["op"], n["target"]
        if not isinstance(name, str) or not name.isidentifier() or name in names:
            raise MalformedGraph(f"node {i}: name {_short(name)} is not an identifier or is used twice")
        where = f"node {name!r}"
        if not isinstance(op, str) or op not in OPS:
            raise MalformedGraph(f"{where}: unknown op {_short(op)} (known: {', '.join(OPS)})")
        if (op == "output") != (i == len(nodes) - 1):
            raise MalformedGraph(f"{where}: the last node, and only it, must be the output")
        if op == "call_function":
            if not isinstance(target, str) or target not in FUNCTIONS:
                raise MalformedGraph(f"{where}: calls {_short(target)}, which is not an operation of integer "
                                     "models (int_graph.FUNCTIONS)")
            target = FUNCTIONS[target]
        elif op == "call_method" and not (isinstance(target, str) and target in METHODS):
            raise MalformedGraph(f"{where}: calls method {_short(target)}, which is not in int_graph.METHODS")
        elif op == "call_module" and not (isinstance(target, str) and target in modules):
            raise MalformedGraph(f"{where}: calls module {_short(target)}, which the file does not hold")
        elif op == "get_attr" and not (isinstance(target, str) and target in attributes):
            raise MalformedGraph(f"{where}: reads attribute {_short(target)}, which the file does not hold")
        elif op in ("placeholder", "output") and not (isinstance(target, str) and target.isidentifier()):
            raise MalformedGraph(f"{where}: target {_short(target)} is not an identifier")
        args = n["args"]
        if not (isinstance(args, dict) and set(args) == {"tuple"} and isinstance(args["tuple"], list)):
            raise MalformedGraph(f"{where}: args must be an encoded tuple, got {_short(args)}")
        kwargs = n["kwargs"]
        if not (isinstance(kwargs, dict) and set(kwargs) == {"dict"} and isinstance(kwargs["dict"], dict)
                and all(isinstance(k, str) and k.isidentifier() for k in kwargs["dict"])):
            raise MalformedGraph(f"{where}: kwargs must be an encoded dict with identifier keys, got {_short(kwargs)}")
        args, kwargs = _parse_value(args, names, where), _parse_value(kwargs, names, where)
        if op == "output" and (len(args) != 1 or kwargs):
            raise MalformedGraph(f"{where}: the output takes one argument")
        if target is tensor_attribute and (len(args) != 2 or not isinstance(args[1], str)
                                           or args[1] not in TENSOR_ATTRIBUTES or kwargs):
            raise MalformedGraph(f"{where}: getattr reads one of {sorted(TENSOR_ATTRIBUTES)}, got {_short(args)}")
        names[name] = i
        parsed.append((op, target, args, kwargs))
    return parsed


def _fill(v, env):
    if isinstance(v, _Ref):
        return env[v.index]
    if isinstance(v, (list, tuple)):
        return type(v)(_fill(a, env) for a in v)
    if isinstance(v, dict):
        return {k: _fill(a, env) for k, a in v.items()}
    if isinstance(v, slice):
        return slice(_fill(v.start, env), _fill(v.stop, env), _fill(v.step, env))
    return v


def _install(root: nn.Module, path: str, value) -> None:
    """Register a module or a tensor (as a buffer) at a dotted path, creating plain parents."""
    *parents, last = path.split(".")
    m = root
    for p in parents:
        if p not in m._modules:
            m.add_module(p, nn.Module())
        m = m._modules[p]
    if isinstance(value, nn.Module):
        m.add_module(last, value)
    else:
        m.register_buffer(last, value)


class IntGraph(nn.Module):
    """A graph of node records (module docstring) over `modules` ({path: module}) and `attributes`
    ({path: tensor}), run by interpreting its nodes. `records` keeps the records (save_int_model
    writes them back)."""

    def __init__(self, records: list, modules: dict[str, nn.Module], attributes: dict[str, torch.Tensor]):
        super().__init__()
        self._nodes = parse_graph(records, modules, attributes)
        self.records = records
        for path, m in modules.items():
            _install(self, path, m)
        for path, t in attributes.items():
            _install(self, path, t)
        self.inputs = sum(op == "placeholder" for op, *_ in self._nodes)

    def forward(self, *inputs):
        if len(inputs) != self.inputs:
            raise TypeError(f"inputs: the model takes {self.inputs} input(s), got {len(inputs)}")
        env, position = [], 0
        for op, target, args, kwargs in self._nodes:
            if op == "placeholder":
                value = inputs[position]
                position += 1
            elif op == "output":
                return _fill(args[0], env)
            else:
                args, kwargs = _fill(args, env), _fill(kwargs, env)
                if op == "call_function":
                    value = target(*args, **kwargs)
                elif op == "call_module":
                    value = self.get_submodule(target)(*args, **kwargs)
                elif op == "get_attr":
                    value = self.get_buffer(target)
                else:
                    if not args or not isinstance(args[0], torch.Tensor):
                        raise TypeError(f"{target}: a graph calls methods of tensors only")
                    value = getattr(args[0], target)(*args[1:], **kwargs)
            env.append(value)
