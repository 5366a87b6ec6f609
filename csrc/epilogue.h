// The integer conv's epilogue (docs/math.md §7), one definition for the CPU path and the CUDA kernels.
//
// Per output element (pixel p, output channel o), from the integer sums
//   I = sum over valid taps and input channels of w_int * q_a,  w_int = w_mul*k + w_add
//     = w_mul*acc + w_add*Sq    (acc = sum k*q_a, Sq = sum q_a; out-of-image taps read code 0)
//   J = w_mul*(sum of o's weight codes k over the valid taps) + w_add*C_in*(number of valid taps)
// the epilogue computes, in fp32:
//   y = alpha[o]*I + (gamma[o]*J + bias[o])          alpha = s_w*s_a, gamma = s_w*beta_a (BN folded)
//   y = act(y)                                        identity, ReLU or SiLU
//   z = aff_mul[o]*y + aff_add[o]                      gates, folded LayerNorm, ...
// and then either writes z (float output) or the next layer's code:
//   LSQ/LSQ+/PACT: R(clip((z - q_off[o])*q_mul[o], qn, qp))    (q_mul = 1/s, q_off = beta)
//   N2UQ:          qn + #{i : (z - q_off[o])*q_mul[o] > t_i}   (q_mul = alpha1, q_off = 0)
// J is what makes the activation zero point beta_a exact at image borders: zero padding pads xhat
// with 0, not q_a with 0, so a border output sees beta_a only through its valid taps.
//
// Every operation is an IEEE basic operation rounded to nearest even, spelled out (fma where
// written, no contraction elsewhere; the host build uses -ffp-contract=off, device code uses the
// __f*_rn intrinsics, which nvcc never contracts), and exp is a fixed polynomial rather than the
// platform's expf, so the CPU and the CUDA paths give bit-identical floats and codes.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "format.h"

namespace q2k {

// Rows of the float32 (kEpilogueRows, C_out) epilogue tensor.
enum EpilogueRow : int { kAlpha = 0, kGamma, kBias, kAffMul, kAffAdd, kQMul, kQOff, kEpilogueRows };
// Rows of the float32 (kQuantRows, C) quantizer tensor of quantize_pack.
enum QuantRow : int { kQuantMul = 0, kQuantOff, kQuantRows };

enum Activation : int { kIdentity = 0, kReLU = 1, kSiLU = 2 };

Q2K_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

Q2K_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

Q2K_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

Q2K_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

Q2K_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

Q2K_HD float int_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int2float_rn(i);
#else
  return static_cast<float>(i);
#endif
}

Q2K_HD float round_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
}

Q2K_HD float scale_pow2(float v, int e) {
#if defined(__CUDA_ARCH__)
  return ldexpf(v, e);
#else
  return std::ldexp(v, e);
#endif
}

Q2K_HD float infinity_f() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7f800000);
#else
  return std::numeric_limits<float>::infinity();
#endif
}

// exp(x) from basic operations only: x = k*ln2 + r (Cody-Waite, |r| <= ln2/2), a degree-7 Taylor
// polynomial for e^r (truncation < 1e-8 relative), then an exact scaling by 2^k. Within 2 ulp of
// exp on [-87, 88.72]; 0 below (where e^x would be subnormal; 1 + e^x is then 1 anyway), inf above.
Q2K_HD float exp_det(float x) {
  if (x != x) return x;
  if (x > 88.72f) return infinity_f();
  if (x < -87.0f) return 0.0f;
  const float k = round_even(mul_rn(x, 1.44269502f));
  float r = fma_rn(k, -0.693145751953125f, x);
  r = fma_rn(k, -1.42860677e-06f, r);
  float p = 1.98412698e-04f;
  p = fma_rn(p, r, 1.38888889e-03f);
  p = fma_rn(p, r, 8.33333333e-03f);
  p = fma_rn(p, r, 4.16666667e-02f);
  p = fma_rn(p, r, 1.66666667e-01f);
  p = fma_rn(p, r, 0.5f);
  p = fma_rn(p, r, 1.0f);
  p = fma_rn(p, r, 1.0f);
  return scale_pow2(p, static_cast<int>(k));
}

// SiLU as PyTorch writes it, x / (1 + e^-x).
Q2K_HD float silu_det(float x) { return div_rn(x, add_rn(1.0f, exp_det(-x))); }

Q2K_HD float activate(float y, int act) {
  if (act == kReLU) return y < 0.0f ? 0.0f : y;
  if (act == kSiLU) return silu_det(y);
  return y;
}

