// Argument checks of the integer ops, shared by every device. They look at dtypes, shapes, strides
// and devices only, never at values. Type errors raise TypeError, the rest ValueError, each naming
// the argument.
//
// No check overflows: user integers are bounded (kMaxArg) before any arithmetic on them, sizes
// derived from tensor shapes use checked arithmetic (an empty tensor may have a dimension near
// 2^63), and ranges are compared as `c_offset <= limit - channels`, never through the sum.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>

#include "epilogue.h"
#include "int_conv.h"

namespace q2k {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
constexpr int64_t kInt32Min = std::numeric_limits<int32_t>::min();
// Channel counts clamped to this before they are added to an offset (an empty tensor can claim
// 2^62 channels; nothing is written to it, so the clamp changes no answer).
constexpr int64_t kMaxLimit = std::numeric_limits<int64_t>::max() / 2;

void check_packed(const at::Tensor& t, const char* name, const char* dims) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kByte, name, ": expected a packed uint8 tensor ", dims,
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 4, name, ": expected a 4-d packed tensor ", dims, ", got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous packed tensor ", dims,
                    " (NHWC codes, two per byte), got strides ", t.strides());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, ": is on ", t.device(), " but x is on ", like.device());
}

}  // namespace

void check_pair(c10::IntArrayRef v, const char* name, int64_t lo) {
  TORCH_CHECK_VALUE(v.size() == 2, name, ": expected 2 values (height, width), got ", v);
  TORCH_CHECK_VALUE(v[0] >= lo && v[1] >= lo, name, ": expected values >= ", lo, ", got ", v);
  TORCH_CHECK_VALUE(v[0] <= kMaxArg && v[1] <= kMaxArg, name, ": expected values <= ", kMaxArg, ", got ", v);
}

// `in` and `taps` come from shapes, so they get checked arithmetic too (int_conv.h).
int64_t out_length(int64_t in, int64_t taps, int64_t stride, int64_t pad, int64_t dil, const char* dim) {
  int64_t padded = 0, reach = 0;
  const bool overflow = c10::add_overflows(in, 2 * pad, &padded) || c10::mul_overflows(dil, taps - 1, &reach);
  TORCH_CHECK_VALUE(!overflow, "padding, dilation: the padded input ", dim, " (", in, " + 2*", pad,
                    ") or the dilated kernel ", dim, " (", dil, "*(", taps, " - 1) + 1) overflows int64");
  TORCH_CHECK_VALUE(padded > reach, "x: the padded input ", dim, " (", padded, ") is smaller than the dilated kernel ",
                    dim, " (", reach, " + 1)");
  return (padded - reach - 1) / stride + 1;
}

namespace {

// A value of the int32 arithmetic of the kernels.
void check_int32(int64_t v, const char* name) {
  TORCH_CHECK_VALUE(v >= kInt32Min && v <= kInt32Max, name, ": expected an int32 value, got ", v);
}

// The int32 accumulator contract (docs/math.md §7): every integer sum of epilogue.h, over any codes
// the 4-bit containers can hold (signed [-8, 7], unsigned [0, 15]), fits int32:
//   |acc|, |w_mul*acc|, |I|, |J| <= L*(|w_mul|*max|k| + |w_add|)*max|q|,   L = KH*KW*C_in
// (max|q| >= 8 also covers J, which has no factor q). The ops cannot see the codes without a host
// sync, so the bound takes the containers' worst case; q2kernels/deploy/accumulator.py is the same
// formula for the converter.
void check_accumulator(const ConvProblem& p) {
  const int64_t max_k = p.w_signed ? 8 : 15, max_q = p.x_signed ? 8 : 15;
  const int64_t per_code = std::abs(static_cast<int64_t>(p.w_mul)) * max_k + std::abs(static_cast<int64_t>(p.w_add));
  int64_t taps = 0, len = 0, bound = 0;
  const bool overflow = c10::mul_overflows(p.kh, p.kw, &taps) || c10::mul_overflows(taps, p.cin, &len) ||
                        c10::mul_overflows(len, per_code * max_q, &bound);
  TORCH_CHECK_VALUE(!overflow && bound <= kInt32Max, "w_mul, w_add: the int32 accumulator can reach L*(|w_mul|*",
                    max_k, " + |w_add|)*", max_q, " with L = KH*KW*C_in = ", p.kh, "*", p.kw, "*", p.cin,
                    ", w_mul = ", p.w_mul, ", w_add = ", p.w_add, ", which exceeds 2^31 - 1 (smaller w_mul, w_add "
                    "or fewer input channels per conv)");
}

// The bytes [first, last) a tensor's elements occupy (every element lies in them; strides are
// non-negative in torch, and the tensor fits its storage, so the span cannot overflow).
struct ByteSpan {
  uintptr_t first, last;
};

ByteSpan byte_span(const at::Tensor& t) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  if (t.numel() == 0) return {first, first};
  int64_t last_element = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last_element += (t.size(d) - 1) * t.stride(d);
  return {first, first + static_cast<uintptr_t>((last_element + 1) * t.element_size())};
}

}  // namespace

