// The CUDA integer conv (docs/math.md §7): implicit GEMM on packed 4-bit NHWC codes, int32 accumulation
// on tensor cores, the epilogue of ../epilogue.h fused. One kernel source, two MMA paths.
//
// GEMM view. M = N*H_out*W_out output pixels (rows), N = C_out (columns), K = KH*KW*C_pad codes,
// ordered tap-major: k = (kh*KW + kw)*C_pad + c. The unit of K is a 16-byte chunk = 32 codes of
// one pixel and tap (../format.h pads C to 32 codes for this): chunk kc is tap kc / (C_pad/32),
// channel group kc % (C_pad/32). A row of A at chunk kc is one aligned 16-byte load from the
// input pixel under that tap (zeros outside the image); a column of B is one output channel's
// weight row, (KH, KW, C_pad) codes contiguous: the packed weight format already is B's
// column-major layout, chunk kc at byte 16*kc, so the converter's packing is the only weight
// preparation the kernel needs.
//
// Tiles. A CTA computes BM=128 rows x BN=32*kWarpsN columns (kWarpsN = 1, 2 or 4, chosen from
// C_out so the 32/64-channel layers of YOLO waste no MMA columns) with 2 x kWarpsN warps, each a
// 64 x 32 warp tile = 4 m16 x 4 n8 MMA tiles, 64 int32 accumulators per lane. K advances by
// k-tiles of 4 chunks (128 codes = 2 MMA k-steps of 64); the last k-tile is zero-filled past K, so
// a layer whose K is an odd number of chunks (C_in = 32, 3x3: 9 chunks) wastes at most 3 chunks.
//
// Pipeline. kStages shared-memory stages, filled by cp.async (16 B per thread per row, no
// register staging) kStages-1 k-tiles ahead of the MMAs: the loads of k-tile kt+2 are issued
// right after the barrier that proves every warp finished reading the stage they overwrite
// (k-tile kt-1), before the MMAs of k-tile kt, so they overlap them.
//
// Shared-memory layout of a stage. A: BM rows x 64 B, then B: BN rows x 64 B; chunk c of row r
// sits in slot c ^ ((r/2) % 4) of its row. The 8 rows an ldmatrix phase reads (one chunk column)
// then cover all 32 banks, and the 8 threads of a cp.async phase write one contiguous 128 B.
//
// Fragments (PTX ISA, mma.m16n8k64 .s4 / m16n8k32 .s8; lane = 4*g + t). In bytes both are the
// same: A register a0 = word t of row g of the k-step's first chunk, a1 = row g+8, a2/a3 = the
// second chunk; B b0/b1 = word t of column g, first/second chunk; C c0,c1 = row g, columns 2t,
// 2t+1; c2,c3 = row g+8. So one ldmatrix.x4 yields a 16-row A fragment, or two n8 B fragments.
//
// MMA paths (template parameter, chosen at run time from the device's compute capability).
// - kS4, sm_80/86/89: mma.m16n8k64.s4.s4 on the codes as loaded: one IMMA.16864 per 16x8x64.
//   Unsigned codes (0..15) do not fit s4, so they enter the MMA as q-8 (a nibble XOR with 8) and
//   the epilogue adds the shifts back exactly: with Wsum = the sum of the column's weight codes and
//   Sq = the sum of the row's activation codes (code 0 outside the image and in the zero-filled
//   tail of K), sum (k-8u_w)(q-8u_x) = acc - 8u_x*Wsum - 8u_w*Sq + 64u_x*u_w*K' over the K' codes
//   of the k-tiles; Wsum and Sq are summed in the loop from the same fragments with dp4a.
// - kS8, sm_90: sm_90 has no int4 tensor core (ptxas turns mma.s4 into a called ~180-instruction
//   emulation around two IMMA.16832). Each 4-bit register is unpacked in registers into two s8
//   registers, even nibbles and odd nibbles (sign-extended for signed codes; unsigned codes fit s8
//   as they are), and each m16n8k64 step becomes two m16n8k32 MMAs: A and B are unpacked by the
//   same rule, so the order this gives the k index is the same on both sides and the dot product
//   is unchanged. No shifts, no corrections. The kS8 variant is compiled for sm_90 only (the
//   launcher never runs it elsewhere); the kS4 variant is compiled for every arch, which is how
//   the emulated int4 path of the same source is checked on an H100.
//
// Epilogue, after the K loop: the exact integer sums I and J of ../epilogue.h (Sq from the same
// loop when w_add != 0, J from the weight tap prefix sums over each pixel's valid tap rectangle),
// then the same fp32 operations in the same order as the CPU path (epilogue.h compiled here with
// __f*_rn intrinsics), so codes and floats are bit-identical to it. Each warp passes its m16 tiles'
// accumulators through shared memory so that a lane owns one channel pair in every row: its epilogue
// parameters are loaded once, its stores coalesce, and the per-element code (SiLU, division,
// thresholds) is compiled once instead of once per accumulator register. Packed codes: a channel
// pair is one byte; the CTA's bytes are staged in shared memory and written as 16-byte rows at the
// output's channel offset (concat = write at an offset); an odd last channel keeps the high nibble
// it shares with the next writer's channel.
//
// Sq includes the activations' channel-padding nibbles, which ../format.h keeps at 0.
#pragma once

