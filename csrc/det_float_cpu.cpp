// The deterministic float ops (det_float.h has their definition): their schemas, the checked calls that
// their CPU and CUDA kernels share, and the CPU kernels.
//
// Schemas: TORCH_LIBRARY_FRAGMENT, next to their kernels, as fast_conv_cpu.cpp does. Their fake (meta)
// implementations are Python, as the integer ops' are: q2kernels/ops/det_float.py registers them when it
// loads the library, and they also serve as the Meta kernels (a model run on the meta device). A C++ Meta
// kernel would reject torch.compile's symbolic shapes (it reads sizes as integers).
//
// The CPU kernels compute every element with the operations of det_float.h in the same order, but fast:
// - det_conv2d and det_matmul are a GEMM, C[r, p] = sum over k ascending of A[r, k]*B[k, p] (conv: A the
//   weights (C_out/groups, K = C_in/groups*KH*KW), B the input taps of a tile of output pixels, im2col,
//   rows k in the order (ci, i, j) of the definition; for a 1x1 conv of stride 1 without padding B is x
//   itself). Each output's sum lives in one vector lane: a register tile of MR rows x NR pixels, k
//   ascending, one product and one sum per k and lane (GCC vector extensions; -ffp-contract=off keeps
//   the multiply and the add apart, and the AVX2 variant is compiled without FMA at all). Vectorising
//   across outputs changes no element's sequence of operations.
//   A tap outside the image (padding) is a 0 in B: adding weight*0 = +-0 to the sum, which is never -0,
//   changes nothing for a finite weight. Output channels with an infinite or NaN weight (inf*0 = NaN) are
//   computed by det_float.h's conv2d_at instead, which skips such taps as the definition does.
// - det_softmax: per slice as det_float.h's softmax_slice; with AVX2 + FMA, exp and the division in
//   8 lanes (epilogue_simd.h's exp_det, the same operations as epilogue.h's), the max and the sum in order.
// - det_silu and the conv's activation: epilogue_simd.h's silu_det / activate in 8 lanes where the CPU
//   has AVX2 + FMA (bit for bit epilogue.h's), else epilogue.h's scalar functions.
// Q2K_DET_FLOAT_CPU chooses the code (read at every call; tests/test_det_float.py runs each): auto (unset:
// the best the CPU has), avx512, avx2, base (no x86 vector extension beyond the baseline), or reference:
// every element by det_float.h's functions, the code the CUDA kernels run.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "det_float.h"
#include "epilogue.h"
#include "epilogue_simd.h"
#include "int_conv.h"

