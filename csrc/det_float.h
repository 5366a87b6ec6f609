// Deterministic float ops (torch.ops.q2kernels_int.det_*; q2kernels/ops/det_float.py): one definition per
// output element, for the CPU path (det_float_cpu.cpp), the CUDA kernels (cuda/det_float.cu) and the ONNX
// graph that q2kernels.deploy writes from the same definitions.
//
// Why: a converted integer model keeps a few layers in float (the stem conv that reads the image, a
// detector's prediction convs, attention). PyTorch, cuDNN and onnxruntime each sum a conv or a matmul in
// their own order, with or without fma, and each has its own exp, so those layers' last bits depend on
// where the model runs, and a value on a rounding boundary of the next quantizer then flips a code. The
// ops below are each ONE sequence of IEEE float32 basic operations, rounded to nearest even, with no fma
// and no reassociation (the host build has -ffp-contract=off; device code uses epilogue.h's
// __f*_rn helpers, which nvcc never contracts), and exp is epilogue.h's exp_det polynomial. Every
// backend that performs that sequence gets the same bits, so an ONNX export that spells the operations
// out reproduces the model bit for bit. add_rn, mul_rn, ... are the helpers of epilogue.h.
//
//   det_conv2d  x (N, C_in, H, W), weight (C_out, C_in/groups, KH, KW), bias (C_out) or none -> (N, C_out,
//               H_out, W_out), H_out = (H + 2*ph - dh*(KH-1) - 1)/sh + 1 (W_out likewise), as torch's conv2d.
//               Output (n, co, oh, ow), group g = co / (C_out/groups):
//                 acc = +0
//                 for ci in [0, C_in/groups), for i in [0, KH), for j in [0, KW)     (this order)
//                   ih = oh*sh - ph + i*dh, iw = ow*sw - pw + j*dw
//                   if 0 <= ih < H and 0 <= iw < W:
//                     acc = add_rn(acc, mul_rn(weight[co, ci, i, j], x[n, g*C_in/groups + ci, ih, iw]))
//                 if bias: acc = add_rn(acc, bias[co])
//                 out = activate(acc, act)           (epilogue.h: 0 identity, 1 ReLU, 2 SiLU = silu_det)
//               A tap outside the image is skipped. For a finite weight that equals adding its product
//               with 0 (a signed zero), since acc starts at +0 and so is never -0; for an infinite or NaN
//               weight it does not (inf*0 is NaN): skipping is the definition.
//   det_matmul  a (B..., M, K), b (B..., K, N) -> (B..., M, N), the same leading dims (no broadcasting):
//                 acc = +0; for k ascending: acc = add_rn(acc, mul_rn(a[.., m, k], b[.., k, n])).  K = 0: +0.
//   det_softmax x (any shape), dim: per slice x_0..x_{L-1} along dim:
//                 m = x_0; for i >= 1: m = (x_i > m || x_i is NaN) ? x_i : m     (the max; NaN if any is)
//                 e_i = exp_det(sub_rn(x_i, m));  s = +0, then s = add_rn(s, e_i) for i ascending
//                 y_i = div_rn(e_i, s)
//   det_silu    x (any shape) -> silu_det(x) = div_rn(x, add_rn(1, exp_det(-x))) per element.
// A NaN result is a NaN; which NaN (sign, payload) is not defined: processors and compilers choose.
//
// This header holds the per-element definitions as host/device functions (the CUDA kernels run exactly
// these; the CPU path runs them in its reference mode and for the cases its fast loops leave out, and its
// fast loops perform the same operations per element in the same order), the CUDA launchers (plain
// pointers: det_float.cu includes no torch header), and, for host compilers only, the checked op calls.
#pragma once

#include <cstdint>

#include "epilogue.h"

struct CUstream_st;  // cudaStream_t is CUstream_st*; declared here so this header needs no CUDA headers

