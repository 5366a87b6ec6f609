// The CUDA kernels of the deterministic float ops (../det_float.h has their definition): one thread per
// output element (det_conv2d, det_matmul, det_silu) or per slice (det_softmax), each running det_float.h's
// per-element function, whose device arithmetic is epilogue.h's __f*_rn helpers (never contracted into
// fma; --fmad=false besides), so every element is the CPU path's bit for bit. CUDA headers only: nvcc
// builds this file on its own (tests/test_cuda_compile.py); the torch side is ../det_float_cpu.cpp
// (the checks) and det_float_ops.cpp (the registration).
#include <cuda_runtime.h>

#include "det_float.h"

namespace q2k {
namespace det {
namespace {

constexpr int kThreads = 256;
// Blocks per launch at most; each thread then loops over the outputs a grid apart (any int64 count).
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

unsigned blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

__device__ __forceinline__ int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

__global__ void conv2d_kernel(ConvGeometry g, const float* __restrict__ x, const float* __restrict__ weight,
                              const float* __restrict__ bias, float* __restrict__ out, int64_t total) {
  for (int64_t i = first_index(); i < total; i += grid_stride()) out[i] = conv2d_at(x, weight, bias, g, i);
}

__global__ void matmul_kernel(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out,
                              int64_t m, int64_t n, int64_t k, int64_t total) {
  for (int64_t i = first_index(); i < total; i += grid_stride()) out[i] = matmul_at(a, b, m, n, k, i);
}

__global__ void softmax_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t len, int64_t inner,
                               int64_t slices) {
  for (int64_t s = first_index(); s < slices; s += grid_stride()) softmax_at(x, y, len, inner, s);
}

__global__ void silu_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t total) {
  for (int64_t i = first_index(); i < total; i += grid_stride()) y[i] = silu(x[i]);
}

}  // namespace

int launch_conv2d(const ConvGeometry& g, const float* x, const float* weight, const float* bias, float* out,
                  CUstream_st* stream) {
  const int64_t total = g.n * g.cout * g.ho * g.wo;
  if (total == 0) return cudaSuccess;
  conv2d_kernel<<<blocks_for(total), kThreads, 0, stream>>>(g, x, weight, bias, out, total);
  return cudaGetLastError();
}

int launch_matmul(int64_t batch, int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* out,
                  CUstream_st* stream) {
  const int64_t total = batch * m * n;
  if (total == 0) return cudaSuccess;
  matmul_kernel<<<blocks_for(total), kThreads, 0, stream>>>(a, b, out, m, n, k, total);
  return cudaGetLastError();
}

int launch_softmax(int64_t outer, int64_t len, int64_t inner, const float* x, float* y, CUstream_st* stream) {
  const int64_t slices = outer * inner;
  if (slices == 0 || len == 0) return cudaSuccess;
  softmax_kernel<<<blocks_for(slices), kThreads, 0, stream>>>(x, y, len, inner, slices);
  return cudaGetLastError();
}

int launch_silu(int64_t numel, const float* x, float* y, CUstream_st* stream) {
  if (numel == 0) return cudaSuccess;
  silu_kernel<<<blocks_for(numel), kThreads, 0, stream>>>(x, y, numel);
  return cudaGetLastError();
}

}  // namespace det
}  // namespace q2k
