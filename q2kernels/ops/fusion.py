"""Fused gated fusion + LayerNorm over channels (GABFusion / Q-GBFusion, docs/math.md §5).

Eagerly this is mul, mul, cat, permute, layer_norm, permute: several full passes and copies, and the
branch gradient energies cost more passes. Here:

Forward: one program owns BLOCK_P pixels of one image and holds every branch's [BLOCK_P, C_k] tile in
registers: each branch is read once, the per-pixel mean and rstd are reduced from the registers, the
normalised output is written once, and (mean, rstd) are saved in fp32 per pixel.

Backward: a persistent grid; each program walks pixel blocks, reads the branches and dy once,
recomputes xhat from the saved statistics (phase 1: the per-pixel sums of the LayerNorm backward;
phase 2: dh, then each branch's dx), writes each branch's dx, and accumulates dgamma, dbeta
(per channel), the gate grads da_k = sum(dh_k*x_k) and the branch energies E_k = sum(dx_k^2) in fp32
registers. Each program stores one row of partials; a torch column sum over the programs is the
deterministic second stage (no atomics, no host sync).

Layout: a branch is addressed by (batch, channel, pixel) strides, pixel = h*W + w, so NCHW (pixels
contiguous, the channel reduction strided by H*W), channels_last (a pixel's channels contiguous) and
channel slices of a larger tensor are all read in place. Triton specialises a stride of 1, which is
what lets it vectorise along whichever axis is contiguous. The output takes the first branch's
memory format.

Branches: any K >= 2. The kernels take Triton tuples (one pointer, one stride triple, one channel
count and one padded width per branch) and walk them with tl.static_range, so each K compiles to
its own unrolled specialisation and each branch's pointer keeps its own alignment for vectorised
access. Concat rows may be ragged (512+256): each branch's tile is padded to its own power of two,
so 512+256 = 768 needs no padding at all. Sum fusion needs equal C_k.

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
from ._layout import INT32_LIMIT
from ._triton_utils import cast_to

# Elements of the [BLOCK_P, row] tile a program holds (forward: x; backward: x and dy), and the
# warps that hold it. Divided by the padded row length the tile gives BLOCK_P (at most MAX_BLOCK_P,
# at least 1). Chosen from the sm_90 compile (ptxas, no GPU; benchmarks/sass_fusion.py): the
# forward keeps ~32 fp32 values of the tile per thread at 16 warps; the backward keeps x and dy
# live across its per-pixel reductions (xhat and g are recomputed after them) and fits ~16 values
# per thread in the registers of 8 warps, where 16 warps (128 registers each) spill. Throughput is
# for the GPU benchmark to tune (benchmarks/bench_fusion.py --sweep).
FWD_TILE, FWD_WARPS = 16384, 16
BWD_TILE, BWD_WARPS = 4096, 8
MAX_BLOCK_P = 128
# Backward programs per SM: enough to fill an H100 with a few resident programs each while keeping
# the partial rows (one fp32 per program and channel) a fraction of a percent of the traffic.
PROGRAMS_PER_SM = 4
# Without CUDA (the interpreter) a few programs, so each one walks several pixel blocks.
CPU_PROGRAMS = 4


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
def _tile_offsets(b, hw, c_off, S, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Element offsets [BLOCK_P, BLOCK_C] of channels c_off + (0 .. BLOCK_C) of pixels hw of image
    b in a tensor of (batch, channel, pixel) strides S."""
    cc = c_off + tl.arange(0, BLOCK_C)
    if INT64:
        cc = cc.to(tl.int64)
    return b * S[0] + hw[:, None] * S[2] + cc[None, :] * S[1]


