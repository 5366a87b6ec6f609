// The torch side of the CUDA integer ops (see int_ops.h). The checks and the output tensors are the
// CPU ops' (../checks.cpp), so a bad argument gives the same error on every device; on top of them
// come the limits of the kernels' index arithmetic and cp.async's 16-byte alignment.
#include "int_ops.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <utility>

#include "epilogue.h"
#include "format.h"
#include "int_conv.h"

namespace q2k {
namespace cuda {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

void check_aligned(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0, name,
                    ": the CUDA kernels copy 16-byte chunks of the packed codes and need a 16-byte aligned "
                    "tensor (a view at an offset is not; .clone() it), got address ", t.const_data_ptr());
}

ConvParams conv_params(const Exec& ex, const ConvProblem& pr, const at::Tensor& x, const at::Tensor& weight) {
  check_aligned(x, "x");
  check_aligned(weight, "weight");
  TORCH_CHECK_VALUE(pr.n * pr.h * pr.w <= kIntMax && pr.n * pr.ho * pr.wo <= kIntMax,
                    "x: the CUDA kernels index pixels with 32-bit integers; ", pr.n, "x", pr.h, "x", pr.w,
                    " input or ", pr.n, "x", pr.ho, "x", pr.wo, " output pixels is too many (split the batch)");
  TORCH_CHECK_VALUE(pr.kh < 256 && pr.kw < 256, "weight: the CUDA kernels support kernels of up to 255x255 taps, "
                    "got ", pr.kh, "x", pr.kw);
  TORCH_CHECK_VALUE(pr.kh * pr.kw * pr.cb <= kIntMax / 16 && pr.cout <= kIntMax / 16,
                    "weight: too large for the CUDA kernels' 32-bit chunk indices, shape ", weight.sizes());
  for (int64_t v : {pr.sh, pr.sw, pr.ph, pr.pw, pr.dh, pr.dw})
    TORCH_CHECK_VALUE(v <= (1 << 16), "stride, padding, dilation: the CUDA kernels support values up to 65536");
  ConvParams p{};
  p.x = x.const_data_ptr<uint8_t>();
  p.w = weight.const_data_ptr<uint8_t>();
  p.n = static_cast<int>(pr.n);
  p.in_h = static_cast<int>(pr.h);
  p.in_w = static_cast<int>(pr.w);
  p.cin = static_cast<int>(pr.cin);
  p.cb = static_cast<int>(pr.cb);
  p.cout = static_cast<int>(pr.cout);
  p.kh = static_cast<int>(pr.kh);
  p.kw = static_cast<int>(pr.kw);
  p.sh = static_cast<int>(pr.sh);
  p.sw = static_cast<int>(pr.sw);
  p.ph = static_cast<int>(pr.ph);
  p.pw = static_cast<int>(pr.pw);
  p.dh = static_cast<int>(pr.dh);
  p.dw = static_cast<int>(pr.dw);
  p.out_h = static_cast<int>(pr.ho);
  p.out_w = static_cast<int>(pr.wo);
  p.x_signed = pr.x_signed;
  p.w_signed = pr.w_signed;
  p.w_mul = pr.w_mul;
  p.w_add = pr.w_add;
  p.path = ex.path;
  return p;
}

void set_epilogue(ConvParams& p, const EpilogueSpec& e) {
  p.epilogue = e.epilogue.const_data_ptr<float>();
  p.tap_sums = e.tap_sums.has_value() ? e.tap_sums->const_data_ptr<int32_t>() : nullptr;
  p.thresholds = e.thresholds.has_value() ? e.thresholds->const_data_ptr<float>() : nullptr;
  p.act = static_cast<int>(e.act);
  p.qn = static_cast<int>(e.qn);
  p.qp = static_cast<int>(e.qp);
}

// Output rows: packed uint8 (n, ho, wo, bytes) or channels_last (n, C, ho, wo), C elements apart.
void set_output(ConvParams& p, const at::Tensor& out, int64_t c_offset) {
  const auto dt = out.scalar_type();
  p.out_kind = dt == at::kByte ? OutKind::kPacked
               : dt == at::kInt ? OutKind::kAcc
               : dt == at::kHalf ? OutKind::kHalf
                                 : OutKind::kFloat;
  p.out = out.data_ptr();
  p.out_pitch = dt == at::kByte ? out.size(3) : out.size(1);
  p.c_offset = c_offset;
}

void launch(const Exec& ex, const ConvParams& p) {
  const int status = launch_int_conv(p, ex.stream);
  TORCH_CHECK(status == 0, "q2kernels_int conv: the CUDA kernel launch failed (cudaError_t ", status, ")");
}

// A checked conv2d(_out) call (conv_args): the kernels' own limits (conv_params), then the launch.
void run_conv2d(const Exec& ex, const ConvArgs& a) {
  ConvParams p = conv_params(ex, a.p, a.x, a.weight);
  set_epilogue(p, a.ep);
  set_output(p, a.out, a.c_offset);
  launch(ex, p);
}

void run_quantize_pack(const Exec& ex, const at::Tensor& x, const at::Tensor& qparams,
                       const c10::optional<at::Tensor>& thresholds, int64_t qn, int64_t qp, int64_t c_offset,
                       const at::Tensor& out) {
  QuantizePackParams p{};
  p.x = x.const_data_ptr();
  p.dtype = x.scalar_type() == at::kHalf ? 1 : x.scalar_type() == at::kBFloat16 ? 2 : 0;
  p.n = x.size(0);
  p.c = x.size(1);
  p.h = x.size(2);
  p.w = x.size(3);
  p.sn = x.stride(0);
  p.sc = x.stride(1);
  p.sh = x.stride(2);
  p.sw = x.stride(3);
  p.qparams = qparams.const_data_ptr<float>();
  p.thresholds = thresholds.has_value() ? thresholds->const_data_ptr<float>() : nullptr;
  p.qn = static_cast<int>(qn);
  p.qp = static_cast<int>(qp);
  p.out = out.data_ptr<uint8_t>();
  p.out_pitch = out.size(3);
  p.c_offset = c_offset;
  const int status = launch_quantize_pack(p, ex.stream);
  TORCH_CHECK(status == 0, "q2kernels_int quantize_pack: the CUDA kernel launch failed (cudaError_t ", status, ")");
}

}  // namespace

