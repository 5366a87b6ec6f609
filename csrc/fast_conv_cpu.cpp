// The pieces of the fast exact CPU integer conv (docs/integer-format.md, "The CPU fast path";
// q2kernels/ops/int_conv.py conv2d_fast_cpu puts them together):
//   unpack_float    packed 4-bit codes -> float32 levels w_mul*code + w_add (activations: 1, 0), NCHW
//                   in channels_last memory: the operands of oneDNN's fp32 direct convolution;
//   conv2d_epilogue the epilogue of epilogue.h applied to the integer sums I of that convolution, which
//                   arrive as float32 (exact integers: the caller proves |every partial sum| <= 2^24),
//                   with J from the tap sums exactly as int_conv_cpu.cpp / grouped_conv.h form it, so
//                   the codes and floats are bit for bit those of the int32 path; 8 output channels
//                   at a time (epilogue_simd.h) where the CPU has AVX2 and FMA.
// Both are CPU only (TORCH_LIBRARY_FRAGMENT: their schemas live here, not in ops.cpp). Their fake
// implementations are registered by q2kernels/ops/int_conv.py with the others.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <utility>
#include <vector>

#include "epilogue.h"
#include "epilogue_simd.h"
#include "int_conv.h"

namespace q2k {
namespace {

// Output pixels per parallel task (the epilogue); packed pixels per task (unpack).
constexpr int64_t kPixelGrain = 64;
constexpr int64_t kUnpackGrain = 256;
// The largest |level| unpack_float writes: every level is then an exact float32 (and an exact
// bfloat16, so that a oneDNN fp32 "fpmath" mode that rounds inputs to bf16 changes nothing).
constexpr int64_t kMaxLevel = 256;

// Channels [c, channels) of one pixel's unpack: a byte (two channels) is one 8-byte copy from the
// table of level pairs.
inline void unpack_pairs(const uint8_t* s, float* d, int64_t c, int64_t channels, const float (*pairs)[2]) {
  for (; c + 1 < channels; c += 2) std::memcpy(d + c, pairs[s[c >> 1]], 2 * sizeof(float));
  if (c < channels) d[c] = pairs[s[c >> 1]][0];
}

#if defined(Q2K_EPILOGUE_AVX2)
// The same, 8 channels (4 bytes) at a time on CPUs with AVX2: each byte goes to two lanes, the odd one
// shifted down so that each lane's code is its low nibble; the level of that code is one of 16, looked
// up by two permutes (the levels of codes 0-7 and of 8-15) and a blend on the code's bit 3.
__attribute__((target("avx2"))) void unpack_pixels_avx2(const uint8_t* src, float* dst, int64_t cb, int64_t channels,
                                                         const float* levels, const float (*pairs)[2], int64_t begin,
                                                         int64_t end) {
  const __m256 levels_low = _mm256_loadu_ps(levels), levels_high = _mm256_loadu_ps(levels + 8);
  const __m128i byte_per_lane = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i odd_lane_shift = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  for (int64_t pix = begin; pix < end; ++pix) {
    const uint8_t* s = src + pix * cb;
    float* d = dst + pix * channels;
    int64_t c = 0;
    for (; c + 8 <= channels; c += 8) {
      int32_t four;
      std::memcpy(&four, s + (c >> 1), sizeof(four));
      const __m256i bytes = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128(four), byte_per_lane));
      const __m256i code = _mm256_and_si256(_mm256_srlv_epi32(bytes, odd_lane_shift), _mm256_set1_epi32(0xF));
      const __m256 high_half = _mm256_castsi256_ps(_mm256_slli_epi32(code, 28));
      _mm256_storeu_ps(d + c, _mm256_blendv_ps(_mm256_permutevar8x32_ps(levels_low, code),
                                               _mm256_permutevar8x32_ps(levels_high, code), high_half));
    }
    unpack_pairs(s, d, c, channels, pairs);
  }
}
#endif

