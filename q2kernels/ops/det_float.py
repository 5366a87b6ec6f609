"""Deterministic float ops: conv, matmul, softmax and SiLU, each ONE defined sequence of IEEE float32
operations (csrc/det_float.h), so that the CPU path, the CUDA path and an ONNX graph that spells the same
operations out (q2kernels.deploy) give bit-identical results.

They stand in for PyTorch's float conv / matmul / softmax / SiLU in the float layers of converted integer
models (the stem conv, a detector's prediction convs, attention), whose last bits otherwise depend on the
backend's summation order, its fma and its exp. Every product and every sum is one float32 rounding to
nearest even, no fma, no reassociation; exp is csrc/epilogue.h's exp_det (a fixed polynomial), SiLU its
silu_det, x / (1 + exp_det(-x)). A NaN result is a NaN (which NaN is not defined).

The ops are torch.ops.q2kernels_int.det_* of the C++/CUDA extension (built or loaded on first use, as the
integer ops), with CPU and CUDA kernels; their fake implementations (below, registered by load()) give the
output shapes on the meta device and under torch.compile, symbolic shapes included. They are inference
ops: no autograd. Inputs must be float32 on one device; any strides are accepted (a non-contiguous,
channels_last or expanded input is copied to a contiguous one first), and outputs are contiguous. Every
argument is checked, errors naming it (TypeError for a dtype or a non-integer, ValueError otherwise).
"""
from __future__ import annotations

import functools

import torch

from . import int_conv
from .int_conv import MAX_ARG, _int, _out_hw, _pair

# det_conv2d's activations (csrc/epilogue.h Activation); "none" is "identity".
ACTIVATIONS = {"none": 0, **int_conv.ACTIVATIONS}
# The largest output the ops allocate (csrc/det_float_cpu.cpp kMaxNumel).
MAX_NUMEL = 2**61


@functools.lru_cache(maxsize=None)
def load():
    """Build (first time) or load q2kernels._C (int_conv.load) and register the fake implementations of
    the det ops. Every op below calls it through `_ops`."""
    lib = int_conv.load()
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"q2kernels_int::{name}")(fake)
    return lib


_ops = int_conv._LazyOps(load)


def det_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
               dilation=1, groups: int = 1, act: str = "none") -> torch.Tensor:
    """act(conv2d(x, weight, bias)), x (N, C_in, H, W), weight (C_out, C_in/groups, KH, KW), bias (C_out) or
    None -> (N, C_out, H_out, W_out), H_out and W_out as torch's conv2d. Output (n, co, oh, ow), group
    g = co // (C_out/groups):
        acc = +0;  for ci < C_in/groups, for i < KH, for j < KW (in this order), if the tap
        (ih, iw) = (oh*sh - ph + i*dh, ow*sw - pw + j*dw) lies inside the image:
            acc = acc + weight[co, ci, i, j] * x[n, g*C_in/groups + ci, ih, iw]   (each op rounded)
        acc = acc + bias[co] (if given);  out = act(acc)
    act: "none" (or "identity"), "relu" (y < 0 ? 0 : y) or "silu" (silu_det). stride, padding, dilation:
    an int or a pair."""
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(f"act: expected one of 'none', 'relu', 'silu', got {act!r}")
    return _ops.det_conv2d(x, weight, bias, _pair(stride, "stride"), _pair(padding, "padding"),
                           _pair(dilation, "dilation"), _int(groups, "groups"), ACTIVATIONS[act])