// R(clip(v, qn, qp)); a NaN becomes qn (the first comparison is false), as in the threshold count.
Q2K_HD int32_t quantize_round(float z, float q_mul, float q_off, int32_t qn, int32_t qp) {
  const float v = mul_rn(sub_rn(z, q_off), q_mul);
  float c = v > static_cast<float>(qn) ? v : static_cast<float>(qn);
  c = c < static_cast<float>(qp) ? c : static_cast<float>(qp);
  return static_cast<int32_t>(round_even(c));
}

// qn + the number of thresholds strictly below u (N2UQ's level count; NaN counts none).
Q2K_HD int32_t quantize_thresholds(float z, float q_mul, float q_off, const float* thr, int32_t nthr,
                                   int32_t qn) {
  const float u = mul_rn(sub_rn(z, q_off), q_mul);
  int32_t k = qn;
  for (int32_t i = 0; i < nthr; ++i) k += u > thr[i] ? 1 : 0;
  return k;
}

// I from the raw accumulators.
Q2K_HD int32_t weighted_acc(int32_t acc, int32_t sq, int32_t w_mul, int32_t w_add) {
  return w_mul * acc + w_add * sq;
}

// The taps k in [k0, k1) of one spatial axis that land inside the image:
// 0 <= o*stride - pad + k*dil < in, with 0 <= k0 <= k1 <= taps. Both ends are clamped to the
// kernel: where the padding is wider than the kernel reaches, every tap of an output can fall before
// the image, and the first tap inside it lies past the last tap; the range is then empty at taps,
// which keeps J's tap_sums lookups at [k0, k1] inside the (KH+1) x (KW+1) prefix sums (and k0, k1
// inside the bytes the CUDA epilogue packs them into, since KH, KW < 256 there).
Q2K_HD void valid_taps(int64_t o, int64_t stride, int64_t pad, int64_t dil, int64_t taps, int64_t in,
                       int64_t& k0, int64_t& k1) {
  const int64_t start = o * stride - pad;
  const int64_t first_inside = start >= 0 ? 0 : (-start + dil - 1) / dil;
  const int64_t end_inside = start < in ? (in - 1 - start) / dil + 1 : 0;
  k0 = first_inside < taps ? first_inside : taps;
  k1 = end_inside < taps ? end_inside : taps;
  if (k1 < k0) k1 = k0;
}

// J of output channel o over the valid tap rectangle [kh0, kh1) x [kw0, kw1), from o's 2-D prefix
// sums ts[i][j] = sum of its weight codes over taps kh < i, kw < j ((KH+1) x (KW+1), row-major).
// For the prefix sums of real codes J and its terms fit int32 (the accumulator contract of
// check_conv); tap_sums is a user tensor, though, so the sum is formed in uint32, which wraps
// instead of being undefined behaviour when it is not (same instructions: two's complement).
Q2K_HD int32_t zero_point_taps(const int32_t* ts, int64_t kw, int64_t kh0, int64_t kh1, int64_t kw0,
                               int64_t kw1, int32_t w_mul, int32_t w_add, int64_t cin) {
  const int64_t ld = kw + 1;
  const uint32_t ksum = static_cast<uint32_t>(ts[kh1 * ld + kw1]) - static_cast<uint32_t>(ts[kh0 * ld + kw1]) -
                        static_cast<uint32_t>(ts[kh1 * ld + kw0]) + static_cast<uint32_t>(ts[kh0 * ld + kw0]);
  const uint32_t codes = static_cast<uint32_t>(cin * (kh1 - kh0) * (kw1 - kw0));
  return static_cast<int32_t>(static_cast<uint32_t>(w_mul) * ksum + static_cast<uint32_t>(w_add) * codes);
}

// z of output channel o (ep: the (kEpilogueRows, ld) epilogue rows).
Q2K_HD float epilogue_value(const float* ep, int64_t ld, int64_t o, int32_t I, int32_t J, int act) {
  const float pre = fma_rn(ep[kAlpha * ld + o], int_to_float(I),
                           fma_rn(ep[kGamma * ld + o], int_to_float(J), ep[kBias * ld + o]));
  return fma_rn(ep[kAffMul * ld + o], activate(pre, act), ep[kAffAdd * ld + o]);
}

// The next layer's code of z: thresholds when thr is given, else rounding.
Q2K_HD int32_t epilogue_code(float z, const float* ep, int64_t ld, int64_t o, const float* thr,
                             int32_t nthr, int32_t qn, int32_t qp) {
  const float q_mul = ep[kQMul * ld + o];
  const float q_off = ep[kQOff * ld + o];
  return thr != nullptr ? quantize_thresholds(z, q_mul, q_off, thr, nthr, qn)
                        : quantize_round(z, q_mul, q_off, qn, qp);
}

}  // namespace q2k
