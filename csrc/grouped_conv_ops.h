// The torch side of the grouped integer conv (grouped_conv.h), shared by the CPU op
// (grouped_conv_cpu.cpp), the CUDA op (cuda/grouped_ops.cpp) and the CUDA emulator of the tests:
// the kernel parameters of a checked call (grouped_conv_ops.cpp). The checks are conv_args'
// (int_conv.h, checks.cpp), so a bad argument gives the same error on every device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include "grouped_conv.h"
#include "int_conv.h"

namespace q2k {

// The kernel parameters of a checked conv2d_grouped(_out) call (conv_args(ConvOp::kGrouped, ...)):
// pointers into its tensors, its geometry and its epilogue. Checks nothing.
GroupedConvParams grouped_params(const ConvArgs& a);

// conv_args(ConvOp::kGrouped, ...) and grouped_params in one call, with the op's arguments: the entry
// point of the CUDA emulator of the tests (tests/cuda_emu/emu_ops.cpp). Fills p; returns the output
// (out, or the one allocated of out_dtype when out is not given).
at::Tensor grouped_conv_setup(GroupedConvParams& p, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& epilogue, const c10::optional<at::Tensor>& tap_sums,
                              const c10::optional<at::Tensor>& thresholds, int64_t in_channels, int64_t groups,
                              bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add, c10::IntArrayRef stride,
                              c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act, int64_t qn,
                              int64_t qp, c10::ScalarType out_dtype, const c10::optional<at::Tensor>& out,
                              int64_t c_offset);

}  // namespace q2k
