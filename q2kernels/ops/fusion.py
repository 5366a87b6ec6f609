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


# What the kernels pass between their helpers, grouped as docs/math.md §5 uses it (the kernels' own
# arguments stay flat, as the launch passes them):
# - a tensor X: the pair (ptr, S), its base pointer and its (batch, channel, pixel) strides S, a
#   triple: X[b, c, p] is at ptr + b*S[0] + c*S[1] + p*S[2] (_tile_offsets). Branch k of the kernels'
#   arguments is (XS[k], SX[k]); the K branches (or their grads) are the pair of tuples (XS, SX);
# - pix = (b, hw, pmask), a pixel block: image b, its pixels hw = h*W + w (a [BLOCK_P] vector) and
#   which of them exist (_pixel_block);
# - chans = (c_off, Ck), a branch's channels c_off .. c_off+Ck-1 of the fused row, where its dy, gamma
#   and beta start (concat: c_off = C_0 + ... + C_{k-1}); its tile is BLOCK_C = BCS[k] wide;
# - stats = (mu, rstd), the per-pixel statistics of the LayerNorm: mean and 1/sqrt(var + eps);
# - block = (pix, stats, xs, masks): what the backward holds of a pixel block before its LayerNorm
#   backward: the pixels, their statistics, and each branch's fp32 tile x_k and its mask;
# - sums = (c1, c2), the LayerNorm backward's per-pixel means of g*xhat and of g (g = dy*gamma);
# - ln = (dys, xh, g, sums): what the backward's phase 1 hands phase 2: the dy tile of each tile of h,
#   the one (xhat, g) of the sum fusion's single tile (unused by concat, which recomputes them), sums.


@triton.jit
def _pixel_block(blk, N_HW_BLOCKS, HW, BLOCK_P: tl.constexpr, INT64: tl.constexpr):
    """pix of pixel block `blk`: (image b, pixel indices hw, their mask)."""
    b = blk // N_HW_BLOCKS
    hw = (blk % N_HW_BLOCKS) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = hw < HW
    if INT64:
        b = b.to(tl.int64)
        hw = hw.to(tl.int64)
    return b, hw, pmask