// (A, B1, B2, packed_bytes(channels)) uint8 -> float32 (A, channels, B1, B2) in channels_last, each
// code k as the float w_mul*k + w_add, from a table of the 16 levels (and of the 256 level pairs).
at::Tensor unpack_float_cpu(const at::Tensor& packed, int64_t channels, bool is_signed, int64_t w_mul,
                            int64_t w_add) {
  check_unpack(packed, channels);
  const int64_t max_code = is_signed ? 8 : 15;
  TORCH_CHECK_VALUE(w_mul >= -kMaxLevel && w_mul <= kMaxLevel && w_add >= -kMaxLevel && w_add <= kMaxLevel &&
                        (w_mul < 0 ? -w_mul : w_mul) * max_code + (w_add < 0 ? -w_add : w_add) <= kMaxLevel,
                    "w_mul, w_add: the levels w_mul*k + w_add of ", is_signed ? "signed" : "unsigned",
                    " codes must stay within +-", kMaxLevel, ", got w_mul=", w_mul, ", w_add=", w_add);
  const int64_t A = packed.size(0), B1 = packed.size(1), B2 = packed.size(2), cb = packed.size(3);
  at::Tensor out = at::empty({A, channels, B1, B2},
                             packed.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  float levels[16];
  for (int nibble = 0; nibble < 16; ++nibble) {
    const uint8_t byte = static_cast<uint8_t>(nibble);
    levels[nibble] = static_cast<float>(w_mul * load_code(&byte, 0, is_signed) + w_add);
  }
  float pairs[256][2];
  for (int b = 0; b < 256; ++b) {
    pairs[b][0] = levels[b & 0xF];
    pairs[b][1] = levels[b >> 4];
  }
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
#if defined(Q2K_EPILOGUE_AVX2)
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (has_avx2) {
    at::parallel_for(0, A * B1 * B2, kUnpackGrain, [&](int64_t begin, int64_t end) {
      unpack_pixels_avx2(src, dst, cb, channels, levels, pairs, begin, end);
    });
    return out;
  }
#endif
  at::parallel_for(0, A * B1 * B2, kUnpackGrain, [&](int64_t begin, int64_t end) {
    for (int64_t pix = begin; pix < end; ++pix) unpack_pairs(src + pix * cb, dst + pix * channels, 0, channels, pairs);
  });
  return out;
}

// An exact integer sum as int32 (saturating, never undefined: NaN gives 0). The fast path only ever
// passes integers of magnitude <= 2^24 here.
inline int32_t sum_to_int(float s) {
  if (!(s == s)) return 0;
  if (s >= 2147483647.0f) return 2147483647;
  if (s <= -2147483648.0f) return -2147483647 - 1;
  return static_cast<int32_t>(s);
}

struct EpilogueArgs {
  const float* sums;  // (n, ho, wo, cout) rows
  const float* ep;
  const int32_t* ts;  // tap sums or null
  const float* thr;   // thresholds or null
  void* out;
  c10::ScalarType dtype;
  int64_t row, c_offset, cout, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, cin;
  int32_t w_mul, w_add, nthr, qn, qp;
  int act;
};

// Pixels [begin, end) of the epilogue: per output channel, I from the sum, J from the tap sums of
// the pixel's valid tap rectangle, then epilogue.h's value and code (int_conv_cpu.cpp conv2d_into's
// loop body, with I read instead of formed). The fallback of the vector loop below.
void epilogue_pixels(const EpilogueArgs& a, int64_t begin, int64_t end) {
  std::vector<int32_t> codes(a.dtype == at::kByte ? a.cout : 0);
  const int64_t ts_stride = (a.kh + 1) * (a.kw + 1);
  for (int64_t pix = begin; pix < end; ++pix) {
    const int64_t oh = pix / a.wo % a.ho, ow = pix % a.wo;
    int64_t kh0, kh1, kw0, kw1;
    valid_taps(oh, a.sh, a.ph, a.dh, a.kh, a.h, kh0, kh1);
    valid_taps(ow, a.sw, a.pw, a.dw, a.kw, a.w, kw0, kw1);
    const float* s = a.sums + pix * a.cout;
    for (int64_t o = 0; o < a.cout; ++o) {
      const int32_t I = sum_to_int(s[o]);
      const int32_t J = a.ts == nullptr ? 0
                                        : zero_point_taps(a.ts + o * ts_stride, a.kw, kh0, kh1, kw0, kw1, a.w_mul,
                                                          a.w_add, a.cin);
      const float z = epilogue_value(a.ep, a.cout, o, I, J, a.act);
      if (a.dtype == at::kByte) {
        codes[o] = epilogue_code(z, a.ep, a.cout, o, a.thr, a.nthr, a.qn, a.qp);
      } else if (a.dtype == at::kFloat) {
        static_cast<float*>(a.out)[pix * a.row + a.c_offset + o] = z;
      } else {
        static_cast<c10::Half*>(a.out)[pix * a.row + a.c_offset + o] = c10::Half(z);
      }
    }
    if (a.dtype == at::kByte) store_codes(static_cast<uint8_t*>(a.out) + pix * a.row, a.c_offset, codes.data(), a.cout);
  }
}

// gamma*J + bias of channel o: the inner fma of epilogue_value, which depends on the pixel only through J.
inline float zero_point_term(const float* ep, int64_t ld, int64_t o, int32_t J) {
  return fma_rn(ep[kGamma * ld + o], int_to_float(J), ep[kBias * ld + o]);
}

#if defined(Q2K_EPILOGUE_AVX2)
// The epilogue on 8 output channels at a time (epilogue_simd.h: the same operations per element, so
// the same bits), for CPUs with AVX2 and FMA. What the loop reads besides the sums is formed once per
// call, in EpilogueTables: the epilogue rows with C_out padded to a multiple of 8 (zeros past C_out, so
// that the ragged last group loads whole vectors); the zero-point term of the pixels whose taps all lie
// inside the image, which share one J (all pixels where there are no tap sums: J = 0); and, with tap
// sums, each output row's and column's valid taps, so that a pixel finds whether it is on the border,
// and its tap rectangle there, without a division. A border pixel forms its own zero-point terms.
struct EpilogueTables {
  int64_t ld;
  std::vector<float> rows;      // (kEpilogueRows, ld)
  std::vector<float> interior;  // (ld): zero_point_term of a pixel with every tap inside the image
  std::vector<int64_t> kh_taps;  // (ho, 2): [kh0, kh1) of each output row (with tap sums only)
  std::vector<int64_t> kw_taps;  // (wo, 2): [kw0, kw1) of each output column
};

EpilogueTables epilogue_tables(const EpilogueArgs& a) {
  EpilogueTables t;
  t.ld = (a.cout + simd::kLanes - 1) / simd::kLanes * simd::kLanes;
  t.rows.assign(kEpilogueRows * t.ld, 0.0f);
  t.interior.assign(t.ld, 0.0f);
  for (int r = 0; r < kEpilogueRows; ++r)
    std::memcpy(t.rows.data() + r * t.ld, a.ep + r * a.cout, a.cout * sizeof(float));
  const int64_t ts_stride = (a.kh + 1) * (a.kw + 1);
  for (int64_t o = 0; o < a.cout; ++o) {
    const int32_t J = a.ts == nullptr ? 0
                                      : zero_point_taps(a.ts + o * ts_stride, a.kw, 0, a.kh, 0, a.kw, a.w_mul,
                                                        a.w_add, a.cin);
    t.interior[o] = zero_point_term(a.ep, a.cout, o, J);
  }
  if (a.ts != nullptr) {
    t.kh_taps.resize(2 * a.ho);
    t.kw_taps.resize(2 * a.wo);
    for (int64_t oh = 0; oh < a.ho; ++oh)
      valid_taps(oh, a.sh, a.ph, a.dh, a.kh, a.h, t.kh_taps[2 * oh], t.kh_taps[2 * oh + 1]);
    for (int64_t ow = 0; ow < a.wo; ++ow)
      valid_taps(ow, a.sw, a.pw, a.dw, a.kw, a.w, t.kw_taps[2 * ow], t.kw_taps[2 * ow + 1]);
  }
  return t;
}

// int_to_float(sum_to_int(s)) in 8 lanes: the truncating conversion, then sum_to_int's saturation
// above and NaN -> 0 (the conversion gives INT_MIN for both, which is right only below).
__attribute__((target("avx2,fma"), always_inline)) inline __m256 sum_to_float(__m256 s) {
  __m256i i = _mm256_cvttps_epi32(s);
  const __m256 above = _mm256_cmp_ps(s, _mm256_set1_ps(2147483647.0f), _CMP_GE_OQ);
  i = _mm256_blendv_epi8(i, _mm256_set1_epi32(2147483647), _mm256_castps_si256(above));
  i = _mm256_andnot_si256(_mm256_castps_si256(_mm256_cmp_ps(s, s, _CMP_UNORD_Q)), i);
  return _mm256_cvtepi32_ps(i);
}

// store_codes of 8 codes from an even channel on: 4 bytes, each an even channel's code in its low nibble
// and the next channel's in its high nibble (pack_pair).
__attribute__((target("avx2,fma"), always_inline)) inline void store_code_group(uint8_t* dst, __m256i codes) {
  const __m256i nibbles = _mm256_and_si256(codes, _mm256_set1_epi32(0xF));
  // In each 64-bit lane the odd channel's nibble moves next to the even one's: its byte 0 is the pair.
  const __m256i pairs = _mm256_or_si256(nibbles, _mm256_srli_epi64(nibbles, 28));
  // Bytes 0 and 8 of each 128-bit half to its front, then the two halves' fronts side by side.
  const __m256i fronts = _mm256_shuffle_epi8(pairs, _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                                     -1, -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1,
                                                                     -1, -1, -1, -1, -1, -1));
  const int32_t bytes = _mm_cvtsi128_si32(
      _mm_unpacklo_epi16(_mm256_castsi256_si128(fronts), _mm256_extracti128_si256(fronts, 1)));
  std::memcpy(dst, &bytes, sizeof(bytes));
}