def det_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B..., M, K) @ b (B..., K, N) -> (B..., M, N), the same leading dimensions (no broadcasting):
        acc = +0;  for k ascending: acc = acc + a[..., m, k] * b[..., k, n]   (each op rounded)
    K = 0 gives +0."""
    return _ops.det_matmul(a, b)


def det_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """softmax of x along dim (any shape), per slice x_0..x_{L-1}:
        m = the max (NaN if a value is NaN);  e_i = exp_det(x_i - m)
        s = +0, then s = s + e_i for i ascending;  y_i = e_i / s"""
    return _ops.det_softmax(x, _int(dim, "dim"))


def det_silu(x: torch.Tensor) -> torch.Tensor:
    """silu_det per element (any shape): x / (1 + exp_det(-x)), each op rounded."""
    return _ops.det_silu(x)


# ---------------------------------------------------------------------------------------------------
# Fake implementations: the output shapes, with the checks of csrc/det_float_cpu.cpp that decide them (the
# same errors, naming the same arguments). Sizes may be symbolic (torch.compile): Python integer arithmetic.

def _check_float(t, name, shape):
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: expected a float32 {shape} tensor, got {t.dtype}")


def _check_device(t, name, like, like_name):
    if t.device != like.device:
        raise ValueError(f"{name}: is on {t.device} but {like_name} is on {like.device}")


def _check_numel(shape, what):
    numel = 1
    for s in shape:
        numel *= s
    if numel > MAX_NUMEL:
        raise ValueError(f"{what}: the output {list(shape)} would have more than 2^61 elements")


def _fake_det_conv2d(x, weight, bias, stride, padding, dilation, groups, act):
    _check_float(x, "x", "(N, C_in, H, W)")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-d (N, C_in, H, W) tensor, got shape {tuple(x.shape)}")
    _check_float(weight, "weight", "(C_out, C_in/groups, KH, KW)")
    if weight.dim() != 4:
        raise ValueError(f"weight: expected a 4-d (C_out, C_in/groups, KH, KW) tensor, got shape "
                         f"{tuple(weight.shape)}")
    _check_device(weight, "weight", x, "x")
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(v) != 2 or not all(lo <= i <= MAX_ARG for i in v):
            raise ValueError(f"{name}: expected 2 values in [{lo}, {MAX_ARG}], got {list(v)}")
    if act not in (0, 1, 2):
        raise ValueError(f"act: expected 0 (identity), 1 (ReLU) or 2 (SiLU), got {act}")
    n, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    if not 1 <= groups <= MAX_ARG:
        raise ValueError(f"groups: expected a value in [1, {MAX_ARG}], got {groups}")
    if cin % groups != 0 or cout % groups != 0:
        raise ValueError(f"groups: {groups} must divide the input channels ({cin}, x's dimension 1) and the output "
                         f"channels ({cout}, weight's dimension 0)")
    if cin_g != cin // groups:
        raise ValueError(f"weight: expected C_in/groups = {cin // groups} input channels per group (dimension 1), "
                         f"got shape {tuple(weight.shape)}")
    if kh < 1 or kw < 1:
        raise ValueError(f"weight: expected a kernel of at least 1x1, got shape {tuple(weight.shape)}")
    if bias is not None:
        _check_float(bias, "bias", "(C_out)")
        if bias.dim() != 1 or bias.shape[0] != cout:
            raise ValueError(f"bias: expected shape ({cout}) (C_out, weight's dimension 0), got {tuple(bias.shape)}")
        _check_device(bias, "bias", x, "x")
    out = _out_hw(h, w, kh, kw, stride, padding, dilation)
    shape = (n, cout, *out)
    _check_numel(shape, "x, weight, stride, padding, dilation")
    return x.new_empty(shape)


def _fake_det_matmul(a, b):
    _check_float(a, "a", "(..., M, K)")
    _check_float(b, "b", "(..., K, N)")
    if a.dim() < 2:
        raise ValueError(f"a: expected a tensor of at least 2 dimensions (..., M, K), got shape {tuple(a.shape)}")
    if b.dim() != a.dim():
        raise ValueError(f"b: expected {a.dim()} dimensions (..., K, N) as a has (no broadcasting), got shape "
                         f"{tuple(b.shape)} for a of shape {tuple(a.shape)}")
    _check_device(b, "b", a, "a")
    if tuple(a.shape[:-2]) != tuple(b.shape[:-2]):
        raise ValueError(f"a, b: the leading (batch) dimensions must be equal (no broadcasting), got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"a, b: a's last dimension (K = {a.shape[-1]}) must equal b's second to last "
                         f"({b.shape[-2]}), got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    shape = (*a.shape[:-1], b.shape[-1])
    _check_numel(shape, "a, b")
    return a.new_empty(shape)


def _fake_det_softmax(x, dim):
    _check_float(x, "x", "(any shape)")
    nd = max(x.dim(), 1)
    if not -nd <= dim < nd:
        raise ValueError(f"dim: expected a dimension of x in [{-nd}, {nd - 1}] (x has shape {tuple(x.shape)}), "
                         f"got {dim}")
    return x.new_empty(x.shape)


def _fake_det_silu(x):
    _check_float(x, "x", "(any shape)")
    return x.new_empty(x.shape)


_FAKES = {"det_conv2d": _fake_det_conv2d, "det_matmul": _fake_det_matmul, "det_softmax": _fake_det_softmax,
          "det_silu": _fake_det_silu}
