"""LSQ / LSQ+ / PACT (ops/fake_quant.py; DoReFa, ops/dorefa.py, in test_dorefa.py): the reference against
float64 autograd, the fused Triton kernels (run by the interpreter on CPU) against the reference, edge
cases, registration and bad input."""

import math

import numpy as np
import pytest
import torch

import q2kernels
from q2kernels import functional as qF
from q2kernels import reference as ref
from q2kernels.ops import _layout
from q2kernels.ops import fake_quant as fq_op

from helpers import DTYPES, assert_sum_close, round_ste, run_both


def _lsq_surrogate(x, s, qn, qp, axis, gscale, beta=None):
    """LSQ / LSQ+ as the common eager QAT code writes it, differentiated by autograd (float64)."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s_ = s.reshape(shape if axis is not None else ())
    s_ = (s_ * gscale) + (s_ - s_ * gscale).detach()
    b = 0.0
    if beta is not None:
        b = beta.reshape(shape if axis is not None else ())
        b = (b * gscale) + (b - b * gscale).detach()
    return round_ste(((x - b) / s_).clamp(qn, qp)) * s_ + b


@pytest.mark.parametrize("mode", ["signed", "unsigned", "symmetric"])
@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("with_beta", [False, True])
def test_lsq_reference_matches_float64_autograd(mode, axis, with_beta):
    x = torch.randn(4, 6, 5, 3, dtype=torch.float64) * 2
    C = 1 if axis is None else x.shape[axis]
    s = torch.rand(C, dtype=torch.float64) * 0.4 + 0.2
    beta = torch.randn(C, dtype=torch.float64) * 0.3 if with_beta else None
    bits = 3
    qn, qp = ref.qrange(bits, mode)
    gscale = _literal_grad_scale(x, axis, qp)
    g = torch.randn_like(x)

    leaves = [t.clone().requires_grad_() for t in (x, s) + ((beta,) if with_beta else ())]
    y64 = _lsq_surrogate(leaves[0], leaves[1], qn, qp, axis, gscale, leaves[2] if with_beta else None)
    want = torch.autograd.grad(y64, leaves, g)

    got_leaves = [t.float().requires_grad_() for t in (x, s) + ((beta,) if with_beta else ())]
    y = ref.lsq_fake_quant(got_leaves[0], got_leaves[1], bits, mode, axis,
                           beta=got_leaves[2] if with_beta else None)
    got = torch.autograd.grad(y, got_leaves, g.float())
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[0].double(), want[0], rtol=0, atol=1e-6)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_pact_reference_matches_float64_autograd():
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64) * 3
    alpha = torch.tensor([2.5], dtype=torch.float64, requires_grad=True)
    xl = x.clone().requires_grad_()
    n = 15
    # PACT as written in the paper's code: y = 0.5(|x| - |x - alpha| + alpha), then quantised (STE).
    c = 0.5 * (xl.abs() - (xl - alpha).abs() + alpha)
    y64 = round_ste(c * n / alpha) * alpha / n
    g = torch.randn_like(x)
    dx64, _ = torch.autograd.grad(y64, (xl, alpha), g)
    x32, a32 = x.float().requires_grad_(), alpha.detach().float().requires_grad_()
    y = ref.pact_fake_quant(x32, a32, 4)
    dx, da = torch.autograd.grad(y, (x32, a32), g.float())
    torch.testing.assert_close(y.double(), y64.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(dx.double(), dx64, rtol=0, atol=1e-6)
    # docs/math.md §3: dalpha = sum g*[x >= alpha] (the clip's gradient; the STE rounding term is dropped).
    torch.testing.assert_close(da.double(), (g * (x >= 2.5)).sum().reshape(1), rtol=1e-5, atol=1e-5)


def _literal_grad_scale(x, axis, qp):
    """LSQ's 1/sqrt(N*Qp), N = the elements sharing one step (all of x, or one channel's), written
    out here so that no test takes it from the code under test."""
    n = x.numel() if axis is None else math.prod(size for d, size in enumerate(x.shape) if d != axis)
    return 1.0 / math.sqrt(n * qp)


def _param_grads64(kind, x, params, g, qn, qp, axis, gscale):
    """[(grad, sum of |terms|)] of each parameter from docs/math.md §1-3: the fp32 per-element terms (the
    level decisions are the contract's), summed in float64. An oracle for the reductions: its only
    rounding is that of the terms, so an fp32 sum's error is bounded by a multiple of 2^-24 of
    sum |terms|."""
    xf, gf = x.detach().float(), g.float()
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    dims = [d for d in range(x.dim()) if d != axis]

    def view(p):
        return p.detach().float().reshape(shape)

    def reduce(t, p):
        """(sum of t, sum of |t|) per entry of p, in float64."""
        t = t.double()

        def total(v):
            return (v.sum(dim=dims) if dims else v).reshape(p.shape)

        return total(t), total(t.abs())

    if kind == "pact":
        alpha = params[0]
        live = (alpha.detach() >= 1e-8).double()
        grad, mag = reduce(torch.where(xf >= view(alpha).clamp_min(1e-8), gf, 0.0), alpha)
        return [(grad * live, mag)]
    s = params[0]
    s_ = view(s).clamp_min(1e-8)
    beta = view(params[1]) if kind == "lsq_plus" else 0.0
    v = (xf - beta) * (1.0 / s_)
    inside = (v >= qn) & (v <= qp)
    q = torch.round(v.clamp(qn, qp))
    ds, ds_mag = reduce(gf * torch.where(inside, q - v, torch.where(v < qn, float(qn), float(qp))), s)
    out = [(ds * gscale * (s.detach() >= 1e-8).double(), ds_mag * gscale)]
    if kind == "lsq_plus":
        dbeta, dbeta_mag = reduce(torch.where(inside, 0.0, gf), params[1])
        out.append((dbeta * gscale, dbeta_mag * gscale))
    return out


def _assert_reduction_close(got, want, terms_abs_sum, n_terms, what):
    """got within the error bound of an fp32 sum of n_terms terms (rounded terms, a tree of
    log2(n) levels in the kernel, a column sum over its programs, the reference's cascade sum):
    (2 log2(n) + 8) * 2^-24 * sum|terms|. Far below 1% of any gradient that is not a near-total
    cancellation: a 1% error in ds, dbeta or dalpha fails at every bit width."""
    bound = (2 * math.ceil(math.log2(max(n_terms, 2))) + 8) * 2.0**-24
    tol = bound * terms_abs_sum + 2.0**-24 * want.abs()
    err = (got.double() - want).abs()
    assert bool((err <= tol).all()), f"{what}: max err {err.max().item():.3e} (tol {tol.min().item():.3e})"


def _plant_ties_and_bounds(x, step, qn, qp, axis=None, offset=None):
    """x changed in place (layout and dtype kept): a quarter of its elements onto exact ties
    (k + 1/2)*step + offset and an eighth onto each clamp bound Qn*step + offset, Qp*step + offset
    of their channel, so that every random sweep exercises round-half-to-even and the closed
    clamp interval. With a power-of-two step and no offset the ties are exact in fp32."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    step = step.detach().float().reshape(shape)
    offset = 0.0 if offset is None else offset.detach().float().reshape(shape)
    k = torch.randint(int(qn), int(qp), x.shape).float()
    pick = torch.randint(0, 8, x.shape)
    planted = torch.where(pick < 2, (k + 0.5) * step + offset, x.detach().float())
    planted = torch.where(pick == 2, qn * step + offset, planted)
    planted = torch.where(pick == 3, qp * step + offset, planted)
    with torch.no_grad():
        x.copy_(planted)
    return x


def _steps(C):
    """C steps: powers of two (exact ties) and arbitrary values, alternately."""
    pow2 = 2.0 ** -torch.randint(1, 5, (C,)).float()
    return torch.where(torch.arange(C) % 2 == 0, pow2, torch.rand(C) * 0.3 + 0.1)


def _check_against_reference(fn, x, params, g, oracle, exact_levels=True):
    """The fused kernels against the reference (y exact, dx exact) and both backends' parameter
    grads against the float64 oracle. oracle: dict(kind=, qn=, qp=, axis=, gscale=)."""
    x = x.detach().requires_grad_()
    (y0, grads0), (y1, grads1) = run_both(fn, [x, *params], g)
    assert len(grads1) == 1 + len(params)
    assert y1.dtype == x.dtype and y1.shape == x.shape
    if _layout.is_dense(x):
        assert y1.stride() == x.stride(), "the output must keep the input's memory layout"
    if exact_levels:
        torch.testing.assert_close(y1, y0, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(grads1[0], grads0[0]), "dx is a mask times g: it must be exact"
    n_terms = x.numel() // max(params[0].numel(), 1)
    want = _param_grads64(x=x, params=params, g=g, **oracle)
    for i, (p1, p0, (w, mag)) in enumerate(zip(grads1[1:], grads0[1:], want)):
        assert p1.dtype == torch.float32 and p1.shape == params[i].shape
        _assert_reduction_close(p1, w, mag, n_terms, f"triton grad of param {i}")
        _assert_reduction_close(p0, w, mag, n_terms, f"reference grad of param {i}")
    return y1, grads1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("mode", ["signed", "unsigned", "symmetric"])
@pytest.mark.parametrize("axis", [None, 1])
def test_lsq_kernel_bits_and_modes(bits, mode, axis):
    x = torch.randn(2, 5, 7, 9) * 2
    C = 1 if axis is None else 5
    s = _steps(C)
    qn, qp = ref.qrange(bits, mode)
    s = s * (8 / 2**bits)  # the grid spans x's range at every width
    _plant_ties_and_bounds(x, s, qn, qp, axis)
    g = torch.randn_like(x)
    oracle = dict(kind="lsq", qn=qn, qp=qp, axis=axis, gscale=_literal_grad_scale(x, axis, qp))
    _check_against_reference(lambda x, s: qF.lsq_quantize(x, s, bits, mode, axis), x, [s.requires_grad_()], g, oracle)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced", "transposed"])
@pytest.mark.parametrize("axis", [None, 0, 1, 3])
def test_lsq_kernel_layouts_and_dtypes(dtype, layout, axis):
    base = torch.randn(3, 6, 5, 7) * 1.5
    if layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(3, 12, 5, 7)[:, ::2]
    elif layout == "transposed":
        x = base.transpose(2, 3)
    else:
        x = base
    x = x.to(dtype)
    C = 1 if axis is None else x.shape[axis]
    s = _steps(C) * 0.5
    _plant_ties_and_bounds(x, s, -8, 7, axis)
    g = torch.randn(x.shape).to(dtype)
    oracle = dict(kind="lsq", qn=-8, qp=7, axis=axis, gscale=_literal_grad_scale(x, axis, 7))
    _check_against_reference(lambda x, s: qF.lsq_quantize(x, s, 4, "signed", axis), x, [s.requires_grad_()], g, oracle)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_lsq_plus_kernel(bits, axis, dtype, channels_last):
    x = (torch.randn(2, 11, 3, 5) * 2 - 0.3).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    C = 1 if axis is None else 11
    qn, qp = ref.qrange(bits, "unsigned")
    # beta a multiple of 2^-6: with a power-of-two step, x - beta and the planted ties are exact
    s, beta = _steps(C) * (8 / 2**bits), torch.round(torch.randn(C) * 0.2 * 64) / 64
    _plant_ties_and_bounds(x, s, qn, qp, axis, beta)
    g = torch.randn(x.shape).to(dtype)
    fn = lambda x, s, b: qF.lsq_plus_quantize(x, s, b, bits, "unsigned", axis)  # noqa: E731
    # y = q*s + beta: the kernel may fuse the multiply-add (one rounding), so allow 1 ulp.
    (y0, _), (y1, _) = run_both(fn, [x, s, beta], None)
    torch.testing.assert_close(y1.float(), y0.float(), rtol=2**-22, atol=1e-7)
    oracle = dict(kind="lsq_plus", qn=qn, qp=qp, axis=axis, gscale=_literal_grad_scale(x, axis, qp))
    _check_against_reference(fn, x, [s.requires_grad_(), beta.requires_grad_()], g, oracle, exact_levels=False)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pact_kernel(bits, dtype):
    x = (torch.randn(3, 5, 6, 7) * 3).to(dtype).to(memory_format=torch.channels_last)
    alpha = torch.tensor([2.25])
    n = 2**bits - 1
    _plant_ties_and_bounds(x, alpha / n, 0, n)
    x[0, 0, 0, :4] = torch.tensor([0.0, 2.25, -0.0, 2.2500002]).to(dtype)  # on and around the bounds
    g = torch.randn(x.shape).to(dtype)
    oracle = dict(kind="pact", qn=0, qp=n, axis=None, gscale=1.0)
    _check_against_reference(lambda x, a: qF.pact_quantize(x, a, bits), x, [alpha.requires_grad_()], g, oracle)


# Clip values alpha where fp32 n*(1/alpha) != n/alpha for every n = 2^k - 1 in {3, 7, 15, 255} (a numpy
# search over float32 alphas): a multiplier computed through a reciprocal (as `n / alpha_tensor` is:
# Tensor.__rtruediv__ multiplies by alpha.reciprocal()) is then one ulp off, and decides some
# ties differently. At 1.81 ... 13.61 only fp32 inputs land close enough to a tie for that ulp to
# flip a level; 7.875 also has fp16 and bf16 inputs that do, at every bit width. (At 2.25, the
# clip value of test_pact_kernel, the two multipliers agree for n = 3, 7, 15 and 255. For n = 1 they
# would always agree, but PACT has 2 bits or more.)
PACT_ODD_ALPHAS = [(1.81, torch.float32), (3.93, torch.float32), (7.03, torch.float32), (13.61, torch.float32),
                   (7.875, torch.float32), (7.875, torch.float16), (7.875, torch.bfloat16)]


def _grid_steps(x, offsets):
    """Each (positive, finite) element of x and its neighbours `offsets` steps away on x's own grid
    (fp32, fp16 or bf16): stepping the bit pattern steps the value for positive floats."""
    ints = torch.int32 if x.dtype == torch.float32 else torch.int16
    return (x.view(ints)[:, None] + torch.tensor(list(offsets), dtype=ints)).view(x.dtype).flatten()


def _pact_levels(xf, alpha, multiplier, n):
    """docs/math.md §3 in numpy fp32: q = R(clip(c*mul, 0, n)), c = clip(x, 0, alpha), every product
    rounded once to fp32, np.round halves to even."""
    c = np.minimum(np.maximum(xf, np.float32(0)), alpha)
    return np.clip(np.round(c * multiplier), 0, n).astype(np.float32)


@pytest.mark.parametrize("alpha,dtype", PACT_ODD_ALPHAS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_pact_multiplier_is_n_over_alpha_rounded_once(alpha, dtype, bits, backend):
    """PACT's level is R(c * fl(n/alpha)) (one correctly rounded division; docs/math.md §0 and §3, and the
    integer path's q_mul), not R(c * fl(n * fl(1/alpha))). The oracle is written out in numpy: fp32
    products, round half to even, and y = q * fl(alpha/n) within one fp32 ulp (§0), stored to the input
    dtype rounding to nearest even. The inputs sit on and around every tie k + 1/2 of this alpha, at
    the clamp bounds 0 and alpha, and outside them."""
    n = 2**bits - 1
    a32, n32 = np.float32(alpha), np.float32(n)
    mul = n32 / a32                          # fl(n/alpha): the contract
    mul_via_reciprocal = n32 * (np.float32(1) / a32)  # the rounding the contract rules out
    assert mul != mul_via_reciprocal
    step = a32 / n32                         # fl(alpha/n)

    k = np.arange(n, dtype=np.float64)
    near_ties = torch.from_numpy(((k + 0.5) / np.float64(mul)).astype(np.float32)).to(dtype)
    a_d = torch.tensor([alpha]).to(dtype)
    x = torch.cat([
        _grid_steps(near_ties, range(-4, 5)),
        _grid_steps(a_d, range(-2, 3)),       # alpha (as the dtype holds it) and its neighbours
        torch.tensor([0.0, -0.0, -1e-7, -1.0, 2.0 * alpha, 1e30, -1e30, float(torch.finfo(dtype).tiny)]).to(dtype),
    ])
    xf = x.float().numpy()

    levels = _pact_levels(xf, a32, mul, n)
    v = np.minimum(np.maximum(xf, np.float32(0)), a32) * mul
    assert ((v - np.floor(v)) == 0.5).any(), "the inputs must include exact ties of this alpha"

    def stored(y32):
        return torch.from_numpy(np.asarray(y32, dtype=np.float32)).to(dtype)

    def allowed(lv):
        """The dtype values within one fp32 ulp of lv*step, each rounded to the dtype (stacked)."""
        y32 = lv * step
        return torch.stack([stored(np.nextafter(y32, np.float32(-np.inf))), stored(y32),
                            stored(np.nextafter(y32, np.float32(np.inf)))])

    def outside(y, ok):
        return ~(y[None] == ok).any(0)

    want = allowed(levels)
    # The data can tell the two multipliers apart at this alpha, dtype and width:
    planted = stored(_pact_levels(xf, a32, mul_via_reciprocal, n) * step)
    assert outside(planted, want).any(), "no input separates fl(n/alpha) from n*fl(1/alpha)"

    g = torch.randn(x.shape).to(dtype)
    xl = x.clone().requires_grad_()
    al = torch.tensor([alpha], requires_grad=True)
    with q2kernels.use_backend(backend):
        y = qF.pact_quantize(xl, al, bits)
        dx, da = torch.autograd.grad(y, (xl, al), g)
    assert y.dtype == dtype
    bad = outside(y, want)
    assert not bad.any(), (f"{int(bad.sum())} levels differ, e.g. x={x[bad][:4].tolist()}: got "
                           f"{y[bad][:4].tolist()}, want level {levels[bad.numpy()][:4].tolist()} * {float(step)}")
    # dx = g*[0 <= x < alpha'], exactly; dalpha = sum g*[x >= alpha'] (float64 oracle, fp32 sum bound).
    inside = torch.from_numpy((xf >= 0) & (xf < a32))
    assert torch.equal(dx, torch.where(inside, g, torch.zeros((), dtype=dtype)))
    gd = g.double()
    above = torch.from_numpy(xf >= a32)
    want_da = gd[above].sum()
    assert da.dtype == torch.float32 and da.shape == (1,)
    assert abs(float(da) - float(want_da)) <= 1e-6 * float(gd[above].abs().sum()) + 1e-7 * abs(float(want_da))


@pytest.mark.parametrize("axis", [None, 1, 3])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_lsq_auto_grad_scale_is_one_over_sqrt_n_qp(axis, backend):
    """grad_scale="auto" is 1/sqrt(N*Qp) with N the elements per step: per channel, N is one
    channel's count (4*5*3 = 60 on axis 1), not x.numel(). Literal values, not the code's helper."""
    x = torch.randn(4, 6, 5, 3)
    C = {None: 1, 1: 6, 3: 3}[axis]
    N = {None: 360, 1: 60, 3: 120}[axis]
    s = torch.rand(C) * 0.3 + 0.1
    g = torch.randn_like(x)
    grads = []
    with q2kernels.use_backend(backend):
        for gs in ("auto", None):
            sl = s.clone().requires_grad_()
            grads.append(torch.autograd.grad(qF.lsq_quantize(x, sl, 4, "signed", axis, grad_scale=gs), sl, g)[0])
    # (the kernel scales each term, the reference the sum: they differ in the last bits)
    torch.testing.assert_close(grads[0], grads[1] / math.sqrt(N * 7), rtol=1e-4, atol=1e-7)


def test_exact_ties_and_clamp_bounds(triton_backend):
    s = torch.tensor([0.25])  # a power of two: x = (k + 1/2) * s is an exact tie of x/s
    halves = torch.arange(-10, 10).float() + 0.5
    bounds = torch.tensor([-8.0, 7.0, -7.0, -8.0000005, 7.0000005])  # Qn, Qp of 4-bit signed
    x = torch.cat([halves, bounds]) * s
    g = torch.ones_like(x)
    (y0, (dx0, ds0)), (y1, (dx1, ds1)) = run_both(lambda x, s: qF.lsq_quantize(x, s, 4, "signed"),
                                                  [x.requires_grad_(), s.requires_grad_()], g)
    expected_levels = torch.round(halves.clamp(-8, 7))  # half to even: 0.5 -> 0, 1.5 -> 2, -0.5 -> -0
    assert torch.equal(y1[:20] / 0.25, expected_levels)
    assert torch.equal(y1, y0)
    # the closed interval Qn <= v <= Qp: both bounds pass the gradient, just outside does not
    assert dx1[20:].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert torch.equal(dx1, dx0)


@pytest.mark.parametrize("fn", [
    lambda x: qF.lsq_quantize(x, torch.tensor([0.3]), 4, "signed"),
    lambda x: qF.lsq_plus_quantize(x, torch.tensor([0.3]), torch.tensor([0.1]), 4),
    lambda x: qF.pact_quantize(x, torch.tensor([2.0]), 4),
], ids=["lsq", "lsq_plus", "pact"])
def test_nan_and_inf_propagate(fn, triton_backend):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, -1.0])
    y = fn(x)
    with q2kernels.use_backend("reference"):
        y_ref = fn(x)
    assert torch.isnan(y[0]) and torch.isnan(y_ref[0])
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("shape", [(0,), (0, 4, 3, 3), (1, 1, 1, 1), (1, 3, 1, 1), (7,), (3, 1001)])
def test_empty_and_tiny_shapes(shape, triton_backend):
    x = torch.randn(shape).requires_grad_()
    s = torch.tensor([0.2], requires_grad=True)
    y = qF.lsq_quantize(x, s, 4, "signed")
    y.sum().backward()
    assert y.shape == x.shape
    with q2kernels.use_backend("reference"):
        xr, sr = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
        qF.lsq_quantize(xr, sr, 4, "signed").sum().backward()
    assert torch.equal(x.grad, xr.grad)
    assert_sum_close(s.grad, sr.grad, torch.tensor(float(x.numel())))
    if x.numel() == 0:
        assert s.grad.item() == 0.0


def test_scale_below_floor_gets_no_gradient(triton_backend):
    x = torch.randn(64)
    s = torch.tensor([1e-9], requires_grad=True)
    y = qF.lsq_quantize(x, s, 4, "signed")
    y.sum().backward()
    assert s.grad.item() == 0.0
    assert torch.equal(y, (torch.round((x * (1 / torch.tensor(1e-8))).clamp(-8, 7)) * 1e-8))


def test_int64_offsets_path(monkeypatch, triton_backend):
    """Tensors over 2^31 elements switch the kernels to int64 offsets; run that path small."""
    monkeypatch.setattr(_layout, "needs_int64", lambda x: True)
    x = torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)
    s = torch.rand(3) + 0.1
    g = torch.randn_like(x)
    oracle = dict(kind="lsq", qn=-8, qp=7, axis=1, gscale=_literal_grad_scale(x, 1, 7))
    _check_against_reference(lambda x, s: qF.lsq_quantize(x, s, 4, "signed", 1), x, [s.requires_grad_()], g, oracle)


def test_deterministic_bits(triton_backend):
    x = torch.randn(4, 16, 9, 9).requires_grad_()
    s = (torch.rand(16) + 0.1).requires_grad_()
    g = torch.randn_like(x)
    runs = []
    for _ in range(2):
        y = qF.lsq_quantize(x, s, 4, "signed", 1)
        runs.append((y,) + torch.autograd.grad(y, (x, s), g))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind,beta,axis", [
    (fq_op.LSQ, False, None), (fq_op.LSQ, False, 1), (fq_op.LSQ_PLUS, True, None),
    (fq_op.LSQ_PLUS, True, 1), (fq_op.PACT, False, None),  # PACT has one clip value per tensor
])
def test_opcheck_fake_quant(kind, beta, axis):
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    C = 1 if axis is None else 3
    s = (torch.rand(C) + 0.5).requires_grad_()
    b = (torch.randn(C) * 0.1).requires_grad_() if beta else None
    qn, qp = (0.0, 15.0) if kind != fq_op.LSQ else (-8.0, 7.0)
    torch.library.opcheck(torch.ops.q2kernels.fake_quant.default, (x, s, b, kind, qn, qp, axis, 0.1))


