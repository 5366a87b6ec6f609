"""Is an integer model (convert_to_int) exactly its fake-quant model? A check users run on their model.

Why the question needs care. The integer model computes every conv as an exact int32 sum of codes
and then one fp32 epilogue (docs/math.md §7). The fake-quant model computes the same conv in fp32 on
dequantised values: a different summation order, and grid values that are themselves rounded
(DoReFa's q*(2/n) - 1, N2UQ's (R(.)/m - 1)*sf and LSQ+'s q*s + beta lose up to half an ulp of 1 or of
beta in the subtraction or addition, i.e. up to ~1e-6 relative for small levels; LSQ's single product
q*s loses 2^-24 relative). Where a pre-activation lies within that rounding of a quantizer's decision
boundary, the two models pick neighbouring codes, and the next layers see different inputs, so one
such flip spreads. These flips are the whole difference: this module measures them layer by layer
and offers a reference that the integer model must match bit for bit.

- `reference_forward(int_model, *inputs)`: the reference mode. The integer model evaluated in plain
  PyTorch, without q2kernels._C: each conv's integer sums accumulated exactly (float64 convolutions
  of the integer codes), then the epilogue's fp32 operations in their documented order, with
  correctly rounded fused multiply-adds and the epilogue's SiLU. It returns the outputs and, per
  layer, the codes; the C++ and CUDA kernels must reproduce them bit for bit.
- `verify_int_model(model, int_model, *inputs)`: per integer layer (named by its QConv2d), the codes the
  integer model feeds it, compared with (a) the reference mode: must be identical; (b) the
  fake-quant model run teacher-forced (every quantized conv gets the integer model's input codes,
  dequantised as the fake-quant quantizer dequantises, so each layer is compared on identical
  inputs): the fraction of codes that differ, and for each differing code its distance to the
  decision boundary in code units, from a float64 evaluation of the same teacher-forced model. A
  difference further than `boundary` (default 1e-4 code units, several orders above fp32 rounding of
  the layers of a detector, orders below any error of scale or offset) from its boundary is not a
  rounding flip: `Verification.ok` is False and the layer is named.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import reference as ref
from ..nn.modules import QConv2d
from ..nn.n2uq import N2UQQuantizer
from ..nn.quantizers import LSQPlusQuantizer, LSQQuantizer, PACTQuantizer
from . import trace
from .fusion import freeze_fusion
from .int_modules import HEAD_CODES, IntConv2d, QuantizePack

BOUNDARY = 1e-4
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
        z = z.contiguous(memory_format=torch.channels_last)
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


class _Recorder(fx.Interpreter):
    """Runs a converted model, recording each integer conv's input codes under its source layer."""

    def __init__(self, net, record):
        super().__init__(net)
        self.record = record

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        if isinstance(m, IntConv2d):
            self.record.setdefault(m.source, unpack_codes(args[0], m.in_channels, m.x_signed))
        return self.run_module(m, target, args, kwargs)

    def run_module(self, m, target, args, kwargs):
        return super().call_module(target, args, kwargs)


class _Reference(_Recorder):
    """The same, with the integer modules run by the plain-PyTorch reference mode."""

    def run_module(self, m, target, args, kwargs):
        if isinstance(m, IntConv2d):
            return _reference_conv(m, *args, **kwargs)
        if isinstance(m, QuantizePack):
            return _reference_quantize(m, *args, **kwargs)
        return super().run_module(m, target, args, kwargs)


def reference_forward(int_model: nn.Module, *inputs):
    """(outputs, {QConv2d name: int64 input codes (N, C, H, W)}) of the reference mode."""
    codes = {}
    with torch.no_grad():
        out = _Reference(int_model.net, codes).run(*inputs)
    return out, codes


def integer_codes(int_model: nn.Module, *inputs):
    """(outputs, {QConv2d name: int64 input codes}) of the integer model itself (q2kernels._C)."""
    codes = {}
    with torch.no_grad():
        out = _Recorder(int_model.net, codes).run(*inputs)
    return out, codes


# ---------------------------------------------------------------------------------------------------
# The fake-quant model, teacher-forced.

