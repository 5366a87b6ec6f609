// The elementwise kernels of the packed 4-bit format (../format.h): quantize-and-pack of a float
// tensor (the input of the first quantized layer), and pack / unpack of integer codes (the converted
// model's max pooling unpacks, pools and packs). One thread per output byte or code, threads ordered
// along the input's innermost axis, so the loads coalesce for NCHW and channels_last alike. A header
// so that the CPU emulator of the tests (tests/cuda_emu/) compiles the same source; packing.cu
// launches them.
#pragma once

#include <cstdint>

#include "epilogue.h"
#include "format.h"
#include "params.h"

#if defined(Q2K_CUDA_EMULATION)
#include "emulator.h"
#else
#include "primitives.cuh"
#endif

namespace q2k {
namespace cuda {

// Grid-stride loop over [0, total).
#define Q2K_FOR_EACH(idx, total)                                                              \
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < (total); \
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)

Q2K_DEV float load_float(const QuantizePackParams& p, int64_t at) {
  if (p.dtype == 1) return f16_bits_to_f32(static_cast<const uint16_t*>(p.x)[at]);
  if (p.dtype == 2) return bf16_bits_to_f32(static_cast<const uint16_t*>(p.x)[at]);
  return static_cast<const float*>(p.x)[at];
}

// Byte b of pixel pix of the output = channels 2b, 2b+1 of the input, at channel offset c_offset.
__global__ void __launch_bounds__(256) quantize_pack_kernel(const QuantizePackParams p) {
  const int64_t bytes = (p.c + 1) / 2, pixels = p.n * p.h * p.w;
  const bool channels_inner = p.sc <= p.sw;
  const float* q_mul = p.qparams;
  const float* q_off = p.qparams + p.c;
  Q2K_FOR_EACH(idx, pixels * bytes) {
    const int64_t pix = channels_inner ? idx / bytes : idx % pixels;
    const int64_t b = channels_inner ? idx % bytes : idx / pixels;
    const int64_t n = pix / (p.h * p.w), hw = pix % (p.h * p.w);
    const int64_t base = n * p.sn + (hw / p.w) * p.sh + (hw % p.w) * p.sw;
    int32_t code[2] = {0, 0};
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t c = 2 * b + e;
      if (c < p.c) {
        const float v = load_float(p, base + c * p.sc);
        code[e] = p.thresholds != nullptr
                      ? quantize_thresholds(v, q_mul[c], q_off[c], p.thresholds, p.qp - p.qn, p.qn)
                      : quantize_round(v, q_mul[c], q_off[c], p.qn, p.qp);
      }
    }
    uint8_t* dst = p.out + pix * p.out_pitch + p.c_offset / 2 + b;
    // An odd last channel keeps the high nibble of its byte (the next channel is someone else's).
    *dst = 2 * b + 1 < p.c ? pack_pair(code[0], code[1]) : static_cast<uint8_t>((*dst & 0xF0) | (code[0] & 0x0F));
  }
}

Q2K_DEV int32_t load_int_code(const PackParams& p, int64_t at) {
  switch (p.elem_bytes) {
    case 1: return p.elem_signed ? static_cast<const int8_t*>(p.codes)[at] : static_cast<const uint8_t*>(p.codes)[at];
    case 2: return static_cast<const int16_t*>(p.codes)[at];
    case 4: return static_cast<const int32_t*>(p.codes)[at];
    default: return static_cast<int32_t>(static_cast<const int64_t*>(p.codes)[at]);
  }
}

// Byte b of row pix (a, b1, b2) of the packed output: codes 2b, 2b+1 along axis 1, or padding (0).
__global__ void __launch_bounds__(256) pack_kernel(const PackParams p) {
  const int64_t rows = p.a * p.b1 * p.b2;
  const bool channels_inner = p.s1 <= p.s3;
  Q2K_FOR_EACH(idx, rows * p.out_pitch) {
    const int64_t row = channels_inner ? idx / p.out_pitch : idx % rows;
    const int64_t b = channels_inner ? idx % p.out_pitch : idx / rows;
    const int64_t a = row / (p.b1 * p.b2), r = row % (p.b1 * p.b2);
    const int64_t base = a * p.s0 + (r / p.b2) * p.s2 + (r % p.b2) * p.s3;
    const int32_t lo = 2 * b < p.c ? load_int_code(p, base + 2 * b * p.s1) : 0;
    const int32_t hi = 2 * b + 1 < p.c ? load_int_code(p, base + (2 * b + 1) * p.s1) : 0;
    p.out[row * p.out_pitch + b] = pack_pair(lo, hi);
  }
}

// Code c of pixel pix, as int8 in channels_last memory order.
__global__ void __launch_bounds__(256) unpack_kernel(const UnpackParams p) {
  Q2K_FOR_EACH(idx, p.pixels * p.channels) {
    const int64_t pix = idx / p.channels, c = idx % p.channels;
    p.out[idx] = static_cast<int8_t>(load_code(p.packed + pix * p.pitch, c, p.is_signed));
  }
}

#undef Q2K_FOR_EACH

}  // namespace cuda
}  // namespace q2k