namespace q2k {
namespace det {

// One det_conv2d, checked (conv2d_call). Every tensor is contiguous (NCHW, row-major).
struct ConvGeometry {
  int64_t n, cin, h, w;  // x: (n, cin, h, w)
  int64_t cout, kh, kw;  // weight: (cout, cin/groups, kh, kw); kh, kw >= 1
  int64_t groups;        // >= 1, divides cin and cout
  int64_t sh, sw;        // stride, >= 1
  int64_t ph, pw;        // zero padding, >= 0
  int64_t dh, dw;        // dilation, >= 1
  int64_t ho, wo;        // output height and width, >= 1
  int act;               // epilogue.h Activation: 0 identity, 1 ReLU, 2 SiLU
};

// The tap sum of output (n, co, oh, ow) of det_conv2d before the bias (the spec's loop, literally).
//   x       float32 (g.n, g.cin, g.h, g.w)
//   weight  float32 (g.cout, g.cin/g.groups, g.kh, g.kw)
Q2K_HD float conv2d_taps(const float* x, const float* weight, const ConvGeometry& g, int64_t n, int64_t co, int64_t oh,
                         int64_t ow) {
  const int64_t cin_g = g.cin / g.groups;
  const int64_t grp = co / (g.cout / g.groups);
  const float* wrow = weight + co * cin_g * g.kh * g.kw;
  float acc = 0.0f;
  for (int64_t ci = 0; ci < cin_g; ++ci) {
    const float* plane = x + ((n * g.cin + grp * cin_g + ci) * g.h) * g.w;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ih = oh * g.sh - g.ph + i * g.dh;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t iw = ow * g.sw - g.pw + j * g.dw;
        if (ih >= 0 && ih < g.h && iw >= 0 && iw < g.w)
          acc = add_rn(acc, mul_rn(wrow[(ci * g.kh + i) * g.kw + j], plane[ih * g.w + iw]));
      }
    }
  }
  return acc;
}

// The bias and the activation of a tap sum: the end of every det_conv2d output.
//   bias  float32 (g.cout) or null
Q2K_HD float conv2d_finish(float acc, const float* bias, int64_t co, int act) {
  if (bias != nullptr) acc = add_rn(acc, bias[co]);
  return activate(acc, act);
}

// Output element `index` of det_conv2d, index = ((n*cout + co)*ho + oh)*wo + ow in the (n, cout, ho, wo)
// contiguous output.
//   x, weight as conv2d_taps; bias float32 (g.cout) or null
Q2K_HD float conv2d_at(const float* x, const float* weight, const float* bias, const ConvGeometry& g, int64_t index) {
  const int64_t ow = index % g.wo;
  const int64_t oh = index / g.wo % g.ho;
  const int64_t co = index / (g.wo * g.ho) % g.cout;
  const int64_t n = index / (g.wo * g.ho * g.cout);
  return conv2d_finish(conv2d_taps(x, weight, g, n, co, oh, ow), bias, co, g.act);
}

// sum over k ascending of a[k]*b[k*b_step], from +0: one element of det_matmul.
//   a  float32 (k), contiguous (a row of the left operand)
//   b  float32 (k) at stride b_step (a column of the right operand)
Q2K_HD float dot(const float* a, const float* b, int64_t k, int64_t b_step) {
  float acc = 0.0f;
  for (int64_t i = 0; i < k; ++i) acc = add_rn(acc, mul_rn(a[i], b[i * b_step]));
  return acc;
}

// Output element `index` of det_matmul, index = (batch*m + row)*n + col in the (batch, m, n) output.
//   a  float32 (batch, m, k) contiguous;  b  float32 (batch, k, n) contiguous
Q2K_HD float matmul_at(const float* a, const float* b, int64_t m, int64_t n, int64_t k, int64_t index) {
  const int64_t col = index % n;
  const int64_t row = index / n % m;
  const int64_t batch = index / (n * m);
  return dot(a + (batch * m + row) * k, b + batch * k * n + col, k, n);
}

// One step of det_softmax's max: v replaces m where v > m or v is NaN (then m stays NaN: v > NaN is false).
Q2K_HD float softmax_max_step(float m, float v) { return (v > m || v != v) ? v : m; }

