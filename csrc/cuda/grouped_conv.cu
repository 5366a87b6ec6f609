// Host launcher of the grouped / depthwise integer conv kernel (grouped_conv_kernel.cuh). CUDA headers
// only: nvcc builds this file on its own (tests/test_cuda_compile.py); grouped_ops.cpp is the torch side.
#include <cuda_runtime.h>

#include "grouped_conv_kernel.cuh"

namespace q2k {
namespace cuda {

int launch_grouped_conv(const GroupedConvParams& p, CUstream_st* stream) {
  const GroupedGrid grid = grouped_grid(p);
  if (grid.total == 0) return cudaSuccess;
  if (grid.blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  grouped_conv_kernel<<<static_cast<unsigned>(grid.blocks), kGroupedThreads, 0, stream>>>(p, grid.pairs, grid.total);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace q2k
