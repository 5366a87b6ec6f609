// Device primitives of the integer kernels: the PTX they use (tensor-core MMA, ldmatrix, cp.async)
// and the few CUDA intrinsics, each behind a small function. tests/cuda_emu/emulator.h defines the
// same functions on the CPU (a lane-level emulator) and the kernels' source is compiled against it
// there (Q2K_CUDA_EMULATION), so the data movement and the fragment bookkeeping are tested in CI
// without a GPU. Only this file and the emulator may contain PTX or CUDA intrinsics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#define Q2K_DEV __device__ __forceinline__

namespace q2k {
namespace cuda {

// D += A*B on one m16n8k64 tile of signed 4-bit codes: the native IMMA.16864 of sm_80/86/89
// (sm_90 has no int4 tensor core: ptxas replaces this by a called emulation, see int_conv_kernel.cuh).
Q2K_DEV void mma_s4(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D += A*B on one m16n8k32 tile of signed 8-bit values (IMMA.16832.S8 on every sm_80+ GPU).
Q2K_DEV void mma_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

Q2K_DEV uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// Four 8x(16-byte) matrices from shared memory: lane l gives the address of row l%8 of matrix
// l/8 and receives, in r[q], the 4-byte word l%4 of row l/4 of matrix q.
Q2K_DEV void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

// 16 bytes global -> shared without passing through registers; zero-filled when !valid (then src
// is not read). Caches in L2 only: every operand tile is read once per CTA.
Q2K_DEV void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

Q2K_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
Q2K_DEV void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

Q2K_DEV void block_sync() { __syncthreads(); }

Q2K_DEV void warp_sync() { __syncwarp(); }

Q2K_DEV uint32_t shfl_xor(uint32_t v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }

Q2K_DEV uint32_t shfl_idx(uint32_t v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }

// c + the sum of the four signed byte products of a and b.
Q2K_DEV int dp4a(uint32_t a, uint32_t b, int c) {
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
}

// The kernel's dynamic shared memory (its size is given at launch).
Q2K_DEV uint8_t* shared_memory() {
  extern __shared__ __align__(128) uint8_t q2k_dynamic_smem[];
  return q2k_dynamic_smem;
}

Q2K_DEV uint16_t f32_to_f16_bits(float v) { return __half_as_ushort(__float2half_rn(v)); }

Q2K_DEV float f16_bits_to_f32(uint16_t v) { return __half2float(__ushort_as_half(v)); }

Q2K_DEV float bf16_bits_to_f32(uint16_t v) { return __bfloat162float(__ushort_as_bfloat16(v)); }

}  // namespace cuda
}  // namespace q2k
