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

IntGraph also checks, when it is built, what a file could otherwise make fail (or overwrite) only
at run time: module and attribute paths that nest in or replace one another, each module call's
arguments against its forward's signature (an IntConv2d head that exists, a concat buffer that
holds the layer's channels), and the channel counts between consecutive layers. A forward's memory
and time are bounded by its inputs: the first call for each input signature first runs the graph
on the meta device (shapes only, nothing allocated), and refuses, naming the node, a graph whose
live tensors would exceed FORWARD_LIVE_FACTOR times the inputs' bytes or that would write more
than FORWARD_WORK_FACTOR times them in all (each at least FORWARD_FLOOR_BYTES). Each value is
released after its last use.
"""
from __future__ import annotations

import builtins
import inspect
import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.fx.node import _get_qualified_name

from ..ops import det_float
from .int_modules import MAX_CHANNELS, channel_affine, packed_maxpool2d, packed_upsample_nearest, packed_write

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
    packed_upsample_nearest, packed_maxpool2d, packed_write, channel_affine,
    det_float.det_matmul, det_float.det_softmax, det_float.det_silu)}
FUNCTIONS[_get_qualified_name(builtins.getattr)] = tensor_attribute

# call_method targets: methods of torch.Tensor (the receiver is checked to be a tensor).
METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "contiguous",
    "unsqueeze", "squeeze", "expand", "chunk", "split", "size", "sigmoid", "softmax", "float", "double", "half",
    "add", "sub", "mul", "div", "sum", "mean"})

OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
MAX_DEPTH = 32  # nesting of an argument value

# A forward's bounds (module docstring). A converted detector holds a few maps of its input's size at
# once (packed codes take half a byte per channel, the float heads a few channels): far below these.
FORWARD_LIVE_FACTOR = 64     # live tensor bytes <= 64 x the inputs' bytes
FORWARD_WORK_FACTOR = 1024   # bytes written in one forward <= 1024 x the inputs' bytes
FORWARD_FLOOR_BYTES = 256 * 2**20  # small inputs still get this much
MAX_CHECKED_SIGNATURES = 64  # input signatures whose shape run is remembered
MAX_CONCAT_CHANNELS = MAX_CHANNELS  # channels of one concat buffer a module call may ask for


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


def _check_paths(modules, attributes) -> None:
    """No module or attribute path may equal or lie inside another: installed later, it would replace or
    modify what was checked before (an attribute "conv.weight" over an IntConv2d's packed weight)."""
    owners = {path: "module" for path in modules}
    for path in attributes:
        if path in owners:
            raise MalformedGraph(f"attribute {path!r}: the file also holds a module {path!r}")
        owners[path] = "attribute"
    for path, kind in owners.items():
        parts = path.split(".")
        for k in range(1, len(parts)):
            parent = ".".join(parts[:k])
            if parent in owners:
                raise MalformedGraph(f"{kind} {path!r}: lies inside {owners[parent]} {parent!r}, which it would modify")


def _leaves(v, kind):
    """The values of type `kind` inside an argument value (nested lists, tuples, dicts, slices)."""
    if isinstance(v, kind):
        yield v
    elif isinstance(v, (list, tuple)):
        for a in v:
            yield from _leaves(a, kind)
    elif isinstance(v, dict):
        for a in v.values():
            yield from _leaves(a, kind)
    elif isinstance(v, slice):
        yield from _leaves([v.start, v.stop, v.step], kind)


def _refs(v):
    """The node indices an argument value refers to."""
    return (r.index for r in _leaves(v, _Ref))


def _release_after(nodes) -> list[list[int]]:
    """For each node, the nodes whose value is used for the last time there (a value nobody uses is
    released where it is made)."""
    last = list(range(len(nodes)))
    for i, (_, _, args, kwargs) in enumerate(nodes):
        for j in _refs((args, kwargs)):
            last[j] = i
    release = [[] for _ in nodes]
    for j, i in enumerate(last):
        release[i].append(j)
    return release


def _map_tensors(v, fn):
    if isinstance(v, torch.Tensor):
        return fn(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_map_tensors(a, fn) for a in v)
    if isinstance(v, dict):
        return {k: _map_tensors(a, fn) for k, a in v.items()}
    return v


def _tensors(v):
    return _leaves(v, torch.Tensor)


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    return t.to("meta")


def _signature(inputs):
    """What a forward's shapes depend on: each input's shape, dtype and device, or a scalar's value;
    None (never remembered) for anything else."""
    key = []
    for v in inputs:
        if isinstance(v, torch.Tensor):
            key.append((tuple(v.shape), v.dtype, v.device))
        elif v is None or isinstance(v, (bool, int, float, str)):
            key.append((type(v), v))
        else:
            return None
    return tuple(key)


class _Budget:
    """The memory and work of one forward, by storage (views share their base's), against its limits."""

    def __init__(self, inputs):
        given = sum(t.numel() * t.element_size() for t in _tensors(inputs))
        self.live_limit = max(FORWARD_FLOOR_BYTES, FORWARD_LIVE_FACTOR * given)
        self.work_limit = max(FORWARD_FLOOR_BYTES, FORWARD_WORK_FACTOR * given)
        self.given, self.live, self.work, self.storages = given, 0, 0, {}

    def hold(self, name: str, value) -> None:
        for t in _tensors(value):
            key = t.untyped_storage()._cdata
            held = self.storages.setdefault(key, [t.untyped_storage().nbytes(), 0])
            if held[1] == 0:
                self.live += held[0]
                self.work += held[0]
            held[1] += 1
        if self.live > self.live_limit or self.work > self.work_limit:
            raise ValueError(
                f"node {name!r}: the forward would hold {self.live} bytes of tensors at once and write {self.work} "
                f"in all, for inputs of {self.given} bytes; the limits are {self.live_limit} and {self.work_limit} "
                f"(int_graph.FORWARD_LIVE_FACTOR = {FORWARD_LIVE_FACTOR}, FORWARD_WORK_FACTOR = "
                f"{FORWARD_WORK_FACTOR} times the inputs' bytes, at least FORWARD_FLOOR_BYTES)")

    def release(self, value) -> None:
        for t in _tensors(value):
            held = self.storages[t.untyped_storage()._cdata]
            held[1] -= 1
            if held[1] == 0:
                self.live -= held[0]


# Modules whose output has their input's shape and dtype.
_ELEMENTWISE = (nn.BatchNorm2d, nn.ReLU, nn.SiLU, nn.Identity, nn.Sigmoid, nn.Hardswish, nn.LeakyReLU)


def _meta_module_call(m: nn.Module, args, kwargs):
    """A module's output on meta inputs, from meta copies of its tensors. A layer kept in float reads its
    quantizers' state, which meta tensors do not have: a conv's output shape is its geometry's."""
    if isinstance(m, _ELEMENTWISE) and len(args) == 1 and isinstance(args[0], torch.Tensor) and not kwargs:
        return torch.empty_like(args[0])  # meta batch_norm decomposes through torch._dynamo, which imports triton
    tensors = {n: _to_meta(t) for n, t in (*m.named_parameters(), *m.named_buffers())}
    try:
        return functional_call(m, tensors, args, kwargs, tie_weights=False)
    except (RuntimeError, NotImplementedError):
        if not (isinstance(m, nn.Conv2d) and len(args) == 1 and not kwargs):
            raise
        return F.conv2d(args[0], tensors["weight"], tensors.get("bias"), m.stride, m.padding, m.dilation, m.groups)


class IntGraph(nn.Module):
    """A graph of node records (module docstring) over `modules` ({path: module}) and `attributes`
    ({path: tensor}), run by interpreting its nodes. `records` keeps the records (save_int_model
    writes them back)."""

    def __init__(self, records: list, modules: dict[str, nn.Module], attributes: dict[str, torch.Tensor]):
        super().__init__()
        self._nodes = parse_graph(records, modules, attributes)
        _check_paths(modules, attributes)
        names = [r["name"] for r in records]
        for name, (op, target, args, kwargs) in zip(names, self._nodes):
            if op == "call_module":
                _check_module_call(name, modules[target], args, kwargs)
        _check_channels(names, self._nodes, modules)
        self.records = records
        for path, m in modules.items():
            _install(self, path, m)
        for path, t in attributes.items():
            _install(self, path, t)
        self.inputs = sum(op == "placeholder" for op, *_ in self._nodes)
        self._names = names
        self._release = _release_after(self._nodes)
        self._checked = set()

    def forward(self, *inputs):
        if len(inputs) != self.inputs:
            raise TypeError(f"inputs: the model takes {self.inputs} input(s), got {len(inputs)}")
        key = _signature(inputs)
        if key is None or key not in self._checked:
            self._check_shapes(inputs)
            if key is not None:
                if len(self._checked) >= MAX_CHECKED_SIGNATURES:
                    self._checked.clear()
                self._checked.add(key)
        return self._run(inputs, self._call)

    def _check_shapes(self, inputs) -> None:
        """Run the graph on the meta device (module docstring): what would fail, or hold or write too
        much, fails here, naming the node, before anything is computed."""
        budget = _Budget(inputs)
        meta = _map_tensors(inputs, _to_meta)

        def call(i, op, target, args, kwargs):
            try:
                if op == "call_module":
                    return _meta_module_call(self.get_submodule(target), args, kwargs)
                if op == "get_attr":
                    return _to_meta(self.get_buffer(target))
                return self._call(i, op, target, args, kwargs)
            except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as e:
                raise ValueError(f"node {self._names[i]!r} ({op} {_target_name(target)}) fails on these inputs: "
                                 f"{type(e).__name__}: {e}") from None

        self._run(meta, call, budget)

    def _call(self, i, op, target, args, kwargs):
        if op == "call_function":
            return target(*args, **kwargs)
        if op == "call_module":
            return self.get_submodule(target)(*args, **kwargs)
        if op == "get_attr":
            return self.get_buffer(target)
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"{target}: a graph calls methods of tensors only")
        return getattr(args[0], target)(*args[1:], **kwargs)

    def _run(self, inputs, call, budget: _Budget | None = None):
        env, position = [None] * len(self._nodes), 0
        for i, (op, target, args, kwargs) in enumerate(self._nodes):
            if op == "output":
                return _fill(args[0], env)
            if op == "placeholder":
                value = inputs[position]
                position += 1
            else:
                value = call(i, op, target, _fill(args, env), _fill(kwargs, env))
            env[i] = value
            if budget is not None:
                budget.hold(self._names[i], value)
            for j in self._release[i]:
                if budget is not None:
                    budget.release(env[j])
                env[j] = None


