"""The int32 accumulator bound of an integer conv (docs/math.md §7), which the converter proves per
layer before it emits an IntConv2d.

The integer conv sums over L = KH*KW*C_in codes, in int32 on every device:
    acc = sum k*q,   I = w_mul*acc + w_add*Sq (Sq = sum q),   J = w_mul*(sum k) + w_add*L'
(L' <= L: the codes of the valid taps). With |k| <= max_w and |q| <= max_a, each of them and each
term and partial sum on the way is at most
    bound = L * (|w_mul|*max_w + |w_add|) * max(max_a, 1)
in magnitude, so bound <= 2^31 - 1 proves that none overflows.

The ops check exactly this bound with max_w and max_a of the 4-bit containers (signed codes
[-8, 7]: 8, unsigned [0, 15]: 15), since they cannot look at the codes without a host sync
(csrc/checks.cpp check_accumulator). The container magnitudes bound every layer's real codes, so
the converter uses them too: a layer it accepts is proven free of overflow and is never rejected
by the op at run time.
"""
from __future__ import annotations

INT32_MAX = 2**31 - 1


def container_magnitude(signed: bool) -> int:
    """The largest |code| a 4-bit container holds: 8 (signed, [-8, 7]) or 15 (unsigned, [0, 15])."""
    return 8 if signed else 15


def accumulator_bound(taps: int, in_channels: int, w_mul: int, w_add: int, max_w: int, max_a: int) -> int:
    """The bound (module docstring) on every int32 sum of a conv of `taps` = KH*KW taps of
    `in_channels` channels, weight levels w_mul*k + w_add with |k| <= max_w, |q| <= max_a."""
    return taps * in_channels * (abs(w_mul) * max_w + abs(w_add)) * max(max_a, 1)


def overflow_reason(kernel_size, in_channels: int, w_signed: bool, a_signed: bool, w_mul: int,
                    w_add: int) -> str | None:
    """Why the int32 accumulator of this conv could overflow (the converter's refusal), or None
    when the bound proves it cannot."""
    kh, kw = kernel_size
    max_w, max_a = container_magnitude(w_signed), container_magnitude(a_signed)
    bound = accumulator_bound(kh * kw, in_channels, w_mul, w_add, max_w, max_a)
    if bound <= INT32_MAX:
        return None
    return (f"its int32 accumulator is not proven free of overflow: L*(|w_mul|*max|k| + |w_add|)*max|q| = "
            f"{kh}*{kw}*{in_channels}*({abs(w_mul)}*{max_w} + {abs(w_add)})*{max_a} = {bound} > 2^31 - 1")