// A pixel's channels go through two loops, the values into a buffer and then the outputs: the value's
// chain of dependent operations is long (SiLU's exp and division), and a loop of fewer instructions per
// group lets the processor overlap more groups of it (measured: 15-20% faster than one loop).
__attribute__((target("avx2,fma"))) void epilogue_pixels_avx2(const EpilogueArgs& a, const EpilogueTables& t,
                                                                int64_t begin, int64_t end) {
  const int64_t ld = t.ld;
  const float* rows = t.rows.data();
  const int64_t ts_stride = (a.kh + 1) * (a.kw + 1);
  std::vector<float> border(a.ts != nullptr ? ld : 0);
  std::vector<float> z(ld);
  const __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t oh = begin / a.wo % a.ho, ow = begin % a.wo;
  for (int64_t pix = begin; pix < end; ++pix) {
    const float* zp = t.interior.data();
    if (a.ts != nullptr) {
      const int64_t kh0 = t.kh_taps[2 * oh], kh1 = t.kh_taps[2 * oh + 1];
      const int64_t kw0 = t.kw_taps[2 * ow], kw1 = t.kw_taps[2 * ow + 1];
      if (kh0 != 0 || kh1 != a.kh || kw0 != 0 || kw1 != a.kw) {
        for (int64_t o = 0; o < a.cout; ++o)
          border[o] = zero_point_term(a.ep, a.cout, o,
                                      zero_point_taps(a.ts + o * ts_stride, a.kw, kh0, kh1, kw0, kw1, a.w_mul,
                                                      a.w_add, a.cin));
        zp = border.data();
      }
    }
    const float* s = a.sums + pix * a.cout;
    for (int64_t o = 0; o < a.cout; o += simd::kLanes) {
      // Lanes past C_out (in the last group) read no sum, and the loop below writes no output of them.
      const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(a.cout - o)), lane_index);
      const __m256 I = sum_to_float(_mm256_maskload_ps(s + o, live));
      _mm256_storeu_ps(z.data() + o, simd::epilogue_value(rows + o, ld, I, _mm256_loadu_ps(zp + o), a.act));
    }
    for (int64_t o = 0; o < a.cout; o += simd::kLanes) {
      const int64_t count = a.cout - o < simd::kLanes ? a.cout - o : simd::kLanes;
      const __m256 zv = _mm256_loadu_ps(z.data() + o);
      if (a.dtype == at::kByte) {
        const __m256i codes = simd::epilogue_code(zv, rows + o, ld, a.thr, a.nthr, a.qn, a.qp);
        uint8_t* row = static_cast<uint8_t*>(a.out) + pix * a.row;
        if (count == simd::kLanes) {
          store_code_group(row + ((a.c_offset + o) >> 1), codes);
        } else {  // store_codes keeps the high nibble past an odd count (another writer's channel)
          int32_t last[simd::kLanes];
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(last), codes);
          store_codes(row, a.c_offset + o, last, count);
        }
      } else if (a.dtype == at::kFloat) {
        float* dst = static_cast<float*>(a.out) + pix * a.row + a.c_offset + o;
        if (count == simd::kLanes) {
          _mm256_storeu_ps(dst, zv);
        } else {
          _mm256_maskstore_ps(dst, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count)), lane_index), zv);
        }
      } else {
        c10::Half* dst = static_cast<c10::Half*>(a.out) + pix * a.row + a.c_offset + o;
        for (int64_t l = 0; l < count; ++l) dst[l] = c10::Half(z[o + l]);
      }
    }
    if (++ow == a.wo) {
      ow = 0;
      if (++oh == a.ho) oh = 0;
    }
  }
}
#endif