// det_softmax of one slice: len values at stride step, from x to y (y may not overlap x).
//   x, y  float32 (len) at stride step
Q2K_HD void softmax_slice(const float* x, float* y, int64_t len, int64_t step) {
  if (len <= 0) return;
  float m = x[0];
  for (int64_t i = 1; i < len; ++i) m = softmax_max_step(m, x[i * step]);
  float s = 0.0f;
  for (int64_t i = 0; i < len; ++i) {
    const float e = exp_det(sub_rn(x[i * step], m));
    y[i * step] = e;
    s = add_rn(s, e);
  }
  for (int64_t i = 0; i < len; ++i) y[i * step] = div_rn(y[i * step], s);
}

// Slice `slice` = o*inner + i of det_softmax over the middle dimension of a contiguous (outer, len, inner)
// view of x (and y): the values x[o, 0..len-1, i].
//   x, y  float32 (outer, len, inner) contiguous
Q2K_HD void softmax_at(const float* x, float* y, int64_t len, int64_t inner, int64_t slice) {
  const int64_t base = slice / inner * len * inner + slice % inner;
  softmax_slice(x + base, y + base, len, inner);
}

// det_silu of one element: epilogue.h's silu_det.
Q2K_HD float silu(float x) { return silu_det(x); }

// The CUDA launchers (cuda/det_float.cu): one thread per output element (det_conv2d, det_matmul,
// det_silu) or per slice (det_softmax), each running the function above; on `stream`, nothing to wait
// for. They return the cudaError_t of the launch (0: launched; nothing is launched for an empty output).
//   conv2d   x, weight, bias (or null), out: as conv2d_at; out float32 (g.n, g.cout, g.ho, g.wo)
//   matmul   a (batch, m, k), b (batch, k, n), out (batch, m, n)
//   softmax  x, y (outer, len, inner), det_softmax along len
//   silu     x, y (numel)
// All contiguous float32 on the current device.
int launch_conv2d(const ConvGeometry& g, const float* x, const float* weight, const float* bias, float* out,
                  CUstream_st* stream);
int launch_matmul(int64_t batch, int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* out,
                  CUstream_st* stream);
int launch_softmax(int64_t outer, int64_t len, int64_t inner, const float* x, float* y, CUstream_st* stream);
int launch_silu(int64_t numel, const float* x, float* y, CUstream_st* stream);

}  // namespace det
}  // namespace q2k

#if !defined(__CUDACC__)
// The torch side, for host compilers (nvcc builds cuda/det_float.cu without torch's headers): the checked
// calls of the four ops, shared by their CPU and CUDA kernels (det_float_cpu.cpp defines them; the CUDA
// registration is cuda/det_float_ops.cpp), so that a bad argument gives the same error on every device
// (q2kernels/ops/det_float.py's fake implementations check the same for the meta device and tracing).
// Each checks every argument (errors name it), makes its tensor inputs contiguous (a copy where they are
// not: channels_last, transposed, expanded, sliced), and allocates the contiguous output on the inputs'
// device.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

namespace q2k {
namespace det {

struct ConvCall {
  at::Tensor x, weight, bias;  // contiguous float32; bias undefined when not given
  ConvGeometry g;
  at::Tensor out;  // float32 (g.n, g.cout, g.ho, g.wo) contiguous, uninitialised
};
ConvCall conv2d_call(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                     int64_t act);

struct MatmulCall {
  at::Tensor a, b;                 // contiguous float32 (..., m, k), (..., k, n)
  int64_t batch, m, n, k;          // batch: the product of the leading dimensions
  at::Tensor out;                  // float32 (..., m, n) contiguous, uninitialised
};
MatmulCall matmul_call(const at::Tensor& a, const at::Tensor& b);

struct SoftmaxCall {
  at::Tensor x;                // contiguous float32
  int64_t outer, len, inner;   // x as (outer, len, inner), len the size of dim (1 for a 0-d x)
  at::Tensor out;              // float32 of x's shape, contiguous, uninitialised
};
SoftmaxCall softmax_call(const at::Tensor& x, int64_t dim);

struct SiluCall {
  at::Tensor x;    // contiguous float32
  at::Tensor out;  // float32 of x's shape, contiguous, uninitialised
};
SiluCall silu_call(const at::Tensor& x);

}  // namespace det
}  // namespace q2k
#endif