at::Tensor pack(const Exec& ex, const at::Tensor& codes, int64_t bits, bool is_signed) {
  check_pack(codes, bits);
  (void)is_signed;  // the low 4 bits of a code are its 4-bit container, signed or not
  const int64_t cb = packed_bytes(codes.size(1));
  at::Tensor out = at::empty({codes.size(0), codes.size(2), codes.size(3), cb}, codes.options().dtype(at::kByte));
  PackParams p{};
  p.codes = codes.const_data_ptr();
  p.elem_bytes = static_cast<int>(codes.element_size());
  p.elem_signed = codes.scalar_type() != at::kByte;
  p.a = codes.size(0);
  p.c = codes.size(1);
  p.b1 = codes.size(2);
  p.b2 = codes.size(3);
  p.s0 = codes.stride(0);
  p.s1 = codes.stride(1);
  p.s2 = codes.stride(2);
  p.s3 = codes.stride(3);
  p.out = out.data_ptr<uint8_t>();
  p.out_pitch = cb;
  const int status = launch_pack(p, ex.stream);
  TORCH_CHECK(status == 0, "q2kernels_int pack: the CUDA kernel launch failed (cudaError_t ", status, ")");
  return out;
}

at::Tensor unpack(const Exec& ex, const at::Tensor& packed, int64_t channels, bool is_signed) {
  check_unpack(packed, channels);
  at::Tensor out = at::empty({packed.size(0), channels, packed.size(1), packed.size(2)},
                             packed.options().dtype(at::kChar).memory_format(at::MemoryFormat::ChannelsLast));
  UnpackParams p{};
  p.packed = packed.const_data_ptr<uint8_t>();
  p.pixels = packed.size(0) * packed.size(1) * packed.size(2);
  p.pitch = packed.size(3);
  p.channels = channels;
  p.is_signed = is_signed;
  p.out = out.data_ptr<int8_t>();
  const int status = launch_unpack(p, ex.stream);
  TORCH_CHECK(status == 0, "q2kernels_int unpack: the CUDA kernel launch failed (cudaError_t ", status, ")");
  return out;
}

at::Tensor conv2d_acc(const Exec& ex, const at::Tensor& x, const at::Tensor& weight, int64_t in_channels,
                      bool x_signed, bool w_signed, c10::IntArrayRef stride, c10::IntArrayRef padding,
                      c10::IntArrayRef dilation) {
  const ConvProblem pr = check_conv(x, weight, in_channels, x_signed, w_signed, 1, 0, stride, padding, dilation);
  ConvParams p = conv_params(ex, pr, x, weight);
  at::Tensor out = at::empty({pr.n, pr.cout, pr.ho, pr.wo},
                             x.options().dtype(at::kInt).memory_format(at::MemoryFormat::ChannelsLast));
  set_output(p, out, 0);
  launch(ex, p);
  return out;
}

at::Tensor conv2d(const Exec& ex, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                  const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                  int64_t in_channels, bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add,
                  c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act,
                  int64_t qn, int64_t qp, c10::ScalarType out_dtype) {
  ConvArgs a = conv_args(ConvOp::kDense, x, weight, epilogue, tap_sums, thresholds, in_channels, 1, x_signed,
                         w_signed, w_mul, w_add, stride, padding, dilation, act, qn, qp, out_dtype, nullptr, 0);
  run_conv2d(ex, a);
  return std::move(a.out);
}

void conv2d_out(const Exec& ex, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                int64_t in_channels, bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add,
                c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act,
                int64_t qn, int64_t qp, int64_t c_offset, const at::Tensor& out) {
  run_conv2d(ex, conv_args(ConvOp::kDense, x, weight, epilogue, tap_sums, thresholds, in_channels, 1, x_signed,
                           w_signed, w_mul, w_add, stride, padding, dilation, act, qn, qp, out.scalar_type(), &out,
                           c_offset));
}

at::Tensor quantize_pack(const Exec& ex, const at::Tensor& x, const at::Tensor& qparams,
                         const c10::optional<at::Tensor>& thresholds, int64_t qn, int64_t qp) {
  check_float_input(x, qparams);
  check_quantizer(thresholds, qn, qp, x);
  at::Tensor out = new_output(x.size(0), x.size(2), x.size(3), x.size(1), at::kByte, x);
  run_quantize_pack(ex, x, qparams, thresholds, qn, qp, 0, out);
  return out;
}

void quantize_pack_out(const Exec& ex, const at::Tensor& x, const at::Tensor& qparams,
                       const c10::optional<at::Tensor>& thresholds, int64_t qn, int64_t qp, int64_t c_offset,
                       const at::Tensor& out) {
  check_float_input(x, qparams);
  check_quantizer(thresholds, qn, qp, x);
  TORCH_CHECK_TYPE(out.scalar_type() == at::kByte, "out: expected a packed uint8 tensor, got ", out.scalar_type());
  check_output(out, x.size(0), x.size(2), x.size(3), x.size(1), c_offset, x);
  check_quantize_out_separate(out, x, qparams, thresholds);
  run_quantize_pack(ex, x, qparams, thresholds, qn, qp, c_offset, out);
}

}  // namespace cuda
}  // namespace q2k