// Parallel over pixels, as the int32 path; the vector loop where the CPU has AVX2 and FMA.
void run_epilogue(const EpilogueArgs& a, int64_t pixels) {
#if defined(Q2K_EPILOGUE_AVX2)
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_avx2) {
    const EpilogueTables t = epilogue_tables(a);
    at::parallel_for(0, pixels, kPixelGrain, [&](int64_t b, int64_t e) { epilogue_pixels_avx2(a, t, b, e); });
    return;
  }
#endif
  at::parallel_for(0, pixels, kPixelGrain, [&](int64_t b, int64_t e) { epilogue_pixels(a, b, e); });
}

// One call of conv2d_epilogue or conv2d_epilogue_out, checked (epilogue_call): conv_args' ConvArgs
// with the conv's sums in the place of x and weight.
struct EpilogueCall {
  const at::Tensor& sums;  // float32 (N, C_out, H_out, W_out) channels_last: the conv's integer sums I,
                           //   exact (the caller proves |every partial sum| <= 2^24)
  EpilogueSpec ep;         // the epilogue and the output quantizer (int_conv.h)
  at::Tensor out;          // uint8 (N, H_out, W_out, C_total/2) contiguous packed codes, or float32 / float16
                           //   (N, C_total, H_out, W_out) channels_last: the op's `out`, or the one allocated
  int64_t c_offset;        // first channel of out written (0 without out), even for packed codes
  ConvProblem p;           // the conv the sums came from: in_size, kernel_size, in_channels (per group),
                           //   strides, ..., checked as check_conv checks that conv; H_out, W_out are sums'
};

