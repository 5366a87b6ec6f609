// Registers the grouped integer conv (conv_args' checks, ../grouped_conv_ops.cpp's parameters,
// grouped_conv.cu's launcher) for torch.ops.q2kernels_int.conv2d_grouped(_out) on CUDA tensors.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <utility>

#include "grouped_conv_ops.h"

namespace q2k {
namespace cuda {
namespace {

void run(const GroupedConvParams& p, const at::Tensor& x) {
  const int status = launch_grouped_conv(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(status == 0, "q2kernels_int conv2d_grouped: the CUDA kernel launch failed (cudaError_t ", status, ")");
}

at::Tensor conv2d_grouped_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                               const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                               int64_t in_channels, int64_t groups, bool x_signed, bool w_signed, int64_t w_mul,
                               int64_t w_add, c10::IntArrayRef stride, c10::IntArrayRef padding,
                               c10::IntArrayRef dilation, int64_t act, int64_t qn, int64_t qp,
                               c10::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(x.device());
  ConvArgs a = conv_args(ConvOp::kGrouped, x, weight, epilogue, tap_sums, thresholds, in_channels, groups, x_signed,
                         w_signed, w_mul, w_add, stride, padding, dilation, act, qn, qp, out_dtype, nullptr, 0);
  run(grouped_params(a), x);
  return std::move(a.out);
}

void conv2d_grouped_out_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                             const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                             int64_t in_channels, int64_t groups, bool x_signed, bool w_signed, int64_t w_mul,
                             int64_t w_add, c10::IntArrayRef stride, c10::IntArrayRef padding,
                             c10::IntArrayRef dilation, int64_t act, int64_t qn, int64_t qp, int64_t c_offset,
                             const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  run(grouped_params(conv_args(ConvOp::kGrouped, x, weight, epilogue, tap_sums, thresholds, in_channels, groups,
                               x_signed, w_signed, w_mul, w_add, stride, padding, dilation, act, qn, qp,
                               out.scalar_type(), &out, c_offset)),
      x);
}

}  // namespace

TORCH_LIBRARY_IMPL(q2kernels_int, CUDA, m) {
  m.impl("conv2d_grouped", &conv2d_grouped_cuda);
  m.impl("conv2d_grouped_out", &conv2d_grouped_out_cuda);
}

}  // namespace cuda
}  // namespace q2k