void check_no_overlap(const at::Tensor& out, const c10::optional<at::Tensor>& input, const char* name) {
  if (!input.has_value()) return;
  const ByteSpan a = byte_span(out), b = byte_span(*input);
  const bool overlap = a.first < a.last && b.first < b.last && a.first < b.last && b.first < a.last;
  TORCH_CHECK_VALUE(!overlap, "out: shares memory with ", name, ", which the op reads while it writes out "
                    "(an alias, a view or an overlapping slice of it); pass an output tensor of its own");
}

void check_conv_out_separate(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& epilogue, const c10::optional<at::Tensor>& tap_sums,
                             const c10::optional<at::Tensor>& thresholds) {
  check_no_overlap(out, x, "x");
  check_no_overlap(out, weight, "weight");
  check_no_overlap(out, epilogue, "epilogue");
  check_no_overlap(out, tap_sums, "tap_sums");
  check_no_overlap(out, thresholds, "thresholds");
}

void check_quantize_out_separate(const at::Tensor& out, const at::Tensor& x, const at::Tensor& qparams,
                                 const c10::optional<at::Tensor>& thresholds) {
  check_no_overlap(out, x, "x");
  check_no_overlap(out, qparams, "qparams");
  check_no_overlap(out, thresholds, "thresholds");
}

void check_channels(int64_t channels, const char* name, int64_t lo) {
  TORCH_CHECK_VALUE(channels >= lo && channels <= kMaxArg, name, ": expected a channel count in [", lo, ", ",
                    kMaxArg, "], got ", channels);
}

