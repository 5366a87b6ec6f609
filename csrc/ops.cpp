// q2kernels._C: the schemas of the integer ops (torch.ops.q2kernels_int.*) and the Python module's
// constants. Each device registers its kernels next to them: pack.cpp and int_conv_cpu.cpp for the
// CPU, csrc/cuda/ for CUDA. Meta (fake) implementations live in q2kernels/ops/int_conv.py.
// Built with Q2K_OPS_LIBRARY (`q2k build --prebuilt`), it is a plain ops library instead: no Python
// module, so that it needs no Python C-API and loads under any Python of the same torch build.
#if !defined(Q2K_OPS_LIBRARY)
#include <pybind11/pybind11.h>
#endif
#include <torch/library.h>

#include "epilogue.h"
#include "format.h"

TORCH_LIBRARY(q2kernels_int, m) {
  m.def("pack(Tensor codes, int bits, bool signed) -> Tensor");
  m.def("unpack(Tensor packed, int channels, bool signed) -> Tensor");
  m.def("quantize_pack(Tensor x, Tensor qparams, Tensor? thresholds, int qn, int qp) -> Tensor");
  m.def(
      "quantize_pack_out(Tensor x, Tensor qparams, Tensor? thresholds, int qn, int qp, int c_offset, "
      "Tensor(a!) out) -> ()");
  m.def(
      "conv2d_acc(Tensor x, Tensor weight, int in_channels, bool x_signed, bool w_signed, int[2] stride, "
      "int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "conv2d(Tensor x, Tensor weight, Tensor epilogue, Tensor? tap_sums, Tensor? thresholds, int in_channels, "
      "bool x_signed, bool w_signed, int w_mul, int w_add, int[2] stride, int[2] padding, int[2] dilation, "
      "int act, int qn, int qp, ScalarType out_dtype) -> Tensor");
  m.def(
      "conv2d_out(Tensor x, Tensor weight, Tensor epilogue, Tensor? tap_sums, Tensor? thresholds, "
      "int in_channels, bool x_signed, bool w_signed, int w_mul, int w_add, int[2] stride, int[2] padding, "
      "int[2] dilation, int act, int qn, int qp, int c_offset, Tensor(a!) out) -> ()");
}

#if defined(Q2K_OPS_LIBRARY)
// The module's constants as C symbols, which q2kernels/_ext.py reads with ctypes. The braceless
// extern "C" gives these const objects external linkage (a const at namespace scope has internal).
#define Q2K_EXPORT extern "C" __attribute__((visibility("default")))
Q2K_EXPORT const int64_t q2k_channel_align = q2k::kChannelAlign;
Q2K_EXPORT const int64_t q2k_format_version = q2k::kFormatVersion;
Q2K_EXPORT const int64_t q2k_epilogue_rows = q2k::kEpilogueRows;
#if defined(Q2K_WITH_CUDA)
Q2K_EXPORT const int64_t q2k_with_cuda = 1;
#else
Q2K_EXPORT const int64_t q2k_with_cuda = 0;
#endif
#else
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "q2kernels integer ops; the ops themselves are torch.ops.q2kernels_int.*";
  m.attr("CHANNEL_ALIGN") = q2k::kChannelAlign;
  m.attr("FORMAT_VERSION") = q2k::kFormatVersion;
  m.attr("EPILOGUE_ROWS") = static_cast<int>(q2k::kEpilogueRows);
#if defined(Q2K_WITH_CUDA)
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
#endif