#include <cstdint>
#include <type_traits>

#include "archs.h"
#include "epilogue.h"
#include "format.h"
#include "params.h"

#if defined(Q2K_CUDA_EMULATION)
#include "emulator.h"  // tests/cuda_emu: the same primitives, on the CPU
#else
#include "primitives.cuh"
#endif

namespace q2k {
namespace cuda {

// Whether this compilation holds the int8-path kernels or empty stubs: the table of archs.h decides
// (mma_path_built). The host pass and the CPU emulator (no __CUDA_ARCH__) see every path.
#if defined(__CUDA_ARCH__)
constexpr bool kS8PathBuilt = mma_path_built(MmaPath::kS8, __CUDA_ARCH__);
#else
constexpr bool kS8PathBuilt = true;
#endif

template <MmaPath kPath_, int kWarpsN_, bool k1x1_>
struct Tile {
  static constexpr MmaPath kPath = kPath_;
  static constexpr bool k1x1 = k1x1_;  // 1x1, stride 1, no padding: A is the input itself
  static constexpr int kWarpsM = 2, kWarpsN = kWarpsN_;
  static constexpr int kMT = 4, kNT = 4;  // m16 and n8 MMA tiles per warp
  static constexpr int kBM = kWarpsM * kMT * 16, kBN = kWarpsN * kNT * 8;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kChunks = 4;  // 16-byte chunks per row of a k-tile
  static constexpr int kRowBytes = kChunks * 16;
  static constexpr int kStages = 3;
  static constexpr int kStageBytes = (kBM + kBN) * kRowBytes;
  static constexpr int kLoadRowStep = kThreads / kChunks;  // rows between one thread's copies
  static constexpr int kARows = kBM / kLoadRowStep, kBRows = kBN / kLoadRowStep;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  // Epilogue staging, in the pipeline's shared memory once the K loop is done: the CTA's packed
  // codes (rows of kOutPitch bytes: 16-B aligned for the copy-out, skewed across banks) and one
  // slice per warp of a m16 tile's accumulators (rows of kSlicePitch words: the 4 rows a
  // half-warp writes land in distinct banks), its rows' Sq and their valid tap rectangles; then the
  // next quantizer's thresholds (at most 15).
  static constexpr int kOutPitch = kBN / 2 + 16;
  static constexpr int kSlicePitch = kNT * 8 + 8;
  static constexpr int kSliceWords = 16 * kSlicePitch + 32;
  static constexpr int kEpilogueBytes = kBM * kOutPitch + (kWarpsM * kWarpsN * kSliceWords + 16) * 4;
  static_assert(kEpilogueBytes <= kSmemBytes, "the epilogue staging fits the pipeline's shared memory");
  static_assert(kBN % kLoadRowStep == 0 && kBM % kLoadRowStep == 0, "whole rows per thread");
};

// Calls f(Tile<...>{}) for the tile a problem runs with: the MMA path, the widest N tile the
// output channels fill, and the 1x1 GEMM specialisation.
template <class F>
void with_tile(const ConvParams& p, F&& f) {
  const bool gemm = p.kh == 1 && p.kw == 1 && p.sh == 1 && p.sw == 1 && p.ph == 0 && p.pw == 0;
  const int wn = p.cout <= 32 ? 1 : p.cout <= 64 ? 2 : 4;
  auto by_width = [&](auto path, auto is_gemm) {
    constexpr MmaPath kP = decltype(path)::value;
    constexpr bool kG = decltype(is_gemm)::value;
    if (wn == 1) f(Tile<kP, 1, kG>{});
    else if (wn == 2) f(Tile<kP, 2, kG>{});
    else f(Tile<kP, 4, kG>{});
  };
  auto by_gemm = [&](auto path) {
    if (gemm) by_width(path, std::true_type{});
    else by_width(path, std::false_type{});
  };
  if (p.path == MmaPath::kS4) by_gemm(std::integral_constant<MmaPath, MmaPath::kS4>{});
  else by_gemm(std::integral_constant<MmaPath, MmaPath::kS8>{});
}

// Byte offset of chunk c of row r in a stage's A or B tile.
template <class T>
Q2K_DEV int tile_offset(int r, int c) {
  return r * T::kRowBytes + ((c ^ ((r >> 1) & 3)) << 4);
}

// The 4 even (low) or odd (high) nibbles of v as bytes, sign-extended where sext = 0x08080808
// (b | 0xF0 for b >= 8: the product sets the high nibble and never carries into the next byte).
Q2K_DEV uint32_t low_nibbles(uint32_t v, uint32_t sext) {
  const uint32_t b = v & 0x0F0F0F0Fu;
  return b | ((b & sext) * 0x1Eu);
}

Q2K_DEV uint32_t high_nibbles(uint32_t v, uint32_t sext) { return low_nibbles(v >> 4, sext); }

// acc + the sum of the 8 codes of v.
Q2K_DEV int nibble_sum(uint32_t v, uint32_t sext, int acc) {
  return dp4a(low_nibbles(v, sext), 0x01010101u, dp4a(high_nibbles(v, sext), 0x01010101u, acc));
}

// What a lane needs of its two output channels n, n+1 in the epilogue, loaded once: their epilogue
// rows (as a (kEpilogueRows, 2) table: epilogue.h reads it with ld = 2), and J over all taps, the
// value of every pixel whose taps are all inside the image.
struct ChannelPair {
  int n;
  bool two;  // n + 1 < cout
  float ep[kEpilogueRows * 2];
  int32_t j_full[2];
};

// The epilogue of output pixel m, channels n and n+1, from their accumulators, the pixel's Sq and
// its valid tap rectangle (bytes kh0, kh1, kw0, kw1; J is over it). The same operations in the same
// order as the CPU path (epilogue.h). Packed codes go to *code_byte (shared memory), everything
// else straight to the output.
Q2K_DEV void epilogue_pair(const ConvParams& p, const ChannelPair& cp, int64_t m, int32_t acc0, int32_t acc1,
                           int32_t sq, uint32_t rect, bool full_rect, const float* thresholds, uint8_t* code_byte) {
  const int n = cp.n;
  const bool two = cp.two;
  const int64_t at = m * p.out_pitch + p.c_offset + n;
  const int elem_bytes = p.out_kind == OutKind::kHalf ? 2 : 4;
  const bool pair_store = two && ((p.out_pitch | p.c_offset) & 1) == 0 &&
                          (reinterpret_cast<uintptr_t>(p.out) & static_cast<uintptr_t>(2 * elem_bytes - 1)) == 0;
  if (p.out_kind == OutKind::kAcc) {
    int32_t* dst = static_cast<int32_t*>(p.out) + at;
    if (pair_store) {
      *reinterpret_cast<int2*>(dst) = make_int2(acc0, acc1);
    } else {
      dst[0] = acc0;
      if (two) dst[1] = acc1;
    }
    return;
  }
  const int64_t kh0 = rect & 0xFF, kh1 = (rect >> 8) & 0xFF, kw0 = (rect >> 16) & 0xFF, kw1 = (rect >> 24) & 0xFF;
  const int ts_stride = (p.kh + 1) * (p.kw + 1);
  auto value = [&](int e, int32_t a) {
    const int32_t I = weighted_acc(a, sq, p.w_mul, p.w_add);
    const int32_t* ts = p.tap_sums + static_cast<int64_t>(n + e) * ts_stride;
    const int32_t J = p.tap_sums == nullptr ? 0
                      : full_rect           ? cp.j_full[e]
                                            : zero_point_taps(ts, p.kw, kh0, kh1, kw0, kw1, p.w_mul, p.w_add, p.cin);
    return epilogue_value(cp.ep, 2, e, I, J, p.act);
  };
  const float z0 = value(0, acc0);
  const float z1 = two ? value(1, acc1) : 0.0f;
  if (p.out_kind == OutKind::kPacked) {
    const int nthr = p.qp - p.qn;
    const int32_t c0 = epilogue_code(z0, cp.ep, 2, 0, thresholds, nthr, p.qn, p.qp);
    const int32_t c1 = two ? epilogue_code(z1, cp.ep, 2, 1, thresholds, nthr, p.qn, p.qp) : 0;
    *code_byte = pack_pair(c0, c1);
  } else if (p.out_kind == OutKind::kFloat) {
    float* dst = static_cast<float*>(p.out) + at;
    if (pair_store) {
      *reinterpret_cast<float2*>(dst) = make_float2(z0, z1);
    } else {
      dst[0] = z0;
      if (two) dst[1] = z1;
    }
  } else {
    uint16_t* dst = static_cast<uint16_t*>(p.out) + at;
    if (pair_store) {
      *reinterpret_cast<uint32_t*>(dst) = f32_to_f16_bits(z0) | (static_cast<uint32_t>(f32_to_f16_bits(z1)) << 16);
    } else {
      dst[0] = f32_to_f16_bits(z0);
      if (two) dst[1] = f32_to_f16_bits(z1);
    }
  }
}

// Where a thread sits in its CTA. Warp (wm, wn) of the kWarpsM x kWarpsN warp grid owns the 64 x 32
// warp tile at rows wm*64, columns wn*32 of the CTA tile; lane = 4g + t indexes its MMA fragments.
struct ThreadCoords {
  int tid, lane, warp;  // threadIdx.x, tid % 32, tid / 32
  int g, t;    // the fragments' row group (0..7) and thread in the group (0..3)
  int wm, wn;  // the warp's row and column in the warp grid
};

template <class T>
Q2K_DEV ThreadCoords thread_coords() {
  ThreadCoords th;
  th.tid = threadIdx.x;
  th.lane = th.tid & 31;
  th.warp = th.tid >> 5;
  th.g = th.lane >> 2;
  th.t = th.lane & 3;
  th.wm = th.warp % T::kWarpsM;
  th.wn = th.warp / T::kWarpsM;
  return th;
}

// The CTA's tile of the GEMM and the extent of its K loop, the same for every thread of the CTA.
// The grid is M-tiles x N-tiles, the N tiles of one M tile adjacent in blockIdx.x (they share A).
struct CtaTile {
  int64_t M;             // GEMM rows: output pixels N*H_out*W_out
  int64_t m_base;        // first row of this CTA's tile (kBM rows)
  int n_base;            // first output channel of this CTA's tile (kBN columns)
  int chunks_per_pixel;  // 16-byte chunks of one input pixel: C_pad/32
  int k_chunks;          // K in chunks: KH*KW*chunks_per_pixel
  int k_tiles;           // k-tiles of kChunks chunks, the last one zero-filled past k_chunks
  int64_t w_row_bytes;   // bytes of one output channel's weight row (a column of B): 16*k_chunks
};

template <class T>
Q2K_DEV CtaTile cta_tile(const ConvParams& p) {  // p: the problem; the CTA is blockIdx.x
  CtaTile cta;
  cta.M = static_cast<int64_t>(p.n) * p.out_h * p.out_w;
  const int n_tiles = (p.cout + T::kBN - 1) / T::kBN;
  cta.m_base = static_cast<int64_t>(blockIdx.x / n_tiles) * T::kBM;
  cta.n_base = static_cast<int>(blockIdx.x % n_tiles) * T::kBN;
  cta.chunks_per_pixel = p.cb / 16;
  cta.k_chunks = p.kh * p.kw * cta.chunks_per_pixel;
  cta.k_tiles = (cta.k_chunks + T::kChunks - 1) / T::kChunks;
  cta.w_row_bytes = static_cast<int64_t>(cta.k_chunks) * 16;
  return cta;
}

// How the codes' signedness enters the K loop and the fix-up (see the top of the file).
struct CodeSigns {
  uint32_t x_sext, w_sext;    // 0x08080808 where the codes are signed (low_nibbles' sext), else 0
  uint32_t x_shift, w_shift;  // 0x88888888 where the codes are unsigned: the -8 of the s4 MMA, as a XOR
  bool need_sq;               // sum Sq: for the kS4 fix-up of unsigned weights, or the epilogue's w_add
  bool need_wsum;             // sum Wsum: for the kS4 fix-up of unsigned activations
};

template <class T>
Q2K_DEV CodeSigns code_signs(const ConvParams& p) {  // p: the problem (x_signed, w_signed, w_add)
  constexpr bool kS4 = T::kPath == MmaPath::kS4;
  CodeSigns s;
  s.x_sext = p.x_signed ? 0x08080808u : 0u;
  s.w_sext = p.w_signed ? 0x08080808u : 0u;
  s.x_shift = p.x_signed ? 0u : 0x88888888u;
  s.w_shift = p.w_signed ? 0u : 0x88888888u;
  s.need_sq = (kS4 && !p.w_signed) || p.w_add != 0;
  s.need_wsum = kS4 && !p.x_signed;
  return s;
}

// Where the A rows one thread copies read their taps (rows ld_row + j*kLoadRowStep of the CTA
// tile, j < kARows): computed once, so the addresses of a k-tile are a few adds. ld_row and ld_col
// stay scalars of conv_tile: kept in this struct, they changed the SASS (tests/cuda_sass_report.py).
template <class T>
struct ARows {
  int pix[T::kARows];  // k1x1: the row's input pixel (-1 past M); else the first pixel of its image
  int ih[T::kARows];   // not k1x1: input row of tap (0, 0), far below 0 past M (every tap reads zeros)
  int iw[T::kARows];   // not k1x1: input column of tap (0, 0)
};

template <class T>
Q2K_DEV ARows<T> a_rows(const ConvParams& p,  // the problem
                        const CtaTile& cta,   // this CTA's tile
                        int ld_row) {         // this thread's first row
  ARows<T> rows;
#pragma unroll
  for (int j = 0; j < T::kARows; ++j) {
    const int64_t m = cta.m_base + ld_row + j * T::kLoadRowStep;
    const bool in = m < cta.M;
    if constexpr (T::k1x1) {
      rows.pix[j] = in ? static_cast<int>(m) : -1;
    } else {
      const int64_t hw = static_cast<int64_t>(p.out_h) * p.out_w;
      const int img = static_cast<int>(m / hw);
      const int pix = static_cast<int>(m - img * hw);
      const int oh = pix / p.out_w, ow = pix - oh * p.out_w;
      rows.pix[j] = img * p.in_h * p.in_w;
      rows.ih[j] = in ? oh * p.sh - p.ph : -(1 << 30);
      rows.iw[j] = ow * p.sw - p.pw;
    }
  }
  return rows;
}

// Main loop, loads: issues this thread's cp.async copies of k-tile kt into one pipeline stage. An
// A row's chunk is 16 bytes of the input pixel under the chunk's tap (zeros outside the image, past
// M or past K); a B row's chunk is 16 bytes of an output channel's weight row (zeros past C_out or
// past K). The copies land at a later cp_async_wait; main_loop orders them against the MMAs.
template <class T>
Q2K_DEV void load_ktile(const ConvParams& p,        // the problem
                        const CtaTile& cta,          // this CTA's tile and K extent
                        int ld_col, int ld_row,      // this thread's chunk column and first row
                        const ARows<T>& rows,        // where its A rows read (a_rows)
                        uint8_t* stage,              // the stage: A (kBM x kRowBytes), then B (kBN x kRowBytes)
                        int kt) {                    // the k-tile: chunks kt*kChunks .. kt*kChunks + kChunks-1
  uint8_t* sA = stage;
  uint8_t* sB = sA + T::kBM * T::kRowBytes;
  const int kc = kt * T::kChunks + ld_col;
  const bool k_in = kc < cta.k_chunks;
  if constexpr (T::k1x1) {
#pragma unroll
    for (int j = 0; j < T::kARows; ++j) {
      const bool ok = k_in && rows.pix[j] >= 0;
      const uint8_t* src = p.x + static_cast<int64_t>(rows.pix[j]) * p.cb + kc * 16;
      cp_async_16(sA + tile_offset<T>(ld_row + j * T::kLoadRowStep, ld_col), ok ? src : p.x, ok);
    }
  } else {
    const int tap = kc / cta.chunks_per_pixel;
    const int group = kc - tap * cta.chunks_per_pixel;
    const int r = tap / p.kw;
    const int dy = r * p.dh, dx = (tap - r * p.kw) * p.dw;
#pragma unroll
    for (int j = 0; j < T::kARows; ++j) {
      const int ih = rows.ih[j] + dy, iw = rows.iw[j] + dx;
      const bool ok = k_in && static_cast<unsigned>(ih) < static_cast<unsigned>(p.in_h) &&
                      static_cast<unsigned>(iw) < static_cast<unsigned>(p.in_w);
      const int64_t pixel = static_cast<int64_t>(rows.pix[j]) + static_cast<int64_t>(ih) * p.in_w + iw;
      const uint8_t* src = p.x + pixel * p.cb + group * 16;
      cp_async_16(sA + tile_offset<T>(ld_row + j * T::kLoadRowStep, ld_col), ok ? src : p.x, ok);
    }
  }
#pragma unroll
  for (int j = 0; j < T::kBRows; ++j) {
    const int n = cta.n_base + ld_row + j * T::kLoadRowStep;
    const bool ok = k_in && n < p.cout;
    const uint8_t* src = p.w + n * cta.w_row_bytes + kc * 16;
    cp_async_16(sB + tile_offset<T>(ld_row + j * T::kLoadRowStep, ld_col), ok ? src : p.w, ok);
  }
}

// Main loop, MMAs: the warp's 64 x 32 tile of one landed k-tile, 2 k-steps of 64 codes. Per k-step:
// ldmatrix of 4 A fragments (m16) and 4 B fragments (n8); the partial Sq / Wsum of this lane's codes
// (dp4a over nibbles) where the fix-up or the epilogue needs them; then 16 MMAs, kS4 on the codes
// shifted by -8 where unsigned, kS8 as 32 MMAs on the nibbles unpacked to bytes.
template <class T>
Q2K_DEV void mma_ktile(const uint8_t* stage,              // the stage holding the k-tile (load_ktile's layout)
                       const ThreadCoords& th,            // this thread's warp and lane
                       const CodeSigns& s,                // sign handling of the codes
                       int (&acc)[T::kMT][T::kNT][4],     // accumulators: m16 tile i, n8 tile j, c0..c3
                       int (&sq)[T::kMT][2],              // partial Sq of rows g, g+8 of each m16 tile
                       int (&ws)[T::kNT]) {               // partial Wsum of column g of each n8 tile
  constexpr bool kS4 = T::kPath == MmaPath::kS4;
  const int lane = th.lane;
  const uint8_t* sA = stage + th.wm * (T::kMT * 16) * T::kRowBytes;
  const uint8_t* sB = stage + (T::kBM + th.wn * (T::kNT * 8)) * T::kRowBytes;
#pragma unroll
  for (int ks = 0; ks < T::kChunks / 2; ++ks) {
    uint32_t a[T::kMT][4], b[T::kNT][2];
#pragma unroll
    for (int i = 0; i < T::kMT; ++i)
      ldmatrix_x4(a[i], sA + tile_offset<T>(i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * ks + (lane >> 4)));
#pragma unroll
    for (int j = 0; j < T::kNT; j += 2) {
      uint32_t r[4];
      ldmatrix_x4(r, sB + tile_offset<T>(j * 8 + (lane & 7) + (lane >> 4) * 8, 2 * ks + ((lane >> 3) & 1)));
      b[j][0] = r[0];
      b[j][1] = r[1];
      b[j + 1][0] = r[2];
      b[j + 1][1] = r[3];
    }
    if (s.need_sq) {
#pragma unroll
      for (int i = 0; i < T::kMT; ++i) {
        sq[i][0] = nibble_sum(a[i][2], s.x_sext, nibble_sum(a[i][0], s.x_sext, sq[i][0]));
        sq[i][1] = nibble_sum(a[i][3], s.x_sext, nibble_sum(a[i][1], s.x_sext, sq[i][1]));
      }
    }
    if constexpr (kS4) {
      if (s.need_wsum) {
#pragma unroll
        for (int j = 0; j < T::kNT; ++j) ws[j] = nibble_sum(b[j][1], s.w_sext, nibble_sum(b[j][0], s.w_sext, ws[j]));
      }
#pragma unroll
      for (int j = 0; j < T::kNT; ++j) {
        b[j][0] ^= s.w_shift;
        b[j][1] ^= s.w_shift;
      }
#pragma unroll
      for (int i = 0; i < T::kMT; ++i) {
#pragma unroll
        for (int q = 0; q < 4; ++q) a[i][q] ^= s.x_shift;
#pragma unroll
        for (int j = 0; j < T::kNT; ++j) mma_s4(acc[i][j], a[i], b[j]);
      }
    } else {
      uint32_t bl[T::kNT][2], bh[T::kNT][2];
#pragma unroll
      for (int j = 0; j < T::kNT; ++j) {
        bl[j][0] = low_nibbles(b[j][0], s.w_sext);
        bl[j][1] = high_nibbles(b[j][0], s.w_sext);
        bh[j][0] = low_nibbles(b[j][1], s.w_sext);
        bh[j][1] = high_nibbles(b[j][1], s.w_sext);
      }
#pragma unroll
      for (int i = 0; i < T::kMT; ++i) {
        const uint32_t al[4] = {low_nibbles(a[i][0], s.x_sext), low_nibbles(a[i][1], s.x_sext),
                                high_nibbles(a[i][0], s.x_sext), high_nibbles(a[i][1], s.x_sext)};
        const uint32_t ah[4] = {low_nibbles(a[i][2], s.x_sext), low_nibbles(a[i][3], s.x_sext),
                                high_nibbles(a[i][2], s.x_sext), high_nibbles(a[i][3], s.x_sext)};
#pragma unroll
        for (int j = 0; j < T::kNT; ++j) {
          mma_s8(acc[i][j], al, bl[j]);
          mma_s8(acc[i][j], ah, bh[j]);
        }
      }
    }
  }
}

// Stage 1, the main loop: the K loop of the CTA tile through the kStages-deep cp.async pipeline
// (see the top of the file). Every iteration commits one group, empty past the last k-tile, so
// wait<kStages-2> always means "k-tile kt has landed"; the barrier after it also proves that every
// warp is done with the stage the next loads overwrite (k-tile kt-1's). Ends with every copy landed
// and every warp past its last ldmatrix, so the epilogue may reuse the shared memory.
template <class T>
Q2K_DEV void main_loop(const ConvParams& p,               // the problem
                       const CtaTile& cta,                // this CTA's tile and K extent
                       const ThreadCoords& th,            // this thread
                       int ld_col, int ld_row,            // this thread's chunk column and first row to copy
                       const ARows<T>& rows,              // where its A rows read (a_rows)
                       const CodeSigns& s,                // sign handling of the codes
                       uint8_t* smem,                     // the pipeline's kStages stages of kStageBytes
                       int (&acc)[T::kMT][T::kNT][4],     // accumulators, zero on entry
                       int (&sq)[T::kMT][2],              // partial Sq, zero on entry
                       int (&ws)[T::kNT]) {               // partial Wsum, zero on entry
#pragma unroll
  for (int kt = 0; kt < T::kStages - 1; ++kt) {
    if (kt < cta.k_tiles) load_ktile<T>(p, cta, ld_col, ld_row, rows, smem + kt * T::kStageBytes, kt);
    cp_async_commit();
  }
  for (int kt = 0; kt < cta.k_tiles; ++kt) {
    cp_async_wait<T::kStages - 2>();
    block_sync();
    const int next = kt + T::kStages - 1;
    if (next < cta.k_tiles) {
      load_ktile<T>(p, cta, ld_col, ld_row, rows, smem + (next % T::kStages) * T::kStageBytes, next);
    }
    cp_async_commit();
    mma_ktile<T>(smem + (kt % T::kStages) * T::kStageBytes, th, s, acc, sq, ws);
  }
  cp_async_wait<0>();
  block_sync();
}

// Stage 2, the row sums: Sq of rows g and g+8 of each m16 tile, summed over the 4 lanes (t) that
// split their k, so every lane of a row group holds the whole sum (the fix-up and the epilogue read it).
template <class T>
Q2K_DEV void reduce_row_sums(bool need_sq,             // whether the main loop summed Sq
                             int (&sq)[T::kMT][2]) {   // in: this lane's partial Sq; out: the row's Sq
  if (need_sq) {
#pragma unroll
    for (int i = 0; i < T::kMT; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        sq[i][h] += static_cast<int>(shfl_xor(static_cast<uint32_t>(sq[i][h]), 1));
        sq[i][h] += static_cast<int>(shfl_xor(static_cast<uint32_t>(sq[i][h]), 2));
      }
    }
  }
}

// Stage 3 (kS4 only), the unsigned fix-up: undoes the -8 shifts under which unsigned codes entered
// the s4 MMA, acc += 8u_x*Wsum + 8u_w*Sq - 64u_x*u_w*K', exact in int32 (see the top of the file).
// Wsum of column g is summed over its 4 lanes and then fetched for this lane's columns 2t, 2t+1.
template <class T>
Q2K_DEV void unsigned_fixup(const ConvParams& p,               // the problem (the codes' signedness)
                            int k_tiles,                       // k-tiles run: K' = k_tiles*kChunks*32 codes
                            int t,                             // this lane's thread in its group
                            const CodeSigns& s,                // which sums the main loop took
                            int (&acc)[T::kMT][T::kNT][4],     // accumulators, fixed in place
                            const int (&sq)[T::kMT][2],        // Sq of rows g, g+8 (reduce_row_sums)
                            int (&ws)[T::kNT]) {               // in: this lane's partial Wsum; out: column g's
  int wcol[T::kNT][2] = {};
  if (s.need_wsum) {
#pragma unroll
    for (int j = 0; j < T::kNT; ++j) {
      ws[j] += static_cast<int>(shfl_xor(static_cast<uint32_t>(ws[j]), 1));
      ws[j] += static_cast<int>(shfl_xor(static_cast<uint32_t>(ws[j]), 2));
      // Lane 4*c holds column c's sum; this lane's accumulators are columns 2t and 2t+1.
      wcol[j][0] = static_cast<int>(shfl_idx(static_cast<uint32_t>(ws[j]), 8 * t));
      wcol[j][1] = static_cast<int>(shfl_idx(static_cast<uint32_t>(ws[j]), 8 * t + 4));
    }
  }
  const int k_codes = k_tiles * T::kChunks * 32;
  const int both = (!p.x_signed && !p.w_signed) ? 64 * k_codes : 0;
#pragma unroll
  for (int i = 0; i < T::kMT; ++i) {
#pragma unroll
    for (int j = 0; j < T::kNT; ++j) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int shift_x = s.need_wsum ? 8 * wcol[j][c & 1] : 0;
        const int shift_w = p.w_signed ? 0 : 8 * sq[i][c >> 1];
        acc[i][j][c] += shift_x + shift_w - both;
      }
    }
  }
}