namespace q2k {
namespace det {

namespace {

// The largest output the ops allocate: 2^61 elements (2^63 bytes of float32). Larger is an error that
// names the arguments that make it, before anything is allocated (q2kernels/ops/det_float.py's fakes
// apply the same bound on the meta device, which allocates nothing).
constexpr int64_t kMaxNumel = int64_t{1} << 61;

void check_float(const at::Tensor& t, const char* name, const char* shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, ": expected a float32 ", shape, " tensor, got ",
                   t.scalar_type());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, ": is on ", t.device(), " but ", like_name, " is on ",
                    like.device());
}

// The product of sizes, or an error naming what they are when it exceeds kMaxNumel.
int64_t checked_numel(c10::IntArrayRef sizes, const char* what) {
  int64_t numel = 1;
  for (const int64_t s : sizes) {
    TORCH_CHECK_VALUE(!c10::mul_overflows(numel, s, &numel) && numel <= kMaxNumel, what, ": the output ", sizes,
                      " would have more than 2^61 elements");
  }
  return numel;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// The checked calls (det_float.h).

ConvCall conv2d_call(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                     int64_t act) {
  check_float(x, "x", "(N, C_in, H, W)");
  TORCH_CHECK_VALUE(x.dim() == 4, "x: expected a 4-d (N, C_in, H, W) tensor, got shape ", x.sizes());
  check_float(weight, "weight", "(C_out, C_in/groups, KH, KW)");
  TORCH_CHECK_VALUE(weight.dim() == 4, "weight: expected a 4-d (C_out, C_in/groups, KH, KW) tensor, got shape ",
                    weight.sizes());
  check_same_device(weight, "weight", x, "x");
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK_VALUE(act == kIdentity || act == kReLU || act == kSiLU,
                    "act: expected 0 (identity), 1 (ReLU) or 2 (SiLU), got ", act);
  const int64_t cin = x.size(1), cout = weight.size(0);
  TORCH_CHECK_VALUE(groups >= 1 && groups <= kMaxArg, "groups: expected a value in [1, ", kMaxArg, "], got ", groups);
  TORCH_CHECK_VALUE(cin % groups == 0 && cout % groups == 0, "groups: ", groups,
                    " must divide the input channels (", cin, ", x's dimension 1) and the output channels (", cout,
                    ", weight's dimension 0)");
  TORCH_CHECK_VALUE(weight.size(1) == cin / groups, "weight: expected C_in/groups = ", cin, "/", groups, " = ",
                    cin / groups, " input channels per group (dimension 1), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(2) >= 1 && weight.size(3) >= 1, "weight: expected a kernel of at least 1x1, got shape ",
                    weight.sizes());
  at::Tensor b;
  if (bias.has_value()) {
    check_float(*bias, "bias", "(C_out)");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == cout, "bias: expected shape (", cout,
                      ") (C_out, weight's dimension 0), got ", bias->sizes());
    check_same_device(*bias, "bias", x, "x");
    b = bias->contiguous();
  }
  ConvGeometry g{};
  g.n = x.size(0);
  g.cin = cin;
  g.h = x.size(2);
  g.w = x.size(3);
  g.cout = cout;
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.groups = groups;
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.ho = out_length(g.h, g.kh, g.sh, g.ph, g.dh, "height");
  g.wo = out_length(g.w, g.kw, g.sw, g.pw, g.dw, "width");
  g.act = static_cast<int>(act);
  const std::vector<int64_t> shape{g.n, g.cout, g.ho, g.wo};
  checked_numel(shape, "x, weight, stride, padding, dilation");
  return ConvCall{x.contiguous(), weight.contiguous(), b, g, at::empty(shape, x.options())};
}

MatmulCall matmul_call(const at::Tensor& a, const at::Tensor& b) {
  check_float(a, "a", "(..., M, K)");
  check_float(b, "b", "(..., K, N)");
  TORCH_CHECK_VALUE(a.dim() >= 2, "a: expected a tensor of at least 2 dimensions (..., M, K), got shape ", a.sizes());
  TORCH_CHECK_VALUE(b.dim() == a.dim(), "b: expected ", a.dim(), " dimensions (..., K, N) as a has (no broadcasting), "
                    "got shape ", b.sizes(), " for a of shape ", a.sizes());
  check_same_device(b, "b", a, "a");
  const int64_t d = a.dim();
  TORCH_CHECK_VALUE(a.sizes().slice(0, d - 2) == b.sizes().slice(0, d - 2), "a, b: the leading (batch) dimensions "
                    "must be equal (no broadcasting), got shapes ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.size(d - 1) == b.size(d - 2), "a, b: a's last dimension (K = ", a.size(d - 1),
                    ") must equal b's second to last (", b.size(d - 2), "), got shapes ", a.sizes(), " and ",
                    b.sizes());
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
  shape[d - 1] = b.size(d - 1);
  // The product of the leading dimensions fits int64 where the output is not empty (it divides its
  // numel); an empty output computes nothing.
  const bool empty = checked_numel(shape, "a, b") == 0;
  int64_t batch = 1;
  for (int64_t i = 0; i < d - 2 && !empty; ++i) batch *= a.size(i);
  MatmulCall c{a.contiguous(), b.contiguous(), batch, a.size(d - 2), b.size(d - 1), a.size(d - 1), at::Tensor()};
  c.out = at::empty(shape, a.options());
  return c;
}

SoftmaxCall softmax_call(const at::Tensor& x, int64_t dim) {
  check_float(x, "x", "(any shape)");
  const int64_t nd = x.dim() == 0 ? 1 : x.dim();
  TORCH_CHECK_VALUE(dim >= -nd && dim < nd, "dim: expected a dimension of x in [", -nd, ", ", nd - 1, "] (x has shape ",
                    x.sizes(), "), got ", dim);
  const int64_t d = dim < 0 ? dim + nd : dim;
  SoftmaxCall c{x.contiguous(), 1, 1, 1, at::Tensor()};
  if (x.numel() == 0) {
    c.outer = c.len = c.inner = 0;  // nothing to compute (the other dimensions may be huge)
  } else if (x.dim() > 0) {
    // outer*len*inner = numel, which fits int64.
    for (int64_t i = 0; i < d; ++i) c.outer *= x.size(i);
    c.len = x.size(d);
    for (int64_t i = d + 1; i < x.dim(); ++i) c.inner *= x.size(i);
  }
  c.out = at::empty(x.sizes(), x.options());
  return c;
}

SiluCall silu_call(const at::Tensor& x) {
  check_float(x, "x", "(any shape)");
  return SiluCall{x.contiguous(), at::empty(x.sizes(), x.options())};
}

// ---------------------------------------------------------------------------------------------------
// The CPU kernels.

namespace {

enum class Isa { kReference, kBase, kAvx2, kAvx512 };

#if defined(__x86_64__) && defined(__GNUC__)
#define Q2K_DET_X86 1
bool cpu_has(const char* feature) {
  if (std::strcmp(feature, "avx2") == 0) return __builtin_cpu_supports("avx2");
  if (std::strcmp(feature, "avx512f") == 0) return __builtin_cpu_supports("avx512f");
  return __builtin_cpu_supports("fma");
}
#else
bool cpu_has(const char*) { return false; }
#endif

// Q2K_DET_FLOAT_CPU (file comment), read at every call.
Isa chosen_isa() {
  const char* env = std::getenv("Q2K_DET_FLOAT_CPU");
  const std::string want = env == nullptr ? "" : env;
  const bool avx512 = cpu_has("avx512f"), avx2 = cpu_has("avx2");
  if (want.empty() || want == "auto") return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kBase;
  if (want == "reference") return Isa::kReference;
  if (want == "base") return Isa::kBase;
  if (want == "avx2" || want == "avx512") {
    TORCH_CHECK_VALUE(want == "avx2" ? avx2 : avx512, "Q2K_DET_FLOAT_CPU=", want, ": this CPU has no ",
                      want == "avx2" ? "AVX2" : "AVX-512F");
    return want == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
  }
  TORCH_CHECK_VALUE(false, "Q2K_DET_FLOAT_CPU: expected auto, avx512, avx2, base or reference, got '", want, "'");
}

// Whether epilogue_simd.h's 8-lane functions (AVX2 + FMA) may run for this choice.
bool simd_epilogue(Isa isa) {
#if defined(Q2K_EPILOGUE_AVX2)
  static const bool has = cpu_has("avx2") && cpu_has("fma");
  return has && (isa == Isa::kAvx2 || isa == Isa::kAvx512);
#else
  (void)isa;
  return false;
#endif
}

// ---- The GEMM: C[r, p] = sum over k ascending of A[r, k]*B[k, p], from +0.

template <int L>
struct VecOf;
template <>
struct VecOf<4> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct VecOf<8> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<16> {
  typedef float type __attribute__((vector_size(64)));
};

#define Q2K_DET_INLINE __attribute__((always_inline)) inline

struct Gemm {
  const float* a;  // (rows, k) at row stride lda
  int64_t lda;
  const float* b;  // (k, cols) at row stride ldb
  int64_t ldb;
  float* c;  // (rows, cols) at row stride ldc
  int64_t ldc;
  int64_t rows, cols, k;
};

// One register tile: MR rows x NV vectors of L lanes, every lane one output's sum.
template <int L, int MR, int NV>
Q2K_DET_INLINE void gemm_tile(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                              int64_t k) {
  typedef typename VecOf<L>::type V;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};  // +0 in every lane
  for (int64_t kk = 0; kk < k; ++kk) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) __builtin_memcpy(&bv[v], b + kk * ldb + v * L, sizeof(V));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const float w = a[r * lda + kk];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = acc[r][v] + bv[v] * w;  // mul_rn, then add_rn
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) __builtin_memcpy(c + r * ldc + v * L, &acc[r][v], sizeof(V));
}