ConvProblem check_conv(const at::Tensor& x, const at::Tensor& weight, int64_t in_channels, bool x_signed,
                       bool w_signed, int64_t w_mul, int64_t w_add, c10::IntArrayRef stride,
                       c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  check_packed(x, "x", "(N, H, W, C_in/2)");
  check_packed(weight, "weight", "(C_out, KH, KW, C_in/2)");
  check_same_device(weight, "weight", x);
  check_channels(in_channels, "in_channels", 1);
  const int64_t cb = packed_bytes(in_channels);
  TORCH_CHECK_VALUE(x.size(3) == cb, "x: holds ", x.size(3), " bytes per pixel but in_channels=", in_channels,
                    " packs into ", cb, " (channels padded to a multiple of ", kChannelAlign,
                    ", two codes per byte)");
  TORCH_CHECK_VALUE(weight.size(3) == cb, "weight: holds ", weight.size(3),
                    " bytes per tap but in_channels=", in_channels, " packs into ", cb,
                    " (the weights' input channels do not match x)");
  TORCH_CHECK_VALUE(weight.size(0) >= 1 && weight.size(1) >= 1 && weight.size(2) >= 1,
                    "weight: expected a non-empty (C_out, KH, KW, C_in/2) tensor, got shape ", weight.sizes());
  check_channels(weight.size(0), "weight: C_out", 1);
  check_int32(w_mul, "w_mul");
  check_int32(w_add, "w_add");
  TORCH_CHECK_VALUE(w_mul != 0, "w_mul: expected a non-zero weight code multiplier, got ", w_mul);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  ConvProblem p;
  p.n = x.size(0);
  p.h = x.size(1);
  p.w = x.size(2);
  p.cin = in_channels;
  p.cb = cb;
  p.cout = weight.size(0);
  p.kh = weight.size(1);
  p.kw = weight.size(2);
  p.sh = stride[0];
  p.sw = stride[1];
  p.ph = padding[0];
  p.pw = padding[1];
  p.dh = dilation[0];
  p.dw = dilation[1];
  p.ho = out_length(p.h, p.kh, p.sh, p.ph, p.dh, "height");
  p.wo = out_length(p.w, p.kw, p.sw, p.pw, p.dw, "width");
  int64_t pixels = 0, elements = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(p.n, p.ho, &pixels) && !c10::mul_overflows(pixels, p.wo, &pixels) &&
                        !c10::mul_overflows(pixels, p.cout, &elements),
                    "x: the output (N, C_out, H_out, W_out) = (", p.n, ", ", p.cout, ", ", p.ho, ", ", p.wo,
                    ") has more than 2^63 elements");
  p.x_signed = x_signed;
  p.w_signed = w_signed;
  p.w_mul = static_cast<int32_t>(w_mul);
  p.w_add = static_cast<int32_t>(w_add);
  check_accumulator(p);
  return p;
}

void check_quantizer(const c10::optional<at::Tensor>& thresholds, int64_t qn, int64_t qp,
                     const at::Tensor& like) {
  TORCH_CHECK_VALUE(qn < qp, "qn, qp: expected qn < qp, got [", qn, ", ", qp, "]");
  const bool fits = qn < 0 ? (qn >= -8 && qp <= 7) : qp <= 15;
  TORCH_CHECK_VALUE(fits, "qn, qp: [", qn, ", ", qp, "] does not fit a 4-bit code ([-8, 7] or [0, 15])");
  if (thresholds.has_value()) {
    const at::Tensor& t = *thresholds;
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "thresholds: expected float32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == qp - qn && t.is_contiguous(),
                      "thresholds: expected a contiguous 1-d tensor of qp - qn = ", qp - qn,
                      " thresholds, got shape ", t.sizes());
    check_same_device(t, "thresholds", like);
  }
}

void check_epilogue(const ConvProblem& p, const at::Tensor& x, const at::Tensor& epilogue,
                    const c10::optional<at::Tensor>& tap_sums, int64_t act) {
  TORCH_CHECK_TYPE(epilogue.scalar_type() == at::kFloat, "epilogue: expected float32, got ",
                   epilogue.scalar_type());
  TORCH_CHECK_VALUE(epilogue.dim() == 2 && epilogue.size(0) == kEpilogueRows && epilogue.size(1) == p.cout &&
                        epilogue.is_contiguous(),
                    "epilogue: expected a contiguous (", static_cast<int>(kEpilogueRows), ", C_out=", p.cout,
                    ") tensor, got shape ", epilogue.sizes());
  check_same_device(epilogue, "epilogue", x);
  if (tap_sums.has_value()) {
    const at::Tensor& t = *tap_sums;
    TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "tap_sums: expected int32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == p.cout && t.size(1) == p.kh + 1 && t.size(2) == p.kw + 1 &&
                          t.is_contiguous(),
                      "tap_sums: expected a contiguous (C_out, KH+1, KW+1) = (", p.cout, ", ", p.kh + 1, ", ",
                      p.kw + 1, ") tensor, got shape ", t.sizes());
    check_same_device(t, "tap_sums", x);
  }
  TORCH_CHECK_VALUE(act == kIdentity || act == kReLU || act == kSiLU,
                    "act: expected 0 (identity), 1 (ReLU) or 2 (SiLU), got ", act);
}