// Stage 4, the epilogue, one m16 tile of the warp at a time: its accumulators, the Sq of its 16 rows
// and their valid tap rectangles go to the warp's shared-memory slice; then lane l takes channels
// 2(l%16), 2(l%16)+1 of the warp tile in rows l/16, l/16 + 2, ... (coalesced stores; the per-element
// code exists once, its channel parameters are loaded once). Floats and accumulators go straight to
// the output; packed codes are staged in shared memory for store_packed. Reuses the pipeline's
// shared memory: main_loop must have ended (its last barrier).
template <class T>
Q2K_DEV void epilogue(const ConvParams& p,                  // the problem
                      const CtaTile& cta,                   // this CTA's tile
                      const ThreadCoords& th,               // this thread
                      uint8_t* smem,                        // the epilogue staging (Tile's kEpilogueBytes)
                      const int (&acc)[T::kMT][T::kNT][4],  // accumulators, fixed up
                      const int (&sq)[T::kMT][2]) {         // Sq of rows g, g+8 of each m16 tile
  static_assert(T::kNT * 8 == 32, "a lane's channel pair is the same in every row");
  const int lane = th.lane, g = th.g, t = th.t;
  uint8_t* staged = smem;  // packed codes of the CTA tile, (kBM, kOutPitch) bytes
  int32_t* slice = reinterpret_cast<int32_t*>(smem + T::kBM * T::kOutPitch) + th.warp * T::kSliceWords;
  float* thresholds = reinterpret_cast<float*>(smem + T::kBM * T::kOutPitch) + T::kWarpsM * T::kWarpsN * T::kSliceWords;
  const int64_t row0 = cta.m_base + th.wm * (T::kMT * 16);
  // This lane's channel pair: its epilogue rows (zeros past C_out, none for raw accumulators) and J
  // over all taps.
  ChannelPair cp;
  cp.n = cta.n_base + th.wn * (T::kNT * 8) + 2 * (lane % 16);
  cp.two = cp.n + 1 < p.cout;
  const bool has_channel = cp.n < p.cout;
  const bool rects = !T::k1x1 && p.tap_sums != nullptr;
  const uint32_t full_rect = static_cast<uint32_t>(p.kh) << 8 | static_cast<uint32_t>(p.kw) << 24;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const bool in = e == 0 ? has_channel : cp.two;
#pragma unroll
    for (int row = 0; row < kEpilogueRows; ++row)
      cp.ep[row * 2 + e] =
          in && p.out_kind != OutKind::kAcc ? p.epilogue[static_cast<int64_t>(row) * p.cout + cp.n + e] : 0.0f;
    cp.j_full[e] = in && p.tap_sums != nullptr
                       ? zero_point_taps(p.tap_sums + static_cast<int64_t>(cp.n + e) * (p.kh + 1) * (p.kw + 1), p.kw,
                                         0, p.kh, 0, p.kw, p.w_mul, p.w_add, p.cin)
                       : 0;
  }
  const bool use_thresholds = p.thresholds != nullptr && p.out_kind == OutKind::kPacked;
  if (use_thresholds && th.tid < p.qp - p.qn) thresholds[th.tid] = p.thresholds[th.tid];
  block_sync();
