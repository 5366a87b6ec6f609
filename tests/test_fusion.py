"""Gated fusion + LayerNorm (docs/math.md §5): the reference against float64 autograd, the fused Triton
kernels (interpreter on CPU) against the reference for outputs, every gradient and the branch
energies; the closed-loop controller; GatedFusion; torch.compile; opcheck; deployment (calibration,
LayerNorm removal and its refusals); bad input."""
import math
import warnings

import pytest
import torch
from torch import nn

import q2kernels
from q2kernels import deploy
from q2kernels import functional as qF
from q2kernels import reference as ref
from q2kernels.gate_controller import GateController
from q2kernels.nn import FusionConv, GatedFusion
from q2kernels.ops import fusion as fusion_op

from gate_controller_oracle import controller_by_hand
from helpers import DTYPES, _like_layout, assert_sum_close


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _branches(channels, B=2, HW=(3, 5), dtype=torch.float32, layout="nchw"):
    """Branches with different scales and offsets (the imbalance the gates exist for)."""
    xs = [torch.randn(B, c, *HW) * (1 + k) + 0.5 * k for k, c in enumerate(channels)]
    if layout == "channels_last":
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    elif layout == "mixed":
        xs = [x.to(memory_format=torch.channels_last) if k % 2 else x for k, x in enumerate(xs)]
    elif layout == "sliced":  # channel slices of wider tensors: not dense, read in place
        xs = [torch.cat([x, torch.randn_like(x)], dim=1)[:, :x.size(1)] for x in xs]
    elif layout == "transposed":  # H and W swapped in memory: pixels do not merge, copied once
        xs = [x.transpose(2, 3).contiguous().transpose(2, 3) for x in xs]
    return [x.to(dtype) for x in xs]


def _params(K, C, affine, seed_scale=1.0):
    theta = torch.randn(K) * seed_scale
    gamma = torch.randn(C) if affine else None
    beta = torch.randn(C) if affine else None
    return theta, gamma, beta


def _recorder(K, L=0, theta=None, device="cpu"):
    return GateController(torch.zeros(K, device=device), torch.zeros(K, device=device),
                              torch.zeros((), dtype=torch.int64, device=device),
                              torch.zeros(L, 1 + 3 * K, device=device), theta)


def _leaf(t):
    if t is None:
        return None
    return _like_layout(t, t.detach().clone()).requires_grad_()


def _run(backend, xs, theta, gamma, beta, fuse, dy):
    """y, grads of (xs..., theta, gamma, beta) and the norms G = sqrt(E) recorded by the backward."""
    xs = [_leaf(x) for x in xs]
    theta, gamma, beta = _leaf(theta), _leaf(gamma), _leaf(beta)
    rec = _recorder(len(xs), device=xs[0].device)
    with q2kernels.use_backend(backend):
        y = qF.gated_fusion(xs, theta, gamma, beta, fuse=fuse, controller=rec)
    wants = xs + [t for t in (theta, gamma, beta) if t is not None]
    grads = torch.autograd.grad(y, wants, dy)
    return y, grads, rec.grad_norm.clone()


def _float64_chain(xs, theta, gamma, beta, fuse, eps=1e-5):
    """The eager chain in float64: softmax, scale, cat (or add), qF.layer_norm over channels."""
    a = torch.softmax(theta, dim=0)
    hs = [a[k] * x for k, x in enumerate(xs)]
    h = torch.cat(hs, dim=1) if fuse == "concat" else sum(hs)
    C = h.size(1)
    y = torch.nn.functional.layer_norm(h.permute(0, 2, 3, 1), (C,), gamma, beta, eps)
    return y.permute(0, 3, 1, 2)


def _grad_terms(xs, theta, gamma, dy, fuse, eps=1e-5):
    """float64 sums of |terms| of every reduced grad (assert_sum_close's summation-order bound):
    (per-branch da terms, per-channel dgamma terms, per-channel dbeta terms)."""
    xs = [x.double() for x in xs]
    a = torch.softmax(theta.double(), dim=0)
    hs = [a[k] * x for k, x in enumerate(xs)]
    h = torch.cat(hs, dim=1) if fuse == "concat" else sum(hs)
    mu = h.mean(1, keepdim=True)
    rstd = 1 / torch.sqrt(((h - mu) ** 2).mean(1, keepdim=True) + eps)
    xhat = (h - mu) * rstd
    g = dy.double() * (gamma.double().reshape(1, -1, 1, 1) if gamma is not None else 1.0)
    c1 = (g * xhat).mean(1, keepdim=True).abs()
    c2 = g.mean(1, keepdim=True).abs()
    dh_bound = rstd * (g.abs() + c2 + xhat.abs() * c1)
    bounds = torch.split(dh_bound, [x.size(1) for x in xs], 1) if fuse == "concat" else [dh_bound] * len(xs)
    da_terms = torch.stack([(b * x.abs()).sum() for b, x in zip(bounds, xs)])
    return da_terms, (dy.double() * xhat).abs().sum((0, 2, 3)), dy.double().abs().sum((0, 2, 3))


def _assert_elementwise(actual, expected, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-5, atol=1e-5)
    else:  # fp32 math, then one rounding to the dtype: 1 ulp of that dtype
        ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
        torch.testing.assert_close(actual.float(), expected.float(), rtol=ulp, atol=1e-5)


