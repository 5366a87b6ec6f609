// The arguments of the CUDA integer kernels as plain structs, and their host launchers. Plain C++:
// the launchers (*.cu, built by nvcc with no torch headers), the torch glue (int_ops.cpp) and the CPU
// emulator of the tests (tests/cuda_emu/) all include it.
#pragma once

#include <cstdint>

struct CUstream_st;  // cudaStream_t is CUstream_st*; declared here so this header needs no CUDA headers

namespace q2k {
namespace cuda {

// Which tensor-core instruction the conv runs: the int4 MMA (native on sm_80/86/89, emulated on
// sm_90) or the int8 MMA on nibbles unpacked in registers (sm_90).
enum class MmaPath : int { kS4 = 0, kS8 = 1 };

// What the conv writes: raw int32 accumulators, the epilogue's float32 / float16 value, or the
// next layer's packed 4-bit codes.
enum class OutKind : int { kAcc = 0, kFloat = 1, kHalf = 2, kPacked = 3 };

struct ConvParams {
  const uint8_t* x;  // packed activations (n, in_h, in_w, cb), 16-byte aligned
  const uint8_t* w;  // packed weights (cout, kh, kw, cb), 16-byte aligned
  int n, in_h, in_w, cin, cb, cout, kh, kw;
  int sh, sw, ph, pw, dh, dw;
  int out_h, out_w;
  bool x_signed, w_signed;
  int w_mul, w_add;
  // Epilogue (ignored for OutKind::kAcc): float32 (kEpilogueRows, cout); tap_sums int32
  // (cout, kh+1, kw+1) or null; thresholds float32 (qp-qn) or null (rounding).
  const float* epilogue;
  const int32_t* tap_sums;
  const float* thresholds;
  int act, qn, qp;
  OutKind out_kind;
  void* out;           // NHWC rows of out_pitch elements (bytes for packed codes)
  int64_t out_pitch;
  int64_t c_offset;    // first output channel written (even for packed codes)
  MmaPath path;
};

struct QuantizePackParams {
  const void* x;       // float32 / float16 / bfloat16 (n, c, h, w), any strides
  int dtype;           // 0 float32, 1 float16, 2 bfloat16
  int64_t n, c, h, w;
  int64_t sn, sc, sh, sw;  // element strides of x
  const float* qparams;    // float32 (kQuantRows, c)
  const float* thresholds; // float32 (qp-qn) or null
  int qn, qp;
  uint8_t* out;            // packed (n, h, w, out_pitch bytes)
  int64_t out_pitch;
  int64_t c_offset;
};

struct PackParams {
  const void* codes;  // integer (a, c, b1, b2), any strides
  int elem_bytes;     // 1, 2, 4 or 8
  bool elem_signed;   // for 1-byte elements: int8 (else uint8)
  int64_t a, c, b1, b2;
  int64_t s0, s1, s2, s3;
  uint8_t* out;       // packed (a, b1, b2, out_pitch), padding written as 0
  int64_t out_pitch;
};

struct UnpackParams {
  const uint8_t* packed;  // (pixels, pitch) bytes
  int64_t pixels, pitch, channels;
  bool is_signed;
  int8_t* out;            // (pixels, channels)
};

// Launch on `stream`; they return the CUDA launch status (0 = cudaSuccess) for the caller to check.
int launch_int_conv(const ConvParams& p, CUstream_st* stream);
int launch_quantize_pack(const QuantizePackParams& p, CUstream_st* stream);
int launch_pack(const PackParams& p, CUstream_st* stream);
int launch_unpack(const UnpackParams& p, CUstream_st* stream);

}  // namespace cuda
}  // namespace q2k
