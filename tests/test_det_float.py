"""The deterministic float ops (csrc/det_float.h; q2kernels.ops.det_float) against an independent oracle,
bit for bit.

The oracle is numpy float32 arithmetic written from the definitions, sharing no code with the ops: a
float32 `*` or `+` of numpy is one IEEE rounding to nearest even, and exp_det (csrc/epilogue.h's
polynomial, which uses fma) is written here with an fma emulated exactly (the float64 product is exact;
its sum with the addend is rounded to odd in float64, then once to float32), itself checked against
exact rational arithmetic. Every CPU variant of the ops is compared (Q2K_DET_FLOAT_CPU: the reference
mode, which runs det_float.h's per-element functions, the code the CUDA kernels run; base; AVX2; AVX-512;
auto), on random inputs and on the edge cases of each op; the CUDA kernels against the CPU (tests marked
cuda). Comparisons are bitwise; a NaN matches any NaN (which NaN an operation returns is the processor's
choice, csrc/det_float.h).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from q2kernels.ops import det_float as df

f32 = np.float32
OPS = torch.ops.q2kernels_int


@pytest.fixture(scope="module", autouse=True)
def _library():
    """The raw ops (OPS) exist once the library is loaded."""
    df.load()


# ---------------------------------------------------------------------------------------------------
# The oracle.

def fma32(a, b, c):
    """float32 fma(a, b, c), rounded once: a*b is exact in float64 (24 + 24 bits), the float64 sum with c is
    rounded to odd (TwoSum's error says whether it was exact), which float32 rounding then rounds correctly
    (53 >= 2*24 + 2). For finite operands whose sum does not overflow float64."""
    a, b, c = (np.asarray(v, dtype=np.float32).astype(np.float64) for v in (a, b, c))
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    even = (s.view(np.int64) & 1) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


_POLY = ("1.38888889e-03", "8.33333333e-03", "4.16666667e-02", "1.66666667e-01", "0.5", "1.0", "1.0")


def exp_det(x):
    """csrc/epilogue.h exp_det: k = rint(x*log2(e)), r = x - k*ln2 (two fmas), a degree-7 polynomial by
    fmas, times 2^k; NaN stays, above 88.72 inf, below -87 zero."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(all="ignore"):
        k = np.rint(x * f32("1.44269502"))
        kk = np.where(np.isfinite(k), k, f32(0))
        r = fma32(kk, f32("-0.693145751953125"), np.where(np.isfinite(x), x, f32(0)))
        r = fma32(kk, f32("-1.42860677e-06"), r)
        p = np.full(x.shape, f32("1.98412698e-04"), dtype=np.float32)
        for coef in _POLY:
            p = fma32(p, r, f32(coef))
        e = np.ldexp(p.astype(np.float64), kk.astype(np.int64)).astype(np.float32)
        e = np.where(x < f32(-87.0), f32(0), e)
        e = np.where(x > f32("88.72"), f32(np.inf), e)
        return np.where(np.isnan(x), x, e).astype(np.float32)


def silu(x):
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(all="ignore"):
        return (x / (f32(1) + exp_det(-x))).astype(np.float32)


def activate(y, act):
    if act == "relu":
        return np.where(y < f32(0), f32(0), y).astype(np.float32)
    if act == "silu":
        return silu(y)
    return y


def conv_oracle(x, w, b, stride, padding, dilation, groups, act):
    """The definition: acc = +0; for ci, i, j in order, where the tap is inside the image,
    acc = acc + w*x (two roundings); then + bias, then the activation. Vectorised over the outputs only."""
    x, w = np.asarray(x, dtype=np.float32), np.asarray(w, dtype=np.float32)
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    acc = np.zeros((n, co, ho, wo), dtype=np.float32)
    grp = np.arange(co) // (co // groups)
    oh, ow = np.arange(ho), np.arange(wo)
    with np.errstate(all="ignore"):
        for ci in range(cg):
            chan = grp * cg + ci
            for i in range(kh):
                ih = oh * sh - ph + i * dh
                for j in range(kw):
                    iw = ow * sw - pw + j * dw
                    valid = ((ih >= 0) & (ih < h))[:, None] & ((iw >= 0) & (iw < wd))[None, :]
                    if not valid.any():
                        continue
                    xv = x[:, chan][:, :, np.clip(ih, 0, h - 1)][:, :, :, np.clip(iw, 0, wd - 1)]
                    prod = w[:, ci, i, j][None, :, None, None] * xv
                    acc = np.where(valid[None, None], acc + prod, acc)
        if b is not None:
            acc = acc + np.asarray(b, dtype=np.float32)[None, :, None, None]
    return activate(acc, act)


def matmul_oracle(a, b):
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    acc = np.zeros(a.shape[:-1] + b.shape[-1:], dtype=np.float32)
    with np.errstate(all="ignore"):
        for k in range(a.shape[-1]):
            acc = acc + a[..., :, k, None] * b[..., None, k, :]
    return acc


def softmax_oracle(x, dim):
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        return softmax_oracle(x.reshape(1), 0).reshape(())
    xm = np.moveaxis(x, dim, -1)
    if xm.shape[-1] == 0:
        return x.copy()
    with np.errstate(all="ignore"):
        m = xm[..., 0]
        for i in range(1, xm.shape[-1]):
            v = xm[..., i]
            m = np.where((v > m) | np.isnan(v), v, m)
        e = exp_det(xm - m[..., None])
        s = np.zeros(xm.shape[:-1], dtype=np.float32)
        for i in range(xm.shape[-1]):
            s = s + e[..., i]
        y = e / s[..., None]
    return np.moveaxis(y.astype(np.float32), -1, dim)


def assert_bits(got, ref):
    """got (a tensor) equals ref (numpy or a tensor) bit for bit; NaN matches NaN."""
    g = got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else got
    r = ref.detach().cpu().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert g.dtype == np.float32 and r.dtype == np.float32, (g.dtype, r.dtype)
    assert g.shape == r.shape, (g.shape, r.shape)
    gn, rn = np.isnan(g), np.isnan(r)
    assert (gn == rn).all(), f"NaN at different places: {int((gn != rn).sum())} elements"
    gb, rb = g[~gn].view(np.uint32), r[~rn].view(np.uint32)
    bad = np.flatnonzero(gb != rb)
    assert bad.size == 0, (f"{bad.size} of {gb.size} elements differ, first: got {g[~gn][bad[0]]!r} "
                           f"expected {r[~rn][bad[0]]!r}")


# ---------------------------------------------------------------------------------------------------
# The oracle's own arithmetic.

def test_fma_emulation_is_rounded_once():
    rng = np.random.default_rng(1)
    a = rng.standard_normal(3000).astype(np.float32)
    b = rng.standard_normal(3000).astype(np.float32)
    # Addends that cancel the product's leading bits, and ties of the float32 rounding.
    c = np.concatenate([-(a[:1000] * b[:1000]), rng.standard_normal(1000).astype(np.float32),
                        (rng.standard_normal(1000) * 1e-6).astype(np.float32)])
    got = fma32(a, b, c)
    for ai, bi, ci, gi in zip(a, b, c, got):
        exact = Fraction(float(ai)) * Fraction(float(bi)) + Fraction(float(ci))
        assert gi == _round_f32(exact), (ai, bi, ci)


def _round_f32(q: Fraction) -> np.float32:
    """The float32 nearest to the rational q, ties to even (normal range)."""
    if q == 0:
        return f32(0)
    sign, q = (-1 if q < 0 else 1), abs(q)
    e = math.floor(math.log2(q))
    while Fraction(2) ** e > q:
        e -= 1
    while Fraction(2) ** (e + 1) <= q:
        e += 1
    scaled = q / Fraction(2) ** (e - 23)  # in [2^23, 2^24)
    m = math.floor(scaled)
    rem = scaled - m
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and m % 2 == 1):
        m += 1
    return f32(sign * math.ldexp(m, e - 23))