@pytest.mark.parametrize("bad,match", [
    (lambda x, s: qF.lsq_quantize(x, s, 1), "bits"),
    (lambda x, s: qF.lsq_quantize(x, s, 9), "bits"),
    (lambda x, s: qF.lsq_quantize(x.to(torch.int32), s, 4), "x: expected a float32"),
    (lambda x, s: qF.lsq_quantize(x.to(torch.complex64), s, 4), "x: expected a float32"),
    (lambda x, s: qF.lsq_quantize(x, torch.ones(3), 4), "s: expected 1 element"),
    (lambda x, s: qF.lsq_quantize(x, torch.ones(3), 4, axis=1), "s: expected 5 element"),
    (lambda x, s: qF.lsq_quantize(x, s, 4, axis=4), "axis"),
    (lambda x, s: qF.lsq_quantize(x, s, 4, mode="asym"), "mode"),
    (lambda x, s: qF.lsq_quantize(x, s.to("meta"), 4), "s: is on meta"),
    (lambda x, s: qF.lsq_quantize(x, s.double(), 4), "s: expected a float32"),
    (lambda x, s: qF.lsq_plus_quantize(x, s, None, 4), "beta"),
    (lambda x, s: qF.pact_quantize(x, torch.ones(2), 4), "alpha: expected 1 element"),
    (lambda x, s: qF.lsq_quantize(x, s, 4, grad_scale="yes"), "grad_scale"),
])
def test_bad_input_errors(bad, match):
    x = torch.randn(2, 5, 3, 3)
    s = torch.tensor([0.5])
    with pytest.raises((ValueError, TypeError), match=match):
        bad(x, s)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, 1])
