"""The integer W4A4/W3A3 ops of q2kernels._C (csrc/; docs/math.md §7): packing of 4-bit codes,
the float quantize-and-pack op, and the integer conv with its fused epilogue.

The kernels are C++ (CPU) and CUDA (csrc/cuda/, where built), registered with TORCH_LIBRARY as
torch.ops.q2kernels_int.*; the first op called builds or loads the extension (q2kernels._ext) and
registers the fake (meta) implementations, so the ops trace under torch.compile. Importing this
module builds nothing. They are inference ops: no autograd.

Packed format (csrc/format.h): uint8 (N, H, W, packed_bytes(C)), NHWC, two codes per byte along
C, low nibble = even channel, C padded to a multiple of CHANNEL_ALIGN = 32 codes (16 bytes) with
zero codes; signed codes in 4-bit two's complement; 3-bit codes in the same 4-bit containers.
Weights: (C_out, KH, KW, packed_bytes(C_in)), the same packing along C_in.

The epilogue (csrc/epilogue.h) takes a float32 (EPILOGUE_ROWS, C_out) tensor whose rows are
ALPHA, GAMMA, BIAS, AFF_MUL, AFF_ADD, Q_MUL, Q_OFF:
    I = w_mul*acc + w_add*Sq,  J = w_mul*(weight codes over the valid taps) + w_add*C_in*(valid taps)
    y = act(alpha*I + (gamma*J + bias)),  z = aff_mul*y + aff_add,
    code = R(clip((z - q_off)*q_mul, qn, qp))        or, with thresholds,  qn + #{i: (z - q_off)*q_mul > t_i}
acc = sum of weight code k times activation code q over the taps (code 0 outside the image), Sq
the sum of q, and w_int = w_mul*k + w_add the weight's integer level (LSQ: 1, 0; odd levels of
N2UQ and DoReFa: 2, -(2^b - 1)). J (tap_sums given) makes an activation zero point beta_a exact
at the borders: gamma = s_w*beta_a.

Argument limits (csrc/checks.cpp; every violation is an error naming the argument): channel counts,
stride, padding and dilation at most MAX_ARG = 2^31 - 1; w_mul, w_add int32; c_offset within out.
The sums are int32 on every device, so conv2d accepts w_mul, w_add only where
    L*(|w_mul|*max|k| + |w_add|)*max|q| <= 2^31 - 1,   L = KH*KW*C_in,
max|k|, max|q| = 8 for signed and 15 for unsigned codes: then no sum can overflow, whatever the codes
(q2kernels/deploy/accumulator.py, which the converter checks per layer). tap_sums must be
weight_tap_sums of the weight codes; other values give a J that wraps modulo 2^32, never a crash.
An `out` (conv2d, quantize_pack, conv2d_grouped) must share no memory with any input the op reads
(x, weight, epilogue, tap_sums, thresholds, qparams): the kernels read those while they write out, so
an alias, a view or an overlapping slice is an error naming the input.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from .. import _ext

# The format constants of csrc/format.h and csrc/epilogue.h. They are spelled out here so that
# importing this module builds nothing; load() checks them against the library it loads.
CHANNEL_ALIGN: int = 32
FORMAT_VERSION: int = 1
EPILOGUE_ROWS: int = 7
ALPHA, GAMMA, BIAS, AFF_MUL, AFF_ADD, Q_MUL, Q_OFF = range(EPILOGUE_ROWS)
ACTIVATIONS = {"identity": 0, "relu": 1, "silu": 2}


@functools.lru_cache(maxsize=None)
def load():
    """Build (first time) or load q2kernels._C, check its format constants against this module's,
    and register the ops' fake implementations. Every op below calls it through `_ops`."""
    lib = _ext.load()
    built = {"CHANNEL_ALIGN": lib.CHANNEL_ALIGN, "FORMAT_VERSION": lib.FORMAT_VERSION,
             "EPILOGUE_ROWS": lib.EPILOGUE_ROWS}
    expected = {"CHANNEL_ALIGN": CHANNEL_ALIGN, "FORMAT_VERSION": FORMAT_VERSION, "EPILOGUE_ROWS": EPILOGUE_ROWS}
    if built != expected:
        raise RuntimeError(f"q2kernels._C was built with {built}, this q2kernels expects {expected}: "
                           "a stale build; remove its build directory (q2k doctor shows it) and rerun")
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"q2kernels_int::{name}")(fake)
    return lib


