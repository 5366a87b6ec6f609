// The grouped / depthwise integer conv (groups > 1): one output element at a time, host and device.
//
// Grouped convs in detectors are depthwise (YOLO11's Detect cv3 branch, C2PSA's positional conv):
// each output channel reads C_in/groups input channels (often 1), so there is no reduction depth to
// feed a tensor core. One plain loop per output element is the whole kernel: the CPU op
// (grouped_conv_cpu.cpp) runs it over every element with at::parallel_for and the CUDA kernel
// (cuda/grouped_conv_kernel.cuh) runs it with one thread per pair of output channels of a pixel, so
// the CPU tests check the very source the GPU runs (and the CUDA emulator of the tests, the kernel and
// its grid). The epilogue is epilogue.h's, bit for bit.
//
// Layouts (format.h): x packed (N, H, W, packed_bytes(C_in)); weight packed
// (C_out, KH, KW, packed_bytes(C_in/groups)); output channel o reads input channels
// [g*cin_g, (g+1)*cin_g) with g = o / cout_g.
#pragma once

#include <cstdint>

#include "epilogue.h"
#include "format.h"

struct CUstream_st;  // cudaStream_t is CUstream_st*; declared at global scope, as params.h does

namespace q2k {

struct GroupedConvParams {
  const uint8_t* x_codes;     // packed (n, h, w, x_cb)
  const uint8_t* w_codes;     // packed (cout, kh, kw, w_cb)
  const float* epilogue;      // float32 (kEpilogueRows, cout)
  const int32_t* tap_sums;    // int32 (cout, kh+1, kw+1) prefix sums, or null (no zero point)
  const float* thresholds;    // float32 (qp - qn), or null (rounding)
  void* out;                  // packed uint8 rows of out_row bytes, or float32 rows of out_row channels
  int64_t n, h, w, x_cb;
  int64_t cin_g, w_cb;        // input channels per group, weight bytes per tap
  int64_t cout, cout_g;       // output channels, output channels per group
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t ho, wo;
  int64_t out_row, c_offset;  // elements per output pixel row; first channel written (even if packed)
  int32_t w_mul, w_add, act, qn, qp;
  bool x_signed, w_signed, packed_out;
};

// z (epilogue.h) of output channel o at output pixel pix = (n*ho + oh)*wo + ow.
Q2K_HD float grouped_value(const GroupedConvParams& p, int64_t pix, int64_t o) {
  const int64_t n = pix / (p.ho * p.wo), oh = pix / p.wo % p.ho, ow = pix % p.wo;
  int64_t kh0, kh1, kw0, kw1;
  valid_taps(oh, p.sh, p.ph, p.dh, p.kh, p.h, kh0, kh1);
  valid_taps(ow, p.sw, p.pw, p.dw, p.kw, p.w, kw0, kw1);
  const int64_t c0 = o / p.cout_g * p.cin_g;
  int32_t acc = 0, sq = 0;
  for (int64_t i = kh0; i < kh1; ++i) {
    const int64_t ih = oh * p.sh - p.ph + i * p.dh;
    for (int64_t j = kw0; j < kw1; ++j) {
      const int64_t iw = ow * p.sw - p.pw + j * p.dw;
      const uint8_t* xr = p.x_codes + ((n * p.h + ih) * p.w + iw) * p.x_cb;
      const uint8_t* wr = p.w_codes + ((o * p.kh + i) * p.kw + j) * p.w_cb;
      for (int64_t c = 0; c < p.cin_g; ++c) {
        const int32_t q = load_code(xr, c0 + c, p.x_signed);
        acc += load_code(wr, c, p.w_signed) * q;
        sq += q;
      }
    }
  }
  const int32_t I = weighted_acc(acc, sq, p.w_mul, p.w_add);
  const int32_t J = p.tap_sums == nullptr
                        ? 0
                        : zero_point_taps(p.tap_sums + o * (p.kh + 1) * (p.kw + 1), p.kw, kh0, kh1, kw0, kw1,
                                          p.w_mul, p.w_add, p.cin_g);
  return epilogue_value(p.epilogue, p.cout, o, I, J, p.act);
}

// Output channels 2*pair and 2*pair + 1 (if any) of pixel pix: one packed byte or one or two floats.
// A trailing odd channel keeps the high nibble of its byte (store_codes' rule).
Q2K_HD void grouped_store_pair(const GroupedConvParams& p, int64_t pix, int64_t pair) {
  const int64_t o = 2 * pair;
  const bool second = o + 1 < p.cout;
  const float z0 = grouped_value(p, pix, o);
  const float z1 = second ? grouped_value(p, pix, o + 1) : 0.0f;
  if (!p.packed_out) {
    float* row = static_cast<float*>(p.out) + pix * p.out_row + p.c_offset + o;
    row[0] = z0;
    if (second) row[1] = z1;
    return;
  }
  const int32_t nthr = p.qp - p.qn;
  const int32_t k0 = epilogue_code(z0, p.epilogue, p.cout, o, p.thresholds, nthr, p.qn, p.qp);
  uint8_t* byte = static_cast<uint8_t*>(p.out) + pix * p.out_row + (p.c_offset >> 1) + pair;
  if (second) {
    *byte = pack_pair(k0, epilogue_code(z1, p.epilogue, p.cout, o + 1, p.thresholds, nthr, p.qn, p.qp));
  } else {
    *byte = static_cast<uint8_t>((*byte & 0xF0) | (k0 & 0xF));
  }
}

namespace cuda {
// csrc/cuda/grouped_conv.cu: every (pixel, pair) of p on `stream`; returns the CUDA launch status.
int launch_grouped_conv(const GroupedConvParams& p, CUstream_st* stream);
}  // namespace cuda

}  // namespace q2k