def _check_kernel(channels, fuse="concat", affine=True, dtype=torch.float32, layout="nchw", B=2, HW=(3, 5)):
    K = len(channels)
    xs = _branches(channels, B, HW, dtype, layout)
    C = sum(channels) if fuse == "concat" else channels[0]
    theta, gamma, beta = _params(K, C, affine)
    dy = torch.randn(B, C, *HW).to(dtype)
    y0, g0, e0 = _run("reference", xs, theta, gamma, beta, fuse, dy)
    y1, g1, e1 = _run("triton", xs, theta, gamma, beta, fuse, dy)
    assert y1.dtype == dtype and y1.shape == y0.shape
    assert y1.stride() == torch.empty_like(y1, memory_format=fusion_op.output_format(xs[0])).stride()
    _assert_elementwise(y1, y0, dtype)
    for k in range(K):
        assert g1[k].dtype == dtype and g1[k].shape == xs[k].shape
        _assert_elementwise(g1[k], g0[k], dtype)
    da_terms, dgamma_terms, dbeta_terms = _grad_terms(xs, theta, gamma, dy, fuse)
    a = torch.softmax(theta.double(), 0)
    assert_sum_close(g1[K], g0[K], a * (da_terms + (a * da_terms).sum()))
    if affine:
        assert_sum_close(g1[K + 1], g0[K + 1], dgamma_terms)
        assert_sum_close(g1[K + 2], g0[K + 2], dbeta_terms)
    assert_sum_close(e1, e0, e0.abs())
    assert bool((e1 > 0).all())
    return xs, y1


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels,fuse,affine", [
    ([4, 3], "concat", True), ([5, 2, 3], "concat", False), ([4, 4], "sum", True), ([3, 3, 3], "sum", False),
])
def test_reference_matches_float64_autograd(channels, fuse, affine):
    K = len(channels)
    xs = _branches(channels, B=2, HW=(3, 4), dtype=torch.float64)
    C = sum(channels) if fuse == "concat" else channels[0]
    theta, gamma, beta = (t.double() if t is not None else None for t in _params(K, C, affine))
    dy = torch.randn(2, C, 3, 4, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in xs + [theta] + ([gamma, beta] if affine else [])]
    y64 = _float64_chain(leaves64[:K], leaves64[K], *(leaves64[K + 1:] if affine else (None, None)), fuse)
    want = torch.autograd.grad(y64, leaves64, dy)

    leaves = [t.float().requires_grad_() for t in xs + [theta] + ([gamma, beta] if affine else [])]
    seen = []
    y = ref.gated_fusion(leaves[:K], leaves[K], *(leaves[K + 1:] if affine else (None, None)), fuse=fuse,
                         on_energies=lambda e, a: seen.append((e, a)))
    got = torch.autograd.grad(y, leaves, dy.float())
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=2e-5)
    for k in range(K):
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-4, atol=1e-5)
    for a, b in zip(got[K:], want[K:]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    # E_k = sum(dx_k^2), dx_k the float64 autograd grad of branch k; the gates of the forward
    (energies, gates), = seen
    torch.testing.assert_close(energies.double(), torch.stack([(w * w).sum() for w in want[:K]]),
                               rtol=1e-5, atol=0)
    assert torch.equal(gates, torch.softmax(leaves[K].detach(), 0))


def test_reference_gate_grad_is_the_softmax_jacobian():
    """dtheta = a*(da - sum_j a_j*da_j), with da_k = sum(dh_k*x_k) the grad of the gates."""
    xs = _branches([3, 5, 2])
    theta = torch.randn(3, requires_grad=True)
    a = torch.softmax(theta.detach(), 0).requires_grad_()
    dy = torch.randn(2, 10, 3, 5)
    (da,) = torch.autograd.grad(ref.fusion.gated_fusion_gates(xs, a), a, dy)
    (dtheta,) = torch.autograd.grad(ref.gated_fusion(xs, theta), theta, dy)
    a = a.detach()
    torch.testing.assert_close(dtheta, a * (da - (a * da).sum()), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# kernels against the reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels,fuse,affine,layout", [
    ([4, 3], "concat", True, "nchw"),               # ragged, 2 branches
    ([5, 5], "concat", False, "channels_last"),     # equal, affine off
    ([4, 6, 3], "concat", True, "channels_last"),   # 3 branches
    ([6, 3, 5, 2], "concat", True, "nchw"),         # 4 branches
    ([3, 1, 2, 5, 4, 2], "concat", True, "mixed"),  # 6 branches: K is not capped
    ([6, 6], "sum", True, "channels_last"),
    ([4, 4, 4], "sum", False, "nchw"),
    ([3, 3, 3, 3], "sum", True, "mixed"),
    ([2, 2, 2, 2, 2], "sum", False, "channels_last"),
    ([4, 7], "concat", True, "mixed"),              # one NCHW and one channels_last branch
    ([4, 3], "concat", True, "sliced"),             # channel slices of wider tensors
    ([4, 3], "concat", False, "transposed"),       # H and W do not merge: one copy
])
def test_kernel_matches_reference(channels, fuse, affine, layout):
    _check_kernel(channels, fuse, affine, layout=layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout,fuse", [("nchw", "concat"), ("channels_last", "sum")])
def test_kernel_half_dtypes(dtype, layout, fuse):
    _check_kernel([6, 6, 6] if fuse == "sum" else [5, 8, 3], fuse, True, dtype, layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fuse", ["concat", "sum"])
def test_kernel_half_stores_round_to_nearest_even(dtype, fuse, triton_backend):
    """y and dx of half inputs are the kernel's own fp32 results (the same fp32 math on the same
    values, run with fp32 inputs) rounded to nearest even, as torch's .to() rounds: not truncated."""
    channels = [6, 6] if fuse == "sum" else [6, 3]
    xs = _branches(channels, B=2, HW=(4, 5), dtype=dtype)
    C = channels[0] if fuse == "sum" else sum(channels)
    theta, gamma, beta = _params(2, C, True)
    dy = torch.randn(2, C, 4, 5).to(dtype)
    outs = {}
    for name, cast in (("half", lambda t: t), ("fp32", lambda t: t.float())):
        leaves = [cast(x).requires_grad_() for x in xs]
        y = qF.gated_fusion(leaves, theta, gamma, beta, fuse=fuse)
        outs[name] = (y,) + torch.autograd.grad(y, leaves, cast(dy))
    for half, full in zip(outs["half"], outs["fp32"]):
        assert half.dtype == dtype
        assert torch.equal(half, full.to(dtype))


@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_strided_and_expanded_parameters(view):
    """gamma, beta and theta that are not contiguous (a slice t[::2], or one value expanded) give
    the reference's outputs and grads on the kernel path, and the grads reach the base tensors."""
    xs = _branches([4, 3], B=2, HW=(3, 4))
    dy = torch.randn(2, 7, 3, 4)
    results = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(11)
        if view == "strided":
            bases = [torch.randn(2 * c).requires_grad_() for c in (2, 7, 7)]
            theta, gamma, beta = (b[::2] for b in bases)
        else:
            bases = [torch.randn(1).requires_grad_() for _ in range(3)]
            theta, gamma, beta = (b.expand(c) for b, c in zip(bases, (2, 7, 7)))
        assert not gamma.is_contiguous()
        leaves = [x.clone().requires_grad_() for x in xs]
        with q2kernels.use_backend(backend):
            y = qF.gated_fusion(leaves, theta, gamma, beta)
        results[backend] = (y,) + torch.autograd.grad(y, leaves + bases, dy)
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels,fuse,B,layout", [
    ([8, 4], "concat", 3, "nchw"), ([8, 4], "concat", 3, "channels_last"), ([5, 5], "sum", 1, "nchw"),
])
def test_kernel_1x1_spatial(channels, fuse, B, layout):
    _check_kernel(channels, fuse, True, B=B, HW=(1, 1), layout=layout)


