// The grouped / depthwise integer conv on the GPU: one thread per pair of output channels of one
// output pixel (a packed byte), running grouped_conv.h's per-element code, the source the CPU op
// runs too. No shared memory and no MMA: a depthwise filter reads C_in/groups (often 1) channels
// per tap, far too little reduction depth for a tensor core; the loads of neighbouring threads
// (neighbouring channel pairs of one pixel) fall in the same 16-byte chunks.
#include <cuda_runtime.h>

#include "grouped_conv.h"

namespace q2k {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) grouped_conv_kernel(const GroupedConvParams p, int64_t pairs,
                                                                   int64_t total) {
  // p: the problem (grouped_conv.h); pairs = ceil(cout/2) per pixel; total = pixels*pairs.
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= total) return;
  grouped_store_pair(p, t / pairs, t % pairs);
}

}  // namespace

int launch_grouped_conv(const GroupedConvParams& p, CUstream_st* stream) {
  const int64_t pairs = (p.cout + 1) / 2;
  const int64_t total = p.n * p.ho * p.wo * pairs;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  grouped_conv_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, pairs, total);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace q2k
