// Registers the CUDA integer ops (int_ops.cpp) for torch.ops.q2kernels_int.* on CUDA tensors: the device
// guard, the current stream, and the MMA path for the device (params.h MmaPath), which the table of
// archs.h gives (gpu_arch_of: the row of the newest arch at or below the GPU's compute capability):
// today sm_80 / sm_86 / sm_89 (any 8.x) the native int4 MMA, sm_90 and newer the int8 MMA on unpacked
// nibbles (int4 MMA is emulated there). No arch number is written here.
// Q2K_INT_MMA=s4 forces the int4 path (on sm_90: the emulated int4 MMA, slow; it checks the same
// kernel source on an H100), Q2K_INT_MMA=s8 the int8 path (built only where the table's row runs it,
// archs.h mma_path_built); auto (unset) chooses.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "archs.h"
#include "int_ops.h"

namespace q2k {
namespace cuda {
namespace {

MmaPath mma_path(const at::Tensor& x) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, x.get_device()));
  const int cc = major * 10 + minor;
  const GpuArch* row = gpu_arch_of(cc);
  TORCH_CHECK(row != nullptr, "q2kernels_int: the CUDA integer kernels need an sm_", kGpuArchs[0].arch,
              " or newer GPU (int4/int8 tensor-core MMA); ", x.device(), " is sm_", cc);
  const char* env = std::getenv("Q2K_INT_MMA");
  const std::string want = env == nullptr ? "auto" : env;
  // The device code that runs here was compiled for __CUDA_ARCH__ = row->arch * 10 (gpu_arch_of); a
  // forced path must be one that compilation holds (mma_path_built), never a stub.
  if (want == "auto" || want.empty()) return row->path;
  if (want == "s4") return MmaPath::kS4;  // built for every arch
  if (want == "s8") {
    TORCH_CHECK_VALUE(mma_path_built(MmaPath::kS8, row->arch * 10),
                      "Q2K_INT_MMA=s8: the int8-MMA kernels are built for sm_",
                      oldest_arch_of(MmaPath::kS8), " only; ", x.device(), " is sm_", cc,
                      " (it runs the native int4 MMA)");
    return MmaPath::kS8;
  }
  TORCH_CHECK_VALUE(false, "Q2K_INT_MMA: expected auto, s4 or s8, got '", want, "'");
}

// The device context of x (with the MMA path for a conv); empty when x is not a CUDA tensor (the
// checks then report the device mix).
struct Context {
  c10::cuda::OptionalCUDAGuard guard;
  Exec ex;
  explicit Context(const at::Tensor& x, bool conv = false) {
    if (!x.is_cuda()) return;
    guard.set_device(x.device());
    if (conv) ex.path = mma_path(x);
    ex.stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  }
};

at::Tensor conv2d_acc_cuda(const at::Tensor& x, const at::Tensor& weight, int64_t in_channels, bool x_signed,
                           bool w_signed, c10::IntArrayRef stride, c10::IntArrayRef padding,
                           c10::IntArrayRef dilation) {
  const Context ctx(x, /*conv=*/true);
  return conv2d_acc(ctx.ex, x, weight, in_channels, x_signed, w_signed, stride, padding, dilation);
}

at::Tensor conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                       const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                       int64_t in_channels, bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add,
                       c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act,
                       int64_t qn, int64_t qp, c10::ScalarType out_dtype) {
  const Context ctx(x, /*conv=*/true);
  return conv2d(ctx.ex, x, weight, epilogue, tap_sums, thresholds, in_channels, x_signed, w_signed, w_mul, w_add,
                stride, padding, dilation, act, qn, qp, out_dtype);
}

void conv2d_out_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                     const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                     int64_t in_channels, bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add,
                     c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act,
                     int64_t qn, int64_t qp, int64_t c_offset, const at::Tensor& out) {
  const Context ctx(x, /*conv=*/true);
  conv2d_out(ctx.ex, x, weight, epilogue, tap_sums, thresholds, in_channels, x_signed, w_signed, w_mul, w_add,
             stride, padding, dilation, act, qn, qp, c_offset, out);
}

at::Tensor pack_cuda(const at::Tensor& codes, int64_t bits, bool is_signed) {
  const Context ctx(codes);
  return pack(ctx.ex, codes, bits, is_signed);
}

at::Tensor unpack_cuda(const at::Tensor& packed, int64_t channels, bool is_signed) {
  const Context ctx(packed);
  return unpack(ctx.ex, packed, channels, is_signed);
}

at::Tensor quantize_pack_cuda(const at::Tensor& x, const at::Tensor& qparams,
                              const c10::optional<at::Tensor>& thresholds, int64_t qn, int64_t qp) {
  const Context ctx(x);
  return quantize_pack(ctx.ex, x, qparams, thresholds, qn, qp);
}

void quantize_pack_out_cuda(const at::Tensor& x, const at::Tensor& qparams,
                            const c10::optional<at::Tensor>& thresholds, int64_t qn, int64_t qp, int64_t c_offset,
                            const at::Tensor& out) {
  const Context ctx(x);
  quantize_pack_out(ctx.ex, x, qparams, thresholds, qn, qp, c_offset, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(q2kernels_int, CUDA, m) {
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
  m.impl("conv2d_acc", &conv2d_acc_cuda);
  m.impl("conv2d", &conv2d_cuda);
  m.impl("conv2d_out", &conv2d_out_cuda);
  m.impl("quantize_pack", &quantize_pack_cuda);
  m.impl("quantize_pack_out", &quantize_pack_out_cuda);
}

}  // namespace cuda
}  // namespace q2k