// Every check of conv2d_epilogue(_out): sums float32 (N, C_out, H_out, W_out) channels_last, and the
// conv it came from (in_size, kernel_size, in_channels per group, strides, ...) checked as check_conv
// checks that conv (on meta tensors of its shapes), with H_out, W_out those of sums; the epilogue;
// the output (or its allocation). out: the op's `out` (then out_dtype is its dtype), or null.
EpilogueCall epilogue_call(const at::Tensor& sums, const at::Tensor& epilogue, const c10::optional<at::Tensor>& tap_sums,
                           const c10::optional<at::Tensor>& thresholds, c10::IntArrayRef in_size,
                           c10::IntArrayRef kernel_size, int64_t in_channels, bool x_signed, bool w_signed,
                           int64_t w_mul, int64_t w_add, c10::IntArrayRef stride, c10::IntArrayRef padding,
                           c10::IntArrayRef dilation, int64_t act, int64_t qn, int64_t qp, c10::ScalarType out_dtype,
                           const at::Tensor* out, int64_t c_offset) {
  if (out != nullptr) out_dtype = out->scalar_type();
  TORCH_CHECK_TYPE(sums.scalar_type() == at::kFloat && sums.dim() == 4,
                   "sums: expected a float32 (N, C_out, H_out, W_out) tensor, got ", sums.scalar_type(), " of shape ",
                   sums.sizes());
  TORCH_CHECK_VALUE(sums.is_contiguous(at::MemoryFormat::ChannelsLast),
                    "sums: expected a channels_last tensor, got strides ", sums.strides());
  TORCH_CHECK_VALUE(in_size.size() == 2 && kernel_size.size() == 2, "in_size, kernel_size: expected 2 values each");
  TORCH_CHECK_VALUE(in_size[0] >= 1 && in_size[1] >= 1 && in_size[0] <= kMaxArg && in_size[1] <= kMaxArg,
                    "in_size: expected values in [1, ", kMaxArg, "], got ", in_size);
  TORCH_CHECK_VALUE(kernel_size[0] >= 1 && kernel_size[1] >= 1 && kernel_size[0] <= kMaxArg &&
                        kernel_size[1] <= kMaxArg,
                    "kernel_size: expected values in [1, ", kMaxArg, "], got ", kernel_size);
  check_channels(in_channels, "in_channels", 1);
  const int64_t cb = packed_bytes(in_channels);
  const auto meta = sums.options().dtype(at::kByte).device(at::kMeta);
  const at::Tensor x_meta = at::empty({sums.size(0), in_size[0], in_size[1], cb}, meta);
  const at::Tensor w_meta = at::empty({sums.size(1), kernel_size[0], kernel_size[1], cb}, meta);
  const ConvProblem p =
      check_conv(x_meta, w_meta, in_channels, x_signed, w_signed, w_mul, w_add, stride, padding, dilation);
  TORCH_CHECK_VALUE(sums.size(2) == p.ho && sums.size(3) == p.wo, "sums: expected (H_out, W_out) = (", p.ho, ", ",
                    p.wo, ") of the conv of in_size ", in_size, ", got shape ", sums.sizes());
  const EpilogueSpec e{epilogue, tap_sums, thresholds, act, qn, qp};
  check_epilogue_spec(p, sums, e, out_dtype == at::kByte);
  if (out == nullptr) return EpilogueCall{sums, e, new_output(p.n, p.ho, p.wo, p.cout, out_dtype, sums), 0, p};
  check_output(*out, p.n, p.ho, p.wo, p.cout, c_offset, sums);
  // out against everything the epilogue reads (sums in the place of x; no weight is read).
  check_no_overlap(*out, sums, "sums");
  check_no_overlap(*out, epilogue, "epilogue");
  check_no_overlap(*out, tap_sums, "tap_sums");
  check_no_overlap(*out, thresholds, "thresholds");
  return EpilogueCall{sums, e, *out, c_offset, p};
}