class _LazyOps:
    """torch.ops.q2kernels_int, calling `load` (the library and a module's fakes) on first use: importing
    q2kernels compiles nothing. Under torch.compile the library is already loaded (building an integer
    model runs these ops), and load() is left out of the traced code."""

    def __init__(self, load):
        self._load = load

    def __getattr__(self, name):
        if not torch.compiler.is_compiling():
            self._load()
        return getattr(torch.ops.q2kernels_int, name)


_ops = _LazyOps(load)


def padded_channels(c: int) -> int:
    return -(-c // CHANNEL_ALIGN) * CHANNEL_ALIGN


def packed_bytes(c: int) -> int:
    return padded_channels(c) // 2


# The largest channel count, stride, padding and dilation the ops accept (csrc/int_conv.h kMaxArg).
MAX_ARG = 2**31 - 1


def _same_device(x, **tensors):
    """The device check of the kernels (csrc/checks.cpp), in the fakes: a meta tensor mixed with CPU
    or CUDA tensors dispatches to them, not to a kernel, and must fail the same way."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: is on {t.device} but x is on {x.device}")


def _out_hw(h, w, kh, kw, stride, padding, dilation):
    out = []
    for dim, i, k, s, p, d in (("height", h, kh, stride[0], padding[0], dilation[0]),
                               ("width", w, kw, stride[1], padding[1], dilation[1])):
        if not (1 <= s <= MAX_ARG and 0 <= p <= MAX_ARG and 1 <= d <= MAX_ARG):
            raise ValueError(f"stride, padding, dilation: expected values in [1 (0 for padding), {MAX_ARG}], "
                             f"got {list(stride)}, {list(padding)}, {list(dilation)}")
        if i + 2 * p >= 2**63 or d * (k - 1) >= 2**63:  # checks.cpp out_length's overflow check
            raise ValueError(f"padding, dilation: the padded input {dim} ({i} + 2*{p}) or the dilated kernel {dim} "
                             f"({d}*({k} - 1) + 1) overflows int64")
        if i + 2 * p <= d * (k - 1):
            raise ValueError(f"x: the padded input {dim} ({i + 2 * p}) is smaller than the dilated kernel {dim} "
                             f"({d * (k - 1)} + 1)")
        out.append((i + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(out)


def _fake_pack(codes, bits, signed):
    a, c, b1, b2 = codes.shape
    return codes.new_empty((a, b1, b2, packed_bytes(c)), dtype=torch.uint8)


def _fake_unpack(packed, channels, signed):
    a, b1, b2, _ = packed.shape
    return packed.new_empty((a, channels, b1, b2), dtype=torch.int8).contiguous(memory_format=torch.channels_last)


def _fake_quantize_pack(x, qparams, thresholds, qn, qp):
    _same_device(x, qparams=qparams, thresholds=thresholds)
    n, c, h, w = x.shape
    return x.new_empty((n, h, w, packed_bytes(c)), dtype=torch.uint8)


def _fake_quantize_pack_out(x, qparams, thresholds, qn, qp, c_offset, out):
    _same_device(x, qparams=qparams, thresholds=thresholds, out=out)
    return None


def _fake_conv2d_acc(x, weight, in_channels, x_signed, w_signed, stride, padding, dilation):
    _same_device(x, weight=weight)
    ho, wo = _out_hw(x.shape[1], x.shape[2], weight.shape[1], weight.shape[2], stride, padding, dilation)
    out = x.new_empty((x.shape[0], weight.shape[0], ho, wo), dtype=torch.int32)
    return out.contiguous(memory_format=torch.channels_last)


def _fake_conv2d(x, weight, epilogue, tap_sums, thresholds, in_channels, x_signed, w_signed, w_mul, w_add, stride,
                 padding, dilation, act, qn, qp, out_dtype):
    _same_device(x, weight=weight, epilogue=epilogue, tap_sums=tap_sums, thresholds=thresholds)
    n, cout = x.shape[0], weight.shape[0]
    ho, wo = _out_hw(x.shape[1], x.shape[2], weight.shape[1], weight.shape[2], stride, padding, dilation)
    if out_dtype == torch.uint8:
        return x.new_empty((n, ho, wo, packed_bytes(cout)), dtype=torch.uint8)
    return x.new_empty((n, cout, ho, wo), dtype=out_dtype).contiguous(memory_format=torch.channels_last)


def _fake_conv2d_out(x, weight, epilogue, tap_sums, thresholds, in_channels, x_signed, w_signed, w_mul, w_add,
                     stride, padding, dilation, act, qn, qp, c_offset, out):
    _same_device(x, weight=weight, epilogue=epilogue, tap_sums=tap_sums, thresholds=thresholds, out=out)
    return None


def _fake_conv2d_grouped(x, weight, epilogue, tap_sums, thresholds, in_channels, groups, x_signed, w_signed, w_mul,
                         w_add, stride, padding, dilation, act, qn, qp, out_dtype):
    return _fake_conv2d(x, weight, epilogue, tap_sums, thresholds, in_channels, x_signed, w_signed, w_mul, w_add,
                        stride, padding, dilation, act, qn, qp, out_dtype)


def _fake_conv2d_grouped_out(x, weight, epilogue, tap_sums, thresholds, in_channels, groups, x_signed, w_signed,
                             w_mul, w_add, stride, padding, dilation, act, qn, qp, c_offset, out):
    return _fake_conv2d_out(x, weight, epilogue, tap_sums, thresholds, in_channels, x_signed, w_signed, w_mul, w_add,
                            stride, padding, dilation, act, qn, qp, c_offset, out)


def _fake_unpack_float(packed, channels, signed, w_mul, w_add):
    a, b1, b2, _ = packed.shape
    return packed.new_empty((a, channels, b1, b2), dtype=torch.float32).contiguous(memory_format=torch.channels_last)


def _fake_conv2d_epilogue(sums, epilogue, tap_sums, thresholds, in_size, kernel_size, in_channels, x_signed, w_signed,
                          w_mul, w_add, stride, padding, dilation, act, qn, qp, out_dtype):
    _same_device(sums, epilogue=epilogue, tap_sums=tap_sums, thresholds=thresholds)
    n, cout, ho, wo = sums.shape
    if out_dtype == torch.uint8:
        return sums.new_empty((n, ho, wo, packed_bytes(cout)), dtype=torch.uint8)
    return sums.new_empty((n, cout, ho, wo), dtype=out_dtype).contiguous(memory_format=torch.channels_last)


def _fake_conv2d_epilogue_out(sums, epilogue, tap_sums, thresholds, in_size, kernel_size, in_channels, x_signed,
                              w_signed, w_mul, w_add, stride, padding, dilation, act, qn, qp, c_offset, out):
    _same_device(sums, epilogue=epilogue, tap_sums=tap_sums, thresholds=thresholds, out=out)
    return None


# Output shapes of the ops for tracing (torch.compile, opcheck), registered by load().
_FAKES = {"pack": _fake_pack, "unpack": _fake_unpack, "quantize_pack": _fake_quantize_pack,
          "quantize_pack_out": _fake_quantize_pack_out, "conv2d_acc": _fake_conv2d_acc, "conv2d": _fake_conv2d,
          "conv2d_out": _fake_conv2d_out, "conv2d_grouped": _fake_conv2d_grouped,
          "conv2d_grouped_out": _fake_conv2d_grouped_out, "unpack_float": _fake_unpack_float,
          "conv2d_epilogue": _fake_conv2d_epilogue, "conv2d_epilogue_out": _fake_conv2d_epilogue_out}


def _int(v, name):
    """An int argument of an op: a Python int (not a bool) within int64, else an error naming it."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name}: expected an int, got {v!r}")
    if not -2**63 <= v < 2**63:
        raise ValueError(f"{name}: {v} does not fit int64")
    return v