// The last rows (fewer than MR) of a column panel.
template <int L, int MR, int NV>
Q2K_DET_INLINE void gemm_rows_tail(int rows, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                                   int64_t ldc, int64_t k) {
  if constexpr (MR <= 1) {
    gemm_tile<L, 1, NV>(a, lda, b, ldb, c, ldc, k);
  } else {
    if (rows == MR)
      gemm_tile<L, MR, NV>(a, lda, b, ldb, c, ldc, k);
    else
      gemm_rows_tail<L, MR - 1, NV>(rows, a, lda, b, ldb, c, ldc, k);
  }
}

// Every row of the column panels of NV vectors from column `col` on, while whole panels fit.
template <int L, int MR, int NV>
Q2K_DET_INLINE int64_t gemm_panels(const Gemm& g, int64_t col) {
  constexpr int64_t kWidth = int64_t{L} * NV;
  for (; col + kWidth <= g.cols; col += kWidth) {
    int64_t r = 0;
    for (; r + MR <= g.rows; r += MR)
      gemm_tile<L, MR, NV>(g.a + r * g.lda, g.lda, g.b + col, g.ldb, g.c + r * g.ldc + col, g.ldc, g.k);
    if (r < g.rows)
      gemm_rows_tail<L, MR - 1, NV>(static_cast<int>(g.rows - r), g.a + r * g.lda, g.lda, g.b + col, g.ldb,
                                    g.c + r * g.ldc + col, g.ldc, g.k);
  }
  return col;
}

