// Host-side declarations shared by the op implementations: the argument checks (checks.cpp), which
// the CPU ops and the CUDA ops (csrc/cuda/) both call, so a bad argument gives the same error on
// every device, and the conv problem they describe.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "format.h"

namespace q2k {

// The largest channel count, stride, padding and dilation the ops accept (int32, as the CUDA
// kernels index them; far above any real conv). Larger values are an error naming the argument,
// raised before any arithmetic on them.
constexpr int64_t kMaxArg = 2147483647;

// channels in [lo, kMaxArg]; name says which argument (or which dimension of one) it is.
void check_channels(int64_t channels, const char* name, int64_t lo);

// A (height, width) pair of values in [lo, kMaxArg] (stride, padding, dilation).
void check_pair(c10::IntArrayRef v, const char* name, int64_t lo);

// The output length of one spatial axis, (in + 2*pad - dil*(taps - 1) - 1) / stride + 1, every step
// checked; pad, dil and stride already bounded by kMaxArg (check_pair). dim: "height" or "width".
int64_t out_length(int64_t in, int64_t taps, int64_t stride, int64_t pad, int64_t dil, const char* dim);

// One integer conv, validated: packed x (n, h, w, cb), packed weight (cout, kh, kw, cb).
struct ConvProblem {
  int64_t n, h, w;         // batch, input height, width (x's first three dimensions)
  int64_t cin, cb;         // input channels (of one group), and the bytes packed_bytes(cin) they pack into
  int64_t cout, kh, kw;    // output channels, kernel height, width (weight's first three dimensions)
  int64_t sh, sw, ph, pw;  // stride, zero padding (height, width), each in [1 | 0, kMaxArg]
  int64_t dh, dw;          // dilation (height, width), in [1, kMaxArg]
  int64_t ho, wo;          // output height, width: (h + 2*ph - dh*(kh - 1) - 1) / sh + 1, likewise wo
  bool x_signed, w_signed; // codes in [-8, 7] (signed) or [0, 15]
  int32_t w_mul, w_add;    // weight code k stands for the integer level w_mul*k + w_add (w_mul != 0);
                           //   |every integer sum| fits int32 for any codes (check_accumulator)
};

// The problem, its output shape, and the int32 accumulator contract: every integer sum the kernels
// form fits int32 for any codes the 4-bit containers hold, or this raises naming w_mul, w_add.
ConvProblem check_conv(const at::Tensor& x, const at::Tensor& weight, int64_t in_channels, bool x_signed,
                       bool w_signed, int64_t w_mul, int64_t w_add, c10::IntArrayRef stride,
                       c10::IntArrayRef padding, c10::IntArrayRef dilation);

// The quantizer that writes codes: rounding to [qn, qp], or (thresholds given) qn + a count of
// qp - qn thresholds; [qn, qp] must fit a 4-bit container.
void check_quantizer(const c10::optional<at::Tensor>& thresholds, int64_t qn, int64_t qp,
                     const at::Tensor& like);

void check_epilogue(const ConvProblem& p, const at::Tensor& x, const at::Tensor& epilogue,
                    const c10::optional<at::Tensor>& tap_sums, int64_t act);

// An output written at channel offset c_offset: packed uint8 (n, ho, wo, bytes) or float
// (n, channels, ho, wo) in channels_last, holding `channels` channels from c_offset on.
void check_output(const at::Tensor& out, int64_t n, int64_t ho, int64_t wo, int64_t channels,
                  int64_t c_offset, const at::Tensor& like);

// out shares no byte of memory with `input`, the tensor argument `name` of the same op: the kernels
// read their inputs while they write out (the CUDA conv reads x tile by tile, every epilogue reads
// its rows per element), so an overlap would give wrong results with no error. Address ranges are
// compared, so an alias, a view, an overlapping slice and a reinterpretation of another dtype are
// all refused; an absent optional input reads nothing.
void check_no_overlap(const at::Tensor& out, const c10::optional<at::Tensor>& input, const char* name);

// The overlap checks of conv2d_out and conv2d_grouped_out: out against every tensor they read.
void check_conv_out_separate(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& epilogue, const c10::optional<at::Tensor>& tap_sums,
                             const c10::optional<at::Tensor>& thresholds);

// The overlap checks of quantize_pack_out: out against x, qparams and thresholds.
void check_quantize_out_separate(const at::Tensor& out, const at::Tensor& x, const at::Tensor& qparams,
                                 const c10::optional<at::Tensor>& thresholds);

// The output conv2d allocates: packed (zero padding) for uint8, else float channels_last.
at::Tensor new_output(int64_t n, int64_t ho, int64_t wo, int64_t channels, c10::ScalarType dtype,
                      const at::Tensor& like);

// The epilogue of a conv (epilogue.h), as its op received it: with ConvProblem, everything an
// epilogue kernel reads. Tensors are on x's device (or sums', for conv2d_epilogue).
struct EpilogueSpec {
  const at::Tensor& epilogue;                   // float32 (kEpilogueRows, C_out) contiguous: per output
                                                //   channel alpha, gamma, bias, aff_mul, aff_add, q_mul, q_off
                                                //   (epilogue.h EpilogueRow)
  const c10::optional<at::Tensor>& tap_sums;    // int32 (C_out, KH+1, KW+1) contiguous: the 2-d prefix sums
                                                //   of each output channel's weight codes over its taps (the
                                                //   zero-point term J at borders); none: no zero point
  const c10::optional<at::Tensor>& thresholds;  // float32 (qp - qn) contiguous: the next layer's N2UQ
                                                //   thresholds t_i; none: rounding. Checked only when out
                                                //   is packed codes, and only then used
  int64_t act;                                  // 0 identity, 1 ReLU, 2 SiLU
  int64_t qn, qp;                               // code range of a packed out, qn < qp, within [-8, 7] or
                                                //   [0, 15]; unchecked (and unused) for a float out
};

// One call of conv2d, conv2d_out, conv2d_grouped or conv2d_grouped_out, checked. conv_args() turns
// the op's flat schema arguments into it, performing every check once, and the implementations
// (int_conv_cpu.cpp, grouped_conv_ops.cpp, cuda/int_ops.cpp) take it and check nothing but their own
// kernel's limits. The references point at the op's own arguments: it lives for one op call.
//
//   x         uint8 (N, H, W, packed_bytes(in_channels)) contiguous: NHWC codes, two per byte (format.h),
//             channels padded to kChannelAlign; signed [-8, 7] if p.x_signed, else [0, 15]
//   weight    uint8 (C_out, KH, KW, packed_bytes(in_channels / groups)) contiguous: the same packing per
//             tap; output channel o of group g = o / (C_out / groups) reads input channels
//             [g*C_in_g, (g+1)*C_in_g); the code k stands for the level w_mul*k + w_add
//   out       uint8 (N, H_out, W_out, C_total/2) contiguous packed codes (written from the even channel
//             c_offset; a trailing odd channel keeps the other nibble of its byte), or float32 / float16
//             (N, C_total, H_out, W_out) channels_last (the dense ops; the grouped ops write float32)
struct ConvArgs {
  const at::Tensor& x;       // see above
  const at::Tensor& weight;  // see above
  EpilogueSpec ep;           // the epilogue and the output quantizer
  at::Tensor out;            // see above: the op's `out`, or the output conv_args allocated (zeros if packed)
  int64_t c_offset;          // first channel of out written (0 without out), even for packed codes
  int64_t groups;            // 1 for the dense ops; C_out and in_channels are multiples of it
  ConvProblem p;             // the geometry, code signs and w_mul, w_add; for groups > 1 that of ONE group:
                             //   p.cin = in_channels / groups, p.cb = weight.size(3), p.cout = C_out (all
                             //   groups), and x holds packed_bytes(in_channels) bytes per pixel, not p.cb
  bool packed_out() const { return out.scalar_type() == at::kByte; }
};

// Which op conv_args checks for: their checks are the same in substance, but the grouped ops check
// (and word) theirs in their own order, and only they take `groups`.
enum class ConvOp { kDense, kGrouped };

// Every check of the op (the problem, check_conv; the epilogue, check_epilogue; the quantizer,
// check_quantizer, when the output is packed codes; the output, check_output and
// check_conv_out_separate, or its allocation, new_output) and the checked arguments. out: the op's
// `out` (then out_dtype is its dtype), or null to allocate one of out_dtype; c_offset is 0 without it.
ConvArgs conv_args(ConvOp op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                   const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                   int64_t in_channels, int64_t groups, bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add,
                   c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act,
                   int64_t qn, int64_t qp, c10::ScalarType out_dtype, const at::Tensor* out, int64_t c_offset);

// check_epilogue, and check_quantizer when the output is packed codes (like: the tensor whose device
// the others must share).
void check_epilogue_spec(const ConvProblem& p, const at::Tensor& like, const EpilogueSpec& e, bool packed_out);

// The float input of quantize_pack and its (2, C) quantizer rows.
void check_float_input(const at::Tensor& x, const at::Tensor& qparams);

// The codes of pack (dtype, rank, channel count) and the bit width; the values are the CPU op's
// to check (CUDA keeps the low 4 bits, see cuda/int_ops.h).
void check_pack(const at::Tensor& codes, int64_t bits);

// The packed input of unpack and the channel count it should hold.
void check_unpack(const at::Tensor& packed, int64_t channels);

}  // namespace q2k