void epilogue_into(const EpilogueCall& c) {
  const ConvProblem& p = c.p;
  const EpilogueSpec& e = c.ep;
  EpilogueArgs a;
  a.sums = c.sums.const_data_ptr<float>();
  a.ep = e.epilogue.const_data_ptr<float>();
  a.ts = e.tap_sums.has_value() ? e.tap_sums->const_data_ptr<int32_t>() : nullptr;
  a.dtype = c.out.scalar_type();
  a.thr = a.dtype == at::kByte && e.thresholds.has_value() ? e.thresholds->const_data_ptr<float>() : nullptr;
  a.out = c.out.data_ptr();
  a.row = a.dtype == at::kByte ? c.out.size(3) : c.out.size(1);
  a.c_offset = c.c_offset;
  a.cout = p.cout;
  a.h = p.h;
  a.w = p.w;
  a.kh = p.kh;
  a.kw = p.kw;
  a.sh = p.sh;
  a.sw = p.sw;
  a.ph = p.ph;
  a.pw = p.pw;
  a.dh = p.dh;
  a.dw = p.dw;
  a.ho = p.ho;
  a.wo = p.wo;
  a.cin = p.cin;
  a.w_mul = p.w_mul;
  a.w_add = p.w_add;
  a.nthr = static_cast<int32_t>(e.qp - e.qn);
  a.qn = static_cast<int32_t>(e.qn);
  a.qp = static_cast<int32_t>(e.qp);
  a.act = static_cast<int>(e.act);
  run_epilogue(a, p.n * p.ho * p.wo);
}