void check_output(const at::Tensor& out, int64_t n, int64_t ho, int64_t wo, int64_t channels,
                  int64_t c_offset, const at::Tensor& like) {
  check_same_device(out, "out", like);
  const bool packed = out.scalar_type() == at::kByte;
  if (packed) {
    check_packed(out, "out", "(N, H_out, W_out, C_total/2)");
    TORCH_CHECK_VALUE(out.size(0) == n && out.size(1) == ho && out.size(2) == wo,
                      "out: expected (N, H_out, W_out) = (", n, ", ", ho, ", ", wo, "), got shape ", out.sizes());
  } else {
    TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat || out.scalar_type() == at::kHalf,
                     "out: expected uint8 (packed codes), float32 or float16, got ", out.scalar_type());
    TORCH_CHECK_VALUE(out.dim() == 4 && out.size(0) == n && out.size(2) == ho && out.size(3) == wo,
                      "out: expected (N, C, H_out, W_out) with (N, H_out, W_out) = (", n, ", ", ho, ", ", wo,
                      "), got shape ", out.sizes());
    TORCH_CHECK_VALUE(out.is_contiguous(at::MemoryFormat::ChannelsLast),
                      "out: expected a channels_last contiguous float tensor, got strides ", out.strides());
  }
  // Bounding c_offset by the limit first keeps c_offset + channels (channels <= kMaxArg) in range.
  const int64_t limit = std::min(packed ? out.size(3) : out.size(1), kMaxLimit) * (packed ? 2 : 1);
  TORCH_CHECK_VALUE(c_offset >= 0 && c_offset <= limit, "c_offset: expected a channel of out in [0, ", limit,
                    "], got ", c_offset);
  TORCH_CHECK_VALUE(!packed || c_offset % 2 == 0, "c_offset: packed outputs start at an even channel (a byte "
                    "boundary), got ", c_offset);
  TORCH_CHECK_VALUE(channels <= limit - c_offset, "out: channels [", c_offset, ", ", c_offset + channels,
                    ") do not fit its ", limit, packed ? " packed channels" : " channels");
}

at::Tensor new_output(int64_t n, int64_t ho, int64_t wo, int64_t channels, c10::ScalarType dtype,
                      const at::Tensor& like) {
  if (dtype == at::kByte) return at::zeros({n, ho, wo, packed_bytes(channels)}, like.options().dtype(at::kByte));
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf,
                   "out_dtype: expected torch.uint8 (packed codes), torch.float32 or torch.float16, got ", dtype);
  return at::empty({n, channels, ho, wo}, like.options().dtype(dtype).memory_format(at::MemoryFormat::ChannelsLast));
}

void check_epilogue_spec(const ConvProblem& p, const at::Tensor& like, const EpilogueSpec& e, bool packed_out) {
  check_epilogue(p, like, e.epilogue, e.tap_sums, e.act);
  if (packed_out) check_quantizer(e.thresholds, e.qn, e.qp, like);
}

namespace {

// The checks of the grouped ops that precede check_conv, in their order: the containers (in the
// grouped ops' words), groups, in_channels / groups, and the output dtype.
void check_grouped(const at::Tensor& x, const at::Tensor& weight, int64_t in_channels, int64_t groups,
                   c10::ScalarType out_dtype) {
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
}

}  // namespace

