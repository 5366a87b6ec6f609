"""Fused gated fusion + LayerNorm over channels (GABFusion / Q-GBFusion, MATH.md section 5).

Eagerly this is mul, mul, cat, permute, layer_norm, permute: several full passes and copies, and the
branch gradient energies cost more passes. Here:

Forward: one program owns BLOCK_P pixels of one image and holds every branch's [BLOCK_P, C_k] tile in
registers: each branch is read once, the per-pixel mean and rstd are reduced from the registers, the
normalised output is written once, and (mean, rstd) are saved in fp32 per pixel.

Backward: a persistent grid; each program walks pixel blocks, reads the branches and dy once,
recomputes xhat from the saved statistics, writes each branch's dx, and accumulates dgamma, dbeta
(per channel), the gate grads da_k = sum(dh_k*x_k) and the branch energies E_k = sum(dx_k^2) in fp32
registers. Each program stores one row of partials; a torch column sum over the programs is the
deterministic second stage (no atomics, no host sync).

Layout: a branch is addressed by (batch, channel, pixel) strides, pixel = h*W + w, so NCHW (pixels
contiguous, the channel reduction strided by H*W), channels_last (a pixel's channels contiguous) and
channel slices of a larger tensor are all read in place. Triton specialises a stride of 1, which is
what lets it vectorise along whichever axis is contiguous. The output takes the first branch's
memory format.

Branches: K = 2..MAX_BRANCHES, one pointer and stride set per branch, K a tl.constexpr. Concat rows
may be ragged (512+256): each branch's tile is padded to its own power of two, so 512+256 = 768 needs
no padding at all. Sum fusion needs equal C_k.

Block sizes are a rule (pick_blocks), checked for spills on sm_90 but not yet tuned on a GPU: the
whole row of BLOCK_P pixels lives in registers, so BLOCK_P shrinks as C grows (C = 768: 16 pixels
forward, 4 backward), which in NCHW shortens the contiguous run per channel; and C beyond a few
thousand channels spills.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..gate_controller import GateController

MAX_BRANCHES = 4

# Elements of the [BLOCK_P, row] tile a program holds (forward: x; backward: x and dy), and the
# warps that hold it. Divided by the padded row length the tile gives BLOCK_P (at most MAX_BLOCK_P,
# at least 1). Chosen from the sm_90 compile (ptxas, no GPU): the forward keeps ~32 fp32 values of
# the tile per thread at 16 warps in under 100 registers; the backward, with about six tiles live
# (x, dy, xhat, g, dh, dx), fits ~16 values per thread in the 255 registers of 8 warps without
# spilling, where 16 warps (128 registers each) spill. Throughput is for the GPU benchmark to
# tune (benchmarks/bench_fusion.py --sweep).
FWD_TILE, FWD_WARPS = 16384, 16
BWD_TILE, BWD_WARPS = 4096, 8
MAX_BLOCK_P = 128
# Backward programs per SM: enough to fill an H100 with a few resident programs each while keeping
# the partial rows (one fp32 per program and channel) a fraction of a percent of the traffic.
PROGRAMS_PER_SM = 4
# Without CUDA (the interpreter) a few programs, so each one walks several pixel blocks.
CPU_PROGRAMS = 4


@triton.jit
def _load_tile(X, b, hw, pmask, c_off, Ck, sB, sC, sP, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """fp32 [BLOCK_P, BLOCK_C] tile of channels c_off .. c_off+Ck of pixels hw of image b, and its
    mask. Masked lanes read 0, which adds 0 to every sum."""
    c = tl.arange(0, BLOCK_C)
    mask = pmask[:, None] & (c < Ck)[None, :]
    cc = c_off + c
    if INT64:
        cc = cc.to(tl.int64)
    offs = b * sB + hw[:, None] * sP + cc[None, :] * sC
    return tl.load(X + offs, mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def _store_tile(X, v, mask, b, hw, c_off, sB, sC, sP, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    cc = c_off + tl.arange(0, BLOCK_C)
    if INT64:
        cc = cc.to(tl.int64)
    offs = b * sB + hw[:, None] * sP + cc[None, :] * sC
    tl.store(X + offs, v.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _channel_vec(P, c_off, Ck, BLOCK_C: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    return tl.load(P + c_off + c, mask=c < Ck, other=0.0)[None, :]


@triton.jit
def _pixel_block(blk, N_HW_BLOCKS, HW, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
    """(image b, pixel indices hw, their mask) of pixel block `blk`."""
    b = blk // N_HW_BLOCKS
    hw = (blk % N_HW_BLOCKS) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = hw < HW
    if INT64:
        b = b.to(tl.int64)
        hw = hw.to(tl.int64)
    return b, hw, pmask


@triton.jit
def _normalise_store(Y, d, mask, rstd, GAMMA, BETA, c_off, Ck, b, hw, syb, syc, syp,
                     BLOCK_C: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                     INT64: tl.constexpr):
    """y = (h - mu)*rstd*gamma + beta for one branch's channels, in the reference's order."""
    y = d * rstd[:, None]
    if HAS_GAMMA:
        y = y * _channel_vec(GAMMA, c_off, Ck, BLOCK_C)
    if HAS_BETA:
        y = y + _channel_vec(BETA, c_off, Ck, BLOCK_C)
    _store_tile(Y, y, mask, b, hw, c_off, syb, syc, syp, BLOCK_C, INT64)


@triton.jit
def _gated_fusion_fwd_kernel(
        X0, X1, X2, X3, Y, MEAN, RSTD, GATES, GAMMA, BETA,
        C0, C1, C2, C3, Cf, HW, N_HW_BLOCKS, eps,
        sb0, sc0, sp0, sb1, sc1, sp1, sb2, sc2, sp2, sb3, sc3, sp3, syb, syc, syp,
        K: tl.constexpr, CONCAT: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
        BLOCK_P: tl.constexpr, BC0: tl.constexpr, BC1: tl.constexpr, BC2: tl.constexpr,
        BC3: tl.constexpr, INT64: tl.constexpr):
    b, hw, pmask = _pixel_block(tl.program_id(0), N_HW_BLOCKS, HW, BLOCK_P, INT64)
    x0, m0 = _load_tile(X0, b, hw, pmask, 0, C0, sb0, sc0, sp0, BC0, INT64)
    x1, m1 = _load_tile(X1, b, hw, pmask, 0, C1, sb1, sc1, sp1, BC1, INT64)
    h0 = tl.load(GATES) * x0
    h1 = tl.load(GATES + 1) * x1
    if K >= 3:
        x2, m2 = _load_tile(X2, b, hw, pmask, 0, C2, sb2, sc2, sp2, BC2, INT64)
        h2 = tl.load(GATES + 2) * x2
    if K >= 4:
        x3, m3 = _load_tile(X3, b, hw, pmask, 0, C3, sb3, sc3, sp3, BC3, INT64)
        h3 = tl.load(GATES + 3) * x3

    if CONCAT:
        s = tl.sum(h0, axis=1) + tl.sum(h1, axis=1)
        if K >= 3:
            s += tl.sum(h2, axis=1)
        if K >= 4:
            s += tl.sum(h3, axis=1)
        mu = tl.math.div_rn(s, Cf)
        # Padded channels must not count in the variance: (0 - mu)^2 is not 0.
        d0 = tl.where(m0, h0 - mu[:, None], 0.0)
        d1 = tl.where(m1, h1 - mu[:, None], 0.0)
        v = tl.sum(d0 * d0, axis=1) + tl.sum(d1 * d1, axis=1)
        if K >= 3:
            d2 = tl.where(m2, h2 - mu[:, None], 0.0)
            v += tl.sum(d2 * d2, axis=1)
        if K >= 4:
            d3 = tl.where(m3, h3 - mu[:, None], 0.0)
            v += tl.sum(d3 * d3, axis=1)
    else:
        h = h0 + h1
        if K >= 3:
            h = h + h2
        if K >= 4:
            h = h + h3
        mu = tl.math.div_rn(tl.sum(h, axis=1), Cf)
        d0 = tl.where(m0, h - mu[:, None], 0.0)
        v = tl.sum(d0 * d0, axis=1)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(v, Cf) + eps))
    stat = b * HW + hw
    tl.store(MEAN + stat, mu, mask=pmask)
    tl.store(RSTD + stat, rstd, mask=pmask)

    _normalise_store(Y, d0, m0, rstd, GAMMA, BETA, 0, C0, b, hw, syb, syc, syp,
                     BC0, HAS_GAMMA, HAS_BETA, INT64)
    if CONCAT:
        _normalise_store(Y, d1, m1, rstd, GAMMA, BETA, C0, C1, b, hw, syb, syc, syp,
                         BC1, HAS_GAMMA, HAS_BETA, INT64)
        if K >= 3:
            _normalise_store(Y, d2, m2, rstd, GAMMA, BETA, C0 + C1, C2, b, hw, syb, syc, syp,
                             BC2, HAS_GAMMA, HAS_BETA, INT64)
        if K >= 4:
            _normalise_store(Y, d3, m3, rstd, GAMMA, BETA, C0 + C1 + C2, C3, b, hw, syb, syc, syp,
                             BC3, HAS_GAMMA, HAS_BETA, INT64)


@triton.jit
def _xhat_g(h, mask, dy, mu, rstd, GAMMA, c_off, Ck, BLOCK_C: tl.constexpr, HAS_GAMMA: tl.constexpr):
    """xhat (0 on padded lanes) and g = dy*gamma of one tile."""
    xhat = tl.where(mask, (h - mu[:, None]) * rstd[:, None], 0.0)
    if HAS_GAMMA:
        g = dy * _channel_vec(GAMMA, c_off, Ck, BLOCK_C)
    else:
        g = dy
    return xhat, g


@triton.jit
def _dh(xhat, g, mask, rstd, c1, c2):
    """LayerNorm input grad: rstd*(g - mean(g) - xhat*mean(g*xhat))."""
    return tl.where(mask, rstd[:, None] * (g - c2[:, None] - xhat * c1[:, None]), 0.0)


@triton.jit
def _branch_dx(DX, dh, x, mask, a, b, hw, sdb, sdc, sdp, da_acc, e_acc,
               BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """dx_k = a_k*dh_k, stored; returns the per-pixel accumulators of da_k and E_k."""
    dx = a * dh
    _store_tile(DX, dx, mask, b, hw, 0, sdb, sdc, sdp, BLOCK_C, INT64)
    return da_acc + tl.sum(dh * x, axis=1), e_acc + tl.sum(dx * dx, axis=1)


@triton.jit
def _store_partials(DGAMMA_PART, DBETA_PART, row, c_off, Ck, dgamma, dbeta,
                    BLOCK_C: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    if HAS_GAMMA:
        tl.store(DGAMMA_PART + row + c_off + c, dgamma, mask=c < Ck)
    if HAS_BETA:
        tl.store(DBETA_PART + row + c_off + c, dbeta, mask=c < Ck)


@triton.jit
def _gated_fusion_bwd_kernel(
        X0, X1, X2, X3, DX0, DX1, DX2, DX3, DY, MEAN, RSTD, GATES, GAMMA,
        DGAMMA_PART, DBETA_PART, DA_PART, E_PART,
        C0, C1, C2, C3, C, Cf, HW, N_HW_BLOCKS, N_BLOCKS,
        sb0, sc0, sp0, sb1, sc1, sp1, sb2, sc2, sp2, sb3, sc3, sp3,
        tb0, tc0, tp0, tb1, tc1, tp1, tb2, tc2, tp2, tb3, tc3, tp3, syb, syc, syp,
        K: tl.constexpr, CONCAT: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
        BLOCK_P: tl.constexpr, BC0: tl.constexpr, BC1: tl.constexpr, BC2: tl.constexpr,
        BC3: tl.constexpr, INT64: tl.constexpr):
    pid = tl.program_id(0)
    a0 = tl.load(GATES)
    a1 = tl.load(GATES + 1)
    da0 = tl.zeros([BLOCK_P], tl.float32)
    da1 = tl.zeros([BLOCK_P], tl.float32)
    e0 = tl.zeros([BLOCK_P], tl.float32)
    e1 = tl.zeros([BLOCK_P], tl.float32)
    dgam0 = tl.zeros([BC0], tl.float32)
    dbet0 = tl.zeros([BC0], tl.float32)
    if K >= 3:
        a2 = tl.load(GATES + 2)
        da2 = tl.zeros([BLOCK_P], tl.float32)
        e2 = tl.zeros([BLOCK_P], tl.float32)
    if K >= 4:
        a3 = tl.load(GATES + 3)
        da3 = tl.zeros([BLOCK_P], tl.float32)
        e3 = tl.zeros([BLOCK_P], tl.float32)
    if CONCAT:
        dgam1 = tl.zeros([BC1], tl.float32)
        dbet1 = tl.zeros([BC1], tl.float32)
        if K >= 3:
            dgam2 = tl.zeros([BC2], tl.float32)
            dbet2 = tl.zeros([BC2], tl.float32)
        if K >= 4:
            dgam3 = tl.zeros([BC3], tl.float32)
            dbet3 = tl.zeros([BC3], tl.float32)

    for blk in range(pid, N_BLOCKS, tl.num_programs(0)):
        b, hw, pmask = _pixel_block(blk, N_HW_BLOCKS, HW, BLOCK_P, INT64)
        stat = b * HW + hw
        mu = tl.load(MEAN + stat, mask=pmask, other=0.0)
        rstd = tl.load(RSTD + stat, mask=pmask, other=0.0)
        x0, m0 = _load_tile(X0, b, hw, pmask, 0, C0, sb0, sc0, sp0, BC0, INT64)
        x1, m1 = _load_tile(X1, b, hw, pmask, 0, C1, sb1, sc1, sp1, BC1, INT64)
        if K >= 3:
            x2, m2 = _load_tile(X2, b, hw, pmask, 0, C2, sb2, sc2, sp2, BC2, INT64)
        if K >= 4:
            x3, m3 = _load_tile(X3, b, hw, pmask, 0, C3, sb3, sc3, sp3, BC3, INT64)
        if CONCAT:
            dy0, _ = _load_tile(DY, b, hw, pmask, 0, C0, syb, syc, syp, BC0, INT64)
            dy1, _ = _load_tile(DY, b, hw, pmask, C0, C1, syb, syc, syp, BC1, INT64)
            xh0, g0 = _xhat_g(a0 * x0, m0, dy0, mu, rstd, GAMMA, 0, C0, BC0, HAS_GAMMA)
            xh1, g1 = _xhat_g(a1 * x1, m1, dy1, mu, rstd, GAMMA, C0, C1, BC1, HAS_GAMMA)
            c1 = tl.sum(g0 * xh0, axis=1) + tl.sum(g1 * xh1, axis=1)
            c2 = tl.sum(g0, axis=1) + tl.sum(g1, axis=1)
            if K >= 3:
                dy2, _ = _load_tile(DY, b, hw, pmask, C0 + C1, C2, syb, syc, syp, BC2, INT64)
                xh2, g2 = _xhat_g(a2 * x2, m2, dy2, mu, rstd, GAMMA, C0 + C1, C2, BC2, HAS_GAMMA)
                c1 += tl.sum(g2 * xh2, axis=1)
                c2 += tl.sum(g2, axis=1)
            if K >= 4:
                dy3, _ = _load_tile(DY, b, hw, pmask, C0 + C1 + C2, C3, syb, syc, syp, BC3, INT64)
                xh3, g3 = _xhat_g(a3 * x3, m3, dy3, mu, rstd, GAMMA, C0 + C1 + C2, C3, BC3, HAS_GAMMA)
                c1 += tl.sum(g3 * xh3, axis=1)
                c2 += tl.sum(g3, axis=1)
            c1 = tl.math.div_rn(c1, Cf)
            c2 = tl.math.div_rn(c2, Cf)
            dh0 = _dh(xh0, g0, m0, rstd, c1, c2)
            dh1 = _dh(xh1, g1, m1, rstd, c1, c2)
            dgam0 += tl.sum(dy0 * xh0, axis=0)
            dbet0 += tl.sum(dy0, axis=0)
            dgam1 += tl.sum(dy1 * xh1, axis=0)
            dbet1 += tl.sum(dy1, axis=0)
            if K >= 3:
                dh2 = _dh(xh2, g2, m2, rstd, c1, c2)
                dgam2 += tl.sum(dy2 * xh2, axis=0)
                dbet2 += tl.sum(dy2, axis=0)
            if K >= 4:
                dh3 = _dh(xh3, g3, m3, rstd, c1, c2)
                dgam3 += tl.sum(dy3 * xh3, axis=0)
                dbet3 += tl.sum(dy3, axis=0)
        else:
            dy, _ = _load_tile(DY, b, hw, pmask, 0, C0, syb, syc, syp, BC0, INT64)
            h = a0 * x0 + a1 * x1
            if K >= 3:
                h = h + a2 * x2
            if K >= 4:
                h = h + a3 * x3
            xh, g = _xhat_g(h, m0, dy, mu, rstd, GAMMA, 0, C0, BC0, HAS_GAMMA)
            c1 = tl.math.div_rn(tl.sum(g * xh, axis=1), Cf)
            c2 = tl.math.div_rn(tl.sum(g, axis=1), Cf)
            dh0 = _dh(xh, g, m0, rstd, c1, c2)
            dh1 = dh0
            if K >= 3:
                dh2 = dh0
            if K >= 4:
                dh3 = dh0
            dgam0 += tl.sum(dy * xh, axis=0)
            dbet0 += tl.sum(dy, axis=0)
        da0, e0 = _branch_dx(DX0, dh0, x0, m0, a0, b, hw, tb0, tc0, tp0, da0, e0, BC0, INT64)
        da1, e1 = _branch_dx(DX1, dh1, x1, m1, a1, b, hw, tb1, tc1, tp1, da1, e1, BC1, INT64)
        if K >= 3:
            da2, e2 = _branch_dx(DX2, dh2, x2, m2, a2, b, hw, tb2, tc2, tp2, da2, e2, BC2, INT64)
        if K >= 4:
            da3, e3 = _branch_dx(DX3, dh3, x3, m3, a3, b, hw, tb3, tc3, tp3, da3, e3, BC3, INT64)

    tl.store(DA_PART + pid * K, tl.sum(da0, axis=0))
    tl.store(DA_PART + pid * K + 1, tl.sum(da1, axis=0))
    tl.store(E_PART + pid * K, tl.sum(e0, axis=0))
    tl.store(E_PART + pid * K + 1, tl.sum(e1, axis=0))
    if K >= 3:
        tl.store(DA_PART + pid * K + 2, tl.sum(da2, axis=0))
        tl.store(E_PART + pid * K + 2, tl.sum(e2, axis=0))
    if K >= 4:
        tl.store(DA_PART + pid * K + 3, tl.sum(da3, axis=0))
        tl.store(E_PART + pid * K + 3, tl.sum(e3, axis=0))
    row = pid * C
    _store_partials(DGAMMA_PART, DBETA_PART, row, 0, C0, dgam0, dbet0, BC0, HAS_GAMMA, HAS_BETA)
    if CONCAT:
        _store_partials(DGAMMA_PART, DBETA_PART, row, C0, C1, dgam1, dbet1, BC1, HAS_GAMMA, HAS_BETA)
        if K >= 3:
            _store_partials(DGAMMA_PART, DBETA_PART, row, C0 + C1, C2, dgam2, dbet2, BC2,
                            HAS_GAMMA, HAS_BETA)
        if K >= 4:
            _store_partials(DGAMMA_PART, DBETA_PART, row, C0 + C1 + C2, C3, dgam3, dbet3, BC3,
                            HAS_GAMMA, HAS_BETA)


# --------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------

def pixel_stride(x: torch.Tensor) -> Optional[int]:
    """Stride between consecutive pixels h*W + w of x (B, C, H, W), or None when H and W do not
    merge into one strided axis (then the launch makes x contiguous)."""
    H, W = x.shape[2], x.shape[3]
    if W == 1:
        return x.stride(2)
    if H == 1 or x.stride(2) == W * x.stride(3):
        return x.stride(3)
    return None


def _walkable(x: torch.Tensor) -> torch.Tensor:
    return x if pixel_stride(x) is not None else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), pixel_stride(x)


def _max_offset(x: torch.Tensor) -> int:
    return sum((n - 1) * abs(s) for n, s in zip(x.shape, x.stride()) if n > 0)


def output_format(x0: torch.Tensor) -> torch.memory_format:
    """The output takes the first branch's layout: channels_last when its channels are innermost."""
    if x0.size(1) > 1 and x0.size(2) * x0.size(3) > 1 and x0.stride(1) == 1:
        return torch.channels_last
    return torch.contiguous_format


