"""N2UQ (docs/math.md §4): the LTQ activation quantizer and the N2UQ weight quantizer. The reference
against float64 autograd through the authors' surrogate and against closed forms at thresholds and
segment edges; the fused Triton kernels (the interpreter on CPU) against the reference; registration,
compile and bad input."""
import math

import pytest
import torch
from torch import nn

import q2kernels
from q2kernels import functional as qF
from q2kernels.nn import N2UQQuantizer, N2UQWeightQuantizer, QConv2d, QLinear, quantize_model
from q2kernels.ops import _layout
from q2kernels.ops import n2uq as n2uq_op
from q2kernels.reference import n2uq as ref

from helpers import DTYPES, assert_sum_close, run_both

A_FLOOR = ref.A_FLOOR


def _params(bits, start=-0.2, alpha1=1.3, alpha2=0.8, spread=0.5, dyadic=False):
    """(start, a, alpha1, alpha2), fp32: intervals a = I*(1 +- spread), randomly. dyadic: start and
    a multiples of 2^-14, so that every running sum is exact in fp32 (and equal to fp64's)."""
    n = 2**bits - 1
    a = (2.0 / n) * (1 + spread * (2 * torch.rand(n) - 1))
    if dyadic:
        a, start = torch.round(a * 2**14) / 2**14, round(start * 2**14) / 2**14
    return torch.tensor([start]), a, torch.tensor([alpha1]), torch.tensor([alpha2])


def _boundaries(params):
    """fp32 inputs x placed on every threshold and edge (u = x*alpha1) and one ulp either side."""
    start, a, alpha1, _ = params
    _, thresholds, edges = ref.ltq_tables(start, a)
    on = torch.cat([thresholds, edges]) / alpha1
    inf = torch.full_like(on, math.inf)
    return torch.cat([on, torch.nextafter(on, inf), torch.nextafter(on, -inf)])


def _inputs(params, shape, with_boundaries=True):
    """x of `shape` whose u = alpha1*x spans below d_0 to above d_n, ending with boundary points."""
    start, a, alpha1, _ = params
    _, _, edges = ref.ltq_tables(start, a)
    lo, hi = edges[0].item() - 0.4, edges[-1].item() + 0.4
    x = (torch.rand(math.prod(shape)) * (hi - lo) + lo) / alpha1
    if with_boundaries:
        b = _boundaries(params)[: x.numel()]
        x[-b.numel():] = b
    return x.reshape(shape)


def _ltq_surrogate64(x, start, a, alpha1, alpha2, bits):
    """LTQ as the authors' code writes it (their x_forward / x_backward), in float64 autograd."""
    n = 2**bits - 1
    interval = 2.0 / n
    a_pos = torch.where(a > A_FLOOR, a, torch.full_like(a, A_FLOOR))
    u = x * alpha1
    s0 = start.reshape(())
    x_forward = torch.zeros_like(u)
    x_backward = torch.zeros_like(u)
    thre_forward, thre_backward = s0 + a_pos[0] / 2, s0
    for i in range(n):
        if i > 0:
            thre_forward = thre_forward + (a_pos[i - 1] / 2 + a_pos[i] / 2)
            thre_backward = thre_backward + a_pos[i - 1]
        x_forward = torch.where(u > thre_forward, (i + 1) * interval, x_forward)
        x_backward = torch.where(u > thre_backward,
                                 interval / a_pos[i] * (u - thre_backward) + i * interval, x_backward)
    x_backward = torch.where(u > thre_backward + a_pos[n - 1], 2.0, x_backward)
    return (x_forward.detach() + x_backward - x_backward.detach()) * alpha2.reshape(())


def _surrogate_grads(x, params, bits, g):
    leaves = [t.detach().double().requires_grad_() for t in (x, *params)]
    y = _ltq_surrogate64(*leaves, bits)
    return y.detach(), torch.autograd.grad(y, leaves, g.double())


def _abs_sums(x, params, bits, g):
    """sum |term| of each parameter gradient (the summation-order error scale of assert_sum_close).
    Every term of dstart, da, dalpha2 has the sign of g*alpha2 (or g): flip those to positive."""
    start, a, alpha1, alpha2 = params
    x = torch.nan_to_num(x, nan=-1e30, posinf=1e30, neginf=-1e30)  # NaN and -inf are below d_0
    _, grads = _surrogate_grads(x, (start, a, alpha1, alpha2.abs()), bits, g.abs())
    dx = grads[0]
    alpha1_terms = (dx * x.double() / alpha1.double()).abs().sum()
    return grads[1].abs(), grads[2].abs(), alpha1_terms.reshape(1), grads[4].abs()