#pragma unroll
  for (int i = 0; i < T::kMT; ++i) {
    warp_sync();
#pragma unroll
    for (int j = 0; j < T::kNT; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        *reinterpret_cast<int2*>(slice + (h * 8 + g) * T::kSlicePitch + j * 8 + 2 * t) =
            make_int2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
      }
    }
    if (t == 0) {
      slice[16 * T::kSlicePitch + g] = sq[i][0];
      slice[16 * T::kSlicePitch + 8 + g] = sq[i][1];
    }
    if (rects && lane < 16) {
      // The valid tap rectangle of output pixel row0 + i*16 + lane, in 4 bytes.
      const int64_t pix = (row0 + i * 16 + lane) % (static_cast<int64_t>(p.out_h) * p.out_w);
      int64_t kh0, kh1, kw0, kw1;
      valid_taps(pix / p.out_w, p.sh, p.ph, p.dh, p.kh, p.in_h, kh0, kh1);
      valid_taps(pix % p.out_w, p.sw, p.pw, p.dw, p.kw, p.in_w, kw0, kw1);
      reinterpret_cast<uint32_t*>(slice)[16 * T::kSlicePitch + 16 + lane] =
          static_cast<uint32_t>(kh0 | (kh1 << 8) | (kw0 << 16) | (kw1 << 24));
    }
    warp_sync();
    if (!has_channel) continue;
    const int c = 2 * (lane % 16);
