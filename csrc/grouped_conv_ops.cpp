// The kernel parameters of the grouped integer conv (grouped_conv_ops.h), shared by the CPU op
// (grouped_conv_cpu.cpp), the CUDA op (cuda/grouped_ops.cpp) and the CPU emulator of the tests
// (tests/cuda_emu/); the checks are conv_args' (checks.cpp). No op registrations here, so the
// emulator can link it beside q2kernels._C.
#include <utility>

#include "grouped_conv_ops.h"
#include "int_conv.h"

namespace q2k {

GroupedConvParams grouped_params(const ConvArgs& a) {
  const ConvProblem& g = a.p;
  const EpilogueSpec& e = a.ep;
  const bool packed_out = a.packed_out();
  GroupedConvParams p{};
  p.x_codes = a.x.const_data_ptr<uint8_t>();
  p.w_codes = a.weight.const_data_ptr<uint8_t>();
  p.epilogue = e.epilogue.const_data_ptr<float>();
  p.tap_sums = e.tap_sums.has_value() ? e.tap_sums->const_data_ptr<int32_t>() : nullptr;
  p.thresholds = packed_out && e.thresholds.has_value() ? e.thresholds->const_data_ptr<float>() : nullptr;
  p.out = a.out.data_ptr();
  p.n = g.n;
  p.h = g.h;
  p.w = g.w;
  p.x_cb = a.x.size(3);
  p.cin_g = g.cin;
  p.w_cb = g.cb;
  p.cout = g.cout;
  p.cout_g = g.cout / a.groups;
  p.kh = g.kh;
  p.kw = g.kw;
  p.sh = g.sh;
  p.sw = g.sw;
  p.ph = g.ph;
  p.pw = g.pw;
  p.dh = g.dh;
  p.dw = g.dw;
  p.ho = g.ho;
  p.wo = g.wo;
  p.out_row = packed_out ? a.out.size(3) : a.out.size(1);
  p.c_offset = a.c_offset;
  p.w_mul = g.w_mul;
  p.w_add = g.w_add;
  p.act = static_cast<int32_t>(e.act);
  p.qn = static_cast<int32_t>(e.qn);
  p.qp = static_cast<int32_t>(e.qp);
  p.x_signed = g.x_signed;
  p.w_signed = g.w_signed;
  p.packed_out = packed_out;
  return p;
}

at::Tensor grouped_conv_setup(GroupedConvParams& p, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& epilogue, const c10::optional<at::Tensor>& tap_sums,
                              const c10::optional<at::Tensor>& thresholds, int64_t in_channels, int64_t groups,
                              bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add, c10::IntArrayRef stride,
                              c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act, int64_t qn,
                              int64_t qp, c10::ScalarType out_dtype, const c10::optional<at::Tensor>& out,
                              int64_t c_offset) {
  ConvArgs a = conv_args(ConvOp::kGrouped, x, weight, epilogue, tap_sums, thresholds, in_channels, groups, x_signed,
                         w_signed, w_mul, w_add, stride, padding, dilation, act, qn, qp, out_dtype,
                         out.has_value() ? &*out : nullptr, c_offset);
  p = grouped_params(a);
  return std::move(a.out);
}

}  // namespace q2k