def _pair(v, name):
    if isinstance(v, int) and not isinstance(v, bool):
        return [_int(v, name)] * 2
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return [_int(i, name) for i in v]
    raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}")


def _act(act):
    if act not in ACTIVATIONS:
        raise ValueError(f"act: expected one of {tuple(ACTIVATIONS)}, got {act!r}")
    return ACTIVATIONS[act]


def pack(codes: torch.Tensor, bits: int = 4, signed: bool = True) -> torch.Tensor:
    """Integer codes (N, C, H, W) — or weights (C_out, C_in, KH, KW) — of a `bits`-wide signed or
    unsigned range, any integer dtype and layout -> packed uint8 (N, H, W, packed_bytes(C))."""
    return _ops.pack(codes, _int(bits, "bits"), signed)


def unpack(packed: torch.Tensor, channels: int, signed: bool = True) -> torch.Tensor:
    """Packed uint8 (N, H, W, packed_bytes(channels)) -> int8 codes (N, channels, H, W), channels_last."""
    return _ops.unpack(packed, _int(channels, "channels"), signed)


def quantize_pack(x: torch.Tensor, qparams: torch.Tensor, qn: int, qp: int, thresholds=None, out=None,
                  c_offset: int = 0) -> torch.Tensor:
    """Codes of a float (N, C, H, W) tensor, packed: R(clip((x - q_off)*q_mul, qn, qp)) per channel,
    or qn + #{i : (x - q_off)*q_mul > thresholds[i]}. qparams: float32 (2, C), rows q_mul, q_off.
    With `out` (packed, N, H, W, bytes), the codes go to its channels c_offset.. and out is returned."""
    qn, qp = _int(qn, "qn"), _int(qp, "qp")
    if out is None:
        return _ops.quantize_pack(x, qparams, thresholds, qn, qp)
    _ops.quantize_pack_out(x, qparams, thresholds, qn, qp, _int(c_offset, "c_offset"), out)
    return out


