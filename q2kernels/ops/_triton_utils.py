"""Small @triton.jit helpers shared by the kernels."""
import triton
import triton.language as tl

from ._interpreter_compat import install as _install_interpreter_compat

# Every kernel module imports this one: the interpreter fix is in place before any launch.
_install_interpreter_compat()

# 1.5 * 2^23: adding and subtracting it rounds an fp32 |v| <= 2^22 to the nearest integer, ties to
# even, in the hardware's default rounding mode — exactly torch.round / rintf, on every backend
# (libdevice's rint is not available to the Triton interpreter).
_RINT_MAGIC: tl.constexpr = tl.constexpr(12582912.0)


@triton.jit
def channel_offsets(k, c, C, INNER):
    """Memory offset of element k of channel c in the (OUTER, C, INNER) view of a dense tensor
    (ops/_layout.py); k and c broadcast against each other."""
    return (k // INNER) * C * INNER + c * INNER + k % INNER


@triton.jit
def clip(v, lo, hi):
    """min(max(v, lo), hi) that keeps NaN, as torch.clamp does."""
    return tl.minimum(tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def round_clip(v, lo, hi):
    """R(clip(v, lo, hi)), R = round half to even. The clip comes first for two reasons: it bounds
    |v| for the magic-number rounding, and it stands between the multiply that produced v and the
    rounding add, so the compiler cannot contract them into an fma that would round x*inv only once
    and flip decisions at ties."""
    return (clip(v, lo, hi) + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def cast_to(v, dtype: tl.constexpr):
    """fp32 -> `dtype`, rounding to nearest even as torch's .to() does. bf16 is rounded explicitly
    on the bits: the Triton interpreter truncates fp32 -> bf16 (on a GPU this is the same result
    as the hardware conversion, at the cost of three integer ops)."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return v.to(dtype)
