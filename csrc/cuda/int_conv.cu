// Host launcher of the integer conv kernel (int_conv_kernel.cuh). CUDA headers only: nvcc builds
// this file on its own (tests/test_cuda_compile.py), and int_ops.cpp is the torch side.
#include <cuda_runtime.h>

#include "int_conv_kernel.cuh"

namespace q2k {
namespace cuda {

int launch_int_conv(const ConvParams& p, CUstream_st* stream) {
  const int64_t m = static_cast<int64_t>(p.n) * p.out_h * p.out_w;
  if (m == 0 || p.cout == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  with_tile(p, [&](auto tile) {
    using T = decltype(tile);
    const int64_t blocks = (m + T::kBM - 1) / T::kBM * ((p.cout + T::kBN - 1) / T::kBN);
    if (blocks > 0x7fffffff) {
      status = cudaErrorInvalidConfiguration;
      return;
    }
    if (T::kSmemBytes > 48 * 1024) {
      status = cudaFuncSetAttribute(int_conv_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes);
      if (status != cudaSuccess) return;
    }
    int_conv_kernel<T><<<static_cast<unsigned>(blocks), T::kThreads, T::kSmemBytes, stream>>>(p);
    status = cudaGetLastError();
  });
  return status;
}

}  // namespace cuda
}  // namespace q2k