template <int L, int MR>
Q2K_DET_INLINE void gemm_run(const Gemm& g) {
  int64_t col = gemm_panels<L, MR, 2>(g, 0);
  col = gemm_panels<L, MR, 1>(g, col);
  for (; col < g.cols; ++col)  // fewer than L columns: one output at a time
    for (int64_t r = 0; r < g.rows; ++r) g.c[r * g.ldc + col] = dot(g.a + r * g.lda, g.b + col, g.k, g.ldb);
}

void gemm_base(const Gemm& g) { gemm_run<4, 4>(g); }

#if defined(Q2K_DET_X86)
// "avx2" without "fma": the compiler has no fused multiply-add to contract into.
__attribute__((target("avx2"))) void gemm_avx2(const Gemm& g) { gemm_run<8, 6>(g); }
__attribute__((target("avx512f"))) void gemm_avx512(const Gemm& g) { gemm_run<16, 8>(g); }
#endif

void gemm(const Gemm& g, Isa isa) {
#if defined(Q2K_DET_X86)
  if (isa == Isa::kAvx512) return gemm_avx512(g);
  if (isa == Isa::kAvx2) return gemm_avx2(g);
#endif
  (void)isa;
  gemm_base(g);
}

// The largest column panel (NV*L) of the GEMMs above: conv tiles are a multiple of it.
constexpr int64_t kMaxPanel = 32;

// ---- Bias and activation of a row of tap sums (conv2d_finish per element).

#if defined(Q2K_EPILOGUE_AVX2)
__attribute__((target("avx2,fma"))) void finish_row_avx2(float* v, int64_t count, const float* bias, int64_t co,
                                                          int act) {
  int64_t i = 0;
  if (bias != nullptr) {
    const __m256 bv = _mm256_set1_ps(bias[co]);
    for (; i + simd::kLanes <= count; i += simd::kLanes)
      _mm256_storeu_ps(v + i, simd::activate(_mm256_add_ps(_mm256_loadu_ps(v + i), bv), act));
  } else {
    for (; i + simd::kLanes <= count; i += simd::kLanes)
      _mm256_storeu_ps(v + i, simd::activate(_mm256_loadu_ps(v + i), act));
  }
  for (; i < count; ++i) v[i] = conv2d_finish(v[i], bias, co, act);
}
#endif

