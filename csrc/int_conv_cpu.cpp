// The CPU integer conv (docs/math.md §7): packed 4-bit NHWC activations and weights, exact int32
// accumulation, the zero-point corrections exact at borders, and the epilogue of epilogue.h.
// It is the oracle of the CUDA kernels, written for clarity first: the codes are widened to int16
// once, then every output pixel gathers its patch (zeros outside the image) and takes one int16
// dot product per output channel, which compilers vectorise into multiply-add instructions.
// Pixels are split across threads with at::parallel_for; each pixel is written by one thread.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <utility>
#include <vector>

#include "epilogue.h"
#include "int_conv.h"

namespace q2k {
namespace {

// Output pixels per parallel task.
constexpr int64_t kPixelGrain = 16;

int32_t dot_i16(const int16_t* a, const int16_t* b, int64_t len) {
  int32_t s = 0;
  for (int64_t i = 0; i < len; ++i) s += static_cast<int32_t>(a[i]) * static_cast<int32_t>(b[i]);
  return s;
}

// Codes of the first `channels` channels of each of `pixels` packed rows, as int16.
std::vector<int16_t> widen(const uint8_t* src, int64_t pixels, int64_t cb, int64_t channels, bool is_signed) {
  std::vector<int16_t> out(pixels * channels);
  at::parallel_for(0, pixels, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t c = 0; c < channels; ++c)
        out[p * channels + c] = static_cast<int16_t>(load_code(src + p * cb, c, is_signed));
  });
  return out;
}

// What a task sees of one output pixel: the raw accumulators acc[C_out], Sq (the sum of the valid
// input codes; computed only when asked for) and the valid tap rectangle.
struct Pixel {
  int64_t index;  // n*ho*wo + oh*wo + ow
  const int32_t* acc;
  int32_t sq;
  int64_t kh0, kh1, kw0, kw1;
};

// Runs the conv and hands every output pixel to sink(const Pixel&, scratch int32 buffer [C_out]).
template <class Sink>
void for_each_pixel(const ConvProblem& p, const at::Tensor& x, const at::Tensor& weight, bool need_sq, Sink&& sink) {
  const int64_t taps = p.kh * p.kw, len = taps * p.cin;
  const std::vector<int16_t> wk = widen(weight.const_data_ptr<uint8_t>(), p.cout * taps, p.cb, p.cin, p.w_signed);
  const std::vector<int16_t> xk = widen(x.const_data_ptr<uint8_t>(), p.n * p.h * p.w, p.cb, p.cin, p.x_signed);
  at::parallel_for(0, p.n * p.ho * p.wo, kPixelGrain, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> patch(len);
    std::vector<int32_t> acc(p.cout), scratch(p.cout);
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t n = pix / (p.ho * p.wo), oh = pix / p.wo % p.ho, ow = pix % p.wo;
      Pixel px{pix, acc.data(), 0, 0, 0, 0, 0};
      valid_taps(oh, p.sh, p.ph, p.dh, p.kh, p.h, px.kh0, px.kh1);
      valid_taps(ow, p.sw, p.pw, p.dw, p.kw, p.w, px.kw0, px.kw1);
      for (int64_t i = 0; i < p.kh; ++i) {
        for (int64_t j = 0; j < p.kw; ++j) {
          int16_t* dst = patch.data() + (i * p.kw + j) * p.cin;
          if (i < px.kh0 || i >= px.kh1 || j < px.kw0 || j >= px.kw1) {
            std::memset(dst, 0, p.cin * sizeof(int16_t));
            continue;
          }
          const int64_t ih = oh * p.sh - p.ph + i * p.dh, iw = ow * p.sw - p.pw + j * p.dw;
          std::memcpy(dst, xk.data() + ((n * p.h + ih) * p.w + iw) * p.cin, p.cin * sizeof(int16_t));
        }
      }
      if (need_sq) {
        for (int64_t l = 0; l < len; ++l) px.sq += patch[l];
      }
      for (int64_t o = 0; o < p.cout; ++o) acc[o] = dot_i16(wk.data() + o * len, patch.data(), len);
      sink(px, scratch.data());
    }
  });
}