ConvArgs conv_args(ConvOp op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                   const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                   int64_t in_channels, int64_t groups, bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add,
                   c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act,
                   int64_t qn, int64_t qp, c10::ScalarType out_dtype, const at::Tensor* out, int64_t c_offset) {
  if (out != nullptr) out_dtype = out->scalar_type();
  const bool packed_out = out_dtype == at::kByte;
  const EpilogueSpec e{epilogue, tap_sums, thresholds, act, qn, qp};
  ConvProblem p;
  if (op == ConvOp::kDense) {
    p = check_conv(x, weight, in_channels, x_signed, w_signed, w_mul, w_add, stride, padding, dilation);
    check_epilogue_spec(p, x, e, packed_out);
  } else {
    check_grouped(x, weight, in_channels, groups, out_dtype);
    // The geometry (and every other check of the dense conv) is check_conv's on one group: a packed
    // tensor of that group's input channels, of x's shape otherwise (only its metadata is looked at).
    const at::Tensor x_group =
        at::empty({x.size(0), x.size(1), x.size(2), weight.size(3)}, x.options().device(at::kMeta));
    const at::Tensor w_meta = at::empty(weight.sizes(), weight.options().device(at::kMeta));
    p = check_conv(x_group, w_meta, in_channels / groups, x_signed, w_signed, w_mul, w_add, stride, padding,
                   dilation);
    TORCH_CHECK_VALUE(x.size(3) == packed_bytes(in_channels), "x: holds ", x.size(3),
                      " bytes per pixel but in_channels=", in_channels, " packs into ", packed_bytes(in_channels));
    check_epilogue_spec(p, x, e, packed_out);
  }
  if (out != nullptr) {
    check_output(*out, p.n, p.ho, p.wo, p.cout, c_offset, x);
    check_conv_out_separate(*out, x, weight, epilogue, tap_sums, thresholds);
    return ConvArgs{x, weight, e, *out, c_offset, op == ConvOp::kDense ? 1 : groups, p};
  }
  if (op == ConvOp::kGrouped) TORCH_CHECK_VALUE(c_offset == 0, "c_offset: expected 0 without out, got ", c_offset);
  return ConvArgs{x, weight, e, new_output(p.n, p.ho, p.wo, p.cout, out_dtype, x), c_offset,
                  op == ConvOp::kDense ? 1 : groups, p};
}

void check_float_input(const at::Tensor& x, const at::Tensor& qparams) {
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                   "x: expected a float32, float16 or bfloat16 tensor, got ", dt);
  TORCH_CHECK_VALUE(x.dim() == 4, "x: expected a 4-d (N, C, H, W) tensor, got shape ", x.sizes());
  check_channels(x.size(1), "x: C", 0);
  TORCH_CHECK_TYPE(qparams.scalar_type() == at::kFloat, "qparams: expected float32, got ", qparams.scalar_type());
  TORCH_CHECK_VALUE(qparams.dim() == 2 && qparams.size(0) == kQuantRows && qparams.size(1) == x.size(1) &&
                        qparams.is_contiguous(),
                    "qparams: expected a contiguous (2, C=", x.size(1), ") tensor (rows q_mul, q_off), got shape ",
                    qparams.sizes());
  TORCH_CHECK_VALUE(qparams.device() == x.device(), "qparams: is on ", qparams.device(), " but x is on ",
                    x.device());
}

void check_pack(const at::Tensor& codes, int64_t bits) {
  TORCH_CHECK_TYPE(at::isIntegralType(codes.scalar_type(), /*includeBool=*/false),
                   "codes: expected an integer tensor, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 4, "codes: expected a 4-d (N, C, H, W) or (C_out, C_in, KH, KW) tensor, got shape ",
                    codes.sizes());
  check_channels(codes.size(1), "codes: C", 0);
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 4, "bits: expected 2, 3 or 4 (codes in 4-bit containers), got ", bits);
}

void check_unpack(const at::Tensor& packed, int64_t channels) {
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "packed: expected a packed uint8 tensor, got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 4 && packed.is_contiguous(),
                    "packed: expected a contiguous 4-d (N, H, W, C/2) tensor, got shape ", packed.sizes(),
                    " strides ", packed.strides());
  check_channels(channels, "channels", 1);
  TORCH_CHECK_VALUE(packed_bytes(channels) == packed.size(3), "channels: ", channels,
                    " channels pack into ", packed_bytes(channels), " bytes per pixel, but packed holds ",
                    packed.size(3));
}

}  // namespace q2k
