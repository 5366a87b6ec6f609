// The grouped / depthwise integer conv (groups > 1) on the CPU: the schemas of
// torch.ops.q2kernels_int.conv2d_grouped(_out) and the CPU kernel, which runs grouped_conv.h's
// per-element code over every output element (the argument checks: conv_args, checks.cpp).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <utility>

#include "grouped_conv_ops.h"

namespace q2k {

namespace {

// Output pixels per parallel task.
constexpr int64_t kPixelGrain = 16;

void run_cpu(const GroupedConvParams& p) {
  const int64_t pairs = (p.cout + 1) / 2;
  at::parallel_for(0, p.n * p.ho * p.wo, kPixelGrain, [&](int64_t begin, int64_t end) {
    for (int64_t pix = begin; pix < end; ++pix)
      for (int64_t pair = 0; pair < pairs; ++pair) grouped_store_pair(p, pix, pair);
  });
}

at::Tensor conv2d_grouped_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                              const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                              int64_t in_channels, int64_t groups, bool x_signed, bool w_signed, int64_t w_mul,
                              int64_t w_add, c10::IntArrayRef stride, c10::IntArrayRef padding,
                              c10::IntArrayRef dilation, int64_t act, int64_t qn, int64_t qp,
                              c10::ScalarType out_dtype) {
  ConvArgs a = conv_args(ConvOp::kGrouped, x, weight, epilogue, tap_sums, thresholds, in_channels, groups, x_signed,
                         w_signed, w_mul, w_add, stride, padding, dilation, act, qn, qp, out_dtype, nullptr, 0);
  run_cpu(grouped_params(a));
  return std::move(a.out);
}

void conv2d_grouped_out_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                            const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                            int64_t in_channels, int64_t groups, bool x_signed, bool w_signed, int64_t w_mul,
                            int64_t w_add, c10::IntArrayRef stride, c10::IntArrayRef padding,
                            c10::IntArrayRef dilation, int64_t act, int64_t qn, int64_t qp, int64_t c_offset,
                            const at::Tensor& out) {
  run_cpu(grouped_params(conv_args(ConvOp::kGrouped, x, weight, epilogue, tap_sums, thresholds, in_channels, groups,
                                   x_signed, w_signed, w_mul, w_add, stride, padding, dilation, act, qn, qp,
                                   out.scalar_type(), &out, c_offset)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(q2kernels_int, m) {
  m.def(
      "conv2d_grouped(Tensor x, Tensor weight, Tensor epilogue, Tensor? tap_sums, Tensor? thresholds, "
      "int in_channels, int groups, bool x_signed, bool w_signed, int w_mul, int w_add, int[2] stride, "
      "int[2] padding, int[2] dilation, int act, int qn, int qp, ScalarType out_dtype) -> Tensor");
  m.def(
      "conv2d_grouped_out(Tensor x, Tensor weight, Tensor epilogue, Tensor? tap_sums, Tensor? thresholds, "
      "int in_channels, int groups, bool x_signed, bool w_signed, int w_mul, int w_add, int[2] stride, "
      "int[2] padding, int[2] dilation, int act, int qn, int qp, int c_offset, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(q2kernels_int, CPU, m) {
  m.impl("conv2d_grouped", &conv2d_grouped_cpu);
  m.impl("conv2d_grouped_out", &conv2d_grouped_out_cpu);
}

}  // namespace q2k
