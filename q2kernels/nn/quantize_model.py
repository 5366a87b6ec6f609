"""quantize_model: swap a model's Conv2d/Linear layers for QConv2d/QLinear under a recipe.

A recipe (protocol.Recipe) names the weight and activation quantizers; each quantizer kind's file
registers its recipes (register_recipe). Weights are quantised per output channel where the method
allows it (LSQ, LSQ+, N2UQ), per tensor where it does not (DoReFa).
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

from .._validate import check_bits, check_bool, check_choice
from .modules import QConv2d, QLinear
from .protocol import RECIPES


def _skip_names(skip) -> set[str]:
    """skip as a set of module names; a single string is refused (its characters are not names)."""
    if isinstance(skip, str) or not isinstance(skip, Iterable):
        raise TypeError(f"skip: expected an iterable of module names (a list, not one string), got {skip!r}")
    names = list(skip)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"skip: expected module names (strings), got {bad[0]!r}")
    return set(names)


def quantize_model(model: nn.Module, recipe: str = "lsq", w_bits: int = 4, a_bits: int = 4,
                   skip: Iterable[str] = (), keep_first_last: bool = True) -> nn.Module:
    """Replace, in place, every nn.Conv2d and nn.Linear of `model` with its quantized drop-in.

    skip: qualified names (as in model.named_modules()) kept in float. keep_first_last: also keep
    the first and the last such layer in float (the usual QAT practice: the stem sees raw pixels,
    the head produces the outputs). Returns the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_choice(recipe, "recipe", sorted(RECIPES))
    check_bits(w_bits, "w_bits")
    check_bits(a_bits, "a_bits")
    check_bool(keep_first_last, "keep_first_last")
    r = RECIPES[recipe]
    skip = _skip_names(skip)
    layers = [(name, m) for name, m in model.named_modules()
              if type(m) in (nn.Conv2d, nn.Linear)]
    unknown = skip - {name for name, _ in model.named_modules()}
    if unknown:
        raise ValueError(f"skip: no module named {sorted(unknown)} in the model")
    if keep_first_last and layers:
        skip |= {layers[0][0], layers[-1][0]}
    for name, layer in layers:
        if name in skip:
            continue
        cls = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
        q = cls.from_float(layer, weight=r.weight(layer, w_bits), act=r.act(layer, a_bits))
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, q.to(layer.weight.device))
    return model