at::Tensor conv2d_epilogue_cpu(const at::Tensor& sums, const at::Tensor& epilogue,
                               const c10::optional<at::Tensor>& tap_sums,
                               const c10::optional<at::Tensor>& thresholds, c10::IntArrayRef in_size,
                               c10::IntArrayRef kernel_size, int64_t in_channels, bool x_signed, bool w_signed,
                               int64_t w_mul, int64_t w_add, c10::IntArrayRef stride, c10::IntArrayRef padding,
                               c10::IntArrayRef dilation, int64_t act, int64_t qn, int64_t qp,
                               c10::ScalarType out_dtype) {
  EpilogueCall c = epilogue_call(sums, epilogue, tap_sums, thresholds, in_size, kernel_size, in_channels, x_signed,
                                 w_signed, w_mul, w_add, stride, padding, dilation, act, qn, qp, out_dtype, nullptr, 0);
  epilogue_into(c);
  return std::move(c.out);
}

void conv2d_epilogue_out_cpu(const at::Tensor& sums, const at::Tensor& epilogue,
                             const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                             c10::IntArrayRef in_size, c10::IntArrayRef kernel_size, int64_t in_channels,
                             bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add, c10::IntArrayRef stride,
                             c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act, int64_t qn,
                             int64_t qp, int64_t c_offset, const at::Tensor& out) {
  epilogue_into(epilogue_call(sums, epilogue, tap_sums, thresholds, in_size, kernel_size, in_channels, x_signed,
                              w_signed, w_mul, w_add, stride, padding, dilation, act, qn, qp, out.scalar_type(), &out,
                              c_offset));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(q2kernels_int, m) {
  m.def("unpack_float(Tensor packed, int channels, bool signed, int w_mul, int w_add) -> Tensor");
  m.def(
      "conv2d_epilogue(Tensor sums, Tensor epilogue, Tensor? tap_sums, Tensor? thresholds, int[2] in_size, "
      "int[2] kernel_size, int in_channels, bool x_signed, bool w_signed, int w_mul, int w_add, int[2] stride, "
      "int[2] padding, int[2] dilation, int act, int qn, int qp, ScalarType out_dtype) -> Tensor");
  m.def(
      "conv2d_epilogue_out(Tensor sums, Tensor epilogue, Tensor? tap_sums, Tensor? thresholds, int[2] in_size, "
      "int[2] kernel_size, int in_channels, bool x_signed, bool w_signed, int w_mul, int w_add, int[2] stride, "
      "int[2] padding, int[2] dilation, int act, int qn, int qp, int c_offset, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(q2kernels_int, CPU, m) {
  m.impl("unpack_float", &unpack_float_cpu);
  m.impl("conv2d_epilogue", &conv2d_epilogue_cpu);
  m.impl("conv2d_epilogue_out", &conv2d_epilogue_out_cpu);
}

}  // namespace q2k
