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

// One integer conv, validated: packed x (n, h, w, cb), packed weight (cout, kh, kw, cb).
struct ConvProblem {
  int64_t n, h, w, cin, cb, cout, kh, kw;
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t ho, wo;
  bool x_signed, w_signed;
  int32_t w_mul, w_add;
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

// Every check of conv2d / conv2d_out: the problem, the epilogue, and the output quantizer when the
// output is packed codes.
ConvProblem check_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                         const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                         int64_t in_channels, bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add,
                         c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act,
                         int64_t qn, int64_t qp, bool packed_out);

// The float input of quantize_pack and its (2, C) quantizer rows.
void check_float_input(const at::Tensor& x, const at::Tensor& qparams);

// The codes of pack (dtype, rank, channel count) and the bit width; the values are the CPU op's
// to check (CUDA keeps the low 4 bits, see cuda/int_ops.h).
void check_pack(const at::Tensor& codes, int64_t bits);

// The packed input of unpack and the channel count it should hold.
void check_unpack(const at::Tensor& packed, int64_t channels);

}  // namespace q2k