def test_cuda_kernels_match_reference_at_scale(dtype, axis):
    x = (torch.randn(16, 64, 80, 80, device="cuda") * 2).to(dtype).to(memory_format=torch.channels_last)
    C = 1 if axis is None else 64
    s = torch.rand(C, device="cuda") * 0.2 + 0.05
    beta = torch.randn(C, device="cuda") * 0.1
    g = torch.randn(x.shape, device="cuda").to(dtype)
    gscale = dict(signed=_literal_grad_scale(x, axis, 7), unsigned=_literal_grad_scale(x, axis, 15))
    _check_against_reference(lambda x, s: qF.lsq_quantize(x, s, 4, "signed", axis), x, [s.requires_grad_()], g,
                             dict(kind="lsq", qn=-8, qp=7, axis=axis, gscale=gscale["signed"]))
    _check_against_reference(lambda x, s, b: qF.lsq_plus_quantize(x, s, b, 4, axis=axis), x,
                             [s.requires_grad_(), beta.requires_grad_()], g,
                             dict(kind="lsq_plus", qn=0, qp=15, axis=axis, gscale=gscale["unsigned"]),
                             exact_levels=False)
    _check_against_reference(lambda x, a: qF.pact_quantize(x, a, 4), x,
                             [torch.tensor([2.0], device="cuda").requires_grad_()], g,
                             dict(kind="pact", qn=0, qp=15, axis=None, gscale=1.0))
