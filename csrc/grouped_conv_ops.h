// The torch side of the grouped integer conv (grouped_conv.h), shared by the CPU op
// (grouped_conv_cpu.cpp), the CUDA op (cuda/grouped_ops.cpp) and the CUDA emulator of the tests:
// argument checks and the kernel parameters (grouped_conv_ops.cpp), so a bad argument gives the same
// error on every device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include "grouped_conv.h"

namespace q2k {

// Checks every argument of conv2d_grouped and allocates the output (packed uint8 or float32
// channels_last) when `out` is not given; fills p (its out pointer included).
at::Tensor grouped_conv_setup(GroupedConvParams& p, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& epilogue, const c10::optional<at::Tensor>& tap_sums,
                              const c10::optional<at::Tensor>& thresholds, int64_t in_channels, int64_t groups,
                              bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add, c10::IntArrayRef stride,
                              c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act, int64_t qn,
                              int64_t qp, c10::ScalarType out_dtype, const c10::optional<at::Tensor>& out,
                              int64_t c_offset);

}  // namespace q2k
