"""The grouped / depthwise integer conv (groups > 1) of q2kernels._C: csrc/grouped_conv.h, one plain
loop per output element that the CPU op and the CUDA kernel (csrc/cuda/grouped_conv_kernel.cuh) both run.

Same packed format and epilogue as q2kernels.ops.int_conv.conv2d; the weights are packed along their
C_in/groups input channels, (C_out, KH, KW, packed_bytes(C_in/groups)), and output channel o reads
input channels [g*C_in/groups, (g+1)*C_in/groups) with g = o // (C_out/groups). Output: packed codes
(uint8) or float32 channels_last.
"""
from __future__ import annotations

import torch

from . import int_conv as ic


def conv2d_grouped(x: torch.Tensor, weight: torch.Tensor, epilogue: torch.Tensor, in_channels: int, groups: int, *,
                   x_signed: bool, w_signed: bool, w_mul: int = 1, w_add: int = 0, tap_sums=None, stride=1,
                   padding=0, dilation=1, act: str = "identity", qn: int = 0, qp: int = 15, thresholds=None,
                   out_dtype=torch.uint8, out=None, c_offset: int = 0) -> torch.Tensor:
    """int_conv.conv2d with `groups` groups (module docstring); tap_sums from the (C_out, C_in/groups,
    KH, KW) weight codes (int_conv.weight_tap_sums). As there, `out` must share no memory with x or
    any other input (an error names the input: the kernel reads x while it writes out)."""
    args = (x, weight, epilogue, tap_sums, thresholds, in_channels, groups, x_signed, w_signed, w_mul, w_add,
            ic._pair(stride, "stride"), ic._pair(padding, "padding"), ic._pair(dilation, "dilation"), ic._act(act),
            qn, qp)
    if out is None:
        return ic._ops.conv2d_grouped(*args, out_dtype)
    ic._ops.conv2d_grouped_out(*args, c_offset, out)
    return out
