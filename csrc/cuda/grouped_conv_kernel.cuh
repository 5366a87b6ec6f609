// The grouped / depthwise integer conv on the GPU: one thread per pair of output channels of one
// output pixel (a packed byte), running grouped_conv.h's per-element code, the source the CPU op
// runs too. No shared memory and no MMA: a depthwise filter reads C_in/groups (often 1) channels
// per tap, far too little reduction depth for a tensor core; the loads of neighbouring threads
// (neighbouring channel pairs of one pixel) fall in the same 16-byte chunks. A header so that the
// CPU emulator of the tests (tests/cuda_emu/) runs the same kernel and grid; grouped_conv.cu
// launches it.
#pragma once

#include <cstdint>

#include "grouped_conv.h"

#if defined(Q2K_CUDA_EMULATION)
#include "emulator.h"  // tests/cuda_emu: __global__, threadIdx and blockIdx on the CPU
#endif

namespace q2k {
namespace cuda {

constexpr int kGroupedThreads = 256;

// The launch of p: pairs = ceil(cout/2) threads per pixel, total = pixels*pairs threads, in blocks
// of kGroupedThreads.
struct GroupedGrid {
  int64_t pairs, total, blocks;
};

inline GroupedGrid grouped_grid(const GroupedConvParams& p) {
  GroupedGrid grid;
  grid.pairs = (p.cout + 1) / 2;
  grid.total = p.n * p.ho * p.wo * grid.pairs;
  grid.blocks = (grid.total + kGroupedThreads - 1) / kGroupedThreads;
  return grid;
}

__global__ void __launch_bounds__(kGroupedThreads) grouped_conv_kernel(const GroupedConvParams p, int64_t pairs,
                                                                         int64_t total) {
  // p: the problem (grouped_conv.h); pairs = ceil(cout/2) per pixel; total = pixels*pairs.
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kGroupedThreads + threadIdx.x;
  if (t >= total) return;
  grouped_store_pair(p, t / pairs, t % pairs);
}

}  // namespace cuda
}  // namespace q2k
