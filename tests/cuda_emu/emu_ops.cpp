// The CUDA integer ops run by the CPU emulator (emulator.h), for tests/test_int_conv_cuda.py and
// tests/test_grouped_conv.py: the real torch glue (csrc/cuda/int_ops.cpp, csrc/grouped_conv_ops.cpp)
// and the real kernel source (csrc/cuda/*_kernel.cuh), with launchers that run the grid CTA by CTA on
// the CPU. Registered as torch.ops.q2k_cuda_emu.* on CPU tensors, with extra leading arguments: the
// MMA path (0 = int4, 1 = int8 on unpacked nibbles) of the dense conv ops, and (every op but the
// grouped conv, which copies nothing to shared memory) whether cp.async copies land lazily (at
// wait_group) or eagerly (at issue).
#include <torch/library.h>

#include "grouped_conv_kernel.cuh"
#include "grouped_conv_ops.h"
#include "int_conv_kernel.cuh"
#include "int_ops.h"
#include "packing_kernels.cuh"

namespace q2k_emu {
inline bool g_lazy_copies = true;
}

namespace q2k {
namespace cuda {

int launch_int_conv(const ConvParams& p, CUstream_st*) {
  const int64_t m = static_cast<int64_t>(p.n) * p.out_h * p.out_w;
  if (m == 0 || p.cout == 0) return 0;
  const std::vector<std::pair<const uint8_t*, const uint8_t*>> readable = {
      {p.x, p.x + static_cast<int64_t>(p.n) * p.in_h * p.in_w * p.cb},
      {p.w, p.w + static_cast<int64_t>(p.cout) * p.kh * p.kw * p.cb}};
  with_tile(p, [&](auto tile) {
    using T = decltype(tile);
    const int64_t blocks = (m + T::kBM - 1) / T::kBM * ((p.cout + T::kBN - 1) / T::kBN);
    q2k_emu::launch(blocks, T::kThreads, T::kSmemBytes, q2k_emu::g_lazy_copies, readable,
                    [&p] { int_conv_kernel<T>(p); });
  });
  return 0;
}

int launch_quantize_pack(const QuantizePackParams& p, CUstream_st*) {
  const int64_t total = p.n * p.h * p.w * ((p.c + 1) / 2);
  if (total == 0) return 0;
  q2k_emu::launch((total + 255) / 256, 256, 0, q2k_emu::g_lazy_copies, {}, [&p] { quantize_pack_kernel(p); });
  return 0;
}

int launch_pack(const PackParams& p, CUstream_st*) {
  const int64_t total = p.a * p.b1 * p.b2 * p.out_pitch;
  if (total == 0) return 0;
  q2k_emu::launch((total + 255) / 256, 256, 0, q2k_emu::g_lazy_copies, {}, [&p] { pack_kernel(p); });
  return 0;
}

int launch_unpack(const UnpackParams& p, CUstream_st*) {
  const int64_t total = p.pixels * p.channels;
  if (total == 0) return 0;
  q2k_emu::launch((total + 255) / 256, 256, 0, q2k_emu::g_lazy_copies, {}, [&p] { unpack_kernel(p); });
  return 0;
}

// The grid of grouped_conv.cu's launcher. The kernel issues no cp.async: no global ranges for it to
// read, and the copy timing does not matter.
int launch_grouped_conv(const GroupedConvParams& p, CUstream_st*) {
  const GroupedGrid grid = grouped_grid(p);
  if (grid.total == 0) return 0;
  q2k_emu::launch(grid.blocks, kGroupedThreads, 0, /*lazy_copies=*/true, {},
                  [&p, &grid] { grouped_conv_kernel(p, grid.pairs, grid.total); });
  return 0;
}

namespace {

Exec exec(int64_t path, bool lazy) {
  q2k_emu::g_lazy_copies = lazy;
  Exec ex;
  ex.path = path == 0 ? MmaPath::kS4 : MmaPath::kS8;
  return ex;
}

at::Tensor emu_conv2d_acc(int64_t path, bool lazy, const at::Tensor& x, const at::Tensor& weight,
                          int64_t in_channels, bool x_signed, bool w_signed, c10::IntArrayRef stride,
                          c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  return conv2d_acc(exec(path, lazy), x, weight, in_channels, x_signed, w_signed, stride, padding, dilation);
}

at::Tensor emu_conv2d(int64_t path, bool lazy, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& epilogue, const c10::optional<at::Tensor>& tap_sums,
                      const c10::optional<at::Tensor>& thresholds, int64_t in_channels, bool x_signed, bool w_signed,
                      int64_t w_mul, int64_t w_add, c10::IntArrayRef stride, c10::IntArrayRef padding,
                      c10::IntArrayRef dilation, int64_t act, int64_t qn, int64_t qp, c10::ScalarType out_dtype) {
  return conv2d(exec(path, lazy), x, weight, epilogue, tap_sums, thresholds, in_channels, x_signed, w_signed, w_mul,
                w_add, stride, padding, dilation, act, qn, qp, out_dtype);
}

void emu_conv2d_out(int64_t path, bool lazy, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& epilogue, const c10::optional<at::Tensor>& tap_sums,
                    const c10::optional<at::Tensor>& thresholds, int64_t in_channels, bool x_signed, bool w_signed,
                    int64_t w_mul, int64_t w_add, c10::IntArrayRef stride, c10::IntArrayRef padding,
                    c10::IntArrayRef dilation, int64_t act, int64_t qn, int64_t qp, int64_t c_offset,
                    const at::Tensor& out) {
  conv2d_out(exec(path, lazy), x, weight, epilogue, tap_sums, thresholds, in_channels, x_signed, w_signed, w_mul,
             w_add, stride, padding, dilation, act, qn, qp, c_offset, out);
}

at::Tensor emu_quantize_pack(bool lazy, const at::Tensor& x, const at::Tensor& qparams,
                             const c10::optional<at::Tensor>& thresholds, int64_t qn, int64_t qp) {
  return quantize_pack(exec(0, lazy), x, qparams, thresholds, qn, qp);
}

void emu_quantize_pack_out(bool lazy, const at::Tensor& x, const at::Tensor& qparams,
                           const c10::optional<at::Tensor>& thresholds, int64_t qn, int64_t qp, int64_t c_offset,
                           const at::Tensor& out) {
  quantize_pack_out(exec(0, lazy), x, qparams, thresholds, qn, qp, c_offset, out);
}

at::Tensor emu_pack(bool lazy, const at::Tensor& codes, int64_t bits, bool is_signed) {
  return pack(exec(0, lazy), codes, bits, is_signed);
}

at::Tensor emu_unpack(bool lazy, const at::Tensor& packed, int64_t channels, bool is_signed) {
  return unpack(exec(0, lazy), packed, channels, is_signed);
}

at::Tensor emu_conv2d_grouped(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                              const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                              int64_t in_channels, int64_t groups, bool x_signed, bool w_signed, int64_t w_mul,
                              int64_t w_add, c10::IntArrayRef stride, c10::IntArrayRef padding,
                              c10::IntArrayRef dilation, int64_t act, int64_t qn, int64_t qp,
                              c10::ScalarType out_dtype) {
  GroupedConvParams p;
  at::Tensor out = grouped_conv_setup(p, x, weight, epilogue, tap_sums, thresholds, in_channels, groups, x_signed,
                                      w_signed, w_mul, w_add, stride, padding, dilation, act, qn, qp, out_dtype,
                                      c10::nullopt, 0);
  launch_grouped_conv(p, nullptr);
  return out;
}

void emu_conv2d_grouped_out(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& epilogue,
                            const c10::optional<at::Tensor>& tap_sums, const c10::optional<at::Tensor>& thresholds,
                            int64_t in_channels, int64_t groups, bool x_signed, bool w_signed, int64_t w_mul,
                            int64_t w_add, c10::IntArrayRef stride, c10::IntArrayRef padding,
                            c10::IntArrayRef dilation, int64_t act, int64_t qn, int64_t qp, int64_t c_offset,
                            const at::Tensor& out) {
  GroupedConvParams p;
  grouped_conv_setup(p, x, weight, epilogue, tap_sums, thresholds, in_channels, groups, x_signed, w_signed, w_mul,
                     w_add, stride, padding, dilation, act, qn, qp, out.scalar_type(), out, c_offset);
  launch_grouped_conv(p, nullptr);
}

}  // namespace

TORCH_LIBRARY(q2k_cuda_emu, m) {
  m.def("pack(bool lazy, Tensor codes, int bits, bool signed) -> Tensor");
  m.def("unpack(bool lazy, Tensor packed, int channels, bool signed) -> Tensor");
  m.def(
      "conv2d_acc(int path, bool lazy, Tensor x, Tensor weight, int in_channels, bool x_signed, bool w_signed, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "conv2d(int path, bool lazy, Tensor x, Tensor weight, Tensor epilogue, Tensor? tap_sums, Tensor? thresholds, "
      "int in_channels, bool x_signed, bool w_signed, int w_mul, int w_add, int[2] stride, int[2] padding, "
      "int[2] dilation, int act, int qn, int qp, ScalarType out_dtype) -> Tensor");
  m.def(
      "conv2d_out(int path, bool lazy, Tensor x, Tensor weight, Tensor epilogue, Tensor? tap_sums, "
      "Tensor? thresholds, int in_channels, bool x_signed, bool w_signed, int w_mul, int w_add, int[2] stride, "
      "int[2] padding, int[2] dilation, int act, int qn, int qp, int c_offset, Tensor(a!) out) -> ()");
  m.def("quantize_pack(bool lazy, Tensor x, Tensor qparams, Tensor? thresholds, int qn, int qp) -> Tensor");
  // The schemas of q2kernels_int's grouped conv (csrc/grouped_conv_cpu.cpp), unchanged.
  m.def(
      "conv2d_grouped(Tensor x, Tensor weight, Tensor epilogue, Tensor? tap_sums, Tensor? thresholds, "
      "int in_channels, int groups, bool x_signed, bool w_signed, int w_mul, int w_add, int[2] stride, "
      "int[2] padding, int[2] dilation, int act, int qn, int qp, ScalarType out_dtype) -> Tensor");
  m.def(
      "conv2d_grouped_out(Tensor x, Tensor weight, Tensor epilogue, Tensor? tap_sums, Tensor? thresholds, "
      "int in_channels, int groups, bool x_signed, bool w_signed, int w_mul, int w_add, int[2] stride, "
      "int[2] padding, int[2] dilation, int act, int qn, int qp, int c_offset, Tensor(a!) out) -> ()");
  m.def(
      "quantize_pack_out(bool lazy, Tensor x, Tensor qparams, Tensor? thresholds, int qn, int qp, int c_offset, "
      "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(q2k_cuda_emu, CPU, m) {
  m.impl("pack", &emu_pack);
  m.impl("unpack", &emu_unpack);
  m.impl("conv2d_acc", &emu_conv2d_acc);
  m.impl("conv2d", &emu_conv2d);
  m.impl("conv2d_out", &emu_conv2d_out);
  m.impl("quantize_pack", &emu_quantize_pack);
  m.impl("quantize_pack_out", &emu_quantize_pack_out);
  m.impl("conv2d_grouped", &emu_conv2d_grouped);
  m.impl("conv2d_grouped_out", &emu_conv2d_grouped_out);
}

}  // namespace cuda
}  // namespace q2k