def _prev_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def pick_blocks(channels: list[int], concat: bool, hw: int, tile: int, max_warps: int):
    """(BLOCK_P, [BLOCK_C_k], num_warps): the per-branch padded rows of BLOCK_P pixels fill about
    `tile` elements, spread over up to `max_warps` warps (fewer for small tiles)."""
    bcs = [triton.next_power_of_2(c) for c in channels]
    row = sum(bcs) if concat else bcs[0] * len(channels)
    block_p = max(1, min(MAX_BLOCK_P, triton.next_power_of_2(max(hw, 1)), _prev_pow2(tile // row)))
    num_warps = min(max_warps, max(1, _prev_pow2(block_p * row * max_warps // tile)))
    return block_p, bcs, num_warps


def _or(t, placeholder):
    """A pointer argument the kernel never reads (its HAS_* constexpr is off): any tensor will do."""
    return placeholder if t is None else t


def _pad4(seq, fill):
    return list(seq) + [fill] * (MAX_BRANCHES - len(seq))


def _branch_args(xs: list[torch.Tensor]):
    ptrs = _pad4(xs, xs[0])
    chans = _pad4([x.size(1) for x in xs], 0)
    strides = [s for x in xs for s in _strides(x)] + [0, 0, 0] * (MAX_BRANCHES - len(xs))
    return ptrs, chans, strides


def _check_branch_count(xs):
    if not 2 <= len(xs) <= MAX_BRANCHES:
        raise ValueError(f"xs: the fused kernel takes 2..{MAX_BRANCHES} branches, got {len(xs)}")


def _out_channels(xs, concat: bool) -> int:
    return sum(x.size(1) for x in xs) if concat else xs[0].size(1)


def _empty_outputs(xs, concat: bool):
    x0 = xs[0]
    B, _, H, W = x0.shape
    y = torch.empty((B, _out_channels(xs, concat), H, W), dtype=x0.dtype, device=x0.device,
                    memory_format=output_format(x0))
    stats = torch.empty((B, H, W), dtype=torch.float32, device=x0.device)
    return y, stats, torch.empty_like(stats)


@torch.library.custom_op("q2kernels::gated_fusion", mutates_args=())
def gated_fusion(xs: list[torch.Tensor], gates: torch.Tensor, gamma: Optional[torch.Tensor],
                 beta: Optional[torch.Tensor], concat: bool, eps: float,
                 controller: list[Optional[torch.Tensor]], ema_weight: float, eta: float,
                 group: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) of gated fusion + LayerNorm from the gates a (K fp32). `controller` is empty,
    or GateController.tensors() of a controller that the backward steps (with ema_weight, eta,
    group); the forward does not touch it."""
    _check_branch_count(xs)
    xs = [_walkable(x) for x in xs]
    y, mean, rstd = _empty_outputs(xs, concat)
    B, C, H, W = y.shape
    HW = H * W
    if y.numel() == 0:
        return y, mean, rstd
    ptrs, chans, strides = _branch_args(xs)
    block_p, bcs, num_warps = pick_blocks([x.size(1) for x in xs], concat, HW, FWD_TILE, FWD_WARPS)
    n_hw_blocks = triton.cdiv(HW, block_p)
    int64 = max(_max_offset(t) for t in xs + [y]) > 2**31 - 1
    _gated_fusion_fwd_kernel[(B * n_hw_blocks,)](
        *ptrs, y, mean, rstd, gates, _or(gamma, gates), _or(beta, gates), *chans, float(C), HW, n_hw_blocks, float(eps),
        *strides, *_strides(y),
        K=len(xs), CONCAT=concat, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
        BLOCK_P=block_p, **{f"BC{k}": v for k, v in enumerate(_pad4(bcs, 1))}, INT64=int64,
        num_warps=num_warps)
    return y, mean, rstd


@gated_fusion.register_fake
def _(xs, gates, gamma, beta, concat, eps, controller, ema_weight, eta, group):
    _check_branch_count(xs)
    return _empty_outputs([_walkable(x) for x in xs], concat)


def _num_programs(device: torch.device, n_blocks: int) -> int:
    if device.type == "cuda":
        cap = torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_SM
    else:
        cap = CPU_PROGRAMS
    return max(1, min(n_blocks, cap))


@torch.library.custom_op("q2kernels::gated_fusion_backward", mutates_args=())
def gated_fusion_backward(dy: torch.Tensor, xs: list[torch.Tensor], gates: torch.Tensor,
                          gamma: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                          concat: bool, has_beta: bool
                          ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dxs, dgates, dgamma, dbeta, energies). dgamma / dbeta have 0 elements without gamma / beta.
    dy may have any strides whose pixels merge (autograd can hand an expanded one: it is read in place)."""
    _check_branch_count(xs)
    xs = [_walkable(x) for x in xs]
    dy = _walkable(dy)
    B, C, H, W = dy.shape
    HW = H * W
    K = len(xs)
    dxs = [torch.empty_like(x) for x in xs]
    dev = dy.device
    block_p, bcs, num_warps = pick_blocks([x.size(1) for x in xs], concat, HW, BWD_TILE, BWD_WARPS)
    n_hw_blocks = triton.cdiv(HW, block_p) if HW else 0
    n_blocks = B * n_hw_blocks
    n_prog = _num_programs(dev, n_blocks) if n_blocks else 0
    da_part = torch.empty((n_prog, K), device=dev, dtype=torch.float32)
    e_part = torch.empty((n_prog, K), device=dev, dtype=torch.float32)
    dgamma_part = torch.empty((n_prog, C if gamma is not None else 0), device=dev, dtype=torch.float32)
    dbeta_part = torch.empty((n_prog, C if has_beta else 0), device=dev, dtype=torch.float32)
    if n_prog:
        x_ptrs, chans, x_strides = _branch_args(xs)
        dx_ptrs, _, dx_strides = _branch_args(dxs)
        int64 = max(_max_offset(t) for t in xs + dxs + [dy]) > 2**31 - 1
        _gated_fusion_bwd_kernel[(n_prog,)](
            *x_ptrs, *dx_ptrs, dy, mean, rstd, gates, _or(gamma, gates), dgamma_part, dbeta_part, da_part, e_part,
            *chans, C, float(C), HW, n_hw_blocks, n_blocks, *x_strides, *dx_strides, *_strides(dy),
            K=K, CONCAT=concat, HAS_GAMMA=gamma is not None, HAS_BETA=has_beta,
            BLOCK_P=block_p, **{f"BC{k}": v for k, v in enumerate(_pad4(bcs, 1))}, INT64=int64,
            num_warps=num_warps)
    return dxs, da_part.sum(dim=0), dgamma_part.sum(dim=0), dbeta_part.sum(dim=0), e_part.sum(dim=0)


@gated_fusion_backward.register_fake
def _(dy, xs, gates, gamma, mean, rstd, concat, has_beta):
    _check_branch_count(xs)
    C = dy.size(1)
    f32 = dict(device=dy.device, dtype=torch.float32)
    return ([torch.empty_like(_walkable(x)) for x in xs], torch.empty((len(xs),), **f32),
            torch.empty((C if gamma is not None else 0,), **f32),
            torch.empty((C if has_beta else 0,), **f32), torch.empty((len(xs),), **f32))


def _setup_context(ctx, inputs, output):
    xs, gates, gamma, beta, concat, eps, controller, ema_weight, eta, group = inputs
    _, mean, rstd = output
    ctx.n_branches = len(xs)
    ctx.has_gamma, ctx.has_beta, ctx.concat = gamma is not None, beta is not None, concat
    # The controller's buffers are targets the backward writes, not values it reads: kept on ctx
    # rather than saved, so that backpropagating twice through one forward (retain_graph) is two
    # controller steps instead of a version-counter error.
    ctx.controller = GateController(*controller, ema_weight, eta, group) if controller else None
    ctx.save_for_backward(*xs, gates, mean, rstd, *([gamma] if gamma is not None else []))


def _backward(ctx, dy, _dmean, _drstd):
    saved = list(ctx.saved_tensors)
    K = ctx.n_branches
    xs, (gates, mean, rstd) = saved[:K], saved[K:K + 3]
    gamma = saved[K + 3] if ctx.has_gamma else None
    dxs, dgates, dgamma, dbeta, energies = torch.ops.q2kernels.gated_fusion_backward(
        dy, xs, gates, gamma, mean, rstd, ctx.concat, ctx.has_beta)
    if ctx.controller is not None:
        ctx.controller.step(energies, gates)
    # torch.library matches the grads' structure to the inputs': a list of tensors is one entry per
    # tensor, while a list holding a None is a single (non-differentiable) leaf.
    ctrl = ctx.controller.tensors() if ctx.controller is not None else []
    no_grad_ctrl = [None] * len(ctrl) if all(t is not None for t in ctrl) else None
    return (dxs, dgates, dgamma if ctx.has_gamma else None, dbeta if ctx.has_beta else None,
            None, None, no_grad_ctrl, None, None, None)


gated_fusion.register_autograd(_backward, setup_context=_setup_context)