def _target_name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _check_module_call(name: str, m: nn.Module, args, kwargs) -> None:
    """A module call's arguments fit its forward's signature, and an integer layer's head, channel
    offset and concat buffer fit the layer (each a run-time failure or allocation otherwise)."""
    try:
        bound = inspect.signature(m.forward).bind(*args, **kwargs).arguments
    except TypeError as e:
        raise MalformedGraph(f"node {name!r}: calls module {type(m).__name__} with arguments it does not take: {e}") \
            from None
    heads = getattr(m, "heads", None)
    if "head" in bound and not (_is_int(bound["head"]) and 0 <= bound["head"] < len(heads)):
        raise MalformedGraph(f"node {name!r}: head: expected an integer in [0, {len(heads)}), got "
                             f"{_short(bound['head'])}")
    if "c_offset" in bound or "total_channels" in bound:
        _check_concat_write(name, _channels_of(m)[1], bound.get("c_offset", 0), bound.get("total_channels"))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_concat_write(name: str, channels: int, c_offset, total) -> None:
    """A write of `channels` codes at channel c_offset of a concat buffer of `total` channels (None: the
    buffer is given)."""
    if not (_is_int(c_offset) and 0 <= c_offset <= MAX_CONCAT_CHANNELS):
        raise MalformedGraph(f"node {name!r}: c_offset: expected an integer in [0, {MAX_CONCAT_CHANNELS}], got "
                             f"{_short(c_offset)}")
    if total is not None and not (_is_int(total) and c_offset + channels <= total <= MAX_CONCAT_CHANNELS):
        raise MalformedGraph(f"node {name!r}: total_channels: expected an integer from c_offset + channels "
                             f"({c_offset} + {channels}) to {MAX_CONCAT_CHANNELS}, got {_short(total)}")



