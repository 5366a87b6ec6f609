// CPU pack / unpack of 4-bit codes and the float quantize-and-pack op (format in format.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "epilogue.h"
#include "int_conv.h"

namespace q2k {
namespace {

// Pixels per parallel task: enough work to amortise the task start, small enough to balance.
constexpr int64_t kPixelGrain = 256;

// codes (A, C, B1, B2), any integer dtype and strides -> (A, B1, B2, packed_bytes(C)) uint8.
// The values must lie in the bits-wide signed or unsigned range (checked: this is the CPU, the
// values are read anyway).
at::Tensor pack_cpu(const at::Tensor& codes, int64_t bits, bool is_signed) {
  check_pack(codes, bits);
  const int64_t lo = is_signed ? -(int64_t{1} << (bits - 1)) : 0;
  const int64_t hi = is_signed ? (int64_t{1} << (bits - 1)) - 1 : (int64_t{1} << bits) - 1;
  const int64_t A = codes.size(0), C = codes.size(1), B1 = codes.size(2), B2 = codes.size(3);
  const int64_t cb = packed_bytes(C);
  at::Tensor out = at::zeros({A, B1, B2, cb}, codes.options().dtype(at::kByte));
  if (out.numel() == 0 || C == 0) return out;
  const auto st = codes.strides();
  uint8_t* dst = out.data_ptr<uint8_t>();
  std::atomic<bool> bad{false};
  std::atomic<int64_t> bad_value{0};
  AT_DISPATCH_INTEGRAL_TYPES(codes.scalar_type(), "q2kernels_int::pack", [&] {
    const scalar_t* src = codes.const_data_ptr<scalar_t>();
    at::parallel_for(0, A * B1 * B2, kPixelGrain, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> row(C);
      for (int64_t pix = begin; pix < end; ++pix) {
        const int64_t a = pix / (B1 * B2), b1 = pix / B2 % B1, b2 = pix % B2;
        const scalar_t* p = src + a * st[0] + b1 * st[2] + b2 * st[3];
        for (int64_t c = 0; c < C; ++c) {
          const int64_t v = static_cast<int64_t>(p[c * st[1]]);
          if ((v < lo || v > hi) && !bad.exchange(true)) bad_value = v;
          row[c] = static_cast<int32_t>(v);
        }
        store_codes(dst + pix * cb, 0, row.data(), C);
      }
    });
  });
  TORCH_CHECK_VALUE(!bad.load(), "codes: value ", bad_value.load(), " is outside the ", bits, "-bit ",
                    is_signed ? "signed" : "unsigned", " range [", lo, ", ", hi, "]");
  return out;
}

// (A, B1, B2, packed_bytes(channels)) uint8 -> int8 (A, channels, B1, B2) in channels_last.
at::Tensor unpack_cpu(const at::Tensor& packed, int64_t channels, bool is_signed) {
  check_unpack(packed, channels);
  const int64_t A = packed.size(0), B1 = packed.size(1), B2 = packed.size(2), cb = packed.size(3);
  at::Tensor out = at::empty({A, channels, B1, B2},
                             packed.options().dtype(at::kChar).memory_format(at::MemoryFormat::ChannelsLast));
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, A * B1 * B2, kPixelGrain, [&](int64_t begin, int64_t end) {
    for (int64_t pix = begin; pix < end; ++pix) {
      for (int64_t c = 0; c < channels; ++c)
        dst[pix * channels + c] = static_cast<int8_t>(load_code(src + pix * cb, c, is_signed));
    }
  });
  return out;
}

// The quantizer of a float (N, C, H, W) tensor (any strides), written as codes into the packed
// (N, H, W, bytes) out from channel c_offset on.
void quantize_pack_into(const at::Tensor& x, const at::Tensor& qparams, const c10::optional<at::Tensor>& thresholds,
                        int64_t qn, int64_t qp, int64_t c_offset, const at::Tensor& out) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), cb = out.size(3);
  if (N * C * H * W == 0) return;
  const auto st = x.strides();
  const float* q_mul = qparams.const_data_ptr<float>();
  const float* q_off = q_mul + C;
  const float* thr = thresholds.has_value() ? thresholds->const_data_ptr<float>() : nullptr;
  const int32_t nthr = static_cast<int32_t>(qp - qn), iqn = static_cast<int32_t>(qn), iqp = static_cast<int32_t>(qp);
  uint8_t* dst = out.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "q2kernels_int::quantize_pack", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, N * H * W, kPixelGrain, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> row(C);
      for (int64_t pix = begin; pix < end; ++pix) {
        const int64_t n = pix / (H * W), h = pix / W % H, w = pix % W;
        const scalar_t* p = src + n * st[0] + h * st[2] + w * st[3];
        for (int64_t c = 0; c < C; ++c) {
          const float v = static_cast<float>(p[c * st[1]]);
          row[c] = thr != nullptr ? quantize_thresholds(v, q_mul[c], q_off[c], thr, nthr, iqn)
                                  : quantize_round(v, q_mul[c], q_off[c], iqn, iqp);
        }
        store_codes(dst + pix * cb, c_offset, row.data(), C);
      }
    });
  });
}

at::Tensor quantize_pack_cpu(const at::Tensor& x, const at::Tensor& qparams,
                             const c10::optional<at::Tensor>& thresholds, int64_t qn, int64_t qp) {
  check_float_input(x, qparams);
  check_quantizer(thresholds, qn, qp, x);
  at::Tensor out = new_output(x.size(0), x.size(2), x.size(3), x.size(1), at::kByte, x);
  quantize_pack_into(x, qparams, thresholds, qn, qp, 0, out);
  return out;
}

// `out` (schema `Tensor(a!) out`) is taken as const at::Tensor&, as by the CUDA kernel: the dispatcher
// aborts the load of a library whose kernels of one op differ in C++ signature across devices.
void quantize_pack_out_cpu(const at::Tensor& x, const at::Tensor& qparams,
                           const c10::optional<at::Tensor>& thresholds, int64_t qn, int64_t qp, int64_t c_offset,
                           const at::Tensor& out) {
  check_float_input(x, qparams);
  check_quantizer(thresholds, qn, qp, x);
  TORCH_CHECK_TYPE(out.scalar_type() == at::kByte, "out: expected a packed uint8 tensor, got ", out.scalar_type());
  check_output(out, x.size(0), x.size(2), x.size(3), x.size(1), c_offset, x);
  check_quantize_out_separate(out, x, qparams, thresholds);
  quantize_pack_into(x, qparams, thresholds, qn, qp, c_offset, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(q2kernels_int, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
  m.impl("quantize_pack", &quantize_pack_cpu);
  m.impl("quantize_pack_out", &quantize_pack_out_cpu);
}

}  // namespace q2k