def _away_from_boundaries(x, params, margin=1e-4, shift=2.5e-4):
    """x with every u within `margin` of a threshold or edge moved `shift` up (fp32 and fp64 agree
    on the level and the segment of every element then)."""
    start, a, alpha1, _ = params
    _, thresholds, edges = ref.ltq_tables(start, a)
    u = x.double() * alpha1.double()
    near = (u[..., None] - torch.cat([thresholds, edges]).double()).abs().amin(-1) < margin
    return torch.where(near, ((u + shift) / alpha1.double()).float(), x)


def _run_act(x, params, bits, g, backend):
    leaves = [t.detach().clone().requires_grad_() for t in params]
    xl = x.detach().clone().requires_grad_()
    with q2kernels.use_backend(backend):
        y = qF.n2uq_act_quantize(xl, *leaves, bits)
    return y, torch.autograd.grad(y, [xl, *leaves], g)


def _check_act(x, params, bits, g):
    """The fused kernels against the reference: identical levels (so identical y), identical dx
    (the same fp32 products in the same order), parameter grads within docs/math.md §0."""
    x = x.detach().requires_grad_()
    leaves = [p.detach().clone().requires_grad_() for p in params]
    (y0, grads0), (y1, grads1) = run_both(lambda x, *p: qF.n2uq_act_quantize(x, *p, bits), [x, *leaves], g)
    assert y1.dtype == x.dtype and y1.shape == x.shape
    if _layout.is_dense(x) and x.numel() > 1:
        assert y1.stride() == x.stride(), "the output must keep the input's memory layout"
    assert torch.equal(y1, y0)
    assert grads1[0].dtype == x.dtype and torch.equal(grads1[0], grads0[0])
    for p1, p0, p, terms in zip(grads1[1:], grads0[1:], params, _abs_sums(x.float(), params, bits, g.float())):
        assert p1.dtype == torch.float32 and p1.shape == p.shape
        assert_sum_close(p1, p0, terms)
    return y1, grads1


