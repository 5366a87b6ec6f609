// A lane-level CPU emulator of the CUDA features the integer kernels use, so that the kernels'
// own source (csrc/cuda/*_kernel.cuh, compiled with -DQ2K_CUDA_EMULATION) runs in CI without a GPU.
// It defines the functions of csrc/cuda/primitives.cuh with the semantics of the PTX ISA:
// - every CUDA thread is a fiber (ucontext) of one OS thread; a CTA runs until each fiber exits;
// - block_sync: a fiber waits until every live fiber of the CTA waits there;
// - warp collectives (mma, ldmatrix, shfl, warp_sync): each lane deposits its operands and waits;
//   the 32nd lane computes every lane's result from all operands, as the hardware does, and
//   releases the warp. The fragment layouts of mma.m16n8k64.s4 and m16n8k32.s8 and of ldmatrix
//   are written here from the PTX ISA tables, independently of the kernels;
// - cp.async: a copy lands at cp.async.wait_group (lazy: the latest moment PTX allows, so a missing
//   wait reads stale shared memory) or at issue (eager: the earliest, so a stage overwritten while
//   another warp still reads it shows); its source must lie in a registered global buffer;
// - shared memory starts as garbage (0xA5) in every CTA, so an unwritten read shows.
// A deadlock (a divergent barrier) or a misaligned / out-of-range access throws.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#define __global__
#define __launch_bounds__(...)
#define Q2K_DEV inline

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

struct int2 {
  int x, y;
};
struct float2 {
  float x, y;
};
struct uint4 {
  unsigned x, y, z, w;
};
inline int2 make_int2(int x, int y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

namespace q2k_emu {

enum class Wait { kNone, kBlock, kWarp };
enum class Op { kNone, kMmaS4, kMmaS8, kLdmatrix, kShflXor, kShflIdx, kWarpSync };

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

struct Lane {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  bool done = false;
  Wait wait = Wait::kNone;
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
};

struct WarpState {
  Op op = Op::kNone;
  int arrived = 0;
  uint32_t in[32][10];
  const uint8_t* addr[32];
  uint32_t out[32][4];
};

struct Cta {
  std::vector<Lane> lanes;
  std::vector<WarpState> warps;
  std::vector<uint8_t> smem;
  ucontext_t scheduler;
  int current = -1;
  std::function<void()> body;
  bool lazy = true;
  std::vector<std::pair<const uint8_t*, const uint8_t*>> readable;  // global ranges cp.async may read
  std::exception_ptr error;  // thrown in a fiber, rethrown by the scheduler
};

inline Cta* g_cta = nullptr;
constexpr size_t kStackBytes = 128 * 1024;

[[noreturn]] inline void fail(const std::string& what) {
  throw std::runtime_error("cuda emulator: " + what + " (thread " + std::to_string(threadIdx.x) + ", block " +
                           std::to_string(blockIdx.x) + ")");
}

inline Lane& me() { return g_cta->lanes[g_cta->current]; }

inline void yield() { swapcontext(&me().ctx, &g_cta->scheduler); }

inline void lane_entry() {
  try {
    g_cta->body();
  } catch (...) {
    g_cta->error = std::current_exception();
  }
  me().done = true;
  swapcontext(&me().ctx, &g_cta->scheduler);
}

inline int32_t sext4(uint32_t v) { return static_cast<int32_t>(v << 28) >> 28; }
inline int32_t sext8(uint32_t v) { return static_cast<int32_t>(v << 24) >> 24; }

// D = A*B + C of one warp, from the 32 lanes' registers in[l] = {a0..a3, b0, b1, c0..c3}.
// kBits = 4: m16n8k64 .s4 (8 codes per register); 8: m16n8k32 .s8 (4 per register). Register i of
// A holds row g + 8*(i%2), k = (i/2)*(K/2) + t*(K/8) + e; B register i: column g, k likewise with
// i in place of i/2; C register i: row g + 8*(i/2), column 2t + i%2 (lane = 4g + t).
template <int kBits>
inline void mma(WarpState& w) {
  constexpr int kK = kBits == 4 ? 64 : 32, kPer = 32 / kBits;
  int32_t A[16][kK], B[kK][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
      for (int e = 0; e < kPer; ++e) {
        const uint32_t bits = (w.in[l][i] >> (kBits * e)) & ((1u << kBits) - 1);
        A[g + 8 * (i % 2)][(i / 2) * (kK / 2) + t * kPer + e] = kBits == 4 ? sext4(bits) : sext8(bits);
      }
      C[g + 8 * (i / 2)][2 * t + i % 2] = static_cast<int32_t>(w.in[l][6 + i]);
    }
    for (int i = 0; i < 2; ++i) {
      for (int e = 0; e < kPer; ++e) {
        const uint32_t bits = (w.in[l][4 + i] >> (kBits * e)) & ((1u << kBits) - 1);
        B[i * (kK / 2) + t * kPer + e][g] = kBits == 4 ? sext4(bits) : sext8(bits);
      }
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
      const int r = g + 8 * (i / 2), c = 2 * t + i % 2;
      int64_t s = C[r][c];
      for (int k = 0; k < kK; ++k) s += static_cast<int64_t>(A[r][k]) * B[k][c];
      w.out[l][i] = static_cast<uint32_t>(static_cast<int32_t>(s));
    }
  }
}

inline void check_smem(const void* p, size_t bytes, size_t align, const char* what) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  if (b < g_cta->smem.data() || b + bytes > g_cta->smem.data() + g_cta->smem.size())
    fail(std::string(what) + ": shared-memory address out of range");
  if (reinterpret_cast<uintptr_t>(b) % align != 0) fail(std::string(what) + ": misaligned shared-memory address");
}

