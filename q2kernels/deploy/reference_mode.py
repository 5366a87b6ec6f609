"""The reference mode of an integer model (convert_to_int): the integer model evaluated in plain
PyTorch, without q2kernels._C, as the C++ and CUDA kernels must compute it bit for bit.

Each conv's integer sums are accumulated exactly (float64 convolutions of the integer codes), then the
epilogue's fp32 operations run in their documented order (docs/math.md §7, docs/integer-format.md),
with correctly rounded fused multiply-adds and the epilogue's SiLU. `reference_forward` returns the
outputs and, per layer, the codes; `integer_codes` the same of the integer model itself. deploy.verify
compares the two, and both with the fake-quant model.
"""
from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .int_modules import HEAD_CODES, IntConv2d, QuantizePack

_ALIGN = 32  # channels per packed group (csrc/format.h), written out here: the reference shares no code


# ---------------------------------------------------------------------------------------------------
# Packed codes, independently of q2kernels._C.

def unpack_codes(packed: torch.Tensor, channels: int, signed: bool) -> torch.Tensor:
    """Packed uint8 (N, H, W, bytes) -> int64 codes (N, channels, H, W): low nibble = even channel."""
    b = packed.to(torch.int64)
    nib = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)[..., :channels]
    if signed:
        nib = nib - 16 * (nib >= 8)
    return nib.permute(0, 3, 1, 2)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """int codes (N, C, H, W) of a 4-bit range -> packed uint8 (N, H, W, bytes), zero padding."""
    n, c, h, w = codes.shape
    padded = -(-c // _ALIGN) * _ALIGN
    nib = torch.zeros(n, h, w, padded, dtype=torch.int64, device=codes.device)
    nib[..., :c] = codes.permute(0, 2, 3, 1).to(torch.int64) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def _write(out, packed, channels, c_offset):
    """Codes of `channels` channels into out from c_offset on; an odd last channel keeps the high
    nibble of its byte (the other writer's)."""
    full, odd = divmod(channels, 2)
    start = c_offset // 2
    out[..., start:start + full] = packed[..., :full]
    if odd:
        out[..., start + full] = (out[..., start + full] & 0xF0) | (packed[..., full] & 0x0F)
    return out


# ---------------------------------------------------------------------------------------------------
# The epilogue's fp32 arithmetic (docs/math.md §7), emulated.

def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fma(a, b, c), correctly rounded: a*b is exact in float64, the sum is rounded to odd in
    float64 (its error found exactly by TwoSum) and then to nearest fp32, which is then exact."""
    p = a.double() * b.double()
    c = c.double()
    s = p + c
    bp = s - c
    err = (p - bp) + (c - (s - bp))
    even = (s.view(torch.int64) & 1) == 0
    s = torch.where((err != 0) & even & torch.isfinite(s), torch.nextafter(s, s + err), s)
    return s.float()


def _f32(v: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=like.device).expand_as(like)


def _exp32(x: torch.Tensor) -> torch.Tensor:
    """csrc/epilogue.h's exp_det: Cody-Waite reduction, degree-7 polynomial, exact 2^k scaling."""
    k = torch.round(x * _f32(1.44269502, x))
    r = _fma32(k, _f32(-0.693145751953125, x), x)
    r = _fma32(k, _f32(-1.42860677e-06, x), r)
    p = _f32(1.98412698e-04, x)
    for coef in (1.38888889e-03, 8.33333333e-03, 4.16666667e-02, 1.66666667e-01, 0.5, 1.0, 1.0):
        p = _fma32(p, r, _f32(coef, x))
    y = (p.double() * torch.exp2(k.double().clamp(-300, 300))).float()  # exact: p*2^k fits a double
    y = torch.where(x > 88.72, torch.full_like(x, math.inf), y)
    y = torch.where(x < -87.0, torch.zeros_like(x), y)
    return torch.where(torch.isnan(x), x, y)


def _activate(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return torch.where(y < 0, torch.zeros_like(y), y)
    if act == "silu":
        return y / (1.0 + _exp32(-y))
    return y


def _round_codes(v: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    c = torch.where(v > qn, v, torch.full_like(v, qn))  # NaN -> qn
    c = torch.where(c < qp, c, torch.full_like(c, qp))
    return torch.round(c).to(torch.int64)


def _threshold_codes(u: torch.Tensor, thresholds: torch.Tensor, qn: int) -> torch.Tensor:
    return qn + (u.unsqueeze(-1) > thresholds).sum(-1)


def _codes_of(v, qn, qp, thresholds):
    return _threshold_codes(v, thresholds, qn) if thresholds is not None else _round_codes(v, qn, qp)


# ---------------------------------------------------------------------------------------------------
# The reference mode.

def _reference_conv(m: IntConv2d, x, head=0, out=None, c_offset=0, total_channels=None):
    """What IntConv2d head `head` computes, from m's buffers, in plain PyTorch (module docstring)."""
    xq = unpack_codes(x, m.in_channels, m.x_signed).double()
    cin_g = m.in_channels // m.groups
    k = unpack_codes(m.weight, cin_g, m.w_signed).double()  # (C_out, cin_g, KH, KW)
    levels = m.w_mul * k + m.w_add
    conv = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
    I = F.conv2d(xq, levels, **conv)
    J = torch.zeros_like(I)
    if m.tap_sums is not None:
        J = F.conv2d(torch.ones_like(xq), levels, **conv)
    ep = m.epilogues[head].view(-1, 1, 1, m.out_channels).permute(0, 3, 1, 2)  # rows x (1, C, 1, 1)
    alpha, gamma, bias, aff_mul, aff_add, q_mul, q_off = (ep[r:r + 1] for r in range(ep.shape[0]))
    pre = _fma32(alpha.expand_as(I).float(), I.float(), _fma32(gamma.expand_as(J).float(), J.float(),
                                                                 bias.expand_as(I).float()))
    z = _fma32(aff_mul.expand_as(pre), _activate(pre, m.act), aff_add.expand_as(pre))
    h = m.heads[head]
    if h["kind"] != HEAD_CODES:
        # The C++ op's NHWC buffer, strides and all: contiguous(channels_last) normalises the strides of
        # size-1 dims (a 1x1 map's (C, 1, 1, 1) against the op's (C, 1, C, C)), and a float layer after
        # it may then pick another kernel, with another fp32 summation order.
        n, c, hh, ww = z.shape
        z = z.new_empty(n, hh, ww, c).permute(0, 3, 1, 2).copy_(z)
        if out is None:
            return z
        out[:, c_offset:c_offset + m.out_channels] = z
        return out
    v = (z - q_off) * q_mul
    thr = m.thresholds[head, :h["nthr"]] if h["nthr"] else None
    codes = _codes_of(v, h["qn"], h["qp"], thr)
    packed = pack_codes(codes)
    if out is None and total_channels is None:
        return packed
    if out is None:
        out = pack_codes(torch.zeros(codes.shape[0], total_channels, *codes.shape[2:], dtype=torch.int64,
                                     device=codes.device))
    return _write(out, packed, m.out_channels, c_offset)


def _reference_quantize(m: QuantizePack, x, out=None, c_offset=0, total_channels=None):
    x = x.float()
    if m.scale is not None:
        x = x * m.scale.view(1, -1, 1, 1) + m.shift.view(1, -1, 1, 1)
    v = (x - m.qparams[1].view(1, -1, 1, 1)) * m.qparams[0].view(1, -1, 1, 1)
    codes = _codes_of(v, m.qn, m.qp, m.thresholds)
    packed = pack_codes(codes)
    if out is None and total_channels is None:
        return packed
    if out is None:
        out = pack_codes(torch.zeros_like(codes).expand(-1, total_channels, -1, -1))
    return _write(out, packed, m.channels, c_offset)


def _record_input_codes(net: nn.Module, record: dict) -> list:
    """Forward pre-hooks that record each integer conv's input codes under its source layer (its first
    call's); returns their handles. Hooks, not an fx.Interpreter: a converted model's net is a
    GraphModule, a loaded one's an int_graph.IntGraph, and both call their modules."""
    def hook(m, args, kwargs):
        x = args[0] if args else kwargs["x"]
        if not x.is_meta:  # an IntGraph first runs itself on meta tensors, to check shapes: no codes there
            record.setdefault(m.source, unpack_codes(x, m.in_channels, m.x_signed))

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in net.modules() if isinstance(m, IntConv2d)]


def _run_recording(net: nn.Module, inputs) -> tuple:
    codes = {}
    handles = _record_input_codes(net, codes)
    try:
        with torch.no_grad():
            out = net(*inputs)
    finally:
        for h in handles:
            h.remove()
    return out, codes


def _as_reference(net: nn.Module) -> nn.Module:
    """A copy of net whose integer modules compute by the plain-PyTorch reference mode (the model
    itself is left as it is)."""
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, IntConv2d):
            m.forward = functools.partial(_reference_conv, m)
        elif isinstance(m, QuantizePack):
            m.forward = functools.partial(_reference_quantize, m)
    return net


def _net(int_model: nn.Module) -> nn.Module:
    net = getattr(int_model, "net", None)
    if not isinstance(net, nn.Module):
        raise TypeError(f"int_model: expected an integer model (convert_to_int or load_int_model), got "
                        f"{type(int_model).__name__}")
    return net


def reference_forward(int_model: nn.Module, *inputs):
    """(outputs, {QConv2d name: int64 input codes (N, C, H, W)}) of the reference mode."""
    return _run_recording(_as_reference(_net(int_model)), inputs)


def integer_codes(int_model: nn.Module, *inputs):
    """(outputs, {QConv2d name: int64 input codes}) of the integer model itself (q2kernels._C)."""
    return _run_recording(_net(int_model), inputs)
