// Registers the deterministic float ops (../det_float.h) for torch.ops.q2kernels_int.det_* on CUDA tensors,
// as grouped_ops.cpp does for the grouped conv: the checked calls of ../det_float_cpu.cpp (shared with
// the CPU kernels, so a bad argument gives the same error on every device), then det_float.cu's launchers
// on the current stream of the inputs' device. They run on every GPU (plain float arithmetic, no MMA):
// no arch table is consulted.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "det_float.h"

namespace q2k {
namespace det {
namespace {

// The device guard and the current stream of x's device; empty when x is not a CUDA tensor (the checked
// call then reports the device mix before anything is launched).
struct Context {
  c10::cuda::OptionalCUDAGuard guard;
  CUstream_st* stream = nullptr;
  explicit Context(const at::Tensor& x) {
    if (!x.is_cuda()) return;
    guard.set_device(x.device());
    stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  }
};

void check_launch(int status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "q2kernels_int ", op, ": the CUDA kernel launch failed (cudaError_t ", status,
              ")");
}

at::Tensor det_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                           int64_t groups, int64_t act) {
  const Context ctx(x);
  ConvCall c = conv2d_call(x, weight, bias, stride, padding, dilation, groups, act);
  if (c.out.numel() == 0) return c.out;
  check_launch(launch_conv2d(c.g, c.x.const_data_ptr<float>(), c.weight.const_data_ptr<float>(),
                             c.bias.defined() ? c.bias.const_data_ptr<float>() : nullptr, c.out.data_ptr<float>(),
                             ctx.stream),
               "det_conv2d");
  return c.out;
}

at::Tensor det_matmul_cuda(const at::Tensor& a, const at::Tensor& b) {
  const Context ctx(a);
  MatmulCall c = matmul_call(a, b);
  if (c.out.numel() == 0) return c.out;
  if (c.k == 0) return c.out.zero_();  // empty sums: +0 (a and b may have no memory)
  check_launch(launch_matmul(c.batch, c.m, c.n, c.k, c.a.const_data_ptr<float>(), c.b.const_data_ptr<float>(),
                             c.out.data_ptr<float>(), ctx.stream),
               "det_matmul");
  return c.out;
}

at::Tensor det_softmax_cuda(const at::Tensor& x, int64_t dim) {
  const Context ctx(x);
  SoftmaxCall c = softmax_call(x, dim);
  if (c.out.numel() == 0) return c.out;
  check_launch(launch_softmax(c.outer, c.len, c.inner, c.x.const_data_ptr<float>(), c.out.data_ptr<float>(),
                              ctx.stream),
               "det_softmax");
  return c.out;
}

at::Tensor det_silu_cuda(const at::Tensor& x) {
  const Context ctx(x);
  SiluCall c = silu_call(x);
  if (c.out.numel() == 0) return c.out;
  check_launch(launch_silu(c.out.numel(), c.x.const_data_ptr<float>(), c.out.data_ptr<float>(), ctx.stream),
               "det_silu");
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(q2kernels_int, CUDA, m) {
  m.impl("det_conv2d", &det_conv2d_cuda);
  m.impl("det_matmul", &det_matmul_cuda);
  m.impl("det_softmax", &det_softmax_cuda);
  m.impl("det_silu", &det_silu_cuda);
}

}  // namespace det
}  // namespace q2k