#pragma unroll 1
    for (int r = lane / 16; r < 16; r += 2) {
      const int64_t m = row0 + i * 16 + r;
      if (m >= cta.M) break;
      const int32_t* src = slice + r * T::kSlicePitch + c;
      const uint32_t rect = rects ? reinterpret_cast<const uint32_t*>(slice)[16 * T::kSlicePitch + 16 + r] : full_rect;
      epilogue_pair(p, cp, m, src[0], src[1], slice[16 * T::kSlicePitch + r], rect, rect == full_rect,
                    use_thresholds ? thresholds : nullptr,
                    staged + (m - cta.m_base) * T::kOutPitch + (cp.n - cta.n_base) / 2);
    }
  }
}

// Stage 5 (packed codes only), the store: the codes the epilogue staged -> the output rows, from
// byte (c_offset + n_base)/2 of each: 16-byte stores where aligned, bytes elsewhere; an odd channel
// count leaves the high nibble of its last byte alone (it belongs to the next writer's channel).
template <class T>
Q2K_DEV void store_packed(const ConvParams& p,     // the problem (out, out_pitch, c_offset)
                          const CtaTile& cta,      // this CTA's tile
                          int tid,                 // this thread
                          const uint8_t* staged) { // the codes the epilogue staged, (kBM, kOutPitch) bytes
  block_sync();
  const int channels = p.cout - cta.n_base < T::kBN ? p.cout - cta.n_base : T::kBN;
  const int full = channels / 2, row_bytes = (channels + 1) / 2;
  constexpr int kRowChunks = T::kBN / 32;
  for (int idx = tid; idx < T::kBM * kRowChunks; idx += T::kThreads) {
    const int r = idx / kRowChunks, b0 = (idx % kRowChunks) * 16;
    const int64_t m = cta.m_base + r;
    if (m >= cta.M || b0 >= row_bytes) continue;
    const uint8_t* src = staged + r * T::kOutPitch + b0;
    uint8_t* dst = static_cast<uint8_t*>(p.out) + m * p.out_pitch + (p.c_offset + cta.n_base) / 2 + b0;
    if (b0 + 16 <= full && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      continue;
    }
    const int end = b0 + 16 < row_bytes ? 16 : row_bytes - b0;
    for (int b = 0; b < end; ++b) {
      dst[b] = b0 + b < full ? src[b] : static_cast<uint8_t>((dst[b] & 0xF0) | (src[b] & 0x0F));
    }
  }
}

