// The GPU architectures of the CUDA integer kernels: ONE table, read by everything that depends on it.
// - the build (q2kernels/_ext.py: q2kernels._ext.GPU_ARCHS parses kGpuArchs below, CUDA_ARCHS and
//   cuda_flags make nvcc's -gencode flags from it: machine code for every row, and the newest row's
//   compute_XX PTX riding along for newer GPUs);
// - the dispatcher (register_cuda.cpp: mma_path runs gpu_arch_of(compute capability)->path);
// - the kernel's compile-time guard (int_conv_kernel.cuh: kS8PathBuilt = mma_path_built(kS8, __CUDA_ARCH__));
// - the tests (tests/test_cuda_compile.py compiles each row and checks the SASS of its path;
//   tests/test_gpu_archs.py fails when a consumer disagrees with the table).
//
// Why the table is C++ and Python parses it, not the reverse (Python the source, -D flags to the
// compilers): the dispatcher and the kernel guard are compiled code, and three compilers read them
// (nvcc for the .cu files, the host compiler for register_cuda.cpp, and the host compiler again for
// the CPU emulator of tests/cuda_emu), each with its own flags; -D flags would have to reach all of
// them (and the prebuilt library's stamped flags), and a translation unit compiled without them would
// silently fall back to a default. A header is included by all of them as it is, and _ext.py reads it
// with a strict parser that rejects anything it does not understand (tests/test_gpu_archs.py checks
// that the parser and the C++ compiler read the same rows). The flags stay what they were.
//
// The format, which q2kernels/_ext.py's parser expects: one row per line, `{NN, MmaPath::kS4}` or
// `{NN, MmaPath::kS8}` with NN = major*10 + minor (sm_NN), oldest first; a `//` comment may follow.
// The tile configuration does not depend on the architecture (int_conv_kernel.cuh: Tile), so the
// table has no tile column.
//
// Adding an architecture (say sm_100) is adding its row; docs/extending.md ("A GPU architecture")
// lists what to run then.
#pragma once

#include "params.h"

namespace q2k {
namespace cuda {

struct GpuArch {
  int arch;      // sm_<arch>: compute capability major*10 + minor
  MmaPath path;  // the MMA path the dispatcher runs there unless Q2K_INT_MMA forces one
};

inline constexpr GpuArch kGpuArchs[] = {
    {80, MmaPath::kS4},  // A100: native int4 MMA (IMMA.16864)
    {86, MmaPath::kS4},  // RTX 30xx, A10/A40
    {89, MmaPath::kS4},  // Ada: RTX 40xx, L4, L40S
    {90, MmaPath::kS8},  // H100/H200: no int4 tensor core (ptxas emulates mma.s4), the int8 MMA on unpacked nibbles
};

inline constexpr int kNumGpuArchs = sizeof(kGpuArchs) / sizeof(kGpuArchs[0]);

constexpr bool gpu_archs_ascending() {
  for (int i = 1; i < kNumGpuArchs; ++i) {
    if (kGpuArchs[i - 1].arch >= kGpuArchs[i].arch) return false;
  }
  return true;
}
static_assert(gpu_archs_ascending(), "kGpuArchs: rows oldest first, each arch once");

// The row whose code a GPU of compute capability cc (major*10 + minor, e.g. 87) runs: the newest row
// at or below cc. That is the driver's own choice: machine code of the same major and an equal or
// lower minor (sm_86 code on an sm_87 GPU), and past the newest row its PTX, compiled for it
// (compute_90 on an sm_100 GPU). nullptr below the oldest row: no kernel runs there.
constexpr const GpuArch* gpu_arch_of(int cc) {
  const GpuArch* row = nullptr;
  for (int i = 0; i < kNumGpuArchs; ++i) {
    if (kGpuArchs[i].arch <= cc) row = &kGpuArchs[i];
  }
  return row;
}

// The oldest row whose path is `path` (0 where no row has it): for messages.
constexpr int oldest_arch_of(MmaPath path) {
  for (int i = 0; i < kNumGpuArchs; ++i) {
    if (kGpuArchs[i].path == path) return kGpuArchs[i].arch;
  }
  return 0;
}

// Whether the device code compiled for cuda_arch (__CUDA_ARCH__, e.g. 860) holds the kernels of `path`
// rather than empty stubs. The path of the architecture's row is built; the int4 path is built for
// every architecture as well (on sm_90 it is the compiler's emulation, which Q2K_INT_MMA=s4 runs to
// check the same kernel source on an H100), so a dispatcher that runs a row's path, or kS4, never
// launches a stub.
constexpr bool mma_path_built(MmaPath path, int cuda_arch) {
  const GpuArch* row = gpu_arch_of(cuda_arch / 10);
  return path == MmaPath::kS4 || (row != nullptr && row->path == path);
}

}  // namespace cuda
}  // namespace q2k