def conv2d_acc(x: torch.Tensor, weight: torch.Tensor, in_channels: int, x_signed: bool, w_signed: bool,
               stride=1, padding=0, dilation=1) -> torch.Tensor:
    """The raw int32 accumulators acc = sum over taps of k*q (code 0 outside the image), as an
    (N, C_out, H_out, W_out) channels_last tensor: what the CUDA MMA produces, for exact comparisons."""
    return _ops.conv2d_acc(x, weight, _int(in_channels, "in_channels"), x_signed, w_signed, _pair(stride, "stride"),
                           _pair(padding, "padding"), _pair(dilation, "dilation"))


def conv2d(x: torch.Tensor, weight: torch.Tensor, epilogue: torch.Tensor, in_channels: int, *, x_signed: bool,
           w_signed: bool, w_mul: int = 1, w_add: int = 0, tap_sums=None, stride=1, padding=0, dilation=1,
           act: str = "identity", qn: int = 0, qp: int = 15, thresholds=None, out_dtype=torch.uint8, out=None,
           c_offset: int = 0) -> torch.Tensor:
    """The integer conv with its epilogue (module docstring). Output: packed codes of [qn, qp]
    (out_dtype uint8, (N, H_out, W_out, packed_bytes(C_out))) or float32/float16 (N, C_out, H_out,
    W_out) channels_last. With `out` (packed or float), the result goes to its channels c_offset..
    (even for packed outputs), leaving the other channels alone, and out is returned; out must not
    overlap any input (module docstring)."""
    args = (x, weight, epilogue, tap_sums, thresholds, _int(in_channels, "in_channels"), x_signed, w_signed,
            _int(w_mul, "w_mul"), _int(w_add, "w_add"), _pair(stride, "stride"), _pair(padding, "padding"),
            _pair(dilation, "dilation"), _act(act), _int(qn, "qn"), _int(qp, "qp"))
    if out is None:
        return _ops.conv2d(*args, out_dtype)
    _ops.conv2d_out(*args, _int(c_offset, "c_offset"), out)
    return out