void finish_row(float* v, int64_t count, const float* bias, int64_t co, int act, bool simd) {
  if (bias == nullptr && act == kIdentity) return;
#if defined(Q2K_EPILOGUE_AVX2)
  if (simd) return finish_row_avx2(v, count, bias, co, act);
#endif
  (void)simd;
  for (int64_t i = 0; i < count; ++i) v[i] = conv2d_finish(v[i], bias, co, act);
}

// ---- det_conv2d

// The output columns [lo, hi) of one kernel column j whose input column ow*sw - pw + j*dw lies in the image.
void valid_columns(const ConvGeometry& g, int64_t j, int64_t& lo, int64_t& hi) {
  const int64_t off = j * g.dw - g.pw;
  lo = off >= 0 ? 0 : (-off + g.sw - 1) / g.sw;
  hi = off > g.w - 1 ? 0 : (g.w - 1 - off) / g.sw + 1;
  lo = std::min(lo, g.wo);
  hi = std::max(std::min(hi, g.wo), lo);
}

// B of a tile: for each tap k = (ci*KH + i)*KW + j, the row col[k*ld + t] = x[n, grp*cin_g + ci, ih, iw] of
// the tile's output pixels p0 + t (t < count), 0 where the tap lies outside the image.
//   xg  float32 (cin_g, h, w): the group's input channels of image n
void im2col(const float* xg, const ConvGeometry& g, int64_t cin_g, const std::vector<int64_t>& cols, int64_t p0,
            int64_t count, float* col, int64_t ld) {
  for (int64_t ci = 0; ci < cin_g; ++ci) {
    const float* plane = xg + ci * g.h * g.w;
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        float* dst = col + ((ci * g.kh + i) * g.kw + j) * ld;
        const int64_t lo = cols[2 * j], hi = cols[2 * j + 1], off = j * g.dw - g.pw;
        int64_t oh = p0 / g.wo, ow = p0 % g.wo, t = 0;
        while (t < count) {
          // Output columns [ow, end) of output row oh go to dst[t + o - ow]; the input of column o (when
          // inside the image) is plane[ih*w + o*sw + off], o*sw + off >= 0 for o >= lo.
          const int64_t seg = std::min(g.wo - ow, count - t), end = ow + seg;
          const int64_t ih = oh * g.sh - g.ph + i * g.dh;
          float* d = dst + t;
          if (ih < 0 || ih >= g.h) {
            std::fill(d, d + seg, 0.0f);
          } else {
            const float* row = plane + ih * g.w;
            const int64_t a = std::min(std::max(lo, ow), end), b = std::min(std::max(hi, a), end);
            std::fill(d, d + (a - ow), 0.0f);
            if (g.sw == 1) {
              if (b > a) std::memcpy(d + (a - ow), row + a + off, (b - a) * sizeof(float));
            } else {
              for (int64_t o = a; o < b; ++o) d[o - ow] = row[o * g.sw + off];
            }
            std::fill(d + (b - ow), d + seg, 0.0f);
          }
          t += seg;
          ow = 0;
          ++oh;
        }
      }
    }
  }
}

void conv2d_reference(const ConvCall& c) {
  const float* x = c.x.const_data_ptr<float>();
  const float* w = c.weight.const_data_ptr<float>();
  const float* bias = c.bias.defined() ? c.bias.const_data_ptr<float>() : nullptr;
  float* out = c.out.data_ptr<float>();
  const ConvGeometry g = c.g;
  at::parallel_for(0, c.out.numel(), 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = conv2d_at(x, w, bias, g, i);
  });
}