def test_exp_oracle_is_close_to_exp():
    """A sanity check of the oracle's exp_det itself (within 2 ulp of exp on its range, epilogue.h)."""
    x = np.linspace(-87, 88.7, 20001, dtype=np.float32)
    got = exp_det(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    assert (np.abs(got - want) <= 2.5 * np.spacing(want.astype(np.float32)).astype(np.float64)).all()


# ---------------------------------------------------------------------------------------------------
# The CPU variants.

def _modes():
    modes = ["auto", "reference", "base"]
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX2", "AVX512"):
        modes.append("avx2")
    if cap == "AVX512":
        modes.append("avx512")
    return modes


MODES = _modes()


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    monkeypatch.setenv("Q2K_DET_FLOAT_CPU", request.param)
    return request.param


SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e38, -3e38, 1e-40, -1e-40, 1e-45, 1.17549435e-38,
                     88.72, -87.0, 87.5, -88.0, 1.0, -1.0], dtype=np.float32)


def _randn(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(torch.float32)


def _sprinkle(t, gen, fraction=0.05):
    """t with a fraction of its elements replaced by SPECIALS (a copy)."""
    t = t.clone()
    flat = t.view(-1)
    count = max(1, int(flat.numel() * fraction)) if flat.numel() else 0
    idx = torch.randint(0, max(flat.numel(), 1), (count,), generator=gen)
    vals = torch.from_numpy(SPECIALS)[torch.randint(0, len(SPECIALS), (count,), generator=gen)]
    flat[idx] = vals
    return t


# name: (N, C_in, H, W, C_out, (KH, KW), stride, padding, dilation, groups)
GEOMETRIES = {
    "3x3": (2, 5, 9, 11, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "1x1_direct": (2, 37, 9, 13, 40, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    "1x1_stride2_pad": (1, 16, 9, 7, 9, (1, 1), (2, 2), (1, 1), (1, 1), 1),
    "1x1_map": (3, 4, 1, 1, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "stem_s2": (1, 3, 40, 38, 16, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    "stem_6x6": (1, 3, 21, 18, 8, (6, 6), (2, 2), (2, 2), (1, 1), 1),
    "dilation2": (1, 6, 12, 10, 5, (3, 3), (1, 1), (2, 2), (2, 2), 1),
    "mixed": (1, 9, 11, 9, 10, (5, 3), (2, 1), (3, 1), (2, 1), 1),
    "pad_beyond_kernel": (1, 2, 5, 4, 3, (3, 3), (1, 2), (4, 5), (1, 1), 1),
    "groups": (2, 6, 8, 8, 9, (3, 3), (1, 1), (1, 1), (1, 1), 3),
    "depthwise": (1, 8, 10, 12, 8, (3, 3), (2, 2), (1, 1), (1, 1), 8),
    "depthwise_x2": (1, 4, 7, 7, 8, (3, 3), (1, 1), (1, 1), (1, 1), 4),
    "ragged_big": (1, 19, 13, 17, 45, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "many_tiles": (1, 2, 70, 90, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "empty_batch": (0, 4, 5, 5, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "no_input_channels": (1, 0, 4, 4, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "no_output_channels": (1, 3, 4, 4, 0, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "zero_width_padded": (1, 2, 3, 0, 2, (1, 1), (1, 1), (0, 1), (1, 1), 1),
}


def _conv_case(name, seed, specials=False, bias=True):
    n, cin, h, w, cout, k, stride, padding, dilation, groups = GEOMETRIES[name]
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, n, cin, h, w)
    weight = _randn(gen, cout, cin // groups if groups else 0, *k, scale=0.5)
    b = _randn(gen, cout) if bias else None
    if specials:
        x = _sprinkle(x, gen)
    return x, weight, b, stride, padding, dilation, groups


def _check_conv(x, weight, b, stride, padding, dilation, groups, act):
    got = df.det_conv2d(x, weight, b, stride, padding, dilation, groups, act)
    ref = conv_oracle(x.numpy(), weight.numpy(), None if b is None else b.numpy(), stride, padding, dilation,
                      groups, act)
    assert got.is_contiguous()
    assert_bits(got, ref)
    return got


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_conv_matches_the_definition(mode, name):
    seed = sum(map(ord, name))
    for act, bias in (("none", True), ("relu", False), ("silu", True)):
        _check_conv(*_conv_case(name, seed=seed, bias=bias), act=act)


@pytest.mark.parametrize("name", ["3x3", "1x1_direct", "stem_6x6", "depthwise", "pad_beyond_kernel", "mixed"])
def test_conv_special_values(mode, name):
    """+-0, inf, NaN, huge and subnormal values in x, in the weights and in the bias; infinite and NaN
    weights next to padding, where a tap outside the image must be skipped (inf*0 would be NaN)."""
    x, weight, b, *geo = _conv_case(name, seed=3, specials=True)
    gen = torch.Generator().manual_seed(4)
    for w in (weight, _sprinkle(weight, gen, 0.1)):
        for act in ("none", "relu", "silu"):
            _check_conv(x, w, _sprinkle(b, gen, 0.3), *geo, act)
    # Only the weights non-finite: the outputs near the border stay finite where the skipped taps are.
    w = weight.clone()
    w[0, 0, 0, 0] = float("inf")
    if w.shape[0] > 1:
        w[1, 0, -1, -1] = float("nan")
    clean = _conv_case(name, seed=5)[0]
    _check_conv(clean, w, b, *geo, "none")


def test_conv_skips_taps_outside_the_image():
    """An infinite weight whose taps fall outside the image for some outputs: those stay finite."""
    x = torch.ones(1, 1, 3, 3)
    w = torch.zeros(1, 1, 3, 3)
    w[0, 0, 0, 0] = float("inf")
    out = df.det_conv2d(x, w, None, 1, 1)
    assert torch.isinf(out[0, 0, 1:, 1:]).all()
    assert (out[0, 0, 0, :] == 0).all() and (out[0, 0, :, 0] == 0).all()
    assert_bits(out, conv_oracle(x.numpy(), w.numpy(), None, (1, 1), (1, 1), (1, 1), 1, "none"))


def test_conv_strided_inputs(mode):
    """channels_last, sliced, transposed and expanded inputs give the contiguous inputs' result."""
    x, weight, b, *geo = _conv_case("3x3", seed=11)
    want = df.det_conv2d(x, weight, b, *geo)
    assert_bits(df.det_conv2d(x.contiguous(memory_format=torch.channels_last), weight, b, *geo), want)
    assert_bits(df.det_conv2d(x, weight.contiguous(memory_format=torch.channels_last), b, *geo), want)
    big = torch.zeros(x.shape[0], x.shape[1], x.shape[2] * 2, x.shape[3] + 3)
    big[:, :, ::2, 3:] = x
    assert_bits(df.det_conv2d(big[:, :, ::2, 3:], weight, b, *geo), want)
    assert_bits(df.det_conv2d(x.transpose(2, 3).contiguous().transpose(2, 3), weight, b, *geo), want)
    bias_view = torch.stack([b, b], 1)[:, 0]
    assert_bits(df.det_conv2d(x, weight, bias_view, *geo), want)
    row = torch.randn(1, 3, 1, 8)
    w1 = torch.randn(2, 3, 1, 3)
    assert_bits(df.det_conv2d(row.expand(2, 3, 5, 8), w1, None, 1, (0, 1)),
                df.det_conv2d(row.expand(2, 3, 5, 8).contiguous(), w1, None, 1, (0, 1)))


def test_conv_big_random():
    """A YOLO stem-sized layer (the tiles, the panels and the thread split of the fast path)."""
    gen = torch.Generator().manual_seed(21)
    x = _randn(gen, 1, 3, 160, 160)
    w = _randn(gen, 16, 3, 3, 3, scale=0.3)
    b = _randn(gen, 16)
    _check_conv(x, w, b, (2, 2), (1, 1), (1, 1), 1, "silu")
    x = _randn(gen, 1, 64, 20, 20)
    w = _randn(gen, 64, 64, 1, 1, scale=0.1)
    _check_conv(x, w, b.repeat(4), (1, 1), (0, 0), (1, 1), 1, "none")


# ---------------------------------------------------------------------------------------------------
# det_matmul

MATMULS = [((3, 5), (5, 4)), ((1, 1), (1, 1)), ((7, 33), (33, 17)), ((2, 50, 64), (2, 64, 100)),
           ((2, 3, 9, 40), (2, 3, 40, 31)), ((13, 0), (0, 6)), ((0, 4), (4, 5)), ((4, 3), (3, 0)),
           ((2, 0, 3, 4), (2, 0, 4, 5)), ((1, 100), (100, 1)), ((50, 8), (8, 47)), ((3, 1, 70), (3, 70, 300))]


@pytest.mark.parametrize("shapes", MATMULS, ids=lambda s: "x".join(map(str, s[0])) + "@" + "x".join(map(str, s[1])))
def test_matmul_matches_the_definition(mode, shapes):
    gen = torch.Generator().manual_seed(sum(shapes[0]) + 7 * sum(shapes[1]))
    a, b = _randn(gen, *shapes[0]), _randn(gen, *shapes[1])
    assert_bits(df.det_matmul(a, b), matmul_oracle(a.numpy(), b.numpy()))
    a, b = _sprinkle(a, gen), _sprinkle(b, gen)
    assert_bits(df.det_matmul(a, b), matmul_oracle(a.numpy(), b.numpy()))


def test_matmul_empty_sum_is_plus_zero(mode):
    out = df.det_matmul(torch.empty(2, 3, 0), torch.empty(2, 0, 4))
    assert out.shape == (2, 3, 4) and (out.view(torch.int32) == 0).all()


def test_matmul_strided_inputs(mode):
    gen = torch.Generator().manual_seed(5)
    a, b = _randn(gen, 2, 9, 20), _randn(gen, 2, 20, 19)
    want = matmul_oracle(a.numpy(), b.numpy())
    assert_bits(df.det_matmul(a.transpose(1, 2).contiguous().transpose(1, 2), b.transpose(1, 2).contiguous()
                              .transpose(1, 2)), want)
    wide = torch.zeros(2, 9, 40)
    wide[..., ::2] = a
    assert_bits(df.det_matmul(wide[..., ::2], b), want)
    row = _randn(gen, 1, 1, 20)
    assert_bits(df.det_matmul(row.expand(2, 9, 20), b), matmul_oracle(row.expand(2, 9, 20).numpy(), b.numpy()))


# ---------------------------------------------------------------------------------------------------
# det_softmax

def _softmax_input(gen, shape):
    x = _randn(gen, *shape, scale=4.0)
    flat = x.view(-1)
    if flat.numel() > 8:
        flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 7),), generator=gen)] = -float("inf")
    return x


@pytest.mark.parametrize("shape", [(5,), (3, 17), (2, 3, 4, 5), (2, 1, 33, 9), (4, 400), (1, 8, 16), (3, 0, 4)])
def test_softmax_along_every_dim(mode, shape):
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    x = _softmax_input(gen, shape)
    for dim in range(-len(shape), len(shape)):
        assert_bits(df.det_softmax(x, dim), softmax_oracle(x.numpy(), dim))


def test_softmax_edge_cases(mode):
    rows = torch.tensor([
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        [-float("inf")] * 9,                                   # every value -inf: NaN (inf - inf)
        [float("inf"), 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],  # +inf: NaN
        [float("nan"), 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
        [0.0, -0.0, 0.0, -0.0, -0.0, 0.0, 1e-45, -1e-45, 0.0],  # signed zeros, subnormals
        [-float("inf"), 100.0, -200.0, 3e38, -3e38, 88.0, -90.0, 0.5, -float("inf")],
        [-1e-40, 1e-40, 1e-38, -1e-38, 0.0, 1.0, -1.0, 2.0, -2.0],
        [50.0, 50.0, 50.0, 50.0, 50.0, 50.0, 50.0, 50.0, 50.0],
    ], dtype=torch.float32)
    for x in (rows, rows.t().contiguous(), rows.repeat(3, 2)):
        for dim in (0, 1, -1):
            assert_bits(df.det_softmax(x, dim), softmax_oracle(x.numpy(), dim))
    scalar = torch.tensor(3.5)
    assert_bits(df.det_softmax(scalar, 0), softmax_oracle(scalar.numpy(), 0))
    assert df.det_softmax(torch.empty(0, 3), 1).shape == (0, 3)


def test_softmax_strided_inputs(mode):
    gen = torch.Generator().manual_seed(9)
    x = _softmax_input(gen, (3, 8, 12))
    want = softmax_oracle(x.numpy(), 1)
    assert_bits(df.det_softmax(x.transpose(0, 2).contiguous().transpose(0, 2), 1), want)
    assert_bits(df.det_softmax(x.unsqueeze(0).expand(2, 3, 8, 12)[1], 1), want)


# ---------------------------------------------------------------------------------------------------
# det_silu

def _silu_sweep():
    gen = np.random.default_rng(3)
    parts = [
        np.linspace(-100, 100, 40001, dtype=np.float32),
        # both sides of exp_det's early returns (x = -silu's argument) and of its rounding of k
        np.array([np.nextafter(f32(v), f32(d * np.inf)) for v in (87.0, -88.72, 88.72, -87.0) for d in (1, -1)]
                 + [f32(v) for v in (87.0, -88.72, 88.72, -87.0)], dtype=np.float32),
        (np.arange(-180, 180, dtype=np.float32) + f32(0.5)) * f32(np.log(2)),
        gen.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # every kind of float
        SPECIALS,
    ]
    return np.concatenate(parts).astype(np.float32)


def test_silu_matches_the_definition(mode):
    x = torch.from_numpy(_silu_sweep())
    assert_bits(df.det_silu(x), silu(x.numpy()))
    x2 = x[: 3 * 7 * 11 * 13].reshape(3, 7, 11, 13)
    assert_bits(df.det_silu(x2.transpose(1, 3)), silu(x2.transpose(1, 3).numpy()))
    assert_bits(df.det_silu(x2.contiguous(memory_format=torch.channels_last)), silu(x2.numpy()))
    assert df.det_silu(torch.empty(0, 5)).shape == (0, 5)
    assert_bits(df.det_silu(torch.tensor(-2.5)), silu(np.float32(-2.5)))


def test_conv_silu_is_det_silu():
    """The conv's activation is the same function as det_silu (and relu is y < 0 ? 0 : y)."""
    x, weight, b, *geo = _conv_case("3x3", seed=2)
    plain = df.det_conv2d(x, weight, b, *geo)
    assert_bits(df.det_conv2d(x, weight, b, *geo, act="silu"), df.det_silu(plain))
    assert_bits(df.det_conv2d(x, weight, b, *geo, act="relu"), torch.where(plain < 0, 0.0, plain))


# ---------------------------------------------------------------------------------------------------
# The definition is not torch's or float64's: cases where they differ.

def test_products_are_rounded_before_the_sum():
    """acc + round(w*x), never fma(w, x, acc): here the fma (and float64) keep 2^-24, the definition 0."""
    big = 1 + 2.0**-11
    half = 1 + 2.0**-12  # half*half = 1 + 2^-11 + 2^-24, rounded to 1 + 2^-11 (a tie, to even)
    a = torch.tensor([[-big, half]])
    b = torch.tensor([[1.0], [half]])
    got = df.det_matmul(a, b)
    assert got.item() == 0.0 and not math.copysign(1, got.item()) < 0
    assert fma32(f32(half), f32(half), f32(-big)) == f32(2.0**-24)
    assert float(a.double() @ b.double()) == 2.0**-24
    conv = df.det_conv2d(b.reshape(1, 2, 1, 1), a.reshape(1, 2, 1, 1))
    assert conv.item() == 0.0


def test_sum_order_is_fixed():
    """((1e8 + 1) - 1e8) in float32 is 0; any other order (or float64) gives 1."""
    a = torch.tensor([[1e8, 1.0, -1e8]])
    b = torch.ones(3, 1)
    assert df.det_matmul(a, b).item() == 0.0
    assert float(a.double() @ b.double()) == 1.0
    assert df.det_matmul(a[:, [0, 2, 1]], b).item() == 1.0
    x = a.reshape(1, 3, 1, 1)
    assert df.det_conv2d(x, torch.ones(1, 3, 1, 1)).item() == 0.0
    assert df.det_conv2d(x[:, [2, 0, 1]], torch.ones(1, 3, 1, 1)).item() == 1.0


def test_not_torchs_kernels():
    """On random layers torch's conv, matmul, softmax and SiLU differ from the definition somewhere (a
    silent fall-back to them would fail the oracle tests; this says the oracle can tell)."""
    gen = torch.Generator().manual_seed(17)
    x, w = _randn(gen, 1, 32, 16, 16), _randn(gen, 32, 32, 3, 3, scale=0.1)
    assert not torch.equal(df.det_conv2d(x, w, None, 1, 1), F.conv2d(x, w, None, 1, 1))
    a, b = _randn(gen, 64, 256), _randn(gen, 256, 64)
    assert not torch.equal(df.det_matmul(a, b), a @ b)
    s = _randn(gen, 64, 256, scale=3)
    assert not torch.equal(df.det_softmax(s, -1), torch.softmax(s, -1))
    assert not torch.equal(df.det_silu(s), F.silu(s))


# ---------------------------------------------------------------------------------------------------
# Arguments.

ERRORS = (ValueError, TypeError, RuntimeError)


def _conv_args(**over):
    args = dict(x=torch.randn(1, 4, 6, 6), weight=torch.randn(6, 4, 3, 3), bias=torch.randn(6), stride=1,
                padding=1, dilation=1, groups=1, act="none")
    args.update(over)
    return args


@pytest.mark.parametrize("over, name", [
    (dict(x=torch.randn(1, 4, 6, 6, dtype=torch.float64)), "x"),
    (dict(x=torch.randint(0, 3, (1, 4, 6, 6))), "x"),
    (dict(x=torch.randn(4, 6, 6)), "x"),
    (dict(weight=torch.randn(6, 4, 3, 3).half()), "weight"),
    (dict(weight=torch.randn(6, 4, 3)), "weight"),
    (dict(weight=torch.randn(6, 3, 3, 3)), "weight"),
    (dict(weight=torch.randn(6, 4, 0, 3)), "weight"),
    (dict(bias=torch.randn(5)), "bias"),
    (dict(bias=torch.randn(6, 1)), "bias"),
    (dict(bias=torch.randn(6, dtype=torch.float64)), "bias"),
    (dict(bias=torch.randn(6, device="meta")), "bias"),
    (dict(weight=torch.randn(6, 4, 3, 3, device="meta")), "weight"),
    (dict(groups=0), "groups"),
    (dict(groups=-2), "groups"),
    (dict(groups=3), "groups"),
    (dict(groups=2, weight=torch.randn(6, 4, 3, 3)), "weight"),
    (dict(groups=2**40), "groups"),
    (dict(groups=1.5), "groups"),
    (dict(stride=0), "stride"),
    (dict(stride=(1, -1)), "stride"),
    (dict(stride=(1, 2, 3)), "stride"),
    (dict(stride=2**31), "stride"),
    (dict(stride=2**70), "stride"),
    (dict(padding=-1), "padding"),
    (dict(padding=(0, 2**31)), "padding"),
    (dict(dilation=0), "dilation"),
    (dict(dilation="2"), "dilation"),
    (dict(act="gelu"), "act"),
    (dict(act=2), "act"),
    (dict(act=None), "act"),
    (dict(padding=0, x=torch.randn(1, 4, 2, 6)), "x"),
    (dict(padding=0, dilation=4), "x"),
])
def test_conv_refuses_bad_arguments(over, name):
    args = _conv_args(**over)
    with pytest.raises(ERRORS, match=name):
        df.det_conv2d(**args)
    # The fake implementation (the meta device) refuses it too, naming the same argument.
    if not any(isinstance(v, torch.Tensor) and v.device.type == "meta" for v in over.values()):
        meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises(ERRORS, match=name):
            df.det_conv2d(**meta)


def test_conv_refuses_bad_arguments_of_the_raw_op():
    x, w = torch.randn(1, 4, 6, 6), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="act"):
        OPS.det_conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, 3)
    with pytest.raises(ValueError, match="act"):
        OPS.det_conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, -1)
    with pytest.raises(ValueError, match="stride"):
        OPS.det_conv2d(x, w, None, [1, 1, 1], [1, 1], [1, 1], 1, 0)
    with pytest.raises(ValueError, match="groups"):
        OPS.det_conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 0, 0)


def test_absurd_sizes_are_refused_on_the_meta_device():
    m = "meta"
    with pytest.raises(ValueError, match="more than 2"):
        df.det_conv2d(torch.empty(2**20, 1, 2**20, 2**20, device=m), torch.empty(4, 1, 1, 1, device=m))
    with pytest.raises(ValueError, match="padding"):
        df.det_conv2d(torch.empty(0, 1, 2**63 - 2, 1, device=m), torch.empty(1, 1, 1, 1, device=m), padding=2**31 - 1)
    with pytest.raises(ValueError, match="dilation"):
        df.det_conv2d(torch.empty(1, 1, 4, 4, device=m), torch.empty(0, 1, 2**62, 1, device=m), dilation=2**31 - 1)
    with pytest.raises(ValueError, match="more than 2"):
        df.det_matmul(torch.empty(2**30, 2**30, 1, device=m), torch.empty(2**30, 1, 2**30, device=m))


@pytest.mark.parametrize("a, b, name", [
    (torch.randn(5), torch.randn(5, 2), "a"),
    (torch.randn(3, 5), torch.randn(2, 5, 2), "b"),
    (torch.randn(2, 3, 5), torch.randn(3, 5, 2), "a, b"),
    (torch.randn(1, 3, 5), torch.randn(2, 5, 2), "a, b"),
    (torch.randn(3, 5), torch.randn(4, 2), "a, b"),
    (torch.randn(3, 5).double(), torch.randn(5, 2), "a"),
    (torch.randn(3, 5), torch.randint(0, 2, (5, 2)), "b"),
    (torch.randn(3, 5), torch.randn(5, 2, device="meta"), "b"),
])
def test_matmul_refuses_bad_arguments(a, b, name):
    with pytest.raises(ERRORS, match=name):
        df.det_matmul(a, b)
    if b.device.type != "meta":
        with pytest.raises(ERRORS, match=name):
            df.det_matmul(a.to("meta"), b.to("meta"))


@pytest.mark.parametrize("x, dim, name", [
    (torch.randn(3, 4), 2, "dim"), (torch.randn(3, 4), -3, "dim"), (torch.tensor(1.0), 1, "dim"),
    (torch.randn(3, 4), 1.0, "dim"), (torch.randn(3, 4), 2**64, "dim"), (torch.randn(3, 4).double(), 0, "x"),
    (torch.randint(0, 2, (3,)), 0, "x"),
])
def test_softmax_refuses_bad_arguments(x, dim, name):
    for t in (x, x.to("meta")):
        with pytest.raises(ERRORS, match=name):
            df.det_softmax(t, dim)


def test_silu_refuses_bad_arguments():
    for x in (torch.randn(3).double(), torch.randint(0, 2, (3,)), torch.randn(3).half()):
        for t in (x, x.to("meta")):
            with pytest.raises(ERRORS, match="x"):
                df.det_silu(t)


def test_cpu_variant_choice_is_checked(monkeypatch):
    monkeypatch.setenv("Q2K_DET_FLOAT_CPU", "fastest")
    with pytest.raises(ValueError, match="Q2K_DET_FLOAT_CPU"):
        df.det_silu(torch.randn(3))


# ---------------------------------------------------------------------------------------------------
# Meta kernels (the integer graph bounds memory on the meta device; torch.compile traces with fakes).

def test_meta_shapes_match_the_cpu():
    cases = [
        (df.det_conv2d, (torch.randn(2, 6, 9, 11), torch.randn(4, 3, 3, 2), torch.randn(4), (2, 1), (1, 0), (1, 2), 2,
                         "silu")),
        (df.det_matmul, (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 6))),
        (df.det_softmax, (torch.randn(2, 3, 4), -2)),
        (df.det_silu, (torch.randn(2, 7),)),
    ]
    for op, args in cases:
        cpu = op(*args)
        meta = op(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
        assert meta.device.type == "meta" and meta.shape == cpu.shape and meta.dtype == torch.float32
    with pytest.raises(ValueError, match="groups"):
        df.det_conv2d(torch.empty(1, 6, 4, 4, device="meta"), torch.empty(4, 3, 3, 3, device="meta"), groups=4)


def test_ops_trace_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = df.det_conv2d(torch.empty(1, 3, 32, 32), torch.empty(8, 3, 3, 3), None, 2, 1)
        assert out.shape == (1, 8, 16, 16)
        assert df.det_matmul(torch.empty(2, 3, 4), torch.empty(2, 4, 5)).shape == (2, 3, 5)
        assert df.det_softmax(torch.empty(2, 3), 0).shape == (2, 3)


def test_torch_compile_dynamic_shapes():
    def f(x, w, a, b):
        return df.det_softmax(df.det_matmul(a, b), -1), df.det_silu(df.det_conv2d(x, w, None, 1, 1))

    compiled = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)
    for size in (8, 11):
        x, w = torch.randn(1, 3, size, size), torch.randn(4, 3, 3, 3)
        a, b = torch.randn(2, size, 5), torch.randn(2, 5, size)
        for got, want in zip(compiled(x, w, a, b), f(x, w, a, b)):
            assert_bits(got, want)


def test_opcheck():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    torch.library.opcheck(OPS.det_conv2d, (x, w, torch.randn(4), [1, 1], [1, 1], [1, 1], 1, 2))
    torch.library.opcheck(OPS.det_matmul, (torch.randn(2, 3, 4), torch.randn(2, 4, 5)))
    torch.library.opcheck(OPS.det_softmax, (torch.randn(3, 5), 1))
    torch.library.opcheck(OPS.det_silu, (torch.randn(3, 5),))


# ---------------------------------------------------------------------------------------------------
# CUDA == CPU, bit for bit.

def _cuda_copy(t):
    """A CUDA copy with the same strides."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda").copy_(t)


def _both(op, *args):
    cpu = op(*args)
    gpu = op(*[_cuda_copy(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert gpu.device.type == "cuda"
    assert_bits(gpu, cpu)


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_cuda_conv_equals_cpu(name):
    for act in ("none", "relu", "silu"):
        _both(df.det_conv2d, *_conv_case(name, seed=31), act)
        x, w, b, *geo = _conv_case(name, seed=32, specials=True)
        _both(df.det_conv2d, x, _sprinkle(w, torch.Generator().manual_seed(1), 0.1), b, *geo, act)
    x, w, b, *geo = _conv_case(name, seed=33)
    _both(df.det_conv2d, x.contiguous(memory_format=torch.channels_last), w, b, *geo, "silu")


@pytest.mark.cuda
def test_cuda_conv_stem_equals_cpu():
    gen = torch.Generator().manual_seed(41)
    _both(df.det_conv2d, _randn(gen, 1, 3, 320, 320), _randn(gen, 16, 3, 3, 3), _randn(gen, 16), 2, 1, 1, 1, "silu")


@pytest.mark.cuda
@pytest.mark.parametrize("shapes", MATMULS, ids=lambda s: "x".join(map(str, s[0])) + "@" + "x".join(map(str, s[1])))
def test_cuda_matmul_equals_cpu(shapes):
    gen = torch.Generator().manual_seed(43)
    a, b = _randn(gen, *shapes[0]), _randn(gen, *shapes[1])
    _both(df.det_matmul, a, b)
    _both(df.det_matmul, _sprinkle(a, gen), _sprinkle(b, gen))


@pytest.mark.cuda
def test_cuda_softmax_and_silu_equal_cpu():
    gen = torch.Generator().manual_seed(47)
    for shape in [(5,), (3, 17), (2, 3, 4, 5), (4, 400), (8, 64, 64)]:
        x = _softmax_input(gen, shape)
        for dim in range(-len(shape), len(shape)):
            _both(df.det_softmax, x, dim)
    _both(df.det_softmax, torch.tensor([[float("nan"), 1.0], [-float("inf"), -float("inf")], [0.0, -0.0]]), 1)
    _both(df.det_silu, torch.from_numpy(_silu_sweep()))
    _both(df.det_silu, torch.randn(4, 5, 6).transpose(0, 2))