@triton.jit
def _load_tile(X, b, hw, pmask, c_off, Ck, S, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """fp32 [BLOCK_P, BLOCK_C] tile of channels c_off .. c_off+Ck of pixels hw of image b, and its
    mask. Masked lanes read 0, which adds 0 to every sum."""
    mask = pmask[:, None] & (tl.arange(0, BLOCK_C) < Ck)[None, :]
    return tl.load(X + _tile_offsets(b, hw, c_off, S, BLOCK_C, INT64), mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def _store_tile(X, v, mask, b, hw, c_off, S, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Store the fp32 tile v in X's dtype, rounded to nearest even."""
    tl.store(X + _tile_offsets(b, hw, c_off, S, BLOCK_C, INT64), cast_to(v, X.dtype.element_ty), mask=mask)


@triton.jit
def _zeros(n: tl.constexpr):
    """fp32 zeros of length n. A helper, not tl.zeros([BCS[k]]) inline: Triton 3.6 (the GPU image's)
    does not take an element of a constexpr tuple as a shape, but does take it as a constexpr argument."""
    return tl.zeros([n], tl.float32)


@triton.jit
def _channel_vec(P, c_off, Ck, BLOCK_C: tl.constexpr):
    """[1, BLOCK_C] of the per-channel vector P at channels c_off .. c_off+Ck (0 beyond)."""
    c = tl.arange(0, BLOCK_C)
    return tl.load(P + c_off + c, mask=c < Ck, other=0.0)[None, :]


@triton.jit
def _normalise_store(Y, SY, d, mask, rstd, GAMMA, BETA, c_off, Ck, b, hw, BLOCK_C: tl.constexpr,
                     HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, INT64: tl.constexpr):
    """y = (h - mu)*rstd*gamma + beta for one branch's channels (d = h - mu), in the reference's order."""
    y = d * rstd[:, None]
    if HAS_GAMMA:
        y = y * _channel_vec(GAMMA, c_off, Ck, BLOCK_C)
    if HAS_BETA:
        y = y + _channel_vec(BETA, c_off, Ck, BLOCK_C)
    _store_tile(Y, y, mask, b, hw, c_off, SY, BLOCK_C, INT64)


@triton.jit
def _gated_fusion_fwd_kernel(
        XS,           # K pointers: branch k, (B, C_k, H, W) in any layout whose pixels merge
        SX,           # K int triples: (batch, channel, pixel) strides of XS[k], in elements
        CS,           # K ints: C_k
        Y,            # (B, C, H, W) output in the branches' dtype, C = sum C_k (concat) or C_0 (sum)
        SY,           # int triple: (batch, channel, pixel) strides of Y
        MEAN,         # (B*H*W,) fp32 out: per-pixel mean mu of h
        RSTD,         # (B*H*W,) fp32 out: per-pixel 1/sqrt(var + eps)
        GATES,        # (K,) fp32: a = softmax(theta)
        GAMMA,        # (C,) fp32 LayerNorm scale (read when HAS_GAMMA)
        BETA,         # (C,) fp32 LayerNorm shift (read when HAS_BETA)
        Cf,           # C as fp32: the count the mean and the variance divide by
        HW,           # H*W
        N_HW_BLOCKS,  # cdiv(HW, BLOCK_P): pixel blocks per image
        eps,          # LayerNorm eps
        CONCAT: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
        BLOCK_P: tl.constexpr,  # pixels per program
        BCS: tl.constexpr,      # K powers of two: BCS[k] >= C_k, the padded width of branch k's tile
        INT64: tl.constexpr):   # 64-bit offsets (a tensor spans 2^31 elements or more)
    b, hw, pmask = _pixel_block(tl.program_id(0), N_HW_BLOCKS, HW, BLOCK_P, INT64)
    # Read every branch once: h_k = a_k*x_k, [BLOCK_P, BCS[k]] fp32 tiles held in registers.
    hs = ()
    masks = ()
    for k in tl.static_range(len(XS)):
        x, m = _load_tile(XS[k], b, hw, pmask, 0, CS[k], SX[k], BCS[k], INT64)
        hs = hs + (tl.load(GATES + k) * x,)
        masks = masks + (m,)
    # The per-pixel statistics over the fused channels, from the registers; d = h - mu (0 on padding:
    # (0 - mu)^2 must not count in the variance).
    if CONCAT:
        s = tl.sum(hs[0], axis=1)
        for k in tl.static_range(1, len(XS)):
            s += tl.sum(hs[k], axis=1)
        mu = tl.math.div_rn(s, Cf)
        ds = ()
        for k in tl.static_range(len(XS)):
            ds = ds + (tl.where(masks[k], hs[k] - mu[:, None], 0.0),)
        v = tl.sum(ds[0] * ds[0], axis=1)
        for k in tl.static_range(1, len(XS)):
            v += tl.sum(ds[k] * ds[k], axis=1)
    else:
        h = hs[0]
        for k in tl.static_range(1, len(XS)):
            h = h + hs[k]
        mu = tl.math.div_rn(tl.sum(h, axis=1), Cf)
        ds = (tl.where(masks[0], h - mu[:, None], 0.0),)
        v = tl.sum(ds[0] * ds[0], axis=1)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(v, Cf) + eps))
    stat = b * HW + hw
    tl.store(MEAN + stat, mu, mask=pmask)
    tl.store(RSTD + stat, rstd, mask=pmask)
    # Write y once: branch k's channels start at c_off = C_0 + ... + C_{k-1} (concat).
    c_off = 0
    for k in tl.static_range(len(ds)):
        _normalise_store(Y, SY, ds[k], masks[k], rstd, GAMMA, BETA, c_off, CS[k], b, hw, BCS[k],
                         HAS_GAMMA, HAS_BETA, INT64)
        c_off += CS[k]


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
def _branch_dx(DX, SDX, dh, x, mask, a, b, hw, da_acc, e_acc, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """dx_k = a_k*dh_k, stored; returns the per-pixel accumulators of da_k and E_k."""
    dx = a * dh
    _store_tile(DX, dx, mask, b, hw, 0, SDX, BLOCK_C, INT64)
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
        XS,           # K pointers: branch k, (B, C_k, H, W) in any layout whose pixels merge
        SX,           # K int triples: (batch, channel, pixel) strides of XS[k]
        DXS,          # K pointers: dx_k (B, C_k, H, W) out, the branches' dtype
        SDX,          # K int triples: (batch, channel, pixel) strides of DXS[k]
        CS,           # K ints: C_k
        DY,           # (B, C, H, W) grad of y, any strides whose pixels merge
        SY,           # int triple: (batch, channel, pixel) strides of DY
        MEAN,         # (B*H*W,) fp32: the forward's mu
        RSTD,         # (B*H*W,) fp32: the forward's 1/sqrt(var + eps)
        GATES,        # (K,) fp32: a
        GAMMA,        # (C,) fp32 LayerNorm scale (read when HAS_GAMMA)
        DGAMMA_PART,  # (programs, C) fp32 out: this program's sum of dy*xhat (when HAS_GAMMA)
        DBETA_PART,   # (programs, C) fp32 out: this program's sum of dy (when HAS_BETA)
        DA_PART,      # (programs, K) fp32 out: this program's da_k = sum(dh_k*x_k)
        E_PART,       # (programs, K) fp32 out: this program's E_k = sum(dx_k^2)
        C,            # channels of y (a row of the partials)
        Cf,           # C as fp32
        HW,           # H*W
        N_HW_BLOCKS,  # cdiv(HW, BLOCK_P): pixel blocks per image
        N_BLOCKS,     # B*N_HW_BLOCKS: pixel blocks in all, walked by the persistent grid
        CONCAT: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
        BLOCK_P: tl.constexpr,  # pixels per block
        BCS: tl.constexpr,      # K powers of two: BCS[k] >= C_k, the padded width of branch k's tile
        INT64: tl.constexpr):   # 64-bit offsets
    pid = tl.program_id(0)
    K: tl.constexpr = len(XS)
    # fp32 accumulators over this program's pixel blocks: da_k and E_k per pixel row; dgamma and
    # dbeta per channel, one vector per branch (concat) or one for the single sum (sum). Triton
    # tuples are immutable: each pixel block builds the updated tuples (new_*) and rebinds them.
    da = ()
    e = ()
    for k in tl.static_range(K):
        da = da + (tl.zeros([BLOCK_P], tl.float32),)
        e = e + (tl.zeros([BLOCK_P], tl.float32),)
    dgam = ()
    dbet = ()
    for k in tl.static_range(K if CONCAT else 1):
        dgam = dgam + (_zeros(BCS[k]),)
        dbet = dbet + (_zeros(BCS[k]),)

    for blk in range(pid, N_BLOCKS, tl.num_programs(0)):
        b, hw, pmask = _pixel_block(blk, N_HW_BLOCKS, HW, BLOCK_P, INT64)
        stat = b * HW + hw
        mu = tl.load(MEAN + stat, mask=pmask, other=0.0)
        rstd = tl.load(RSTD + stat, mask=pmask, other=0.0)
        # Phase 1: read x_k and dy once; the LayerNorm backward's per-pixel sums
        # c1 = mean_c(g*xhat) and c2 = mean_c(g) (g = dy*gamma, xhat recomputed from mu, rstd),
        # and the per-channel dgamma += dy*xhat, dbeta += dy.
        xs = ()
        masks = ()
        for k in tl.static_range(K):
            x, m = _load_tile(XS[k], b, hw, pmask, 0, CS[k], SX[k], BCS[k], INT64)
            xs = xs + (x,)
            masks = masks + (m,)
        dys = ()
        new_dgam = ()
        new_dbet = ()
        if CONCAT:
            c_off = 0
            for k in tl.static_range(K):
                dy, _ = _load_tile(DY, b, hw, pmask, c_off, CS[k], SY, BCS[k], INT64)
                xh, g = _xhat_g(tl.load(GATES + k) * xs[k], masks[k], dy, mu, rstd, GAMMA, c_off, CS[k], BCS[k],
                                HAS_GAMMA)
                if k == 0:
                    c1 = tl.sum(g * xh, axis=1)
                    c2 = tl.sum(g, axis=1)
                else:
                    c1 += tl.sum(g * xh, axis=1)
                    c2 += tl.sum(g, axis=1)
                new_dgam = new_dgam + (dgam[k] + tl.sum(dy * xh, axis=0),)
                new_dbet = new_dbet + (dbet[k] + tl.sum(dy, axis=0),)
                dys = dys + (dy,)
                c_off += CS[k]
        else:
            dy, _ = _load_tile(DY, b, hw, pmask, 0, CS[0], SY, BCS[0], INT64)
            h = tl.load(GATES) * xs[0]
            for k in tl.static_range(1, K):
                h = h + tl.load(GATES + k) * xs[k]
            xh, g = _xhat_g(h, masks[0], dy, mu, rstd, GAMMA, 0, CS[0], BCS[0], HAS_GAMMA)
            c1 = tl.sum(g * xh, axis=1)
            c2 = tl.sum(g, axis=1)
            new_dgam = (dgam[0] + tl.sum(dy * xh, axis=0),)
            new_dbet = (dbet[0] + tl.sum(dy, axis=0),)
        dgam = new_dgam
        dbet = new_dbet
        c1 = tl.math.div_rn(c1, Cf)
        c2 = tl.math.div_rn(c2, Cf)
        if not CONCAT:  # one dh, shared by every branch
            dh = _dh(xh, g, masks[0], rstd, c1, c2)
        # Phase 2: dh_k = rstd*(g - c2 - xhat*c1) (concat: xhat and g recomputed from x_k and dy,
        # so only x_k and dy stay live across the reductions above), dx_k = a_k*dh_k written once,
        # and the per-pixel da_k += sum(dh_k*x_k), E_k += sum(dx_k^2).
        new_da = ()
        new_e = ()
        c_off = 0
        for k in tl.static_range(K):
            a = tl.load(GATES + k)
            if CONCAT:
                xh, g = _xhat_g(a * xs[k], masks[k], dys[k], mu, rstd, GAMMA, c_off, CS[k], BCS[k], HAS_GAMMA)
                dh = _dh(xh, g, masks[k], rstd, c1, c2)
                c_off += CS[k]
            dak, ek = _branch_dx(DXS[k], SDX[k], dh, xs[k], masks[k], a, b, hw, da[k], e[k], BCS[k], INT64)
            new_da = new_da + (dak,)
            new_e = new_e + (ek,)
        da = new_da
        e = new_e

    # One row of partials per program; the launch sums the rows (a deterministic second stage).
    for k in tl.static_range(K):
        tl.store(DA_PART + pid * K + k, tl.sum(da[k], axis=0))
        tl.store(E_PART + pid * K + k, tl.sum(e[k], axis=0))
    c_off = 0
    for k in tl.static_range(len(dgam)):
        _store_partials(DGAMMA_PART, DBETA_PART, pid * C, c_off, CS[k], dgam[k], dbet[k], BCS[k],
                        HAS_GAMMA, HAS_BETA)
        c_off += CS[k]


# --------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------

def pixel_stride(x: torch.Tensor) -> Optional[int]:
    """Stride between consecutive pixels h*W + w of x (B, C, H, W), or None when H and W do not
    merge into one strided axis (then the launch makes x contiguous). Not ops/_layout.py's walker:
    that one views a dense tensor as (OUTER, C, INNER) and would copy a channel slice of a wider
    tensor, which this (batch, channel, pixel) addressing reads in place."""
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


def _dense_vector(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A per-channel vector (gamma, beta) as the kernels read it, element c at offset c: a strided
    or expanded one is copied (C elements) rather than read wrongly."""
    return None if p is None else p.contiguous()


def _or(t, placeholder):
    """A pointer argument the kernel never reads (its HAS_* constexpr is off): any tensor will do."""
    return placeholder if t is None else t


def _branch_args(xs: list[torch.Tensor]):
    """The kernels' (pointers, stride triples) tuples of the branches."""
    return tuple(xs), tuple(_strides(x) for x in xs)


def _check_branch_count(xs):
    if len(xs) < 2:
        raise ValueError(f"xs: the fused kernel takes at least 2 branches, got {len(xs)}")


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
    gamma, beta = _dense_vector(gamma), _dense_vector(beta)
    y, mean, rstd = _empty_outputs(xs, concat)
    B, C, H, W = y.shape
    HW = H * W
    if y.numel() == 0:
        return y, mean, rstd
    ptrs, strides = _branch_args(xs)
    channels = [x.size(1) for x in xs]
    block_p, bcs, num_warps = pick_blocks(channels, concat, HW, FWD_TILE, FWD_WARPS)
    n_hw_blocks = triton.cdiv(HW, block_p)
    int64 = max(_max_offset(t) for t in xs + [y]) > INT32_LIMIT
    _gated_fusion_fwd_kernel[(B * n_hw_blocks,)](
        ptrs, strides, tuple(channels), y, _strides(y), mean, rstd, gates, _or(gamma, gates), _or(beta, gates),
        float(C), HW, n_hw_blocks, float(eps),
        CONCAT=concat, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, BLOCK_P=block_p, BCS=tuple(bcs),
        INT64=int64, num_warps=num_warps)
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
    gamma = _dense_vector(gamma)
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
        x_ptrs, x_strides = _branch_args(xs)
        dx_ptrs, dx_strides = _branch_args(dxs)
        int64 = max(_max_offset(t) for t in xs + dxs + [dy]) > INT32_LIMIT
        _gated_fusion_bwd_kernel[(n_prog,)](
            x_ptrs, x_strides, dx_ptrs, dx_strides, tuple(x.size(1) for x in xs), dy, _strides(dy), mean, rstd,
            gates, _or(gamma, gates), dgamma_part, dbeta_part, da_part, e_part, C, float(C), HW, n_hw_blocks,
            n_blocks, CONCAT=concat, HAS_GAMMA=gamma is not None, HAS_BETA=has_beta, BLOCK_P=block_p,
            BCS=tuple(bcs), INT64=int64, num_warps=num_warps)
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
    ctx.controller = GateController.from_op_arguments(controller, ema_weight, eta, group) if controller else None
    # torch.library matches the grads' structure to the inputs': a list of tensors is one entry per
    # tensor, while a list holding a None is a single (non-differentiable) leaf.
    ctx.no_grad_ctrl = [None] * len(controller) if all(t is not None for t in controller) else None
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
    return (dxs, dgates, dgamma if ctx.has_gamma else None, dbeta if ctx.has_beta else None,
            None, None, ctx.no_grad_ctrl, None, None, None)


gated_fusion.register_autograd(_backward, setup_context=_setup_context)