void conv2d_fast(const ConvCall& c, Isa isa) {
  const ConvGeometry g = c.g;
  const int64_t cin_g = g.cin / g.groups, cout_g = g.cout / g.groups;
  const int64_t k = cin_g * g.kh * g.kw, pixels = g.ho * g.wo;
  const float* x = c.x.const_data_ptr<float>();
  const float* w = c.weight.const_data_ptr<float>();
  const float* bias = c.bias.defined() ? c.bias.const_data_ptr<float>() : nullptr;
  float* out = c.out.data_ptr<float>();
  // B is x itself: every tap of every output is inside the image, and the pixels are x's.
  const bool direct = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
  // Without padding no tap of any output lies outside the image, so no 0 of B is ever read.
  const bool padded = g.ph > 0 || g.pw > 0;
  std::vector<char> finite(g.cout, 1);
  if (padded) {
    for (int64_t co = 0; co < g.cout; ++co)
      for (int64_t t = 0; t < k && finite[co]; ++t) finite[co] = std::isfinite(w[co * k + t]) ? 1 : 0;
  }
  std::vector<int64_t> cols(2 * g.kw);
  for (int64_t j = 0; j < g.kw; ++j) valid_columns(g, j, cols[2 * j], cols[2 * j + 1]);
  // Output pixels per tile: B of about 128 KiB (L2), a multiple of the widest panel; smaller where that
  // leaves fewer than 4 tiles per thread.
  int64_t tile = direct ? 1024 : std::min<int64_t>(4096, std::max<int64_t>(64, (32768 / std::max<int64_t>(k, 1))));
  tile = tile / kMaxPanel * kMaxPanel;
  const int64_t planes = g.n * g.groups;
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  while (tile > 2 * kMaxPanel && planes * ((pixels + tile - 1) / tile) < want) tile = tile / 2 / kMaxPanel * kMaxPanel;
  if (tile >= pixels) tile = pixels;
  const int64_t tiles = (pixels + tile - 1) / tile;
  const bool simd = simd_epilogue(isa);
  at::parallel_for(0, planes * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(direct ? 0 : k * tile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / tiles, n = plane / g.groups, grp = plane % g.groups;
      const int64_t p0 = task % tiles * tile, count = std::min(tile, pixels - p0);
      const float* xg = x + (n * g.cin + grp * cin_g) * g.h * g.w;
      Gemm gm;
      if (direct) {
        gm.b = xg + p0;
        gm.ldb = pixels;
      } else {
        im2col(xg, g, cin_g, cols, p0, count, buffer.data(), tile);
        gm.b = buffer.data();
        gm.ldb = tile;
      }
      gm.lda = k;
      gm.ldc = pixels;
      gm.cols = count;
      gm.k = k;
      // Runs of output channels with finite weights go through the GEMM, the others through conv2d_at.
      for (int64_t r = 0; r < cout_g;) {
        const int64_t co0 = grp * cout_g + r;
        const bool fast = finite[co0] != 0;
        int64_t e = r + 1;
        while (e < cout_g && (finite[grp * cout_g + e] != 0) == fast) ++e;
        float* c0 = out + (n * g.cout + co0) * pixels + p0;
        if (fast) {
          gm.a = w + co0 * k;
          gm.c = c0;
          gm.rows = e - r;
          gemm(gm, isa);
          for (int64_t row = 0; row < e - r; ++row) finish_row(c0 + row * pixels, count, bias, co0 + row, g.act, simd);
        } else {
          for (int64_t row = 0; row < e - r; ++row)
            for (int64_t t = 0; t < count; ++t)
              c0[row * pixels + t] = conv2d_at(x, w, bias, g, (n * g.cout + co0 + row) * pixels + p0 + t);
        }
        r = e;
      }
    }
  });
}

at::Tensor det_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                          int64_t act) {
  const Isa isa = chosen_isa();
  ConvCall c = conv2d_call(x, weight, bias, stride, padding, dilation, groups, act);
  if (c.out.numel() == 0) return c.out;
  if (c.g.cin == 0) {  // no taps (x and weight may have no memory): every output is conv2d_finish(+0)
    const float* b = c.bias.defined() ? c.bias.const_data_ptr<float>() : nullptr;
    float* out = c.out.data_ptr<float>();
    const int64_t pixels = c.g.ho * c.g.wo;
    for (int64_t i = 0; i < c.out.numel(); ++i) out[i] = conv2d_finish(0.0f, b, i / pixels % c.g.cout, c.g.act);
    return c.out;
  }
  if (isa == Isa::kReference)
    conv2d_reference(c);
  else
    conv2d_fast(c, isa);
  return c.out;
}

// ---- det_matmul