def _dequantize(q, codes):
    """The fake-quant quantizer's output for `codes`, computed as its forward computes it (fp32)."""
    c = codes.float()
    if isinstance(q, LSQQuantizer):
        beta = q.beta.float().reshape(()) if isinstance(q, LSQPlusQuantizer) else 0.0
        return c * q.s.float().reshape(()).clamp_min(ref.fake_quant.SCALE_FLOOR) + beta
    if isinstance(q, PACTQuantizer):
        a = q.alpha.float().reshape(())
        return c * (a / (2**q.bits - 1))
    if isinstance(q, N2UQQuantizer):
        return (c * ref.n2uq.ltq_interval(q.bits)) * q.alpha2.float().reshape(())
    raise TypeError(f"verify: no dequantisation for a {type(q).__name__} activation quantizer")


def _decision(q, x):
    """(codes, distance to the nearest decision boundary in code units) of activation quantizer q
    for input x, evaluated in x's dtype (fp32 as the model runs, or float64)."""
    if isinstance(q, N2UQQuantizer):
        a_pos, thresholds, _ = ref.n2uq.ltq_tables(q.start.detach(), q.a.detach())
        u = x * q.alpha1.detach().to(x.dtype).reshape(())
        t = thresholds.to(x.dtype)
        codes = (u.unsqueeze(-1) > t).sum(-1)
        return codes, ((u.unsqueeze(-1) - t).abs() / a_pos.to(x.dtype)).amin(-1)
    if isinstance(q, LSQQuantizer):
        qn, qp = ref.qrange(q.bits, q.mode)
        s = q.s.detach().float().reshape(()).clamp_min(ref.fake_quant.SCALE_FLOOR)
        beta = q.beta.detach().float().reshape(()) if isinstance(q, LSQPlusQuantizer) else torch.zeros(())
        v = (x - beta.to(x.dtype)) * (1.0 / s).to(x.dtype)
    elif isinstance(q, PACTQuantizer):
        qn, qp = 0, 2**q.bits - 1
        a = q.alpha.detach().float().reshape(())
        m = a.new_full((), float(qp)) / a
        v = torch.minimum(x.clamp_min(0.0), a.to(x.dtype)) * m.to(x.dtype)
    else:
        raise TypeError(f"verify: no decision rule for a {type(q).__name__} activation quantizer")
    codes = torch.round(v.clamp(qn, qp)).to(torch.int64)
    inside = (v > qn - 0.5) & (v < qp + 0.5)
    dist = torch.where(inside, (v - torch.floor(v) - 0.5).abs(), torch.full_like(v, math.inf))
    return codes, dist


class _Forced(nn.Module):
    """Records the decision of quantizer q on its input and passes on the integer model's codes."""

    def __init__(self, q, codes):
        super().__init__()
        self.q, self.codes = q, codes

    def forward(self, x):
        self.seen = _decision(self.q, x)
        y = _dequantize(self.q, self.codes)
        return y.to(x.dtype)


class _AsFloat32(nn.Module):
    """A weight quantizer run on fp32 values, in fp32, inside a float64 model: the fake-quant weights."""

    def __init__(self, q):
        super().__init__()
        self.q = q

    def forward(self, w):
        return self.q(w.float()).to(w.dtype)


def _teacher_forced(model, codes, inputs, dtype):
    forced_model = freeze_fusion(copy.deepcopy(model)).eval()
    forced = {}
    for name, m in forced_model.named_modules():
        if isinstance(m, QConv2d) and m.weight_quantizer is not None:
            m.weight_quantizer = _AsFloat32(m.weight_quantizer)
            if name in codes:
                m.act_quantizer = forced[name] = _Forced(m.act_quantizer, codes[name])
    forced_model.to(dtype)
    for f in forced.values():
        f.q.float()
    for m in forced_model.modules():
        if isinstance(m, _AsFloat32):
            m.q.float()
    with torch.no_grad():
        forced_model(*(x.to(dtype) if x.is_floating_point() else x for x in inputs))
    return {name: f.seen for name, f in forced.items()}


