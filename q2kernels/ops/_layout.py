"""Memory-layout helpers shared by the elementwise kernels.

The kernels walk a tensor in memory order, so any dense layout (NCHW, channels_last, a permuted
weight) is read and written in place without a permute copy. A dense tensor seen along one `axis`
is the 3-d view (OUTER, C, INNER) of its memory: C = size(axis) and INNER = stride(axis), so element
k of channel c (k < OUTER*INNER) sits at (k // INNER) * C * INNER + c * INNER + k % INNER.
"""
from __future__ import annotations

import torch

INT32_LIMIT = 2**31 - 1


def is_dense(x: torch.Tensor) -> bool:
    """True when x's elements fill its storage span with no gaps or overlaps, in any dim order."""
    expected = 1
    for d in sorted(range(x.dim()), key=lambda d: x.stride(d)):
        if x.size(d) == 1:
            continue
        if x.stride(d) != expected:
            return False
        expected *= x.size(d)
    return True


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when dense; otherwise (a slice, an expanded tensor) a contiguous copy. This is the
    one copy the kernels ever make, and only for inputs no kernel can walk in memory order."""
    return x if is_dense(x) else x.contiguous()


def like(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y in x's (dense) memory layout: y itself when the strides already match, else one copy.
    Autograd hands e.g. an expanded gradient for `.sum()`, which must be laid out like x."""
    if y.stride() == x.stride() or x.numel() <= 1:
        return y
    return torch.empty_like(x, dtype=y.dtype).copy_(y)


def channel_view(x: torch.Tensor, axis: int | None) -> tuple[int, int]:
    """(C, INNER) of the (OUTER, C, INNER) view of dense x along axis; (1, 1) per tensor."""
    if axis is None or x.size(axis) == 1:
        return 1, 1
    return x.size(axis), x.stride(axis)


def needs_int64(x: torch.Tensor) -> bool:
    return x.numel() > INT32_LIMIT


def rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A (B, C, H, W) tensor as B*C rows of H*W pixels: x (copied only if it is not dense or its H
    and W do not merge into one pixel stride) and its (batch, channel, pixel) strides. NCHW has
    pixel stride 1, channels_last C; either is walked in place."""
    x = dense(x)
    _, _, H, W = x.shape
    if H > 1 and W > 1 and x.stride(2) != W * x.stride(3):
        x = x.contiguous()
    pixel = x.stride(3) if W > 1 else (x.stride(2) if H > 1 else 1)
    return x, (x.stride(0), x.stride(1), pixel)
