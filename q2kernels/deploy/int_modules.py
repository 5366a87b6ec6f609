"""The modules and functions of a converted integer model (q2kernels.deploy.convert_to_int).

Between integer layers the data is packed 4-bit codes (q2kernels.ops.int_conv's format: uint8
(N, H, W, packed_bytes(C)), NHWC, two codes per byte). What runs on them:
- IntConv2d: one converted QConv2d (+ BatchNorm + activation): packed weight codes and one or more
  heads. A head is one epilogue: the codes of one consumer's quantizer (with the per-channel affine
  of a fusion node on the way, if any) or a float output. Each head call runs the integer conv
  (heads of one layer share its weights; each call recomputes the accumulators).
- QuantizePack: a float tensor (optionally through a per-channel affine first) -> the codes of a
  consumer's quantizer, where the producer is a float op.
- packed_upsample_nearest, packed_maxpool2d: nearest upsampling and max pooling commute with every
  monotone quantizer, so they run on the codes.
- packed_write: copies codes into a channel range of a shared packed tensor (a concat).
A concat whose inputs come straight from IntConv2d heads costs nothing: the heads write into the
shared tensor at their channel offsets (`out`, `c_offset`, `total_channels`).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_bool, check_int
from ..ops import grouped_conv as gc
from ..ops import int_conv as ic
from .accumulator import overflow_reason

HEAD_CODES, HEAD_FLOAT = "codes", "float"
# The largest channel count and kernel, stride, padding or dilation a converted layer (or a model
# file) may declare: far above any detector's, far below what would overflow the ops' arithmetic.
MAX_CHANNELS = 2**16
MAX_GEOMETRY = 1024


def _new_packed(like: torch.Tensor, n: int, h: int, w: int, channels: int) -> torch.Tensor:
    return torch.zeros(n, h, w, ic.packed_bytes(channels), dtype=torch.uint8, device=like.device)


class IntConv2d(nn.Module):
    """An integer conv (docs/math.md §7) with its heads (module docstring).

    weight: packed codes (C_out, KH, KW, packed_bytes(C_in/groups)); its integer levels are
    w_mul*k + w_add. tap_sums (int32, (C_out, KH+1, KW+1)) when the input has a zero point.
    heads: one dict per head, {"kind": "codes" | "float", "qn", "qp", "nthr", "signed"}, with
    epilogues (H, EPILOGUE_ROWS, C_out) and thresholds (H, 15) (the first nthr used).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation,
                 x_signed: bool, w_signed: bool, w_mul: int, w_add: int, act: str, heads: list[dict],
                 weight: torch.Tensor, epilogues: torch.Tensor, thresholds: torch.Tensor,
                 tap_sums: torch.Tensor | None = None, source: str = "", groups: int = 1):
        super().__init__()
        # Checked, never coerced (int(2.5) would be 2): a model file gives these values.
        self.groups = check_int(groups, "groups", 1, MAX_CHANNELS)
        self.in_channels = check_int(in_channels, "in_channels", 1, MAX_CHANNELS)
        self.out_channels = check_int(out_channels, "out_channels", 1, MAX_CHANNELS)
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride, self.dilation = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
        self.padding = _pair(padding, "padding", 0)
        self.x_signed, self.w_signed = check_bool(x_signed, "x_signed"), check_bool(w_signed, "w_signed")
        self.w_mul, self.w_add = check_int(w_mul, "w_mul", -ic.MAX_ARG), check_int(w_add, "w_add", -ic.MAX_ARG)
        _expect(isinstance(act, str) and isinstance(source, str) and isinstance(heads, list),
                f"act, source, heads: expected str, str, list, got {type(act).__name__}, {type(source).__name__}, "
                f"{type(heads).__name__}")
        self.act, self.heads, self.source = act, [dict(h) if isinstance(h, dict) else h for h in heads], source
        _check_int_conv(self, weight, epilogues, thresholds, tap_sums)
        self.register_buffer("weight", weight)
        self.register_buffer("epilogues", epilogues)
        self.register_buffer("thresholds", thresholds)
        self.register_buffer("tap_sums", tap_sums)
        # The CPU fast path (ops.int_conv.conv2d_fast_cpu): whether this layer's bound proves its
        # float32 sums exact, decided from the configuration alone (so for a loaded model as for a
        # converted one; nothing about it is stored in a model file), and the weight's float levels,
        # unpacked on the first CPU call and kept until the weight changes.
        self.fast_cpu = ic.fp32_exact(self.kernel_size, self.in_channels // self.groups, self.x_signed,
                                      self.w_signed, self.w_mul, self.w_add)
        self._levels, self._levels_key = None, None

    def _weight_levels(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, tuple(w.shape))
        if self._levels is None or self._levels_key != key:
            self._levels = ic.unpack_float(w, self.in_channels // self.groups, self.w_signed, self.w_mul, self.w_add)
            self._levels_key = key
        return self._levels

    def _apply(self, fn, recurse=True):
        # The packed weight's layout is the op's contract: a memory format asked of the whole model
        # (Ultralytics' validator sets channels_last on CPUs) moves it, and it is laid back out here.
        super()._apply(fn, recurse)
        self.weight = self.weight.contiguous()
        return self

    def config(self) -> dict:
        return {k: getattr(self, k) for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                                              "dilation", "x_signed", "w_signed", "w_mul", "w_add", "act",
                                              "heads", "source", "groups")}

    def output_size(self, x: torch.Tensor) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return ((x.shape[1] + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                (x.shape[2] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)

    def forward(self, x: torch.Tensor, head: int = 0, out: torch.Tensor | None = None, c_offset: int = 0,
                total_channels: int | None = None) -> torch.Tensor:
        """Head `head` of the conv of packed x. A codes head writing into a shared tensor: `out` (or,
        for the first writer, a new zeroed one of total_channels channels) at channel c_offset."""
        h = self.heads[head]
        if h["kind"] == HEAD_CODES and out is None and total_channels is not None:
            out = _new_packed(x, x.shape[0], *self.output_size(x), total_channels)
        thr = self.thresholds[head, :h["nthr"]] if h["nthr"] else None
        args = dict(x_signed=self.x_signed, w_signed=self.w_signed, w_mul=self.w_mul, w_add=self.w_add,
                    tap_sums=self.tap_sums, stride=self.stride, padding=self.padding, dilation=self.dilation,
                    act=self.act, qn=h["qn"], qp=h["qp"], thresholds=thr,
                    out_dtype=torch.uint8 if h["kind"] == HEAD_CODES else torch.float32, out=out, c_offset=c_offset)
        # The one dispatch of the CPU fast path: CPU tensors (not meta, not CUDA) of a layer whose bound
        # holds (self.fast_cpu) run oneDNN's fp32 conv of the codes and the same epilogue, bit for bit the
        # int32 kernels' result; every other call runs the int32 kernels.
        if x.device.type == "cpu" and self.weight.device.type == "cpu" and self.fast_cpu and ic.fast_cpu_available():
            return ic.conv2d_fast_cpu(x, self._weight_levels(), self.epilogues[head], self.in_channels, self.groups,
                                      **args)
        if self.groups == 1:
            return ic.conv2d(x, self.weight, self.epilogues[head], self.in_channels, **args)
        return gc.conv2d_grouped(x, self.weight, self.epilogues[head], self.in_channels, self.groups, **args)

    def extra_repr(self) -> str:
        kinds = ", ".join(h["kind"] for h in self.heads)
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, act={self.act!r}, heads=[{kinds}], "
                f"source={self.source!r}")


_HEAD_KEYS = {"kind", "qn", "qp", "nthr", "signed"}


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


MAX_THRESHOLDS = 15  # a 4-bit code has 16 levels


def _fits_nibble(qn: int, qp: int) -> bool:
    """Levels qn < qp of a 4-bit code: signed [-8, 7] or unsigned [0, 15]."""
    return qn < qp and ((-8 <= qn and qp <= 7) if qn < 0 else qp <= 15)


def _pair(v, name: str, lo: int) -> tuple[int, int]:
    """A pair of integers in lo..MAX_GEOMETRY (a conv's kernel_size, stride, padding, dilation)."""
    _expect(isinstance(v, (tuple, list)) and len(v) == 2, f"{name}: expected 2 integers, got {v!r}")
    return tuple(check_int(x, name, lo, MAX_GEOMETRY) for x in v)


def _check_int_conv(m: IntConv2d, weight, epilogues, thresholds, tap_sums) -> None:
    """What the module itself indexes (heads, epilogue and threshold rows) and the shapes, dtypes and
    accumulator bound the op expects, so that a bad model file fails here, naming the field, rather
    than inside the conv."""
    _expect(m.act in ic.ACTIVATIONS, f"act: expected one of {sorted(ic.ACTIVATIONS)}, got {m.act!r}")
    _expect(len(m.heads) > 0, "heads: expected a non-empty list")
    _expect(isinstance(thresholds, torch.Tensor) and thresholds.dtype == torch.float32 and thresholds.dim() == 2
            and thresholds.shape[0] == len(m.heads) and thresholds.shape[1] <= MAX_THRESHOLDS,
            f"thresholds: expected float32 ({len(m.heads)}, T), T <= {MAX_THRESHOLDS}, got "
            f"{getattr(thresholds, 'dtype', type(thresholds).__name__)} {tuple(getattr(thresholds, 'shape', ()))}")
    for h in m.heads:
        _expect(isinstance(h, dict) and set(h) == _HEAD_KEYS and h["kind"] in (HEAD_CODES, HEAD_FLOAT)
                and all(_is_int(h[k]) for k in ("qn", "qp", "nthr")) and isinstance(h["signed"], bool)
                and 0 <= h["nthr"] <= thresholds.shape[-1] and _fits_nibble(h["qn"], h["qp"]),
                f"heads: expected dicts with keys {sorted(_HEAD_KEYS)}, kind codes|float, 0 <= nthr <= "
                f"{thresholds.shape[-1]}, levels qn < qp of a 4-bit code, got {h!r}")
    if why := overflow_reason(m.kernel_size, m.in_channels // m.groups, m.w_signed, m.x_signed, m.w_mul, m.w_add):
        raise ValueError(f"w_mul, w_add: {why}")
    _expect(m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0,
            f"groups: expected a positive divisor of in_channels ({m.in_channels}) and out_channels "
            f"({m.out_channels}), got {m.groups}")
    kh, kw = m.kernel_size
    nh = len(m.heads)
    packed = (m.out_channels, kh, kw, ic.packed_bytes(m.in_channels // m.groups))
    _expect(isinstance(weight, torch.Tensor) and weight.dtype == torch.uint8 and tuple(weight.shape) == packed,
            f"weight: expected uint8 {packed}, got "
            f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    _expect(isinstance(epilogues, torch.Tensor) and epilogues.dtype == torch.float32
            and tuple(epilogues.shape) == (nh, ic.EPILOGUE_ROWS, m.out_channels),
            f"epilogues: expected float32 {(nh, ic.EPILOGUE_ROWS, m.out_channels)}, got "
            f"{getattr(epilogues, 'dtype', type(epilogues).__name__)} {tuple(getattr(epilogues, 'shape', ()))}")
    _expect(tap_sums is None or (isinstance(tap_sums, torch.Tensor) and tap_sums.dtype == torch.int32
                                 and tuple(tap_sums.shape) == (m.out_channels, kh + 1, kw + 1)),
            f"tap_sums: expected None or int32 {(m.out_channels, kh + 1, kw + 1)}, got "
            f"{getattr(tap_sums, 'dtype', type(tap_sums).__name__)} {tuple(getattr(tap_sums, 'shape', ()))}")


class QuantizePack(nn.Module):
    """Float (N, C, H, W) -> packed codes of a quantizer: q_mul/q_off per channel (rows of qparams),
    rounding to [qn, qp] or counting thresholds. With scale/shift, x*scale + shift (per channel, in
    fp32) is quantised instead: the affine of a fusion node whose input comes from a float op."""

    def __init__(self, channels: int, qn: int, qp: int, qparams: torch.Tensor, thresholds: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, source: str = ""):
        super().__init__()
        self.channels = check_int(channels, "channels", 1, MAX_CHANNELS)
        self.qn, self.qp = check_int(qn, "qn", -8, 15), check_int(qp, "qp", -8, 15)
        _expect(_fits_nibble(self.qn, self.qp), f"qn, qp: expected levels qn < qp of a 4-bit code, got {qn}, {qp}")
        _expect(isinstance(source, str), f"source: expected a str, got {type(source).__name__}")
        self.source = source
        _expect(isinstance(qparams, torch.Tensor) and qparams.dtype == torch.float32
                and tuple(qparams.shape) == (2, self.channels),
                f"qparams: expected float32 (2, {self.channels}), got "
                f"{getattr(qparams, 'dtype', type(qparams).__name__)} "
                f"{tuple(getattr(qparams, 'shape', ()))}")
        _expect(thresholds is None or (isinstance(thresholds, torch.Tensor) and thresholds.dtype == torch.float32
                                       and thresholds.dim() == 1 and thresholds.numel() <= MAX_THRESHOLDS),
                f"thresholds: expected None or float32 (T,), T <= {MAX_THRESHOLDS}, got "
                f"{getattr(thresholds, 'dtype', type(thresholds).__name__)} {tuple(getattr(thresholds, 'shape', ()))}")
        for name, t in (("scale", scale), ("shift", shift)):
            _expect(t is None or (isinstance(t, torch.Tensor) and t.is_floating_point()
                                  and tuple(t.shape) == (self.channels,)),
                    f"{name}: expected None or a float tensor ({self.channels},), got "
                    f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        _expect((scale is None) == (shift is None), "scale and shift: give both or neither")
        self.register_buffer("qparams", qparams)
        self.register_buffer("thresholds", thresholds)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def config(self) -> dict:
        return {"channels": self.channels, "qn": self.qn, "qp": self.qp, "source": self.source}

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None, c_offset: int = 0,
                total_channels: int | None = None) -> torch.Tensor:
        x = x.float()
        if self.scale is not None:
            x = x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        if out is None and total_channels is not None:
            out = _new_packed(x, x.shape[0], x.shape[2], x.shape[3], total_channels)
        return ic.quantize_pack(x, self.qparams, self.qn, self.qp, thresholds=self.thresholds, out=out,
                                c_offset=c_offset)

    def extra_repr(self) -> str:
        return f"{self.channels}, qn={self.qn}, qp={self.qp}, affine={self.scale is not None}, source={self.source!r}"


def packed_upsample_nearest(x: torch.Tensor, scale_h: int, scale_w: int) -> torch.Tensor:
    """Nearest upsampling by integer factors of packed codes (whole bytes are repeated)."""
    return x.repeat_interleave(scale_h, dim=1).repeat_interleave(scale_w, dim=2)


def packed_maxpool2d(x: torch.Tensor, channels: int, signed: bool, kernel_size, stride, padding, dilation,
                     ceil_mode: bool) -> torch.Tensor:
    """Max pooling of packed codes: max(Q(v)) = Q(max(v)) for a non-decreasing quantizer Q."""
    codes = ic.unpack(x, channels, signed)
    # Pooled as float32 (exact for 4-bit codes): CUDA max_pool2d has no integer kernels, and the CPU one
    # on channels_last int8 indexes with the element type (it fails from 256x20x20, SPPF at 640x640).
    pooled = F.max_pool2d(codes.float(), kernel_size, stride, padding, dilation, ceil_mode)
    return ic.pack(pooled.to(torch.int8), 4, signed)


def packed_write(out: torch.Tensor | None, src: torch.Tensor, channels: int, c_offset: int,
                 total_channels: int) -> torch.Tensor:
    """Copy the `channels` codes of packed src into channels [c_offset, c_offset + channels) of out
    (c_offset even; a new zeroed tensor of total_channels channels when out is None)."""
    if out is None:
        out = _new_packed(src, src.shape[0], src.shape[1], src.shape[2], total_channels)
    nbytes = (channels + 1) // 2
    out[..., c_offset // 2:c_offset // 2 + nbytes] = src[..., :nbytes]
    return out


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x*scale + shift per channel of a float (N, C, H, W) tensor."""
    return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)