@dataclass
class LayerCheck:
    """One integer layer's input codes (QConv2d `name`), against the reference and the fake-quant model."""
    name: str
    codes: int
    reference_mismatches: int  # must be 0
    differing: int  # codes that differ from the teacher-forced fake-quant model's
    max_distance: float  # the largest boundary distance (code units, float64) of a differing code
    beyond_boundary: int  # differing codes further than the tolerance from their boundary

    @property
    def fraction(self) -> float:
        return self.differing / max(self.codes, 1)


@dataclass
class Verification:
    layers: dict[str, LayerCheck] = field(default_factory=dict)
    boundary: float = BOUNDARY
    missing: list[str] = field(default_factory=list)  # integer layers the fake-quant model has no QConv2d for
    outputs_equal: bool = True  # the integer model's outputs are the reference mode's, bit for bit

    @property
    def exact(self) -> bool:
        """The integer model's codes (at every layer) and outputs are the reference mode's, bit for bit."""
        return self.outputs_equal and all(c.reference_mismatches == 0 for c in self.layers.values())

    @property
    def ok(self) -> bool:
        """exact, and every code that differs from the fake-quant model's is a rounding flip."""
        return self.exact and not self.missing and all(c.beyond_boundary == 0 for c in self.layers.values())

    @property
    def differing_fraction(self) -> float:
        total = sum(c.codes for c in self.layers.values())
        return sum(c.differing for c in self.layers.values()) / max(total, 1)

    def failures(self) -> list[str]:
        out = [f"{n}: {c.reference_mismatches} codes differ from the reference mode"
               for n, c in self.layers.items() if c.reference_mismatches]
        out += [] if self.outputs_equal else ["outputs: differ from the reference mode's"]
        out += [f"{n}: {c.beyond_boundary} codes differ from the fake-quant model's at up to {c.max_distance:.3g} "
                f"code units from their decision boundary (> {self.boundary:g}: not a rounding flip)"
                for n, c in self.layers.items() if c.beyond_boundary]
        out += [f"{n}: no QConv2d of that name in the fake-quant model" for n in self.missing]
        return out

    def summary(self) -> str:
        lines = [f"{'layer':40s} {'codes':>9s} {'ref.diff':>8s} {'fq.diff':>8s} {'fraction':>9s} {'max dist':>9s}"]
        for n, c in self.layers.items():
            lines.append(f"{n:40s} {c.codes:9d} {c.reference_mismatches:8d} {c.differing:8d} {c.fraction:9.2e} "
                         f"{c.max_distance:9.2e}")
        lines.append(f"exact: {self.exact}; codes differing from the fake-quant model: {self.differing_fraction:.3e}; "
                     f"all rounding flips (<= {self.boundary:g} code units from a boundary): {self.ok}")
        return "\n".join(lines)


def _same(a, b) -> bool:
    """Outputs (tensors, possibly nested in tuples/lists) equal bit for bit, as float32."""
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.float(), b.float())
    return a == b


def verify_int_model(model: nn.Module, int_model: nn.Module, *inputs, boundary: float = BOUNDARY) -> Verification:
    """Compare `int_model` (convert_to_int(model, ...)) with the reference mode and with the QAT
    `model` on `inputs` (module docstring). The model is not changed."""
    model = trace.traceable(model)
    out, got = integer_codes(int_model, *inputs)
    ref_out, want = reference_forward(int_model, *inputs)
    fq32 = _teacher_forced(model, got, inputs, torch.float32)
    differs = {name: codes != fq32[name][0] for name, codes in got.items() if name in fq32}
    # The float64 evaluation only measures how far differing codes are from their boundaries.
    fq64 = _teacher_forced(model, got, inputs, torch.float64) if any(d.any() for d in differs.values()) else {}
    result = Verification(boundary=boundary, outputs_equal=_same(out, ref_out))
    for name, codes in got.items():
        if name not in fq32:
            result.missing.append(name)
            continue
        mismatches = int((codes != want[name]).sum()) if name in want else codes.numel()
        diff = differs[name]
        dist = fq64[name][1][diff] if name in fq64 else diff.new_zeros(0, dtype=torch.float64)
        result.layers[name] = LayerCheck(name, codes.numel(), mismatches, int(diff.sum()),
                                         float(dist.max()) if dist.numel() else 0.0, int((dist > boundary).sum()))
    return result