def weight_tap_sums(codes: torch.Tensor) -> torch.Tensor:
    """int32 (C_out, KH+1, KW+1) 2-D prefix sums over the taps of each output channel's weight-code
    sums, from the integer codes (C_out, C_in, KH, KW): the `tap_sums` of conv2d, from which the
    epilogue takes any valid-tap rectangle's sum with four lookups."""
    per_tap = codes.to(torch.int64).sum(dim=1)
    ts = torch.nn.functional.pad(per_tap.cumsum(1).cumsum(2), (1, 0, 1, 0))
    return ts.to(torch.int32).contiguous()


def epilogue_params(cout: int, alpha, gamma=0.0, bias=0.0, aff_mul=1.0, aff_add=0.0, q_mul=1.0, q_off=0.0,
                    device=None) -> torch.Tensor:
    """The float32 (EPILOGUE_ROWS, C_out) epilogue tensor from per-channel tensors or scalars
    (each broadcast to C_out; float64 inputs are rounded to float32 once, here)."""
    rows = [alpha, gamma, bias, aff_mul, aff_add, q_mul, q_off]
    return torch.stack([torch.as_tensor(r, dtype=torch.float64, device=device).reshape(-1).expand(cout)
                        for r in rows]).to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------------
# The CPU fast path (docs/integer-format.md, "The CPU fast path").
#
# Where every partial sum of a conv's integer sum I = sum of levels*codes is an integer of magnitude
# <= 2^24, float32 represents each of them exactly, so a float32 convolution of the levels and the codes
# that only multiplies and adds them (in any order, with or without fma) returns I exactly. oneDNN's
# direct convolution (aten.mkldnn_convolution: ideep's algorithm::convolution_direct, never Winograd)
# is such a convolution, and runs at float speed. Then conv2d_epilogue applies the same epilogue as
# the int32 path to those sums: the same codes and floats, bit for bit. The bound is a function of the
# layer's configuration only (fp32_exact), so a model decides it when it is built or loaded.

FP32_EXACT = 2**24  # every integer of magnitude <= 2^24 is a float32
MAX_LEVEL = 256  # unpack_float's largest |level| (csrc/fast_conv_cpu.cpp): also exact in bfloat16

_fast_cpu = True


def fp32_bound(kernel_size, in_channels: int, x_signed: bool, w_signed: bool, w_mul: int, w_add: int) -> int:
    """The largest |partial sum| of the conv's I = sum over K = KH*KW*in_channels terms of
    (w_mul*k + w_add)*q, for any codes the 4-bit containers hold (|k| <= 8 signed, 15 unsigned; same
    for |q|): sum |level|*|q| <= K*(|w_mul|*max|k| + |w_add|)*max|q|, whatever the summation order.
    in_channels: per group."""
    kh, kw = kernel_size
    max_w, max_x = (8 if w_signed else 15), (8 if x_signed else 15)
    return kh * kw * in_channels * (abs(w_mul) * max_w + abs(w_add)) * max_x


def fp32_exact(kernel_size, in_channels: int, x_signed: bool, w_signed: bool, w_mul: int, w_add: int) -> bool:
    """Whether the CPU fast path computes this conv exactly: fp32_bound <= 2^24 and every level
    |w_mul*k + w_add| <= MAX_LEVEL (module section above). in_channels: per group."""
    max_w = 8 if w_signed else 15
    return (abs(w_mul) * max_w + abs(w_add) <= MAX_LEVEL
            and fp32_bound(kernel_size, in_channels, x_signed, w_signed, w_mul, w_add) <= FP32_EXACT)