# ---------------------------------------------------------------- the reference


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_table_kernel_reproduces_the_sequential_running_sums(bits):
    start, a, _, _ = _params(bits, spread=0.9)
    a[0] = A_FLOOR / 2  # clamped entries enter the sums as 1e-3
    a_pos, thresholds, edges = ref.ltq_tables(start, a)
    tab = n2uq_op._ltq_tables(start, a, bits)
    M, n = 2**bits, 2**bits - 1
    assert torch.equal(tab[:n], thresholds) and tab[n].item() == math.inf
    assert torch.equal(tab[M:2 * M], edges)
    assert torch.equal(tab[2 * M:2 * M + n], torch.full((), ref.ltq_interval(bits)) / a_pos)
    assert torch.equal(tab[3 * M:3 * M + n], a_pos)
    merged = torch.stack([edges, torch.cat([thresholds, torch.tensor([math.inf])])], 1).reshape(-1)
    assert torch.equal(tab[4 * M:6 * M], merged)
    # the binary searches rely on this
    assert bool((thresholds[1:] >= thresholds[:-1]).all()) and bool((edges[1:] >= edges[:-1]).all())
    assert tab[6 * M].item() == float(bool((merged[1:] >= merged[:-1]).all())) == 1.0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_thresholds_not_interleaving_edges_in_fp32(backend):
    """With |start| large against a+, the fp32 running sums can put a threshold past the next edge;
    the backward then falls back from the merged search to two searches and must stay exact."""
    bits = 8
    start, a, alpha1, alpha2 = _params(bits, start=3000.0, alpha1=1.0)
    a = torch.rand(a.shape) * 4e-3 + 1e-3
    tab = n2uq_op._ltq_tables(start, a, bits)
    assert tab[6 * 2**bits].item() == 0.0, "these parameters must exercise the fallback"
    params = (start, a, alpha1, alpha2)
    x = _inputs(params, (3, 5, 7))
    g = torch.randn(x.shape)
    if backend == "triton":
        with q2kernels.use_backend("auto"):
            _check_act(x, params, bits, g)
    else:
        _, _, edges = ref.ltq_tables(start, a)
        _, (dx, *_) = _run_act(x, params, bits, g, "reference")
        # edges computed in fp32: dx is G*I/a+ exactly on the elements strictly inside
        inside = (x > edges[0]) & (x <= edges[-1])
        assert bool((dx[~inside] == 0).all()) and bool((dx[inside] != 0).all())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_matches_float64_surrogate(bits):
    # The fp32 running sums over up to 255 intervals carry ~1e-5 of absolute error that fp64 does
    # not, and u - d_{i-1} over a segment of width ~2/255 magnifies it. Dyadic parameters and inputs
    # (and alpha1 = 1.25) make the sums and u - d exact in fp32, so what is compared is the formulas.
    params = _params(bits, alpha1=1.25, dyadic=True)
    x = _away_from_boundaries(_inputs(params, (4, 5, 6, 7), with_boundaries=False), params)
    # two points in every segment, so every d`a` gets its own-segment term
    _, _, edges = ref.ltq_tables(*params[:2])
    quarter = (edges[:-1] + torch.stack([edges[1:] - edges[:-1]]) * torch.tensor([[0.25], [0.75]])).reshape(-1)
    x.view(-1)[: quarter.numel()] = quarter / params[2]
    x = torch.round(x * 2**16) / 2**16
    g = torch.randn(x.shape)
    y, grads = _run_act(x, params, bits, g, "reference")
    y64, grads64 = _surrogate_grads(x, params, bits, g)
    torch.testing.assert_close(y.double(), y64, rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[0].double(), grads64[0], rtol=1e-6, atol=0)
    for got, want, terms in zip(grads[1:], grads64[1:], _abs_sums(x, params, bits, g)):
        assert got.dtype == torch.float32
        assert_sum_close(got, want, terms)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_levels_and_segments_exactly_on_thresholds_and_edges(backend):
    bits = 3
    n, interval = 2**bits - 1, ref.ltq_interval(bits)
    # alpha1 a power of two: u = alpha1*x is exact, so x lands on each boundary exactly.
    params = _params(bits, alpha1=0.5, alpha2=1.7)
    start, a, alpha1, alpha2 = params
    a_pos, thresholds, edges = ref.ltq_tables(start, a)
    up = lambda v: torch.nextafter(v, torch.full_like(v, math.inf))  # noqa: E731
    down = lambda v: torch.nextafter(v, torch.full_like(v, -math.inf))  # noqa: E731
    x = torch.cat([thresholds, up(thresholds), down(thresholds), edges, up(edges), down(edges)]) / alpha1
    y, (dx, *_) = _run_act(x, params, bits, torch.ones_like(x), backend)
    i = torch.arange(n)
    # strict comparison: on t_i the level is the count of thresholds before it
    want_k = torch.cat([i, i + 1, i])
    torch.testing.assert_close(y[:3 * n], (want_k.float() * interval) * alpha2, rtol=0, atol=0)
    # segments (d_{j-1}, d_j]: on an edge the element belongs to the segment on its left
    slope = torch.full((), interval) / a_pos
    seg_on = torch.cat([torch.tensor([-1]), i])  # d_0 is outside, d_j (j >= 1) is in segment j-1
    seg_up = torch.cat([i, torch.tensor([-1])])  # just above d_n is outside
    seg_down = seg_on.clone()
    seg_down[1:] = i  # just below d_j is segment j-1, just below d_0 is outside
    for seg, got in zip((seg_on, seg_up, seg_down), dx[3 * n:].reshape(3, n + 1)):
        want = torch.where(seg >= 0, (1.0 * alpha2) * slope[seg.clamp(min=0)] * alpha1, torch.zeros(()))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_at_and_below_the_floor():
    bits = 3
    start, a, alpha1, alpha2 = _params(bits)
    tiny = torch.tensor([A_FLOOR, torch.nextafter(torch.tensor(A_FLOOR), torch.tensor(0.0)).item(), 0.0, -0.3,
                         float("nan"), torch.nextafter(torch.tensor(A_FLOOR), torch.tensor(1.0)).item()])
    a[:6] = tiny
    params = (start, a, alpha1, alpha2)
    a_pos, _, edges = ref.ltq_tables(start, a)
    assert a_pos[:5].tolist() == [A_FLOOR] * 5 and a_pos[5].item() > A_FLOOR
    # inputs at a quarter and three quarters of every segment, so each tiny segment has elements
    quarter = (edges[:-1] + torch.stack([edges[1:] - edges[:-1]]) * torch.tensor([[0.25], [0.75]])).reshape(-1)
    x = torch.cat([_away_from_boundaries(torch.randn(200), params), quarter / alpha1])
    g = torch.randn(x.shape)
    _, grads = _run_act(x, params, bits, g, "reference")
    da = grads[2]
    assert da[:5].tolist() == [0.0] * 5, "the clamp passes no gradient to entries at or below 1e-3"
    assert da[5].item() != 0.0
    _, grads64 = _surrogate_grads(x, (start, torch.where(a.isnan(), 0.0, a), alpha1, alpha2), bits, g)
    for got, want, terms in zip(grads[1:], grads64[1:], _abs_sums(x, params, bits, g)):
        assert_sum_close(got, want, terms)
    with q2kernels.use_backend("auto"):
        _check_act(x, params, bits, g)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_all_below_the_first_edge_and_all_above_the_last(backend):
    bits = 4
    n, interval = 2**bits - 1, ref.ltq_interval(bits)
    params = _params(bits, start=0.1)
    start, a, alpha1, alpha2 = params
    _, _, edges = ref.ltq_tables(start, a)
    g = torch.randn(3, 4, 5)
    below = -torch.rand(3, 4, 5) * 3  # all negative, all under d_0 = 0.1
    below.view(-1)[0] = (edges[0] / alpha1).item()  # on d_0: still outside
    y, grads = _run_act(below, params, bits, g, backend)
    assert torch.equal(y, torch.zeros_like(y))
    for gr in grads:
        assert torch.equal(gr, torch.zeros_like(gr))
    above = (edges[-1] + 1e-3 + torch.rand(3, 4, 5) * 3) / alpha1
    y, (dx, dstart, da, dalpha1, dalpha2) = _run_act(above, params, bits, g, backend)
    assert torch.equal(y, ((torch.full((), float(n)) * interval) * alpha2).expand_as(y))  # fp32, as y
    for gr in (dx, dstart, da, dalpha1):
        assert torch.equal(gr, torch.zeros_like(gr))
    torch.testing.assert_close(dalpha2, (g.sum() * (n * interval)).reshape(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("start, a_edit", [(math.nan, None), (-math.inf, (5, math.inf)), (0.1, (3, math.inf)),
                                           (math.inf, None), (-math.inf, None), (0.1, (7, math.nan))])
def test_levels_at_non_finite_parameters(backend, start, a_edit):
    """Each level is the strict count #{i : alpha1*x > t_i}, also where the thresholds stop being
    finite: a NaN start (every t NaN), -inf + inf (NaN from that threshold on), an infinite interval,
    a NaN interval (clamped to the floor). The oracle counts threshold by threshold, t_i as the
    sequential fp32 sum docs/math.md §4 writes."""
    bits = 4
    n, interval = 2**bits - 1, ref.ltq_interval(bits)
    _, a, alpha1, alpha2 = _params(bits)
    if a_edit is not None:
        a[a_edit[0]] = a_edit[1]
    params = (torch.tensor([start]), a, alpha1, alpha2)
    x = torch.cat([torch.linspace(-3, 3, 61), torch.tensor([math.nan, math.inf, -math.inf, 0.0])])
    u = x * alpha1
    a_pos = [torch.tensor(A_FLOOR) if not (v > A_FLOOR) else v for v in a]
    t = params[0][0] + a_pos[0] / 2
    count = torch.zeros_like(u)
    for i in range(n):
        if i > 0:
            t = t + (a_pos[i - 1] / 2 + a_pos[i] / 2)
        count += (u > t).float()
    y, _ = _run_act(x, params, bits, torch.ones_like(x), backend)
    assert torch.equal(y, (count * interval) * alpha2)


# ---------------------------------------------------------------- the fused kernels


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_kernel_matches_reference_over_bits(bits, triton_backend):
    params = _params(bits)
    x = _inputs(params, (2, 3, 5, 7))
    _check_act(x, params, bits, torch.randn(x.shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_kernel_dtypes_and_layouts(dtype, layout, triton_backend):
    bits = 4 if layout != "sliced" else 3
    params = _params(bits, start=-0.35, alpha1=0.9, alpha2=1.1)
    x = _inputs(params, (3, 6, 5, 7))
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.cat([x, x], 1)[:, ::2]
    x = x.to(dtype)
    g = torch.randn(x.shape).to(dtype)
    _check_act(x, params, bits, g)


@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_several_programs(bits, triton_backend):
    params = _params(bits)
    x = _inputs(params, (2, 3, 37, 41)).to(memory_format=torch.channels_last)  # 9102: three programs
    _check_act(x, params, bits, torch.randn(x.shape))


@pytest.mark.parametrize("max_programs", [1, 2])
def test_kernel_programs_looping_over_several_blocks(max_programs, monkeypatch, triton_backend):
    """Large tensors give each backward program several consecutive blocks (at most MAX_PROGRAMS
    rows of partials); three blocks on one program, or on two with the last one half idle."""
    monkeypatch.setattr(n2uq_op, "MAX_PROGRAMS", max_programs)
    params = _params(3)
    x = _inputs(params, (2, 3, 37, 41))
    _check_act(x, params, 3, torch.randn(x.shape))


@pytest.mark.parametrize("shape", [(0,), (0, 3, 4, 4), (1,), (1, 1, 1, 1), (3, 1, 1, 1), (5, 13)])
def test_kernel_empty_and_tiny(shape, triton_backend):
    params = _params(3)
    x = _inputs(params, shape, with_boundaries=False) if math.prod(shape) else torch.empty(shape)
    _, grads = _check_act(x, params, 3, torch.randn(shape))
    if x.numel() == 0:
        assert all(bool((gr == 0).all()) for gr in grads[1:])


def test_kernel_nan_and_inf_inputs(triton_backend):
    bits = 4
    params = _params(bits)
    x = torch.tensor([float("nan"), math.inf, -math.inf, 0.3, -0.1, 5.0])
    y, _ = _check_act(x, params, bits, torch.randn(x.shape))
    n, interval = 2**bits - 1, ref.ltq_interval(bits)
    assert y[0].item() == 0.0 and y[2].item() == 0.0  # NaN and -inf are above no threshold
    assert y[1].item() == ((torch.full((), float(n)) * interval) * params[3]).item()


def test_kernel_deterministic(triton_backend):
    bits = 4
    params = _params(bits)
    x = _inputs(params, (2, 4, 33, 35)).requires_grad_()
    params = [p.requires_grad_() for p in params]
    g = torch.randn(x.shape)
    runs = []
    for _ in range(2):
        y = qF.n2uq_act_quantize(x, *params, bits)
        runs.append((y,) + torch.autograd.grad(y, (x, *params), g))
    for r0, r1 in zip(*runs):
        assert torch.equal(r0, r1)


def test_kernel_int64_offsets_path(monkeypatch, triton_backend):
    """Tensors over 2^31 elements switch the kernels to int64 offsets; run that path small."""
    monkeypatch.setattr(_layout, "needs_int64", lambda x: True)
    params = _params(4)
    x = _inputs(params, (2, 3, 5, 5))
    _check_act(x, params, 4, torch.randn(x.shape))
    w = torch.randn(4, 3, 3, 3)
    (y0, _), (y1, _) = run_both(lambda w: qF.n2uq_weight_quantize(w, 4), [w], None)
    assert torch.equal(y0, y1)


def test_autograd_saves_nothing_larger_than_the_input(triton_backend):
    params = _params(4)
    x = _inputs(params, (2, 3, 16, 16)).requires_grad_()
    params = [p.requires_grad_() for p in params]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        qF.n2uq_act_quantize(x, *params, 4)
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # x itself, not a copy
    assert all(t.numel() <= n2uq_op.table_size(4) for t in saved if t.data_ptr() != x.data_ptr())
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        qF.n2uq_weight_quantize(w, 4)
    assert [t.shape for t in saved] == [(6,)], "the weight quantizer saves its scales only"


def test_weight_grad_of_a_sum_is_one_over_the_scale(triton_backend):
    """y.sum() hands the backward an expanded (stride-0) gradient."""
    w = (torch.randn(5, 4, 3, 3) * 0.1).to(memory_format=torch.channels_last).requires_grad_()
    qF.n2uq_weight_quantize(w, 3).sum().backward()
    inv = 1.0 / ref.n2uq_weight_scale(w, 3)
    assert torch.equal(w.grad, inv.reshape(-1, 1, 1, 1).expand(w.shape))


# ---------------------------------------------------------------- weights


def _weight_surrogate64(w, bits):
    """The authors' HardQuantizeConv weight path in float64 (scaling factor detached, STE)."""
    gamma = (2**bits - 1) / 2 ** (bits - 1)
    sf = (gamma * w.abs().flatten(1).mean(1)).detach().reshape((-1,) + (1,) * (w.dim() - 1))
    scaled = w / sf
    clipped = scaled.clamp(-1.0, 1.0)
    m = (2**bits - 1) / 2
    wq = sf * (torch.round((clipped + 1) * m) / m - 1)
    return wq.detach() - scaled.detach() + scaled, ((clipped + 1) * m).detach()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_reference_matches_float64_surrogate(bits):
    w = torch.randn(6, 4, 3, 3) * 0.1
    w[0, 0, 0, 0] = 2.0  # beyond the clip
    g = torch.randn(w.shape)
    w64 = w.double().requires_grad_()
    y64, v64 = _weight_surrogate64(w64, bits)
    (dw64,) = torch.autograd.grad(y64, (w64,), g.double())
    wl = w.clone().requires_grad_()
    y = ref.n2uq_weight_fake_quant(wl, bits)
    (dw,) = torch.autograd.grad(y, (wl,), g)
    sf = ref.n2uq_weight_scale(w, bits).reshape(-1, 1, 1, 1)
    # fp32 and fp64 may round a value within ~1e-7 of a tie differently; compare away from ties.
    away = (v64 % 1 - 0.5).abs() > 1e-4
    assert away.float().mean() > 0.99
    levels = torch.round((y.double() / sf + 1) * (2**bits - 1) / 2)
    assert torch.equal(levels[away], torch.round(v64)[away])
    # sf*(q/m - 1) cancels near the middle levels: within an ulp of sf, not of the value
    torch.testing.assert_close(y.double()[away], y64.detach()[away], rtol=1e-6, atol=sf.max().item() * 2**-22)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-6, atol=0)
    # 2^b levels, symmetric, no zero: (2q/(2^b-1) - 1) for q = 0..2^b-1
    assert bool(((levels >= 0) & (levels <= 2**bits - 1)).all()) and bool((y != 0).all())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_weight_ties_round_half_to_even(backend):
    """A channel of equal magnitudes puts v = (W/sf + 1)*m near k + 1/2 for every b; about half
    of them are exact fp32 ties, which must go to the even level, identically on both backends."""
    bits = 4
    mag = torch.rand(64) * 0.1 + 0.01
    w = torch.stack([mag, -mag, mag, -mag], 1)
    sf = ref.n2uq_weight_scale(w, bits)
    m = (2**bits - 1) / 2
    v = ((w * (1.0 / sf)[:, None]).clamp(-1, 1) + 1) * torch.tensor(m)
    ties = v - v.floor() == 0.5
    assert ties.sum() > 20
    with q2kernels.use_backend(backend):
        y = qF.n2uq_weight_quantize(w, bits)
    q = torch.round((y / sf[:, None] + 1) * m)
    assert bool((q[ties] % 2 == 0).all())
    with q2kernels.use_backend("reference"):
        assert torch.equal(y, qF.n2uq_weight_quantize(w, bits))


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("shape,layout", [
    ((16, 8, 3, 3), "nchw"), ((16, 8, 3, 3), "channels_last"), ((4, 300, 2, 2), "nchw"),
    ((10, 7), "nchw"), ((7, 12), "transposed"), ((5,), "nchw"), ((1, 3, 3, 3), "nchw"), ((3, 5, 1, 1), "sliced"),
])
def test_weight_kernel_matches_reference(bits, shape, layout, triton_backend):
    w = torch.randn(shape) * 0.05
    if layout == "channels_last":
        w = w.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        w = w.t().contiguous().t()
    elif layout == "sliced":
        w = torch.cat([w, w], 1)[:, ::2]
    g = torch.randn(w.shape)
    (y0, (dw0,)), (y1, (dw1,)) = run_both(lambda w: qF.n2uq_weight_quantize(w, bits), [w.requires_grad_()], g)
    if _layout.is_dense(w):
        assert y1.stride() == w.stride()
    assert torch.equal(y1, y0), "fp64 |W| sums give the same sf, hence the same levels"
    assert torch.equal(dw1, dw0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_kernel_half_dtypes(dtype, triton_backend):
    w = (torch.randn(12, 5, 3, 3) * 0.05).to(dtype).to(memory_format=torch.channels_last)
    g = torch.randn(w.shape).to(dtype)
    (y0, (dw0,)), (y1, (dw1,)) = run_both(lambda w: qF.n2uq_weight_quantize(w, 4), [w.requires_grad_()], g)
    assert y1.dtype == dtype and dw1.dtype == dtype
    assert torch.equal(y1, y0) and torch.equal(dw1, dw0)


@pytest.mark.parametrize("shape", [(0, 3, 3, 3), (4, 0, 3, 3), (0,)])
def test_weight_empty(shape, triton_backend):
    w = torch.randn(shape, requires_grad=True)
    y = qF.n2uq_weight_quantize(w, 4)
    y.sum().backward()
    assert y.shape == w.shape and w.grad.shape == w.shape


# ---------------------------------------------------------------- registration, compile, bad input


def test_opcheck_act():
    params = _params(3)
    x = _inputs(params, (2, 3, 4, 5)).to(memory_format=torch.channels_last).requires_grad_()
    params = [p.requires_grad_() for p in params]
    torch.library.opcheck(torch.ops.q2kernels.n2uq_act.default, (x, *params, 3))
    tab = n2uq_op._ltq_tables(params[0].detach(), params[1].detach(), 3)
    torch.library.opcheck(torch.ops.q2kernels.n2uq_act_backward.default,
                          (torch.randn(x.shape), x.detach(), tab, params[2].detach(), params[3].detach(), 3))


def test_opcheck_weight():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.q2kernels.n2uq_weight.default, (w, 4))
    sf = ref.n2uq_weight_scale(w, 4)
    torch.library.opcheck(torch.ops.q2kernels.n2uq_weight_backward.default, (torch.randn(w.shape), sf))
    g = torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.q2kernels.n2uq_weight_backward.default, (g, sf))


class _TinyN2UQNet(nn.Module):
    def __init__(self, bits=4):
        super().__init__()
        self.bits = bits
        self.start, self.a, self.alpha1, self.alpha2 = (nn.Parameter(p) for p in ref.ltq_init(bits))
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.2)

    def forward(self, x):
        xq = qF.n2uq_act_quantize(x, self.start, self.a, self.alpha1, self.alpha2, self.bits)
        return torch.nn.functional.conv2d(xq, qF.n2uq_weight_quantize(self.weight, self.bits), padding=1)


def test_torch_compile_fullgraph(triton_backend):
    net = _TinyN2UQNet()
    x = torch.randn(2, 3, 6, 6) * 1.5
    y = net(x)
    grads = torch.autograd.grad(y.square().sum(), list(net.parameters()))
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    yc = compiled(x)
    grads_c = torch.autograd.grad(yc.square().sum(), list(net.parameters()))
    assert torch.equal(yc, y)
    for a, b in zip(grads_c, grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad,match", [
    (lambda x, p: qF.n2uq_act_quantize(x, p[0], torch.ones(16), p[2], p[3], 4), "a: expected 2\\^bits - 1 = 15"),
    (lambda x, p: qF.n2uq_act_quantize(x, p[0], p[1], p[2], p[3], 3), "a: expected 2\\^bits - 1 = 7"),
    (lambda x, p: qF.n2uq_act_quantize(x, p[0], p[1].to("meta"), p[2], p[3], 4), "a: is on meta"),
    (lambda x, p: qF.n2uq_act_quantize(x, p[0].to("meta"), p[1], p[2], p[3], 4), "start: is on meta"),
    (lambda x, p: qF.n2uq_act_quantize(x, p[0], p[1], p[2], p[3].to("meta"), 4), "alpha2: is on meta"),
    (lambda x, p: qF.n2uq_act_quantize(x, p[0], p[1], torch.ones(2), p[3], 4), "alpha1: expected 1 element"),
    (lambda x, p: qF.n2uq_act_quantize(x, p[0], p[1].double(), p[2], p[3], 4), "a: expected a float32"),
    (lambda x, p: qF.n2uq_act_quantize(x, p[0], p[1], p[2], p[3], 1), "bits"),
    (lambda x, p: qF.n2uq_act_quantize(x, p[0], p[1], p[2], p[3], 9), "bits"),
    (lambda x, p: qF.n2uq_act_quantize(x, p[0], p[1], p[2], p[3], 4.0), "bits"),
    (lambda x, p: qF.n2uq_act_quantize(x.int(), p[0], p[1], p[2], p[3], 4), "x: expected a float32"),
    (lambda x, p: qF.n2uq_weight_quantize(x, 9), "bits"),
    (lambda x, p: qF.n2uq_weight_quantize(x, True), "bits"),
    (lambda x, p: qF.n2uq_weight_quantize(torch.tensor(1.0), 4), "w: expected a tensor with an output-channel"),
    (lambda x, p: qF.n2uq_weight_quantize(x.long(), 4), "w: expected a float32"),
])
def test_bad_input_errors(bad, match):
    x = torch.randn(2, 5, 3, 3)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(x, _params(4))