at::Tensor conv2d_acc_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t in_channels, bool x_signed,
                          bool w_signed, c10::IntArrayRef stride, c10::IntArrayRef padding,
                          c10::IntArrayRef dilation) {
  const ConvProblem p = check_conv(x, weight, in_channels, x_signed, w_signed, 1, 0, stride, padding, dilation);
  at::Tensor out = at::empty({p.n, p.cout, p.ho, p.wo},
                             x.options().dtype(at::kInt).memory_format(at::MemoryFormat::ChannelsLast));
  int32_t* dst = out.data_ptr<int32_t>();
  for_each_pixel(p, x, weight, false, [&](const Pixel& px, int32_t*) {
    std::memcpy(dst + px.index * p.cout, px.acc, p.cout * sizeof(int32_t));
  });
  return out;
}

// The epilogue of every output channel of a pixel, into packed codes at c_offset or floats.
void conv2d_into(const ConvArgs& a) {
  const ConvProblem& p = a.p;
  const EpilogueSpec& e = a.ep;
  const float* ep = e.epilogue.const_data_ptr<float>();
  const int32_t* ts = e.tap_sums.has_value() ? e.tap_sums->const_data_ptr<int32_t>() : nullptr;
  const float* thr = e.thresholds.has_value() ? e.thresholds->const_data_ptr<float>() : nullptr;
  const int32_t nthr = static_cast<int32_t>(e.qp - e.qn), iqn = static_cast<int32_t>(e.qn),
                iqp = static_cast<int32_t>(e.qp);
  const int act = static_cast<int>(e.act);
  const int64_t ts_stride = (p.kh + 1) * (p.kw + 1);
  const int64_t c_offset = a.c_offset;
  const auto dtype = a.out.scalar_type();
  // Codes and floats of a pixel are both C_out-contiguous rows of out (NHWC memory).
  const int64_t row = dtype == at::kByte ? a.out.size(3) : a.out.size(1);
  void* base = a.out.data_ptr();
  for_each_pixel(p, a.x, a.weight, p.w_add != 0, [&](const Pixel& px, int32_t* codes) {
    for (int64_t o = 0; o < p.cout; ++o) {
      const int32_t I = weighted_acc(px.acc[o], px.sq, p.w_mul, p.w_add);
      const int32_t J = ts == nullptr ? 0
                                      : zero_point_taps(ts + o * ts_stride, p.kw, px.kh0, px.kh1, px.kw0, px.kw1,
                                                        p.w_mul, p.w_add, p.cin);
      const float z = epilogue_value(ep, p.cout, o, I, J, act);
      if (dtype == at::kByte) {
        codes[o] = epilogue_code(z, ep, p.cout, o, thr, nthr, iqn, iqp);
      } else if (dtype == at::kFloat) {
        static_cast<float*>(base)[px.index * row + c_offset + o] = z;
      } else {
        static_cast<c10::Half*>(base)[px.index * row + c_offset + o] = c10::Half(z);
      }
    }
    if (dtype == at::kByte) store_codes(static_cast<uint8_t*>(base) + px.index * row, c_offset, codes, p.cout);
  });
}

at::Tensor conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                      const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                      int64_t in_channels, bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add,
                      c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act,
                      int64_t qn, int64_t qp, c10::ScalarType out_dtype) {
  ConvArgs a = conv_args(ConvOp::kDense, x, weight, epilogue, tap_sums, thresholds, in_channels, 1, x_signed,
                         w_signed, w_mul, w_add, stride, padding, dilation, act, qn, qp, out_dtype, nullptr, 0);
  conv2d_into(a);
  return std::move(a.out);
}

// `out` (schema `Tensor(a!) out`) is taken as const at::Tensor&, as by the CUDA kernel: the dispatcher
// aborts the load of a library whose kernels of one op differ in C++ signature across devices.
void conv2d_out_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                    const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                    int64_t in_channels, bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add,
                    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act,
                    int64_t qn, int64_t qp, int64_t c_offset, const at::Tensor& out) {
  conv2d_into(conv_args(ConvOp::kDense, x, weight, epilogue, tap_sums, thresholds, in_channels, 1, x_signed, w_signed,
                        w_mul, w_add, stride, padding, dilation, act, qn, qp, out.scalar_type(), &out, c_offset));
}

}  // namespace

TORCH_LIBRARY_IMPL(q2kernels_int, CPU, m) {
  m.impl("conv2d_acc", &conv2d_acc_cpu);
  m.impl("conv2d", &conv2d_cpu);
  m.impl("conv2d_out", &conv2d_out_cpu);
}

}  // namespace q2k
