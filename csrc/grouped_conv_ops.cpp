// The argument checks and kernel parameters of the grouped integer conv (grouped_conv_ops.h), shared
// by the CPU op (grouped_conv_cpu.cpp), the CUDA op (cuda/grouped_ops.cpp) and the CPU emulator of the
// tests (tests/cuda_emu/). No op registrations here, so the emulator can link it beside q2kernels._C.
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "grouped_conv_ops.h"
#include "int_conv.h"

namespace q2k {

at::Tensor grouped_conv_setup(GroupedConvParams& p, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& epilogue, const c10::optional<at::Tensor>& tap_sums,
                              const c10::optional<at::Tensor>& thresholds, int64_t in_channels, int64_t groups,
                              bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add, c10::IntArrayRef stride,
                              c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act, int64_t qn,
                              int64_t qp, c10::ScalarType out_dtype, const c10::optional<at::Tensor>& out,
                              int64_t c_offset) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kByte && x.dim() == 4, "x: expected a packed uint8 (N, H, W, C_in/2) tensor, "
                   "got ", x.scalar_type(), " of shape ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), "x: expected a contiguous packed tensor, got strides ", x.strides());
  TORCH_CHECK_VALUE(groups >= 1, "groups: expected >= 1, got ", groups);
  TORCH_CHECK_VALUE(in_channels >= 1 && in_channels % groups == 0, "in_channels: expected a positive multiple of "
                    "groups=", groups, ", got ", in_channels);
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kByte && weight.dim() == 4,
                   "weight: expected a packed uint8 (C_out, KH, KW, C_in/groups/2) tensor, got ", weight.scalar_type(),
                   " of shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.is_contiguous(), "weight: expected a contiguous packed tensor, got strides ",
                    weight.strides());
  TORCH_CHECK_VALUE(weight.size(3) == packed_bytes(in_channels / groups), "weight: holds ", weight.size(3),
                    " bytes per tap but in_channels/groups=", in_channels / groups, " packs into ",
                    packed_bytes(in_channels / groups));
  TORCH_CHECK_VALUE(weight.size(0) % groups == 0, "weight: C_out=", weight.size(0), " is not a multiple of groups=",
                    groups);
  TORCH_CHECK_TYPE(out_dtype == at::kByte || out_dtype == at::kFloat,
                   "out_dtype: the grouped conv writes torch.uint8 (packed codes) or torch.float32, got ", out_dtype);
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight: is on ", weight.device(), " but x is on ", x.device());
  // The geometry (and every other check of the dense conv) is check_conv's on one group: a packed
  // tensor of that group's input channels, of x's shape otherwise (only its metadata is looked at).
  const at::Tensor x_group =
      at::empty({x.size(0), x.size(1), x.size(2), weight.size(3)}, x.options().device(at::kMeta));
  const at::Tensor w_meta = at::empty(weight.sizes(), weight.options().device(at::kMeta));
  ConvProblem g = check_conv(x_group, w_meta, in_channels / groups, x_signed, w_signed, w_mul, w_add, stride, padding,
                             dilation);
  TORCH_CHECK_VALUE(x.size(3) == packed_bytes(in_channels), "x: holds ", x.size(3), " bytes per pixel but in_channels=",
                    in_channels, " packs into ", packed_bytes(in_channels));
  check_epilogue(g, x, epilogue, tap_sums, act);
  if (out_dtype == at::kByte) check_quantizer(thresholds, qn, qp, x);
  at::Tensor result;
  if (out.has_value()) {
    result = *out;
    TORCH_CHECK_TYPE(result.scalar_type() == out_dtype, "out: expected ", out_dtype, ", got ", result.scalar_type());
    check_output(result, g.n, g.ho, g.wo, g.cout, c_offset, x);
    check_conv_out_separate(result, x, weight, epilogue, tap_sums, thresholds);
  } else {
    TORCH_CHECK_VALUE(c_offset == 0, "c_offset: expected 0 without out, got ", c_offset);
    result = new_output(g.n, g.ho, g.wo, g.cout, out_dtype, x);
  }
  p = GroupedConvParams{};
  p.x_codes = x.const_data_ptr<uint8_t>();
  p.w_codes = weight.const_data_ptr<uint8_t>();
  p.epilogue = epilogue.const_data_ptr<float>();
  p.tap_sums = tap_sums.has_value() ? tap_sums->const_data_ptr<int32_t>() : nullptr;
  p.thresholds = out_dtype == at::kByte && thresholds.has_value() ? thresholds->const_data_ptr<float>() : nullptr;
  p.out = result.data_ptr();
  p.n = g.n;
  p.h = g.h;
  p.w = g.w;
  p.x_cb = x.size(3);
  p.cin_g = g.cin;
  p.w_cb = g.cb;
  p.cout = g.cout;
  p.cout_g = g.cout / groups;
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
  p.out_row = out_dtype == at::kByte ? result.size(3) : result.size(1);
  p.c_offset = c_offset;
  p.w_mul = g.w_mul;
  p.w_add = g.w_add;
  p.act = static_cast<int32_t>(act);
  p.qn = static_cast<int32_t>(qn);
  p.qp = static_cast<int32_t>(qp);
  p.x_signed = x_signed;
  p.w_signed = w_signed;
  p.packed_out = out_dtype == at::kByte;
  return result;
}

}  // namespace q2k