at::Tensor det_matmul_cpu(const at::Tensor& a, const at::Tensor& b) {
  const Isa isa = chosen_isa();
  MatmulCall c = matmul_call(a, b);
  if (c.out.numel() == 0) return c.out;
  if (c.k == 0) return c.out.zero_();  // empty sums: +0 (a and b may have no memory)
  const float* ap = c.a.const_data_ptr<float>();
  const float* bp = c.b.const_data_ptr<float>();
  float* out = c.out.data_ptr<float>();
  const int64_t m = c.m, n = c.n, k = c.k;
  if (isa == Isa::kReference) {
    at::parallel_for(0, c.out.numel(), 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) out[i] = matmul_at(ap, bp, m, n, k, i);
    });
    return c.out;
  }
  // Tasks of up to 48 rows x 256 columns of one matrix of the batch.
  constexpr int64_t kRows = 48, kCols = 256;
  const int64_t mt = (m + kRows - 1) / kRows, nt = (n + kCols - 1) / kCols;
  at::parallel_for(0, c.batch * mt * nt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / (mt * nt), r0 = task / nt % mt * kRows, c0 = task % nt * kCols;
      Gemm g;
      g.a = ap + (bi * m + r0) * k;
      g.lda = k;
      g.b = bp + bi * k * n + c0;
      g.ldb = n;
      g.c = out + (bi * m + r0) * n + c0;
      g.ldc = n;
      g.rows = std::min(kRows, m - r0);
      g.cols = std::min(kCols, n - c0);
      g.k = k;
      gemm(g, isa);
    }
  });
  return c.out;
}

// ---- det_softmax

#if defined(Q2K_EPILOGUE_AVX2)
// R contiguous slices (inner == 1) of length len from x and y on: exp and the division 8 lanes at a time;
// the max and the sum in order, the R slices' chains interleaved (independent, so the processor overlaps
// them; each slice's own sequence is the scalar one).
template <int R>
__attribute__((target("avx2,fma"), always_inline)) inline void softmax_rows_avx2(const float* x, float* y,
                                                                                 int64_t len) {
  float m[R], s[R];
  for (int r = 0; r < R; ++r) m[r] = x[r * len];
  for (int64_t i = 1; i < len; ++i)
    for (int r = 0; r < R; ++r) m[r] = softmax_max_step(m[r], x[r * len + i]);
  for (int r = 0; r < R; ++r) {
    const float* xr = x + r * len;
    float* yr = y + r * len;
    const __m256 mv = _mm256_set1_ps(m[r]);
    int64_t i = 0;
    for (; i + simd::kLanes <= len; i += simd::kLanes)
      _mm256_storeu_ps(yr + i, simd::exp_det(_mm256_sub_ps(_mm256_loadu_ps(xr + i), mv)));
    for (; i < len; ++i) yr[i] = exp_det(sub_rn(xr[i], m[r]));
  }
  for (int r = 0; r < R; ++r) s[r] = 0.0f;
  for (int64_t i = 0; i < len; ++i)
    for (int r = 0; r < R; ++r) s[r] = add_rn(s[r], y[r * len + i]);
  for (int r = 0; r < R; ++r) {
    float* yr = y + r * len;
    const __m256 sv = _mm256_set1_ps(s[r]);
    int64_t i = 0;
    for (; i + simd::kLanes <= len; i += simd::kLanes)
      _mm256_storeu_ps(yr + i, _mm256_div_ps(_mm256_loadu_ps(yr + i), sv));
    for (; i < len; ++i) yr[i] = div_rn(yr[i], s[r]);
  }
}

// Slices [begin, end) of a contiguous (slices, len) x: 8 at a time, then one at a time.
__attribute__((target("avx2,fma"))) void softmax_rows_avx2(const float* x, float* y, int64_t len, int64_t begin,
                                                           int64_t end) {
  int64_t o = begin;
  for (; o + 8 <= end; o += 8) softmax_rows_avx2<8>(x + o * len, y + o * len, len);
  for (; o < end; ++o) softmax_rows_avx2<1>(x + o * len, y + o * len, len);
}

