// The pieces of the fast exact CPU integer conv (docs/integer-format.md, "The CPU fast path";
// q2kernels/ops/int_conv.py conv2d_fast_cpu puts them together):
//   unpack_float    packed 4-bit codes -> float32 levels w_mul*code + w_add (activations: 1, 0), NCHW
//                   in channels_last memory: the operands of oneDNN's fp32 direct convolution;
//   conv2d_epilogue the epilogue of epilogue.h applied to the integer sums I of that convolution, which
//                   arrive as float32 (exact integers: the caller proves |every partial sum| <= 2^24),
//                   with J from the tap sums exactly as int_conv_cpu.cpp / grouped_conv.h form it, so
//                   the codes and floats are bit for bit those of the int32 path.
// Both are CPU only (TORCH_LIBRARY_FRAGMENT: their schemas live here, not in ops.cpp). Their fake
// implementations are registered by q2kernels/ops/int_conv.py with the others.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "epilogue.h"
#include "int_conv.h"

namespace q2k {
namespace {

// Output pixels per parallel task (the epilogue); packed pixels per task (unpack).
constexpr int64_t kPixelGrain = 64;
constexpr int64_t kUnpackGrain = 256;
// The largest |level| unpack_float writes: every level is then an exact float32 (and an exact
// bfloat16, so that a oneDNN fp32 "fpmath" mode that rounds inputs to bf16 changes nothing).
constexpr int64_t kMaxLevel = 256;

// (A, B1, B2, packed_bytes(channels)) uint8 -> float32 (A, channels, B1, B2) in channels_last, each
// code k as the float w_mul*k + w_add. One 256-entry table of value pairs: a byte is one 8-byte copy.
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
  float lut[256][2];
  for (int b = 0; b < 256; ++b) {
    const uint8_t byte = static_cast<uint8_t>(b);
    for (int half = 0; half < 2; ++half)
      lut[b][half] = static_cast<float>(w_mul * load_code(&byte, half, is_signed) + w_add);
  }
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const int64_t pairs = channels / 2;
  const bool odd = channels % 2 != 0;
  at::parallel_for(0, A * B1 * B2, kUnpackGrain, [&](int64_t begin, int64_t end) {
    for (int64_t pix = begin; pix < end; ++pix) {
      const uint8_t* s = src + pix * cb;
      float* d = dst + pix * channels;
      for (int64_t i = 0; i < pairs; ++i) std::memcpy(d + 2 * i, lut[s[i]], 2 * sizeof(float));
      if (odd) d[2 * pairs] = lut[s[pairs]][0];
    }
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
// loop body, with I read instead of formed).
__attribute__((always_inline)) inline void epilogue_pixels(const EpilogueArgs& a, int64_t begin, int64_t end) {
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

// The same loop compiled for CPUs with FMA and SSE4.1, where fma, nearbyint and the conversions are
// single instructions instead of library calls. Every operation is still the correctly rounded IEEE
// one the source names (no contraction: -ffp-contract=off holds here too), so both versions give the
// same bits; the tests run whichever this CPU selects against the reference mode.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define Q2K_EPILOGUE_FMA_CLONE 1
__attribute__((target("fma,sse4.1"))) void epilogue_pixels_fma(const EpilogueArgs& a, int64_t begin, int64_t end) {
  epilogue_pixels(a, begin, end);
}
#endif

void run_epilogue(const EpilogueArgs& a, int64_t pixels) {
#if defined(Q2K_EPILOGUE_FMA_CLONE)
  static const bool has_fma = __builtin_cpu_supports("fma") && __builtin_cpu_supports("sse4.1");
  if (has_fma) {
    at::parallel_for(0, pixels, kPixelGrain, [&](int64_t b, int64_t e) { epilogue_pixels_fma(a, b, e); });
    return;
  }
#endif
  at::parallel_for(0, pixels, kPixelGrain, [&](int64_t b, int64_t e) { epilogue_pixels(a, b, e); });
}

// The checks of conv2d_epilogue(_out): sums float32 (N, C_out, H_out, W_out) channels_last, and the
// conv it came from (in_size, kernel_size, in_channels per group, strides, ...) checked as check_conv
// checks that conv (on meta tensors of its shapes), with H_out, W_out those of sums.
ConvProblem check_epilogue_problem(const at::Tensor& sums, const at::Tensor& epilogue,
                                   const c10::optional<at::Tensor>& tap_sums,
                                   const c10::optional<at::Tensor>& thresholds, c10::IntArrayRef in_size,
                                   c10::IntArrayRef kernel_size, int64_t in_channels, bool x_signed, bool w_signed,
                                   int64_t w_mul, int64_t w_add, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                   c10::IntArrayRef dilation, int64_t act, int64_t qn, int64_t qp, bool packed_out) {
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
  check_epilogue(p, sums, epilogue, tap_sums, act);
  if (packed_out) check_quantizer(thresholds, qn, qp, sums);
  return p;
}

void epilogue_into(const ConvProblem& p, const at::Tensor& sums, const at::Tensor& epilogue,
                   const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                   int64_t act, int64_t qn, int64_t qp, int64_t c_offset, const at::Tensor& out) {
  EpilogueArgs a;
  a.sums = sums.const_data_ptr<float>();
  a.ep = epilogue.const_data_ptr<float>();
  a.ts = tap_sums.has_value() ? tap_sums->const_data_ptr<int32_t>() : nullptr;
  a.dtype = out.scalar_type();
  a.thr = a.dtype == at::kByte && thresholds.has_value() ? thresholds->const_data_ptr<float>() : nullptr;
  a.out = out.data_ptr();
  a.row = a.dtype == at::kByte ? out.size(3) : out.size(1);
  a.c_offset = c_offset;
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
  a.nthr = static_cast<int32_t>(qp - qn);
  a.qn = static_cast<int32_t>(qn);
  a.qp = static_cast<int32_t>(qp);
  a.act = static_cast<int>(act);
  run_epilogue(a, p.n * p.ho * p.wo);
}

at::Tensor conv2d_epilogue_cpu(const at::Tensor& sums, const at::Tensor& epilogue,
                               const c10::optional<at::Tensor>& tap_sums,
                               const c10::optional<at::Tensor>& thresholds, c10::IntArrayRef in_size,
                               c10::IntArrayRef kernel_size, int64_t in_channels, bool x_signed, bool w_signed,
                               int64_t w_mul, int64_t w_add, c10::IntArrayRef stride, c10::IntArrayRef padding,
                               c10::IntArrayRef dilation, int64_t act, int64_t qn, int64_t qp,
                               c10::ScalarType out_dtype) {
  const ConvProblem p =
      check_epilogue_problem(sums, epilogue, tap_sums, thresholds, in_size, kernel_size, in_channels, x_signed,
                             w_signed, w_mul, w_add, stride, padding, dilation, act, qn, qp, out_dtype == at::kByte);
  at::Tensor out = new_output(p.n, p.ho, p.wo, p.cout, out_dtype, sums);
  epilogue_into(p, sums, epilogue, tap_sums, thresholds, act, qn, qp, 0, out);
  return out;
}

void conv2d_epilogue_out_cpu(const at::Tensor& sums, const at::Tensor& epilogue,
                             const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                             c10::IntArrayRef in_size, c10::IntArrayRef kernel_size, int64_t in_channels,
                             bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add, c10::IntArrayRef stride,
                             c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act, int64_t qn,
                             int64_t qp, int64_t c_offset, const at::Tensor& out) {
  const ConvProblem p = check_epilogue_problem(sums, epilogue, tap_sums, thresholds, in_size, kernel_size,
                                               in_channels, x_signed, w_signed, w_mul, w_add, stride, padding,
                                               dilation, act, qn, qp, out.scalar_type() == at::kByte);
  check_output(out, p.n, p.ho, p.wo, p.cout, c_offset, sums);
  // out against everything the epilogue reads (sums in the place of x; no weight is read).
  check_no_overlap(out, sums, "sums");
  check_no_overlap(out, epilogue, "epilogue");
  check_no_overlap(out, tap_sums, "tap_sums");
  check_no_overlap(out, thresholds, "thresholds");
  epilogue_into(p, sums, epilogue, tap_sums, thresholds, act, qn, qp, c_offset, out);
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