def fast_cpu_available() -> bool:
    """Whether this torch has oneDNN (mkldnn) and the fast path is enabled (use_fast_cpu)."""
    return _fast_cpu and torch.backends.mkldnn.is_available()


@contextlib.contextmanager
def use_fast_cpu(enabled: bool):
    """Turn the CPU fast path on or off (it is on by default) within a `with` block: off, every CPU
    integer conv runs the int32 kernels (the benchmark's "old path", and the tests' comparison)."""
    global _fast_cpu
    before, _fast_cpu = _fast_cpu, bool(enabled)
    try:
        yield
    finally:
        _fast_cpu = before


def unpack_float(packed: torch.Tensor, channels: int, signed: bool, w_mul: int = 1, w_add: int = 0) -> torch.Tensor:
    """Packed uint8 (N, H, W, packed_bytes(channels)) -> float32 (N, channels, H, W), channels_last,
    each code k as w_mul*k + w_add (|w_mul|*max|k| + |w_add| <= MAX_LEVEL). Of packed weights
    (C_out, KH, KW, bytes): their float levels (C_out, C_in/groups, KH, KW)."""
    return _ops.unpack_float(packed, _int(channels, "channels"), signed, _int(w_mul, "w_mul"), _int(w_add, "w_add"))


def conv2d_fast_cpu(x: torch.Tensor, weight_levels: torch.Tensor, epilogue: torch.Tensor, in_channels: int,
                    groups: int = 1, *, x_signed: bool, w_signed: bool, w_mul: int = 1, w_add: int = 0, tap_sums=None,
                    stride=1, padding=0, dilation=1, act: str = "identity", qn: int = 0, qp: int = 15,
                    thresholds=None, out_dtype=torch.uint8, out=None, c_offset: int = 0) -> torch.Tensor:
    """conv2d / conv2d_grouped on CPU tensors, by oneDNN's fp32 direct convolution of the codes:
    the same result bit for bit, where fp32_exact holds for the layer (else ValueError).
    weight_levels: unpack_float(weight, in_channels // groups, w_signed, w_mul, w_add) of the packed
    weight (IntConv2d caches it); every other argument as conv2d's."""
    in_channels, groups = _int(in_channels, "in_channels"), _int(groups, "groups")
    if groups < 1 or in_channels % groups:
        raise ValueError(f"groups: expected a positive divisor of in_channels ({in_channels}), got {groups}")
    cin_g = in_channels // groups
    if weight_levels.dtype != torch.float32 or weight_levels.dim() != 4 or weight_levels.shape[1] != cin_g:
        raise ValueError(f"weight_levels: expected float32 (C_out, {cin_g}, KH, KW), got {weight_levels.dtype} "
                         f"{tuple(weight_levels.shape)}")
    kernel = tuple(weight_levels.shape[2:])
    if not fp32_exact(kernel, cin_g, x_signed, w_signed, w_mul, w_add):
        raise ValueError(f"conv2d_fast_cpu: this layer's partial sums are not proven exact in float32 "
                         f"(bound {fp32_bound(kernel, cin_g, x_signed, w_signed, w_mul, w_add)} > 2^24, or a "
                         f"level above {MAX_LEVEL}): use conv2d")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    xf = _ops.unpack_float(x, in_channels, x_signed, 1, 0)
    sums = torch.ops.aten.mkldnn_convolution(xf, weight_levels, None, padding, stride, dilation, groups)
    # oneDNN keeps its channels_last input's format, so this is no copy; it only pins the epilogue's layout.
    sums = sums.contiguous(memory_format=torch.channels_last)
    args = (sums, epilogue, tap_sums, thresholds, [x.shape[1], x.shape[2]], list(kernel), cin_g, x_signed, w_signed,
            _int(w_mul, "w_mul"), _int(w_add, "w_add"), stride, padding, dilation, _act(act), _int(qn, "qn"),
            _int(qp, "qp"))
    if out is None:
        return _ops.conv2d_epilogue(*args, out_dtype)
    _ops.conv2d_epilogue_out(*args, _int(c_offset, "c_offset"), out)
    return out