// Deposits this lane's operands for op, waits for the warp, and returns its results.
inline const uint32_t* warp_collective(Op op, const uint32_t* in, int n_in, const uint8_t* addr = nullptr) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  WarpState& w = g_cta->warps[threadIdx.x / 32];
  if (w.op != Op::kNone && w.op != op) fail("lanes of a warp reached different collective operations");
  w.op = op;
  for (int i = 0; i < n_in; ++i) w.in[lane][i] = in[i];
  w.addr[lane] = addr;
  if (++w.arrived < 32) {
    me().wait = Wait::kWarp;
    yield();
  } else {
    switch (op) {
      case Op::kMmaS4: mma<4>(w); break;
      case Op::kMmaS8: mma<8>(w); break;
      case Op::kLdmatrix:
        for (int l = 0; l < 32; ++l)
          for (int q = 0; q < 4; ++q) std::memcpy(&w.out[l][q], w.addr[q * 8 + l / 4] + 4 * (l % 4), 4);
        break;
      case Op::kShflXor:
        for (int l = 0; l < 32; ++l) w.out[l][0] = w.in[l ^ static_cast<int>(w.in[l][1])][0];
        break;
      case Op::kShflIdx:
        for (int l = 0; l < 32; ++l) w.out[l][0] = w.in[static_cast<int>(w.in[l][1]) & 31][0];
        break;
      default: break;
    }
    w.op = Op::kNone;
    w.arrived = 0;
    const int first = static_cast<int>(threadIdx.x) & ~31;
    for (int l = 0; l < 32; ++l) g_cta->lanes[first + l].wait = Wait::kNone;
  }
  return w.out[lane];
}

inline void apply(const Copy& c) {
  if (c.valid) std::memcpy(c.dst, c.src, 16);
  else std::memset(c.dst, 0, 16);
}

// Runs `body` as a grid of `blocks` CTAs of `threads` threads, one CTA after the other.
inline void launch(int64_t blocks, int threads, size_t smem_bytes, bool lazy_copies,
                   std::vector<std::pair<const uint8_t*, const uint8_t*>> readable, std::function<void()> body) {
  if (threads % 32 != 0) throw std::runtime_error("cuda emulator: block size must be a multiple of 32");
  Cta cta;
  cta.lanes.resize(threads);
  cta.warps.resize(threads / 32);
  cta.body = std::move(body);
  cta.lazy = lazy_copies;
  cta.readable = std::move(readable);
  for (Lane& l : cta.lanes) l.stack.reset(new char[kStackBytes]);
  Cta* outer = g_cta;
  g_cta = &cta;
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  gridDim = {static_cast<unsigned>(blocks), 1, 1};
  try {
    for (int64_t b = 0; b < blocks; ++b) {
      blockIdx = {static_cast<unsigned>(b), 0, 0};
      cta.smem.assign(smem_bytes, 0xA5);
      for (int i = 0; i < threads; ++i) {
        Lane& l = cta.lanes[i];
        l.done = false;
        l.wait = Wait::kNone;
        l.open.clear();
        l.groups.clear();
        getcontext(&l.ctx);
        l.ctx.uc_stack.ss_sp = l.stack.get();
        l.ctx.uc_stack.ss_size = kStackBytes;
        l.ctx.uc_link = nullptr;
        makecontext(&l.ctx, lane_entry, 0);
      }
      for (;;) {
        bool ran = false, all_done = true, all_at_barrier = true;
        for (int i = 0; i < threads; ++i) {
          Lane& l = cta.lanes[i];
          if (!l.done && l.wait == Wait::kNone) {
            cta.current = i;
            threadIdx = {static_cast<unsigned>(i), 0, 0};
            swapcontext(&cta.scheduler, &l.ctx);
            if (cta.error) std::rethrow_exception(cta.error);
            ran = true;
          }
        }
        for (const Lane& l : cta.lanes) {
          if (l.done) continue;
          all_done = false;
          if (l.wait != Wait::kBlock) all_at_barrier = false;
        }
        if (all_done) break;
        if (all_at_barrier) {
          for (Lane& l : cta.lanes) l.wait = Wait::kNone;
        } else if (!ran) {
          throw std::runtime_error("cuda emulator: deadlock (threads of block " + std::to_string(b) +
                                   " wait at different barriers or collectives)");
        }
      }
    }
  } catch (...) {
    g_cta = outer;
    throw;
  }
  g_cta = outer;
}

}  // namespace q2k_emu

