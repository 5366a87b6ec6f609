// Host launchers of the packing kernels (packing_kernels.cuh). CUDA headers only: nvcc builds this
// file on its own (tests/test_cuda_compile.py); int_ops.cpp is the torch side.
#include <cuda_runtime.h>

#include "packing_kernels.cuh"

namespace q2k {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Blocks for `total` threads, capped (the kernels loop) so the grid size always fits.
unsigned blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < (1 << 30) ? blocks : (1 << 30));
}

}  // namespace

int launch_quantize_pack(const QuantizePackParams& p, CUstream_st* stream) {
  const int64_t total = p.n * p.h * p.w * ((p.c + 1) / 2);
  if (total == 0) return cudaSuccess;
  quantize_pack_kernel<<<blocks_for(total), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

int launch_pack(const PackParams& p, CUstream_st* stream) {
  const int64_t total = p.a * p.b1 * p.b2 * p.out_pitch;
  if (total == 0) return cudaSuccess;
  pack_kernel<<<blocks_for(total), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

int launch_unpack(const UnpackParams& p, CUstream_st* stream) {
  const int64_t total = p.pixels * p.channels;
  if (total == 0) return cudaSuccess;
  unpack_kernel<<<blocks_for(total), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace q2k