// 8 neighbouring slices (inner >= 8): one per lane, every lane the scalar sequence.
__attribute__((target("avx2,fma"))) void softmax_lanes_avx2(const float* x, float* y, int64_t len, int64_t inner) {
  __m256 m = _mm256_loadu_ps(x);
  for (int64_t i = 1; i < len; ++i) {
    const __m256 v = _mm256_loadu_ps(x + i * inner);
    const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    m = _mm256_blendv_ps(m, v, take);
  }
  __m256 s = _mm256_setzero_ps();
  for (int64_t i = 0; i < len; ++i) {
    const __m256 e = simd::exp_det(_mm256_sub_ps(_mm256_loadu_ps(x + i * inner), m));
    _mm256_storeu_ps(y + i * inner, e);
    s = _mm256_add_ps(s, e);
  }
  for (int64_t i = 0; i < len; ++i) _mm256_storeu_ps(y + i * inner, _mm256_div_ps(_mm256_loadu_ps(y + i * inner), s));
}
#endif

at::Tensor det_softmax_cpu(const at::Tensor& x, int64_t dim) {
  const Isa isa = chosen_isa();
  SoftmaxCall c = softmax_call(x, dim);
  if (c.out.numel() == 0) return c.out;
  const float* xp = c.x.const_data_ptr<float>();
  float* yp = c.out.data_ptr<float>();
  const int64_t len = c.len, inner = c.inner;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1));
#if defined(Q2K_EPILOGUE_AVX2)
  if (simd_epilogue(isa)) {
    if (inner == 1) {
      at::parallel_for(0, c.outer, std::max<int64_t>(8, grain),
                       [&](int64_t begin, int64_t end) { softmax_rows_avx2(xp, yp, len, begin, end); });
      return c.out;
    }
    // Groups of 8 neighbouring slices of one outer index; the last < 8 of each one at a time.
    const int64_t groups = (inner + simd::kLanes - 1) / simd::kLanes;
    at::parallel_for(0, c.outer * groups, std::max<int64_t>(1, grain / simd::kLanes), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t o = t / groups, i0 = t % groups * simd::kLanes;
        const int64_t base = o * len * inner + i0;
        if (i0 + simd::kLanes <= inner) {
          softmax_lanes_avx2(xp + base, yp + base, len, inner);
        } else {
          for (int64_t i = 0; i0 + i < inner; ++i) softmax_slice(xp + base + i, yp + base + i, len, inner);
        }
      }
    });
    return c.out;
  }
#endif
  (void)isa;
  at::parallel_for(0, c.outer * inner, grain, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) softmax_at(xp, yp, len, inner, s);
  });
  return c.out;
}

// ---- det_silu

#if defined(Q2K_EPILOGUE_AVX2)
__attribute__((target("avx2,fma"))) void silu_avx2(const float* x, float* y, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + simd::kLanes <= end; i += simd::kLanes) _mm256_storeu_ps(y + i, simd::silu_det(_mm256_loadu_ps(x + i)));
  for (; i < end; ++i) y[i] = silu(x[i]);
}
#endif

at::Tensor det_silu_cpu(const at::Tensor& x) {
  const Isa isa = chosen_isa();
  SiluCall c = silu_call(x);
  const float* xp = c.x.const_data_ptr<float>();
  float* yp = c.out.data_ptr<float>();
  const bool simd = simd_epilogue(isa);
  at::parallel_for(0, c.out.numel(), 4096, [&](int64_t begin, int64_t end) {
#if defined(Q2K_EPILOGUE_AVX2)
    if (simd) return silu_avx2(xp, yp, begin, end);
#endif
    (void)simd;
    for (int64_t i = begin; i < end; ++i) yp[i] = silu(xp[i]);
  });
  return c.out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(q2kernels_int, m) {
  m.def(
      "det_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "int act) -> Tensor");
  m.def("det_matmul(Tensor a, Tensor b) -> Tensor");
  m.def("det_softmax(Tensor x, int dim) -> Tensor");
  m.def("det_silu(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(q2kernels_int, CPU, m) {
  m.impl("det_conv2d", &det_conv2d_cpu);
  m.impl("det_matmul", &det_matmul_cpu);
  m.impl("det_softmax", &det_softmax_cpu);
  m.impl("det_silu", &det_silu_cpu);
}

}  // namespace det
}  // namespace q2k