@triton.jit
def _tile_offsets(S, pix, c_off, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Element offsets [BLOCK_P, BLOCK_C] of channels c_off + (0 .. BLOCK_C) of the pixels of pix in a
    tensor of (batch, channel, pixel) strides S."""
    b, hw, _ = pix
    cc = c_off + tl.arange(0, BLOCK_C)
    if INT64:
        cc = cc.to(tl.int64)
    return b * S[0] + hw[:, None] * S[2] + cc[None, :] * S[1]


@triton.jit
def _load_tile(X, pix, chans, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """fp32 [BLOCK_P, BLOCK_C] tile of tensor X at channels chans of the pixels of pix, and its mask.
    Masked lanes read 0, which adds 0 to every sum."""
    ptr, S = X
    _, _, pmask = pix
    c_off, Ck = chans
    mask = pmask[:, None] & (tl.arange(0, BLOCK_C) < Ck)[None, :]
    return tl.load(ptr + _tile_offsets(S, pix, c_off, BLOCK_C, INT64), mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def _store_tile(X, v, mask, pix, c_off, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Store the fp32 tile v into tensor X in its dtype, rounded to nearest even."""
    ptr, S = X
    tl.store(ptr + _tile_offsets(S, pix, c_off, BLOCK_C, INT64), cast_to(v, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _zeros(n: tl.constexpr):
    """fp32 zeros of length n. A helper, not tl.zeros([BCS[k]]) inline: Triton 3.6 (the GPU image's)
    does not take an element of a constexpr tuple as a shape, but does take it as a constexpr argument."""
    return tl.zeros([n], tl.float32)


@triton.jit
def _channel_vec(P, chans, BLOCK_C: tl.constexpr):
    """[1, BLOCK_C] of the per-channel vector P at channels chans (0 beyond)."""
    c_off, Ck = chans
    c = tl.arange(0, BLOCK_C)
    return tl.load(P + c_off + c, mask=c < Ck, other=0.0)[None, :]


@triton.jit
def _load_branches(X, CS, GATES, pix, BCS: tl.constexpr, GATED: tl.constexpr, INT64: tl.constexpr):
    """Each branch's fp32 tile [BLOCK_P, BCS[k]] at the pixels of pix, and its mask: x_k, or
    h_k = a_k*x_k when GATED (the forward, which needs only h). X = (XS, SX), the K branches."""
    XS, SX = X
    xs = ()
    masks = ()
    for k in tl.static_range(len(XS)):
        x, m = _load_tile((XS[k], SX[k]), pix, (0, CS[k]), BCS[k], INT64)
        if GATED:
            x = tl.load(GATES + k) * x
        xs = xs + (x,)
        masks = masks + (m,)
    return xs, masks


@triton.jit
def _tile_sum(ts):
    """ts[0] + ts[1] + ... in that order."""
    t = ts[0]
    for k in tl.static_range(1, len(ts)):
        t = t + ts[k]
    return t


@triton.jit
def _row_sum(ts):
    """Per-pixel sum over the channels of the tiles ts, tile by tile."""
    s = tl.sum(ts[0], axis=1)
    for k in tl.static_range(1, len(ts)):
        s += tl.sum(ts[k], axis=1)
    return s


@triton.jit
def _row_dot(us, vs):
    """Per-pixel sum over the channels of the tiles' products us[k]*vs[k], tile by tile."""
    s = tl.sum(us[0] * vs[0], axis=1)
    for k in tl.static_range(1, len(us)):
        s += tl.sum(us[k] * vs[k], axis=1)
    return s


@triton.jit
def _layernorm_stats(hs, masks, Cf, eps):
    """(d, mu, rstd) over the fused channels of h, from its tiles hs: mu = mean(h), d = h - mu (0 on
    padding: (0 - mu)^2 must not count in the variance), rstd = 1/sqrt(mean(d^2) + eps)."""
    mu = tl.math.div_rn(_row_sum(hs), Cf)
    ds = ()
    for k in tl.static_range(len(hs)):
        ds = ds + (tl.where(masks[k], hs[k] - mu[:, None], 0.0),)
    v = _row_dot(ds, ds)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(v, Cf) + eps))
    return ds, mu, rstd


@triton.jit
def _store_stats(MEAN, RSTD, pix, HW, mu, rstd):
    """Save the statistics of the pixels of pix for the backward (_load_stats)."""
    b, hw, pmask = pix
    stat = b * HW + hw
    tl.store(MEAN + stat, mu, mask=pmask)
    tl.store(RSTD + stat, rstd, mask=pmask)


@triton.jit
def _normalise_store(Y, d, mask, pix, rstd, GAMMA, BETA, chans, BLOCK_C: tl.constexpr,
                     HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, INT64: tl.constexpr):
    """y = (h - mu)*rstd*gamma + beta at one tile's channels (d = h - mu), in the reference's order."""
    y = d * rstd[:, None]
    if HAS_GAMMA:
        y = y * _channel_vec(GAMMA, chans, BLOCK_C)
    if HAS_BETA:
        y = y + _channel_vec(BETA, chans, BLOCK_C)
    c_off, _ = chans
    _store_tile(Y, y, mask, pix, c_off, BLOCK_C, INT64)


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
    """docs/math.md §5 forward on one pixel block: h from the gated branches, the LayerNorm's
    statistics, y written once."""
    pix = _pixel_block(tl.program_id(0), N_HW_BLOCKS, HW, BLOCK_P, INT64)
    # Read every branch once: h_k = a_k*x_k, [BLOCK_P, BCS[k]] fp32 tiles held in registers. They are
    # h's tiles (concat), or their sum is h's one tile (sum).
    hs, masks = _load_branches((XS, SX), CS, GATES, pix, BCS, True, INT64)
    if not CONCAT:
        hs = (_tile_sum(hs),)
    ds, mu, rstd = _layernorm_stats(hs, masks, Cf, eps)
    _store_stats(MEAN, RSTD, pix, HW, mu, rstd)
    # Write y once: tile k's channels start at c_off = C_0 + ... + C_{k-1} (concat).
    c_off = 0
    for k in tl.static_range(len(ds)):
        _normalise_store((Y, SY), ds[k], masks[k], pix, rstd, GAMMA, BETA, (c_off, CS[k]), BCS[k],
                         HAS_GAMMA, HAS_BETA, INT64)
        c_off += CS[k]


@triton.jit
def _load_stats(MEAN, RSTD, pix, HW):
    """stats = (mu, rstd) of the pixels of pix, as the forward saved them (_store_stats)."""
    b, hw, pmask = pix
    stat = b * HW + hw
    return tl.load(MEAN + stat, mask=pmask, other=0.0), tl.load(RSTD + stat, mask=pmask, other=0.0)


@triton.jit
def _h_tile(xs, GATES, j, CONCAT: tl.constexpr):
    """Tile j of h: a_j*x_j (concat), or the one tile a_0*x_0 + a_1*x_1 + ... (sum), in that order."""
    if CONCAT:
        h = tl.load(GATES + j) * xs[j]
    else:
        h = tl.load(GATES) * xs[0]
        for k in tl.static_range(1, len(xs)):
            h = h + tl.load(GATES + k) * xs[k]
    return h


@triton.jit
def _xhat_g(h, mask, dy, stats, GAMMA, chans, BLOCK_C: tl.constexpr, HAS_GAMMA: tl.constexpr):
    """xhat = (h - mu)*rstd (0 on padded lanes) and g = dy*gamma of one tile."""
    mu, rstd = stats
    xhat = tl.where(mask, (h - mu[:, None]) * rstd[:, None], 0.0)
    if HAS_GAMMA:
        g = dy * _channel_vec(GAMMA, chans, BLOCK_C)
    else:
        g = dy
    return xhat, g


@triton.jit
def _dh(xhat, g, mask, rstd, sums):
    """LayerNorm input grad: rstd*(g - mean(g) - xhat*mean(g*xhat)), sums = (mean(g*xhat), mean(g))."""
    c1, c2 = sums
    return tl.where(mask, rstd[:, None] * (g - c2[:, None] - xhat * c1[:, None]), 0.0)


@triton.jit
def _zero_accumulators(K: tl.constexpr, CONCAT: tl.constexpr, BLOCK_P: tl.constexpr, BCS: tl.constexpr):
    """The backward's fp32 accumulators over a program's pixel blocks, (da, e, dgamma, dbeta): da_k
    and E_k per pixel row, K of each; dgamma and dbeta per channel, one vector per tile of h (K for
    concat, one for sum)."""
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
    return da, e, dgam, dbet


@triton.jit
def _layernorm_sums(DY, block, GATES, GAMMA, CS, Cf, dgam, dbet, BCS: tl.constexpr, CONCAT: tl.constexpr,
                    HAS_GAMMA: tl.constexpr, INT64: tl.constexpr):
    """Phase 1 of the backward on a block: for each tile of h (branch j's channels, or the sum's one
    tile) read dy once, recompute xhat from the saved statistics and g = dy*gamma, and sum the
    LayerNorm backward's per-pixel c1 = mean_c(g*xhat), c2 = mean_c(g) and the per-channel
    dgamma += dy*xhat, dbeta += dy. Returns ln = (dys, xh, g, sums) and the new dgamma, dbeta."""
    pix, stats, xs, masks = block
    dys = ()
    new_dgam = ()
    new_dbet = ()
    c_off = 0
    for j in tl.static_range(len(dgam)):  # h's tiles, a dgamma vector each
        chans = (c_off, CS[j])
        dy, _ = _load_tile(DY, pix, chans, BCS[j], INT64)
        xh, g = _xhat_g(_h_tile(xs, GATES, j, CONCAT), masks[j], dy, stats, GAMMA, chans, BCS[j], HAS_GAMMA)
        if j == 0:
            c1 = tl.sum(g * xh, axis=1)
            c2 = tl.sum(g, axis=1)
        else:
            c1 += tl.sum(g * xh, axis=1)
            c2 += tl.sum(g, axis=1)
        new_dgam = new_dgam + (dgam[j] + tl.sum(dy * xh, axis=0),)
        new_dbet = new_dbet + (dbet[j] + tl.sum(dy, axis=0),)
        dys = dys + (dy,)
        c_off += CS[j]
    sums = (tl.math.div_rn(c1, Cf), tl.math.div_rn(c2, Cf))
    return (dys, xh, g, sums), new_dgam, new_dbet


@triton.jit
def _branch_dx(DX, dh, x, mask, a, pix, da_acc, e_acc, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """dx_k = a_k*dh_k, stored; returns the per-pixel accumulators of da_k and E_k."""
    dx = a * dh
    _store_tile(DX, dx, mask, pix, 0, BLOCK_C, INT64)
    return da_acc + tl.sum(dh * x, axis=1), e_acc + tl.sum(dx * dx, axis=1)


@triton.jit
def _branch_grads(DX, block, ln, GATES, GAMMA, CS, da, e, BCS: tl.constexpr, CONCAT: tl.constexpr,
                  HAS_GAMMA: tl.constexpr, INT64: tl.constexpr):
    """Phase 2 of the backward on a block: dh_k = rstd*(g - c2 - xhat*c1) (sum: one dh, shared by
    every branch; concat: xhat and g recomputed from x_k and dy, so only x_k and dy stay live across
    phase 1's reductions), dx_k = a_k*dh_k written once into the grads DX, and the per-pixel
    da_k += sum(dh_k*x_k), E_k += sum(dx_k^2). Returns the new da, e."""
    pix, stats, xs, masks = block
    dys, xh, g, sums = ln
    DXS, SDX = DX
    _, rstd = stats
    if not CONCAT:
        dh = _dh(xh, g, masks[0], rstd, sums)
    new_da = ()
    new_e = ()
    c_off = 0
    for k in tl.static_range(len(xs)):
        a = tl.load(GATES + k)
        if CONCAT:
            xh, g = _xhat_g(a * xs[k], masks[k], dys[k], stats, GAMMA, (c_off, CS[k]), BCS[k], HAS_GAMMA)
            dh = _dh(xh, g, masks[k], rstd, sums)
            c_off += CS[k]
        dak, ek = _branch_dx((DXS[k], SDX[k]), dh, xs[k], masks[k], a, pix, da[k], e[k], BCS[k], INT64)
        new_da = new_da + (dak,)
        new_e = new_e + (ek,)
    return new_da, new_e


@triton.jit
def _channel_partials(DGAMMA_PART, DBETA_PART, row, chans, dgamma, dbeta,
                      BLOCK_C: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """One tile's dgamma and dbeta into row `row` of their partials, at its channels chans."""
    c_off, Ck = chans
    c = tl.arange(0, BLOCK_C)
    if HAS_GAMMA:
        tl.store(DGAMMA_PART + row + c_off + c, dgamma, mask=c < Ck)
    if HAS_BETA:
        tl.store(DBETA_PART + row + c_off + c, dbeta, mask=c < Ck)


@triton.jit
def _store_partials(DA_PART, E_PART, DGAMMA_PART, DBETA_PART, pid, C, CS, acc, BCS: tl.constexpr,
                    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """Program pid's row of partials from its accumulators acc = (da, e, dgamma, dbeta); the launch
    sums the rows (a deterministic second stage)."""
    da, e, dgam, dbet = acc
    K: tl.constexpr = len(da)
    for k in tl.static_range(K):
        tl.store(DA_PART + pid * K + k, tl.sum(da[k], axis=0))
        tl.store(E_PART + pid * K + k, tl.sum(e[k], axis=0))
    c_off = 0
    for k in tl.static_range(len(dgam)):
        _channel_partials(DGAMMA_PART, DBETA_PART, pid * C, (c_off, CS[k]), dgam[k], dbet[k], BCS[k],
                          HAS_GAMMA, HAS_BETA)
        c_off += CS[k]


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
    """docs/math.md §5 backward: a persistent program walks pixel blocks; on each, reads the branches
    and dy once, the LayerNorm backward's sums (phase 1), then each branch's dx, da_k and E_k (phase
    2); one row of partials at the end. Triton tuples are immutable: each block rebinds the
    accumulators to the updated tuples the phases return."""
    pid = tl.program_id(0)
    da, e, dgam, dbet = _zero_accumulators(len(XS), CONCAT, BLOCK_P, BCS)
    for blk in range(pid, N_BLOCKS, tl.num_programs(0)):
        pix = _pixel_block(blk, N_HW_BLOCKS, HW, BLOCK_P, INT64)
        stats = _load_stats(MEAN, RSTD, pix, HW)
        xs, masks = _load_branches((XS, SX), CS, GATES, pix, BCS, False, INT64)
        block = (pix, stats, xs, masks)
        ln, dgam, dbet = _layernorm_sums((DY, SY), block, GATES, GAMMA, CS, Cf, dgam, dbet, BCS, CONCAT,
                                         HAS_GAMMA, INT64)
        da, e = _branch_grads((DXS, SDX), block, ln, GATES, GAMMA, CS, da, e, BCS, CONCAT, HAS_GAMMA, INT64)
    _store_partials(DA_PART, E_PART, DGAMMA_PART, DBETA_PART, pid, C, CS, (da, e, dgam, dbet), BCS,
                    HAS_GAMMA, HAS_BETA)


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

