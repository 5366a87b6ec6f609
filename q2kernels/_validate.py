"""Argument checks shared by every op and module. Each raises with the argument's name and what was
expected. The tensor checks look at shapes, dtypes and devices only, never at values, so none
synchronises with the host; the others check Python values (configuration), never coercing them:
2.5 is not an integer and True is not a count."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_bits(bits, name: str = "bits", lo: int = 2, hi: int = 8) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ValueError(f"{name}: expected an integer in {lo}..{hi}, got {bits!r}")
    return bits


def check_float_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32, float16 or bfloat16 tensor, got {x.dtype}")
    return x


def check_param(p, name: str, like: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    """A learnable parameter of an op: a float tensor on `like`'s device, of `numel` elements.

    Returns p contiguous: the kernels read a parameter as a flat array (p_ptr + c), so a strided
    (t[::2]) or expanded (t.expand(C)) one is copied here, once, for every op. The copy is
    differentiable, so the gradient still reaches the original tensor; a contiguous p is returned
    as is (no copy for the usual nn.Parameter)."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(p).__name__}")
    if not p.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {p.dtype}")
    if p.device != like.device:
        raise ValueError(f"{name}: is on {p.device} but the input is on {like.device}")
    if numel is not None and p.numel() != numel:
        raise ValueError(f"{name}: expected {numel} element(s), got shape {tuple(p.shape)}")
    return p.contiguous()


def check_axis(axis, ndim: int, name: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"{name}: expected an integer in [{-ndim}, {ndim}) for a {ndim}-d input, got {axis!r}")
    return axis % ndim


def check_number(v, name: str, lo: float, lo_allowed: bool, hi: float | None = None) -> float:
    """A finite Python number >= lo (> lo when not lo_allowed) and <= hi when given, as a float."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < lo or (v == lo and not lo_allowed) or (hi is not None and v > hi):
        upper = "" if hi is None else f" and <= {hi}"
        raise ValueError(f"{name}: expected a finite number {'>=' if lo_allowed else '>'} {lo}{upper}, got {v!r}")
    return float(v)


def check_int(v, name: str, lo: int, hi: int | None = None) -> int:
    """An integer (int or another numbers.Integral such as numpy's; not a bool, not a float with an
    integral value) in lo..hi, as an int."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name}: expected an integer {bound}, got {v!r}")
    return int(v)


def check_ints(v, name: str, n: int, lo: int) -> tuple[int, ...]:
    """An integer >= lo, or a tuple/list of n of them (a conv's kernel_size, stride, ...), as an n-tuple."""
    values = tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
    if len(values) != n:
        raise ValueError(f"{name}: expected an integer or {n} integers, got {v!r}")
    return tuple(check_int(x, name, lo) for x in values)


def check_bool(v, name: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected True or False, got {v!r}")
    return v


def check_choice(v, name: str, choices) -> str:
    """One of `choices` (strings): an unhashable or other-typed value gets the same clear error."""
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {v!r}")
    return v
