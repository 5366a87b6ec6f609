"""Tracing adapters: how convert_to_int traces models whose own forward torch.fx cannot trace.

Two registries, keyed by the fully qualified class name (so that registering needs no import of the
library that defines the class, and Ultralytics stays an optional dependency):

- root adapters: `root(model) -> nn.Module`, a module to trace instead of the model, holding the
  model's submodules under the same names (so the converter's report and the model agree on names).
- traceable forwards: `forward(module, *args)`, run instead of module.forward while tracing, for
  modules whose forward computes the same thing in a way fx cannot record (a proxy turned into a
  list, a Python branch on a shape). A forward applies to a subclass only where the subclass keeps
  the registered class's forward, so a head that overrides it (a segmentation head) is not silently
  traced as its parent.

`symbolic_trace(model, is_leaf)` applies both and returns the torch.fx GraphModule.

Registered here: Ultralytics DetectionModel (and the `YOLO` object that holds one): the layer loop
unrolled along each layer's `f` routing; C2f (and C3k2) through forward_split; the attention of
C2PSA without shape arithmetic; Detect returning its raw per-level maps (`raw_maps`), which
Ultralytics decodes (Detect's decode depends on the input size through its anchors).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import fx, nn

_ROOTS: dict[str, tuple[Callable[[nn.Module], nn.Module], tuple[str, ...]]] = {}
_FORWARDS: dict[str, Callable] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_root(class_name: str, adapter: Callable[[nn.Module], nn.Module], keeps: tuple[str, ...] = ()) -> None:
    """Trace `adapter(model)` instead of a model of class `class_name`, or of a subclass whose methods
    named in `keeps` are still that class's (what the adapter reproduces)."""
    _ROOTS[class_name] = (adapter, tuple(keeps))


def register_forward(class_name: str, forward: Callable) -> None:
    """Trace `forward(module, *args)` instead of module.forward for class `class_name` (and subclasses
    that keep its forward)."""
    _FORWARDS[class_name] = forward


def _root_adapter(model: nn.Module):
    for cls in type(model).__mro__:
        entry = _ROOTS.get(_qualname(cls))
        if entry is not None:
            adapter, keeps = entry
            return adapter if all(getattr(type(model), k) is getattr(cls, k) for k in keeps) else None
    return None


def _traceable_forward(module: nn.Module):
    for cls in type(module).__mro__:
        forward = _FORWARDS.get(_qualname(cls))
        if forward is not None:
            return forward if type(module).forward is cls.forward else None
    return None


def traceable(model: nn.Module) -> nn.Module:
    """The module that is traced for `model`: its root adapter's, applied until none is registered."""
    seen = set()
    while (adapter := _root_adapter(model)) is not None and id(model) not in seen:
        seen.add(id(model))
        model = adapter(model)
    return model


class _Tracer(fx.Tracer):
    def __init__(self, is_leaf: Callable[[nn.Module], bool]):
        super().__init__()
        self._is_leaf = is_leaf

    def is_leaf_module(self, m, qualname):
        return self._is_leaf(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        alternative = _traceable_forward(m)
        if alternative is not None and not self.is_leaf_module(m, self.path_of_module(m)):
            forward = functools.partial(alternative, m)
        return super().call_module(m, forward, args, kwargs)


def symbolic_trace(model: nn.Module, is_leaf: Callable[[nn.Module], bool] = lambda m: False) -> fx.GraphModule:
    """torch.fx GraphModule of `model` with the registered adapters; modules where is_leaf(m) stay
    single call_module nodes."""
    root = traceable(model)
    return fx.GraphModule(root, _Tracer(is_leaf).trace(root))


# Ultralytics.

class UltralyticsLayers(nn.Module):
    """An Ultralytics model's layer list (`model.model`, each layer with its `f` inputs) as one
    traceable forward: the loop of BaseModel._predict_once with the routing resolved in Python."""

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.model = layers

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x)
        return x


def _ultralytics_detection_model(model: nn.Module) -> nn.Module:
    return UltralyticsLayers(model.model)


def _ultralytics_yolo(model: nn.Module) -> nn.Module:
    return model.model


def _c2f_forward(m, x):
    return m.forward_split(x)


def _attention_forward(m, x):
    """Ultralytics Attention without reading x's shape: the same views, as flatten/unflatten/view_as."""
    qkv = m.qkv(x).flatten(2).unflatten(1, (m.num_heads, -1))
    q, k, v = qkv.split([m.key_dim, m.key_dim, m.head_dim], dim=2)
    attn = ((q * m.scale).transpose(-2, -1) @ k).softmax(dim=-1)
    x = (v @ attn.transpose(-2, -1)).view_as(x) + m.pe(v.reshape_as(x))
    return m.proj(x)


def raw_maps(m, x):
    """Detect's raw prediction maps, one (N, 4*reg_max + nc, H_i, W_i) tensor per level: its box and
    class convs' outputs concatenated (what Detect decodes; ultralytics.utils.tal decodes them)."""
    box, cls = (m.one2one_cv2, m.one2one_cv3) if getattr(m, "end2end", False) else (m.cv2, m.cv3)
    return tuple(torch.cat((box[i](x[i]), cls[i](x[i])), 1) for i in range(m.nl))


register_root("ultralytics.nn.tasks.DetectionModel", _ultralytics_detection_model, keeps=("predict", "_predict_once"))
register_root("ultralytics.engine.model.Model", _ultralytics_yolo)
register_forward("ultralytics.nn.modules.block.C2f", _c2f_forward)
register_forward("ultralytics.nn.modules.block.Attention", _attention_forward)
register_forward("ultralytics.nn.modules.head.Detect", raw_maps)