// One CTA tile of the conv, stage by stage: the K loop into int32 accumulators, the row sums, the
// fix-up of unsigned codes (kS4), the epilogue, and the copy-out of packed codes.
template <class T>
Q2K_DEV void conv_tile(const ConvParams& p) {
  uint8_t* smem = shared_memory();
  const ThreadCoords th = thread_coords<T>();
  const CtaTile cta = cta_tile<T>(p);
  // This thread copies chunk column ld_col of rows ld_row + j*kLoadRowStep of A and B.
  const int ld_col = th.tid % T::kChunks, ld_row = th.tid / T::kChunks;
  const ARows<T> rows = a_rows<T>(p, cta, ld_row);
  const CodeSigns s = code_signs<T>(p);
  int acc[T::kMT][T::kNT][4] = {};
  int sq[T::kMT][2] = {};
  int ws[T::kNT] = {};
  main_loop<T>(p, cta, th, ld_col, ld_row, rows, s, smem, acc, sq, ws);
  reduce_row_sums<T>(s.need_sq, sq);
  if constexpr (T::kPath == MmaPath::kS4) unsigned_fixup<T>(p, cta.k_tiles, th.t, s, acc, sq, ws);
  epilogue<T>(p, cta, th, smem, acc, sq);
  if (p.out_kind == OutKind::kPacked) store_packed<T>(p, cta, th.tid, smem);
}

template <class T>
__global__ void __launch_bounds__(T::kThreads) int_conv_kernel(const ConvParams p) {
  if constexpr (T::kPath == MmaPath::kS4 || kS8PathBuilt) conv_tile<T>(p);
}

}  // namespace cuda
}  // namespace q2k