# ---------------------------------------------------------------- nn modules and the recipe


def _small_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.SiLU(),
        nn.Conv2d(12, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5), nn.SiLU(), nn.Linear(5, 3),
    )


def test_quantizer_modules_start_at_the_math_md_initial_values():
    q = N2UQQuantizer(3)
    assert q.start.tolist() == [0.0] and q.alpha1.tolist() == [1.0] and q.alpha2.tolist() == [1.0]
    assert q.a.shape == (7,) and torch.equal(q.a, torch.full((7,), ref.ltq_interval(3)))
    assert all(p.dtype == torch.float32 for p in q.parameters())
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(q(x), ref.n2uq_act_fake_quant(x, *ref.ltq_init(3), 3))
    # initial LTQ: thresholds at (k - 1/2)*I, so y = R(x/I)*I clamped to [0, 2] (away from ties)
    torch.testing.assert_close(q(x), (torch.round(x * 3.5).clamp(0, 7) / 3.5), rtol=0, atol=1e-6)
    assert torch.allclose(q.step_size(), torch.tensor([2 / 7]))
    w = N2UQWeightQuantizer(4)
    assert not list(w.parameters())
    wt = torch.randn(6, 4, 3, 3)
    assert torch.equal(w(wt), ref.n2uq_weight_fake_quant(wt, 4))


