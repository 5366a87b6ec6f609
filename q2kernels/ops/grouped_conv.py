"""The grouped / depthwise integer conv (groups > 1) of q2kernels._C: csrc/grouped_conv.h, one plain
loop per output element that the CPU op and the CUDA kernel (csrc/cuda/grouped_conv.cu) both run.

Same packed format and epilogue as q2kernels.ops.int_conv.conv2d; the weights are packed along their
C_in/groups input channels, (C_out, KH, KW, packed_bytes(C_in/groups)), and output channel o reads
input channels [g*C_in/groups, (g+1)*C_in/groups) with g = o // (C_out/groups). Output: packed codes
(uint8) or float32 channels_last.
"""
from __future__ import annotations

import torch

from . import int_conv as ic

_ops = torch.ops.q2kernels_int


@torch.library.register_fake("q2kernels_int::conv2d_grouped")
def _(x, weight, epilogue, tap_sums, thresholds, in_channels, groups, x_signed, w_signed, w_mul, w_add, stride,
      padding, dilation, act, qn, qp, out_dtype):
    n, cout = x.shape[0], weight.shape[0]
    ho, wo = ic._out_hw(x.shape[1], x.shape[2], weight.shape[1], weight.shape[2], stride, padding, dilation)
    if out_dtype == torch.uint8:
        return x.new_empty((n, ho, wo, ic.packed_bytes(cout)), dtype=torch.uint8)
    return x.new_empty((n, cout, ho, wo), dtype=out_dtype).contiguous(memory_format=torch.channels_last)


@torch.library.register_fake("q2kernels_int::conv2d_grouped_out")
def _(x, weight, epilogue, tap_sums, thresholds, in_channels, groups, x_signed, w_signed, w_mul, w_add, stride,
      padding, dilation, act, qn, qp, c_offset, out):
    return None


def conv2d_grouped(x: torch.Tensor, weight: torch.Tensor, epilogue: torch.Tensor, in_channels: int, groups: int, *,
                   x_signed: bool, w_signed: bool, w_mul: int = 1, w_add: int = 0, tap_sums=None, stride=1,
                   padding=0, dilation=1, act: str = "identity", qn: int = 0, qp: int = 15, thresholds=None,
                   out_dtype=torch.uint8, out=None, c_offset: int = 0) -> torch.Tensor:
    """int_conv.conv2d with `groups` groups (module docstring); tap_sums from the (C_out, C_in/groups,
    KH, KW) weight codes (int_conv.weight_tap_sums)."""
    args = (x, weight, epilogue, tap_sums, thresholds, in_channels, groups, x_signed, w_signed, w_mul, w_add,
            ic._pair(stride, "stride"), ic._pair(padding, "padding"), ic._pair(dilation, "dilation"), ic._act(act),
            qn, qp)
    if out is None:
        return _ops.conv2d_grouped(*args, out_dtype)
    _ops.conv2d_grouped_out(*args, c_offset, out)
    return out
