// The torch side of the CUDA integer ops: argument checks (../checks.cpp, shared with the CPU ops),
// output allocation and the kernel parameters, then the launchers of params.h. No CUDA headers:
// register_cuda.cpp supplies the stream and the MMA path of the current device, and the CPU emulator of
// the tests (tests/cuda_emu/) compiles this same glue against its own launchers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include "params.h"

namespace q2k {
namespace cuda {

struct Exec {
  MmaPath path = MmaPath::kS4;
  CUstream_st* stream = nullptr;
};

at::Tensor conv2d_acc(const Exec& ex, const at::Tensor& x, const at::Tensor& weight, int64_t in_channels,
                      bool x_signed, bool w_signed, c10::IntArrayRef stride, c10::IntArrayRef padding,
                      c10::IntArrayRef dilation);

// The dense conv ops with the schema's arguments (register_cuda.cpp; the emulator of the tests):
// conv_args (../int_conv.h) turns them into one checked ConvArgs, which the launch glue reads.
at::Tensor conv2d(const Exec& ex, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                  const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                  int64_t in_channels, bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add,
                  c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act,
                  int64_t qn, int64_t qp, c10::ScalarType out_dtype);

void conv2d_out(const Exec& ex, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                int64_t in_channels, bool x_signed, bool w_signed, int64_t w_mul, int64_t w_add,
                c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t act,
                int64_t qn, int64_t qp, int64_t c_offset, const at::Tensor& out);

at::Tensor quantize_pack(const Exec& ex, const at::Tensor& x, const at::Tensor& qparams,
                         const c10::optional<at::Tensor>& thresholds, int64_t qn, int64_t qp);

// CUDA pack does not check that the codes lie in the bits-wide range (that would need a host sync):
// it keeps the low 4 bits of each code. Its inputs are the outputs of unpack or of a quantizer.
at::Tensor pack(const Exec& ex, const at::Tensor& codes, int64_t bits, bool is_signed);

at::Tensor unpack(const Exec& ex, const at::Tensor& packed, int64_t channels, bool is_signed);

void quantize_pack_out(const Exec& ex, const at::Tensor& x, const at::Tensor& qparams,
                       const c10::optional<at::Tensor>& thresholds, int64_t qn, int64_t qp, int64_t c_offset,
                       const at::Tensor& out);

}  // namespace cuda
}  // namespace q2k