@pytest.mark.parametrize("channels", [[128, 256], [512, 256]])  # rows of 384 and 768: not powers of two
def test_kernel_yolo11_channel_counts_batch_1(channels):
    for layout in ("nchw", "channels_last"):
        _check_kernel(channels, "concat", True, torch.bfloat16, layout, B=1, HW=(2, 3))


def test_kernel_many_blocks_per_program(monkeypatch):
    """Small pixel blocks and few programs: each backward program walks several blocks (and every
    image ends in a partial block)."""
    monkeypatch.setattr(fusion_op, "MAX_BLOCK_P", 4)
    monkeypatch.setattr(fusion_op, "CPU_PROGRAMS", 3)
    _check_kernel([5, 3], "concat", True, layout="nchw", B=3, HW=(3, 7))
    _check_kernel([4, 4], "sum", True, layout="channels_last", B=2, HW=(5, 3))


def test_kernel_int64_offsets(monkeypatch):
    monkeypatch.setattr(fusion_op, "_max_offset", lambda t: 2**31)
    _check_kernel([4, 3, 2], "concat", True, layout="channels_last")


def test_kernel_expanded_dy_is_read_in_place(triton_backend):
    """A per-channel loss hands the backward an expanded dy, strides (0, 1, 0, 0)."""
    xs = [x.requires_grad_() for x in _branches([4, 3])]
    theta = torch.randn(2, requires_grad=True)
    w = torch.randn(7)

    def loss(xs, theta):
        return (qF.gated_fusion(xs, theta).sum(dim=(0, 2, 3)) * w).sum()

    loss(xs, theta).backward()
    got = [x.grad.clone() for x in xs] + [theta.grad.clone()]
    with q2kernels.use_backend("reference"):
        xr = [x.detach().clone().requires_grad_() for x in xs]
        tr = theta.detach().clone().requires_grad_()
        loss(xr, tr).backward()
    assert got[0].abs().max() > 0.01
    for a, b in zip(got, [x.grad for x in xr] + [tr.grad]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kernel_nan_stays_in_its_pixel(triton_backend):
    xs = _branches([4, 3])
    xs[1][1, 2, 2, 3] = float("nan")
    y = qF.gated_fusion(xs, torch.zeros(2))
    assert torch.isnan(y[1, :, 2, 3]).all()
    bad = torch.zeros_like(y, dtype=torch.bool)
    bad[1, :, 2, 3] = True
    assert not torch.isnan(y[~bad]).any()
    with q2kernels.use_backend("reference"):
        torch.testing.assert_close(y, qF.gated_fusion(xs, torch.zeros(2)), equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4)])
