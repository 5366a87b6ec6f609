// epilogue.h's per-element functions on 8 float32 lanes (AVX2 + FMA), for the epilogue of the CPU fast
// path (csrc/fast_conv_cpu.cpp). Each lane goes through the same IEEE operations, in the same order and
// with the same constants, as the scalar function of the same name, so the floats and codes are bit for
// bit epilogue.h's (and so the int32 path's and the CUDA kernels'):
//   fma_rn     -> _mm256_fmadd_ps (one rounding, as std::fma)
//   round_even -> _mm256_round_ps to nearest even, no exception flags (nearbyint in the default mode)
//   div_rn     -> _mm256_div_ps (never the rcp estimate)
//   a branch   -> the scalar code's comparison (false for NaN, hence _OQ) and a blend.
// These functions are compiled for AVX2 + FMA alone (the target attribute), so the rest of the library
// keeps the baseline x86-64 instruction set; their callers check the CPU first (__builtin_cpu_supports).
// tests/test_int_conv_fast_cpu.py holds them to the int32 path on adversarial values.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define Q2K_EPILOGUE_AVX2 1

#include <immintrin.h>

#include <cstdint>

#include "epilogue.h"

#define Q2K_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

namespace q2k {
namespace simd {

constexpr int kLanes = 8;
constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// 2^e as a float for integer lanes e in [-126, 127]: the biased exponent alone.
Q2K_AVX2 __m256 pow2(__m256i e) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
}

// ldexp(v, k) for |v| in [0.5, 2] (exp_det's polynomial) and k in [-126, 128] (its range of k). 2^128 is
// not a float, so v is scaled in two steps, by 2^h and 2^(k-h) with h = floor(k/2) in [-63, 64]: the
// first product is exact (a normal float), the second rounds once, exactly as ldexp would.
Q2K_AVX2 __m256 scale_pow2(__m256 v, __m256i k) {
  const __m256i h = _mm256_srai_epi32(k, 1);
  return _mm256_mul_ps(_mm256_mul_ps(v, pow2(h)), pow2(_mm256_sub_epi32(k, h)));
}

// exp_det: the polynomial in every lane, then the scalar code's early returns as blends (the lanes they
// take computed garbage, harmlessly: no trap, no undefined behaviour in vector integer arithmetic).
Q2K_AVX2 __m256 exp_det(__m256 x) {
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269502f)), kRoundNearest);
  __m256 r = _mm256_fmadd_ps(k, _mm256_set1_ps(-0.693145751953125f), x);
  r = _mm256_fmadd_ps(k, _mm256_set1_ps(-1.42860677e-06f), r);
  __m256 p = _mm256_set1_ps(1.98412698e-04f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.38888889e-03f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.33333333e-03f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.16666667e-02f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.66666667e-01f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // k is integral, so the conversion is exact in the lanes that keep this result.
  __m256 e = scale_pow2(p, _mm256_cvtps_epi32(k));
  e = _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ));
  e = _mm256_blendv_ps(e, _mm256_set1_ps(infinity_f()), _mm256_cmp_ps(x, _mm256_set1_ps(88.72f), _CMP_GT_OQ));
  return _mm256_blendv_ps(e, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// silu_det: x / (1 + e^-x); -x flips the sign bit, as the scalar negation does (NaNs included).
Q2K_AVX2 __m256 silu_det(__m256 x) {
  const __m256 minus_x = _mm256_xor_ps(x, _mm256_set1_ps(-0.0f));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_det(minus_x)));
}

Q2K_AVX2 __m256 activate(__m256 y, int act) {
  if (act == kReLU) {
    const __m256 zero = _mm256_setzero_ps();
    return _mm256_blendv_ps(y, zero, _mm256_cmp_ps(y, zero, _CMP_LT_OQ));
  }
  if (act == kSiLU) return silu_det(y);
  return y;
}

// quantize_round. vmaxps/vminps are the scalar selects exactly: max(v, qn) is v > qn ? v : qn (qn for a
// NaN v), min(c, qp) is c < qp ? c : qp. The rounded value lies in [qn, qp], so its conversion is exact.
Q2K_AVX2 __m256i quantize_round(__m256 z, __m256 q_mul, __m256 q_off, __m256 qn, __m256 qp) {
  const __m256 v = _mm256_mul_ps(_mm256_sub_ps(z, q_off), q_mul);
  const __m256 c = _mm256_min_ps(_mm256_max_ps(v, qn), qp);
  return _mm256_cvtps_epi32(_mm256_round_ps(c, kRoundNearest));
}

// quantize_thresholds: a true comparison is -1 in its lane, so subtracting the mask counts it.
Q2K_AVX2 __m256i quantize_thresholds(__m256 z, __m256 q_mul, __m256 q_off, const float* thr, int32_t nthr,
                                     int32_t qn) {
  const __m256 u = _mm256_mul_ps(_mm256_sub_ps(z, q_off), q_mul);
  __m256i k = _mm256_set1_epi32(qn);
  for (int32_t i = 0; i < nthr; ++i)
    k = _mm256_sub_epi32(k, _mm256_castps_si256(_mm256_cmp_ps(u, _mm256_set1_ps(thr[i]), _CMP_GT_OQ)));
  return k;
}

// epilogue_value of the 8 channels whose rows start at ep (row stride ld), given I and
// inner = gamma*J + bias as one fma, the inner operation of the scalar code.
Q2K_AVX2 __m256 epilogue_value(const float* ep, int64_t ld, __m256 I, __m256 inner, int act) {
  const __m256 pre = _mm256_fmadd_ps(_mm256_loadu_ps(ep + kAlpha * ld), I, inner);
  return _mm256_fmadd_ps(_mm256_loadu_ps(ep + kAffMul * ld), activate(pre, act), _mm256_loadu_ps(ep + kAffAdd * ld));
}

// epilogue_code of those 8 channels.
Q2K_AVX2 __m256i epilogue_code(__m256 z, const float* ep, int64_t ld, const float* thr, int32_t nthr, int32_t qn,
                               int32_t qp) {
  const __m256 q_mul = _mm256_loadu_ps(ep + kQMul * ld);
  const __m256 q_off = _mm256_loadu_ps(ep + kQOff * ld);
  return thr != nullptr ? quantize_thresholds(z, q_mul, q_off, thr, nthr, qn)
                        : quantize_round(z, q_mul, q_off, _mm256_set1_ps(static_cast<float>(qn)),
                                         _mm256_set1_ps(static_cast<float>(qp)));
}

}  // namespace simd
}  // namespace q2k

#undef Q2K_AVX2
#endif