# The channel counts of modules: (what they consume, what they produce); None where it is the input's.
def _channels_of(m: nn.Module) -> tuple:
    for attrs in (("in_channels", "out_channels"), ("channels", "channels"), ("num_features", "num_features")):
        if all(_is_int(getattr(m, a, None)) for a in attrs):
            return tuple(getattr(m, a) for a in attrs)
    return None, None


_SAME_CHANNELS = (nn.ReLU, nn.SiLU, nn.Identity, nn.Sigmoid, nn.Hardswish, nn.LeakyReLU, nn.Upsample, nn.MaxPool2d)


def _check_channels(names, nodes, modules) -> None:
    """The channels a layer consumes are those its producer gives, where both are known from the file
    (module calls, through the channel-preserving modules and packed functions between them)."""
    known: dict[int, int] = {}
    for i, (op, target, args, kwargs) in enumerate(nodes):
        src = args[0] if args and isinstance(args[0], _Ref) else None
        given = known.get(src.index) if src is not None else None
        if op == "call_module":
            m = modules[target]
            consumes, produces = _channels_of(m)
            if consumes is not None and given is not None and consumes != given:
                raise MalformedGraph(f"node {names[i]!r}: module {target!r} takes {consumes} channels, its input "
                                     f"{names[src.index]!r} has {given}")
            if isinstance(m, _SAME_CHANNELS):
                produces = given
            total = kwargs.get("total_channels")
            produces = total if _is_int(total) else produces
        elif op == "call_function" and target in (packed_upsample_nearest, packed_maxpool2d):
            produces = given
        elif op == "call_function" and target is packed_write and len(args) == 5 and _is_int(args[4]):
            produces = args[4] if args[0] is None else known.get(getattr(args[0], "index", None))
        else:
            produces = None
        if produces is not None:
            known[i] = produces