def test_kernel_empty(shape, triton_backend):
    B, H, W = shape
    xs = [torch.randn(B, 3, H, W, requires_grad=True), torch.randn(B, 2, H, W, requires_grad=True)]
    theta = torch.zeros(2, requires_grad=True)
    gamma, beta = torch.ones(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    rec = _recorder(2)
    y = qF.gated_fusion(xs, theta, gamma, beta, controller=rec)
    assert y.shape == (B, 5, H, W)
    y.sum().backward()
    assert xs[0].grad.shape == xs[0].shape
    for t in (theta.grad, gamma.grad, beta.grad, rec.grad_norm):
        assert torch.equal(t, torch.zeros_like(t))


def test_kernel_deterministic_bits(triton_backend):
    xs = [x.requires_grad_() for x in _branches([5, 3], B=3, HW=(4, 5))]
    theta, gamma, beta = (t.requires_grad_() for t in _params(2, 8, True))
    dy = torch.randn(3, 8, 4, 5)
    runs = []
    for _ in range(2):
        rec = _recorder(2)
        y = qF.gated_fusion(xs, theta, gamma, beta, controller=rec)
        runs.append((y, rec.grad_norm) + torch.autograd.grad(y, xs + [theta, gamma, beta], dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# the controller
# ------------------------------------------------------------------------------------------------

def test_controller_follows_math_md_by_hand():
    """The op q2kernels::gate_controller against docs/math.md §5 written out in float64
    (gate_controller_oracle.py): the first step, the EMA, tau and the centring, over 4 steps."""
    K = 3
    tau = [0.1, -0.2, 0.1]
    theta0 = [0.3, -0.1, 0.0]
    energies = [[2.0, 30.0, 700.0], [1.5, 80.0, 300.0], [0.25, 10.0, 9000.0], [4.0, 4.0, 4.0]]
    state = GateController(torch.zeros(K), torch.zeros(K), torch.zeros((), dtype=torch.int64),
                           torch.zeros(2, 1 + 3 * K), torch.tensor(theta0), torch.tensor(tau), 0.1, 0.05)
    want = controller_by_hand(energies, theta0, tau)
    for step, (E, (G, Gbar, theta)) in enumerate(zip(energies, want)):
        gates = torch.softmax(state.theta, 0)
        state.step(torch.tensor(E), gates)
        torch.testing.assert_close(state.grad_norm.double(), torch.tensor(G, dtype=torch.float64), rtol=1e-7, atol=0)
        torch.testing.assert_close(state.grad_norm_ema.double(), torch.tensor(Gbar, dtype=torch.float64),
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(state.theta.double(), torch.tensor(theta, dtype=torch.float64), rtol=0, atol=1e-6)
        assert int(state.steps) == step + 1
        row = torch.cat([torch.tensor([float(step)]), state.grad_norm, state.grad_norm_ema, gates])
        assert torch.equal(state.history[step % 2], row)
        if step == 0:  # Gbar <- G on the first step, not an EMA from 0
            assert torch.equal(state.grad_norm_ema, state.grad_norm)
    assert abs(float(state.theta.sum())) < 1e-6


def test_controller_record_only_leaves_theta():
    rec = _recorder(2, L=3)
    rec.step(torch.tensor([1.0, 4.0]), torch.tensor([0.5, 0.5]))  # G = [1, 2]
    rec.step(torch.tensor([9.0, 4.0]), torch.tensor([0.5, 0.5]))  # G = [3, 2]
    assert rec.theta is None
    torch.testing.assert_close(rec.grad_norm, torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(rec.grad_norm_ema, torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 2]))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_balanced_module_follows_math_md_by_hand(backend):
    """A balanced GatedFusion with its default constants over 3 steps: its theta, G and Gbar are
    those of the hand-written loop fed with E_k = sum(dx_k^2) of the grads autograd returned."""
    torch.manual_seed(5)
    m = GatedFusion([4, 3], mode="balanced")
    energies = []
    with q2kernels.use_backend(backend):
        for step in range(3):
            xs = [x.requires_grad_() for x in _branches([4, 3], HW=(3, 3))]
            m(xs).backward(torch.randn(2, 7, 3, 3) * (1 + step))
            energies.append([x.grad.double().square().sum().item() for x in xs])
    G, Gbar, theta = controller_by_hand(energies, [0.0, 0.0])[-1]
    torch.testing.assert_close(m.grad_norm.double(), torch.tensor(G, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(m.grad_norm_ema.double(), torch.tensor(Gbar, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(m.theta.double(), torch.tensor(theta, dtype=torch.float64), rtol=0, atol=1e-6)
    log = m.gate_log()
    assert log["step"].tolist() == [0, 1, 2]
    torch.testing.assert_close(log["grad_norm"].double(),
                               torch.tensor([[math.sqrt(e) for e in E] for E in energies], dtype=torch.float64),
                               rtol=1e-6, atol=0)


def _orthogonal_to_layernorm(g, y):
    """g with, per pixel, its components along 1 and along y removed: the LayerNorm backward of such
    a g (gamma = 1) is exactly rstd*g, so each branch keeps the gradient scale given to it."""
    g = g - g.mean(1, keepdim=True)
    yc = y - y.mean(1, keepdim=True)
    return g - yc * (g * yc).sum(1, keepdim=True) / (yc * yc).sum(1, keepdim=True)


def _imbalanced_run(backend, steps, mode="balanced"):
    """Two 8-channel branches; branch 1's gradient is 100x branch 0's (E_1/E_0 ~ 1e4 at equal gates)."""
    torch.manual_seed(0)
    m = GatedFusion([8, 8], mode=mode, affine=False)
    xs = [torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3) * 2 + 1]
    u = torch.randn(2, 16, 3, 3)
    with q2kernels.use_backend(backend):
        for _ in range(steps):
            y = m([x.clone().requires_grad_() for x in xs])
            yd = y.detach()  # = xhat: no affine
            y.backward(torch.cat([_orthogonal_to_layernorm(u[:, :8], yd[:, :8]),
                                  100 * _orthogonal_to_layernorm(u[:, 8:], yd[:, 8:])], 1))
    return m


def test_controller_balances_a_100x_imbalance():
    m = _imbalanced_run("reference", 300)
    log = m.gate_log()
    l0 = torch.log(log["grad_norm_ema"][0] + 1e-12)
    lt = torch.log(m.grad_norm_ema + 1e-12)
    assert (l0[1] - l0[0]).item() > 4.5  # the imbalance at the start: 100 in norm
    assert abs((lt[1] - lt[0]).item()) < 0.1
    a = m.gates()
    assert 50 < (a[0] / a[1]).item() < 200  # the loud branch turned down by ~100
    assert int(m.steps) == 300 and log["step"].tolist() == list(range(300))


def test_controller_kernel_path_matches_reference_path():
    a, b = _imbalanced_run("reference", 6), _imbalanced_run("triton", 6)
    torch.testing.assert_close(b.theta, a.theta, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.grad_norm_ema, a.grad_norm_ema, rtol=1e-5, atol=0)


def test_learned_mode_trains_theta_and_records_norms():
    m = _imbalanced_run("reference", 2, mode="learned")
    assert isinstance(m.theta, nn.Parameter) and m.theta.grad is not None
    assert torch.equal(m.theta.detach(), torch.zeros(2))  # only an optimizer would move it
    assert int(m.steps) == 2 and bool((m.grad_norm > 0).all())


def test_balanced_gates_frozen_in_eval_mode():
    m = GatedFusion([4, 3], mode="balanced")
    with torch.no_grad():
        m.theta.copy_(torch.tensor([0.2, -0.2]))
    m.eval()
    xs = [x.requires_grad_() for x in _branches([4, 3])]
    m(xs).sum().backward()
    assert torch.equal(m.theta, torch.tensor([0.2, -0.2])) and int(m.steps) == 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_each_backward_is_one_controller_step(backend):
    m = GatedFusion([4, 3], mode="balanced")
    xs = [x.requires_grad_() for x in _branches([4, 3])]
    with q2kernels.use_backend(backend):
        y = m(xs)
        u = torch.randn_like(y)
        y.backward(u, retain_graph=True)
        g1 = m.grad_norm.clone()
        y.backward(2 * u)
    assert int(m.steps) == 2 and bool((g1 > 0).all())
    torch.testing.assert_close(m.grad_norm, 2 * g1, rtol=1e-5, atol=0)  # dx doubles: its norm doubles
    torch.testing.assert_close(m.grad_norm_ema, 0.9 * g1 + 0.1 * 2 * g1, rtol=1e-5, atol=0)


def test_save_load_resumes_the_controller_exactly(tmp_path):
    def steps(m, n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            xs = [torch.randn(2, c, 3, 3, generator=g).requires_grad_() for c in (4, 3)]
            (m(xs) * torch.randn(2, 7, 3, 3, generator=g)).sum().backward()

    a = GatedFusion([4, 3], mode="balanced", tau=[0.0, 0.5])
    steps(a, 3, 1)
    torch.save(a.state_dict(), tmp_path / "fusion.pt")
    b = GatedFusion([4, 3], mode="balanced")
    b.load_state_dict(torch.load(tmp_path / "fusion.pt"))
    steps(a, 3, 2)
    steps(b, 3, 2)
    for name in ("theta", "grad_norm", "grad_norm_ema", "steps", "tau"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert {"theta", "grad_norm", "grad_norm_ema", "steps", "skipped_steps", "tau", "gamma", "beta", "mubar",
            "sigmabar"} \
        == set(a.state_dict())


# ------------------------------------------------------------------------------------------------
# registration, compile
# ------------------------------------------------------------------------------------------------

def test_opcheck():
    xs = [torch.randn(2, 4, 3, 3, requires_grad=True),
          torch.randn(2, 3, 3, 3).to(memory_format=torch.channels_last).requires_grad_()]
    gates = torch.softmax(torch.randn(2), 0).requires_grad_()
    gamma, beta = torch.randn(7, requires_grad=True), torch.randn(7, requires_grad=True)
    torch.library.opcheck(torch.ops.q2kernels.gated_fusion.default,
                          (xs, gates, gamma, beta, True, 1e-5, [], 0.1, 0.05, None))
    ctrl = list(_recorder(2, L=2))[:4] + [torch.zeros(2), torch.zeros(2)]
    torch.library.opcheck(torch.ops.q2kernels.gated_fusion.default,
                          ([x[:, :3] for x in xs], gates.detach(), None, None, False, 1e-5, ctrl, 0.1, 0.05, None))
    y, mean, rstd = torch.ops.q2kernels.gated_fusion(xs, gates, gamma, beta, True, 1e-5, [], 0.1, 0.05, None)
    torch.library.opcheck(torch.ops.q2kernels.gated_fusion_backward.default,
                          (torch.randn_like(y), [x.detach() for x in xs], gates.detach(), gamma.detach(),
                           mean.detach(), rstd.detach(), True, True))
    torch.library.opcheck(torch.ops.q2kernels.gate_controller.default,
                          (torch.rand(2), gates.detach(), *ctrl, 0.1, 0.05, None, torch.zeros((), dtype=torch.int64)))


class _TinyNeck(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 2, 3, padding=1)
        self.fuse = FusionConv(GatedFusion([4, 2], mode=mode), nn.Conv2d(6, 5, 1))

    def forward(self, x):
        return self.fuse([self.a(x), self.b(x).to(memory_format=torch.channels_last)])


@pytest.mark.parametrize("backend,mode", [("triton", "balanced"), ("reference", "learned")])
def test_torch_compile_matches_eager(backend, mode):
    torch.manual_seed(3)
    eager = _TinyNeck(mode)
    compiled_model = _TinyNeck(mode)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 5, 4)
    with q2kernels.use_backend(backend):
        for _ in range(3):
            for m in (eager, compiled):
                m(x).square().sum().backward()
    for (n, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=n)
    for name in ("theta", "grad_norm_ema", "steps"):
        torch.testing.assert_close(getattr(compiled_model.fuse.fusion, name), getattr(eager.fuse.fusion, name),
                                   rtol=1e-5, atol=1e-6)
    assert int(eager.fuse.fusion.steps) == 3


# ------------------------------------------------------------------------------------------------
# deployment
# ------------------------------------------------------------------------------------------------

class _DeployNet(nn.Module):
    def __init__(self, fuse="concat", conv=None, channels=(4, 3)):
        super().__init__()
        C = sum(channels) if fuse == "concat" else channels[0]
        self.stem = nn.ModuleList([nn.Conv2d(3, c, 1) for c in channels])
        self.node = FusionConv(GatedFusion(list(channels), fuse=fuse),
                               conv if conv is not None else nn.Conv2d(C, 6, 1))

    def forward(self, x):
        return self.node([s(x) for s in self.stem])


def _trained_and_calibrated(net):
    with torch.no_grad():
        f = net.node.fusion
        f.theta.copy_(torch.tensor([0.4, -0.7, 0.2][:len(f.channels)]))
        f.gamma.copy_(torch.rand_like(f.gamma) + 0.5)
        f.beta.copy_(torch.randn_like(f.beta))
    stats = deploy.calibrate_fusion(net, [torch.randn(2, 3, 6, 7) for _ in range(3)])
    return net, stats


def _fixed_vs_folded(net, x):
    """The fixed-affine model and the folded one, both deployed in float64."""
    fixed = deploy.freeze_fusion(_clone(net).double())
    folded = _clone(net).double()
    report = deploy.remove_layernorm(folded)
    with torch.no_grad():
        return fixed(x), folded(x), report, folded


def _clone(net):
    import copy
    return copy.deepcopy(net)


@pytest.mark.parametrize("fuse,conv", [
    ("concat", nn.Conv2d(7, 6, 1)),
    ("concat", nn.Conv2d(7, 6, 3, padding=0, groups=1, bias=False)),   # unpadded k>1: exact too
    ("concat", nn.Conv2d(7, 7, 1, groups=7)),                         # depthwise
    ("concat", nn.Conv2d(7, 6, 3, padding=1, padding_mode="replicate")),
    ("sum", nn.Conv2d(4, 6, 1)),
])
def test_remove_layernorm_is_exact(fuse, conv):
    net, stats = _trained_and_calibrated(_DeployNet(fuse, conv, (4, 3) if fuse == "concat" else (4, 4)))
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_fixed, y_folded, report, folded = _fixed_vs_folded(net, x)
    assert report == {"node.fusion": "folded into 'node.conv'"}
    assert isinstance(folded.node.fusion, deploy.FixedFusion) and folded.node.fusion.scale is None
    torch.testing.assert_close(y_folded, y_fixed, rtol=0, atol=1e-10)


def test_calibration_records_mean_statistics():
    net = _DeployNet()
    batches = [torch.randn(2, 3, 6, 7) for _ in range(2)]
    stats = deploy.calibrate_fusion(net, batches)
    f = net.node.fusion
    with torch.no_grad():
        mus, sig = zip(*(ref.fusion_stats([s(b) for s in net.stem], f.theta) for b in batches))
    mubar = torch.cat([m.flatten() for m in mus]).double().mean().item()
    sigmabar = torch.cat([s.flatten() for s in sig]).double().mean().item()
    assert stats["node.fusion"] == (pytest.approx(mubar, rel=1e-6), pytest.approx(sigmabar, rel=1e-6))
    assert net.training  # restored
    # Later forwards (training or not) leave the calibrated statistics alone.
    before = (f.mubar.clone(), f.sigmabar.clone())
    net(torch.randn(2, 3, 6, 7) * 5 + 3).sum().backward()
    with torch.no_grad():
        net.eval()(torch.randn(2, 3, 6, 7) * 5 + 3)
    assert torch.equal(f.mubar, before[0]) and torch.equal(f.sigmabar, before[1])


def test_failed_calibration_leaves_the_node_uncalibrated():
    net = _DeployNet()

    def broken():
        yield torch.randn(2, 3, 6, 7)
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        deploy.calibrate_fusion(net, broken())
    f = net.node.fusion
    assert torch.isnan(f.mubar) and net.training  # nothing half-written, mode restored
    batch = torch.randn(2, 3, 6, 7)
    stats = deploy.calibrate_fusion(net, [batch])  # counts this batch only
    with torch.no_grad():
        mu, sigma = ref.fusion_stats([s(batch) for s in net.stem], f.theta)
    assert stats["node.fusion"] == (pytest.approx(mu.double().mean().item(), rel=1e-6),
                                    pytest.approx(sigma.double().mean().item(), rel=1e-6))


def test_fixed_affine_approximates_layernorm_on_calibration_like_data():
    """The frozen affine is the LN with (mu, sigma) replaced by their calibration means: where the
    per-pixel statistics equal the means, they agree."""
    net, _ = _trained_and_calibrated(_DeployNet())
    f = net.node.fusion
    xs = [torch.full((1, 4, 1, 1), 1.0), torch.full((1, 3, 1, 1), 1.0)]
    xs[0][0, 0] = 3.0
    mu, sigma = ref.fusion_stats(xs, f.theta)
    with torch.no_grad():
        f.mubar.copy_(mu.squeeze())
        f.sigmabar.copy_(sigma.squeeze())
        want = f.eval()(xs)
        got = deploy.freeze_fusion(net).node.fusion(xs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_padded_3x3_conv_is_refused_by_name():
    net, _ = _trained_and_calibrated(_DeployNet(conv=nn.Conv2d(7, 6, 3, padding=1)))
    with pytest.warns(UserWarning, match=r"'node\.fusion'.*'node\.conv' is a 3x3 conv with zero padding"):
        report = deploy.remove_layernorm(_clone(net))
    assert "fixed per-channel affine" in report["node.fusion"]
    with pytest.raises(ValueError, match=r"not folding the LayerNorm of 'node\.fusion'"):
        deploy.remove_layernorm(_clone(net), strict=True)
    # what is left is the fixed affine op: the same outputs as freeze_fusion
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    kept = _clone(net)
    with pytest.warns(UserWarning):
        deploy.remove_layernorm(kept)
    with torch.no_grad():
        torch.testing.assert_close(kept.double()(x), deploy.freeze_fusion(_clone(net)).double()(x), rtol=0, atol=0)


class _UltraConv(nn.Module):
    """ultralytics-style Conv: conv -> bn -> act."""

    def __init__(self, c1, c2):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c1, c2, 1, bias=False), nn.BatchNorm2d(c2), nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _C3(nn.Module):
    """A YOLOv5 C3-like block: two input convs read the fusion output."""

    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2, self.cv3 = _UltraConv(c, 4), _UltraConv(c, 4), nn.Conv2d(8, 5, 3, padding=1)

    def forward(self, x):
        return self.cv3(torch.cat([self.cv1(x), self.cv2(x)], 1))


class _LayerList(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(3, 3, 1), GatedFusion([4, 3]), _C3(7))
        self.model[2].f, self.model[2].i = [0, 1], 2

    def forward(self, x):
        return self.model[3](self.model[2]([self.model[0](x), self.model[1](x)]))


def test_feeds_names_every_consumer_of_an_ultralytics_style_node():
    net = _LayerList().eval()
    with torch.no_grad():
        net.model[3].cv1.bn.running_mean.uniform_(-1, 1)
        net.model[2].beta.normal_()
    deploy.calibrate_fusion(net, [torch.randn(2, 3, 5, 5)])
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    fixed = deploy.freeze_fusion(_clone(net).double())
    folded = _clone(net).double()
    report = deploy.remove_layernorm(folded, feeds={"model.2": ["model.3.cv1", "model.3.cv2"]})
    assert report == {"model.2": "folded into 'model.3.cv1', 'model.3.cv2'"}
    assert folded.model[2].f == [0, 1] and folded.model[2].i == 2  # routing attributes kept
    with torch.no_grad():
        torch.testing.assert_close(folded(x), fixed(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("call,match", [
    (lambda n: deploy.remove_layernorm(n), "GatedFusion 'model.2' is not calibrated"),
    (lambda n: deploy.freeze_fusion(n), "GatedFusion 'model.2' is not calibrated"),
    (lambda n: deploy.remove_layernorm(n, feeds={"nope": "model.3.cv1"}), "feeds: 'nope' is not a GatedFusion"),
    (lambda n: deploy.remove_layernorm(n, feeds={"model.2": "model.9"}), "no module named 'model.9'"),
    (lambda n: deploy.calibrate_fusion(nn.Conv2d(1, 1, 1), []), "no GatedFusion"),
    (lambda n: deploy.calibrate_fusion(n, []), r"\['model.2'\] saw no pixel"),
])
def test_deploy_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(_LayerList())


def test_unconsumed_or_quantized_consumer_is_left_fixed():
    from q2kernels.nn import LSQQuantizer, QConv2d
    net = _DeployNet(conv=QConv2d(7, 6, 1, act_quantizer=LSQQuantizer(bits=4, mode="unsigned")))
    deploy.calibrate_fusion(net, [torch.randn(2, 3, 6, 7)])
    with pytest.warns(UserWarning, match="quantizes its input or weights"):
        deploy.remove_layernorm(_clone(net))
    net2 = _LayerList()
    deploy.calibrate_fusion(net2, [torch.randn(1, 3, 4, 4)])
    with pytest.warns(UserWarning, match="no consumer conv is declared"):
        report = deploy.remove_layernorm(net2)
    assert isinstance(net2.model[2], deploy.FixedFusion) and net2.model[2].scale is not None
    assert "fixed" in report["model.2"]


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def _good():
    return [torch.randn(2, 4, 3, 3), torch.randn(2, 3, 3, 3)], torch.zeros(2)


@pytest.mark.parametrize("bad,match", [
    (lambda xs, t: qF.gated_fusion(xs[:1], t[:1]), r"xs: expected at least 2 branches, got 1"),
    (lambda xs, t: qF.gated_fusion(xs[0], t), "xs: expected a list or tuple"),
    (lambda xs, t: qF.gated_fusion([xs[0], xs[1][:1]], t), r"xs\[1\]: batch and spatial size"),
    (lambda xs, t: qF.gated_fusion([xs[0], xs[1][:, :, :2]], t), r"xs\[1\]: batch and spatial size"),
    (lambda xs, t: qF.gated_fusion([xs[0], xs[1].half()], t), r"xs\[1\]: dtype torch.float16 differs"),
    (lambda xs, t: qF.gated_fusion([xs[0], xs[1].to("meta")], t), r"xs\[1\]: is on meta"),
    (lambda xs, t: qF.gated_fusion([xs[0], xs[1].int()], t), r"xs\[1\]: expected a float32"),
    (lambda xs, t: qF.gated_fusion([xs[0], xs[1][0]], t), r"xs\[1\]: expected a 4-d"),
    (lambda xs, t: qF.gated_fusion(xs, t, fuse="sum"), r"fuse='sum' needs equal channel counts, got \[4, 3\]"),
    (lambda xs, t: qF.gated_fusion(xs, t, fuse="add"), "fuse: expected one of"),
    (lambda xs, t: qF.gated_fusion(xs, t, torch.ones(6)), r"gamma: expected 7 element"),
    (lambda xs, t: qF.gated_fusion(xs, t, torch.ones(7), torch.ones(4)), r"beta: expected 7 element"),
    (lambda xs, t: qF.gated_fusion(xs, t, torch.ones(7).double()), "gamma: expected a float32"),
    (lambda xs, t: qF.gated_fusion(xs, torch.zeros(3)), r"theta: expected 2 element"),
    (lambda xs, t: qF.gated_fusion(xs, t, eps=0.0), "eps"),
    (lambda xs, t: qF.gated_fusion(xs, t, controller=object()), "controller: expected"),
    (lambda xs, t: qF.gated_fusion(xs, t, controller=_recorder(2, device="meta")), "controller.grad_norm: is on meta"),
    (lambda xs, t: GatedFusion([4]), "channels"),
    (lambda xs, t: GatedFusion([4, 3], fuse="sum"), "channels: fuse='sum' needs equal"),
    (lambda xs, t: GatedFusion([4, 3], mode="auto"), "mode"),
    (lambda xs, t: GatedFusion([4, 3])(xs[::-1]), r"xs\[0\]: expected \(B, 4, H, W\)"),
])
def test_bad_input_errors(bad, match):
    xs, theta = _good()
    with pytest.raises((ValueError, TypeError), match=match):
        bad(xs, theta)


# ------------------------------------------------------------------------------------------------
# CUDA, at the benchmark's shapes
# ------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("channels,HW", [([512, 256], (40, 40)), ([128, 256], (40, 40)), ([256, 256], (80, 80))])
def test_cuda_kernel_matches_reference_yolo_nodes(dtype, layout, channels, HW):
    B = 2
    xs = [x.cuda() for x in _branches(channels, B, HW, dtype, layout)]
    C = sum(channels)
    theta, gamma, beta = (t.cuda() for t in _params(2, C, True))
    dy = torch.randn(B, C, *HW, device="cuda").to(dtype)
    y0, g0, e0 = _run("reference", xs, theta, gamma, beta, "concat", dy)
    y1, g1, e1 = _run("triton", xs, theta, gamma, beta, "concat", dy)
    _assert_elementwise(y1, y0, dtype)
    for k in range(2):
        _assert_elementwise(g1[k], g0[k], dtype)
    da_terms, dgamma_terms, dbeta_terms = _grad_terms(xs, theta, gamma, dy, "concat")
    a = torch.softmax(theta.double(), 0)
    assert_sum_close(g1[2], g0[2], a * (da_terms + (a * da_terms).sum()))
    assert_sum_close(g1[3], g0[3], dgamma_terms)
    assert_sum_close(g1[4], g0[4], dbeta_terms)
    assert_sum_close(e1, e0, e0.abs())