// The functions of csrc/cuda/primitives.cuh.
namespace q2k {
namespace cuda {

inline void mma_s4(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const uint32_t in[10] = {a[0], a[1], a[2], a[3], b[0], b[1], static_cast<uint32_t>(d[0]), static_cast<uint32_t>(d[1]),
                           static_cast<uint32_t>(d[2]), static_cast<uint32_t>(d[3])};
  const uint32_t* out = q2k_emu::warp_collective(q2k_emu::Op::kMmaS4, in, 10);
  for (int i = 0; i < 4; ++i) d[i] = static_cast<int>(out[i]);
}

inline void mma_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const uint32_t in[10] = {a[0], a[1], a[2], a[3], b[0], b[1], static_cast<uint32_t>(d[0]), static_cast<uint32_t>(d[1]),
                           static_cast<uint32_t>(d[2]), static_cast<uint32_t>(d[3])};
  const uint32_t* out = q2k_emu::warp_collective(q2k_emu::Op::kMmaS8, in, 10);
  for (int i = 0; i < 4; ++i) d[i] = static_cast<int>(out[i]);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  q2k_emu::check_smem(row, 16, 16, "ldmatrix");
  const uint32_t* out =
      q2k_emu::warp_collective(q2k_emu::Op::kLdmatrix, nullptr, 0, static_cast<const uint8_t*>(row));
  for (int q = 0; q < 4; ++q) r[q] = out[q];
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
  q2k_emu::check_smem(dst, 16, 16, "cp.async destination");
  if (valid) {
    const uint8_t* s = static_cast<const uint8_t*>(src);
    if (reinterpret_cast<uintptr_t>(s) % 16 != 0) q2k_emu::fail("cp.async: misaligned global source");
    bool in_range = false;
    for (const auto& r : q2k_emu::g_cta->readable) in_range = in_range || (s >= r.first && s + 16 <= r.second);
    if (!in_range) q2k_emu::fail("cp.async: global source outside the kernel's input tensors");
  }
  const q2k_emu::Copy c{dst, src, valid};
  if (q2k_emu::g_cta->lazy) q2k_emu::me().open.push_back(c);
  else q2k_emu::apply(c);
}

inline void cp_async_commit() {
  q2k_emu::Lane& l = q2k_emu::me();
  l.groups.push_back(std::move(l.open));
  l.open.clear();
}

template <int kPending>
inline void cp_async_wait() {
  q2k_emu::Lane& l = q2k_emu::me();
  while (static_cast<int>(l.groups.size()) > kPending) {
    for (const q2k_emu::Copy& c : l.groups.front()) q2k_emu::apply(c);
    l.groups.pop_front();
  }
}

inline void block_sync() {
  q2k_emu::me().wait = q2k_emu::Wait::kBlock;
  q2k_emu::yield();
}

inline void warp_sync() { q2k_emu::warp_collective(q2k_emu::Op::kWarpSync, nullptr, 0); }

inline uint32_t shfl_xor(uint32_t v, int lane_mask) {
  const uint32_t in[2] = {v, static_cast<uint32_t>(lane_mask)};
  return q2k_emu::warp_collective(q2k_emu::Op::kShflXor, in, 2)[0];
}

inline uint32_t shfl_idx(uint32_t v, int src_lane) {
  const uint32_t in[2] = {v, static_cast<uint32_t>(src_lane)};
  return q2k_emu::warp_collective(q2k_emu::Op::kShflIdx, in, 2)[0];
}

inline int dp4a(uint32_t a, uint32_t b, int c) {
  for (int i = 0; i < 4; ++i) c += q2k_emu::sext8(a >> (8 * i)) * q2k_emu::sext8(b >> (8 * i));
  return c;
}

inline uint8_t* shared_memory() { return q2k_emu::g_cta->smem.data(); }

inline uint16_t f32_to_f16_bits(float v) { return c10::Half(v).x; }

inline float f16_bits_to_f32(uint16_t v) { return static_cast<float>(c10::Half(v, c10::Half::from_bits())); }

inline float bf16_bits_to_f32(uint16_t v) {
  return static_cast<float>(c10::BFloat16(v, c10::BFloat16::from_bits()));
}

}  // namespace cuda
}  // namespace q2k