def test_quantize_model_n2uq_recipe():
    m = quantize_model(_small_net(), "n2uq", 3, 4)
    quantized = [mod for mod in m if isinstance(mod, (QConv2d, QLinear))]
    assert len(quantized) == 3 and type(m[0]) is nn.Conv2d and type(m[-1]) is nn.Linear
    for mod in quantized:
        assert isinstance(mod.weight_quantizer, N2UQWeightQuantizer) and mod.weight_quantizer.bits == 3
        assert isinstance(mod.act_quantizer, N2UQQuantizer) and mod.act_quantizer.a.numel() == 15


def test_n2uq_model_state_dict_round_trip_and_compile(tmp_path, triton_backend):
    m = quantize_model(_small_net(), "n2uq", 3, 3)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, N2UQQuantizer):
                mod.a.mul_(torch.rand_like(mod.a) + 0.5)  # away from the initial values
    torch.save(m.state_dict(), tmp_path / "m.pt")
    fresh = quantize_model(_small_net(), "n2uq", 3, 3)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    m.eval(), fresh.eval()
    eager = m(x)
    assert torch.equal(eager, fresh(x))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_n2uq_model_compiles_without_graph_break_on_the_reference_backend():
    """No graph break in an N2UQ-quantized conv net on the reference backend, forward or backward:
    the reference turned a tensor into a Python number (ltq_interval, every call: 45 breaks in a
    YOLO11s) and indexed with a boolean mask (a data-dependent size) in the LTQ backward. explain()
    counts breaks that fullgraph=True lets through inside an autograd.Function."""
    torch._dynamo.reset()
    m = quantize_model(_small_net(), "n2uq", 3, 3)
    x = torch.randn(2, 3, 8, 8)
    with q2kernels.use_backend("reference"):
        eager = m(x)
        eager_grads = torch.autograd.grad(eager.square().sum(), list(m.parameters()))
        report = torch._dynamo.explain(m)(x)
        assert report.graph_break_count == 0, [r.reason.splitlines()[0] for r in report.break_reasons]
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        grads = torch.autograd.grad(out.square().sum(), list(m.parameters()))
    torch.testing.assert_close(out, eager)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- CUDA, at real sizes


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_act_matches_reference_at_scale(bits, dtype):
    params = [p.cuda() for p in _params(bits)]
    x = _inputs([p.cpu() for p in params], (16, 64, 40, 40)).cuda().to(dtype).to(memory_format=torch.channels_last)
    g = torch.randn(x.shape, device="cuda").to(dtype)
    _check_act(x, params, bits, g)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cuda_weight_matches_reference(bits):
    w = torch.randn(512, 256, 3, 3, device="cuda") * 0.02
    g = torch.randn(w.shape, device="cuda")
    (y0, (dw0,)), (y1, (dw1,)) = run_both(lambda w: qF.n2uq_weight_quantize(w, bits), [w.requires_grad_()], g)
    assert torch.equal(y1, y0) and torch.equal(dw1, dw0)
