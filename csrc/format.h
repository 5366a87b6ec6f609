// The packed 4-bit code format shared by the CPU path, the CUDA path (csrc/cuda/) and Python
// (q2kernels/ops/int_conv.py mirrors the constants). Host/device inline: nvcc compiles the same
// helpers into the CUDA kernels.
//
// Activations: uint8 tensor (N, H, W, packed_bytes(C)), contiguous; byte b of a pixel holds channel
// 2b in its low nibble and channel 2b+1 in its high nibble. Weights: the same along the input
// channel, (C_out, KH, KW, packed_bytes(C_in)). Signed codes are 4-bit two's complement, so 3-bit
// codes (-4..3 or 0..7) use the same 4-bit container and the same kernels.
//
// K granularity: C is padded to a multiple of kChannelAlign = 32 codes = 16 bytes, one 128-bit load
// or cp.async per pixel and tap. The CUDA int4 MMA consumes k = 64 codes per step, i.e. two such
// chunks (from one tap, or from two neighbouring taps when C_padded = 32), and zero-fills an odd
// last chunk of K = KH*KW*C_padded. Padding to 64 instead would double the work and the traffic of
// the 32-channel layers of YOLOv5s, which are its largest activations (160x160).
//
// Invariant: padding nibbles are 0. pack() and every op that allocates packed output write zeros
// there; the CPU conv ignores them anyway (it reads the first C_in channels only), the CUDA
// kernels rely on the weights' zero padding, which makes any activation padding contribute 0.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define Q2K_HD __host__ __device__ __forceinline__
#else
#define Q2K_HD inline
#endif

namespace q2k {

constexpr int64_t kChannelAlign = 32;
constexpr int64_t kFormatVersion = 1;

Q2K_HD int64_t padded_channels(int64_t c) {
  return (c + kChannelAlign - 1) / kChannelAlign * kChannelAlign;
}

Q2K_HD int64_t packed_bytes(int64_t c) { return padded_channels(c) / 2; }

// The code of channel c from a pixel's packed bytes.
Q2K_HD int32_t load_code(const uint8_t* row, int64_t c, bool is_signed) {
  const int32_t nib = (row[c >> 1] >> ((c & 1) * 4)) & 0xF;
  return is_signed ? nib - ((nib & 0x8) << 1) : nib;
}

// One byte from the codes of an even channel (low nibble) and the next odd one (high nibble).
Q2K_HD uint8_t pack_pair(int32_t even_code, int32_t odd_code) {
  return static_cast<uint8_t>((even_code & 0xF) | ((odd_code & 0xF) << 4));
}

// Writes count codes of one pixel from channel c_offset (even) on. A trailing odd code keeps the
// high nibble it shares a byte with (the next channel belongs to another writer or is padding).
Q2K_HD void store_codes(uint8_t* row, int64_t c_offset, const int32_t* codes, int64_t count) {
  uint8_t* dst = row + (c_offset >> 1);
  int64_t c = 0;
  for (; c + 1 < count; c += 2) dst[c >> 1] = pack_pair(codes[c], codes[c + 1]);
  if (c < count) dst[c >> 1] = static_cast<uint8_t>((dst[c >> 1] & 0xF0) | (codes[c] & 0xF));
}

}  // namespace q2k
