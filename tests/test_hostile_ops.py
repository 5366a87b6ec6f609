"""Hostile inputs to the Python/Triton ops, on both backends (the Triton kernels under the
interpreter on CPU): strided and expanded parameters, NaN / denormal / non-positive parameters,
degenerate data (all-zero weights, a zero channel), empty and 0-channel tensors, fp16/bf16 rounding,
and malformed arguments. Every case expects the reference's answer from the kernels (NaN exactly
where the reference is NaN) or the same clear error, naming the argument, from both backends."""
import math

import pytest
import torch

import q2kernels
from q2kernels import functional as qF
from q2kernels.reference import n2uq as ref_n2uq

# The interpreter evaluates both sides of a tl.where in numpy, which warns about the 1/0 a where
# then discards (an all-zero channel's 1/sf); the results are what the tests check.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                                        "ignore:invalid value:RuntimeWarning")

BACKENDS = ("reference", "triton")
NAN = float("nan")


def _run(backend, fn, inputs, g=None):
    """(y, grads of every input that requires grad) of fn on fresh leaves, under `backend`.
    A leaf given as a view (a slice, an expand) is rebuilt as the same view of a fresh base, whose
    gradient is returned: that is the parameter autograd must reach."""
    leaves, args = [], []
    for t in inputs:
        if isinstance(t, _View):
            base = t.base.detach().clone().requires_grad_()
            leaves.append(base)
            args.append(t.make(base))
        elif isinstance(t, torch.Tensor) and t.requires_grad:
            leaf = t.detach().clone().requires_grad_()
            leaves.append(leaf)
            args.append(leaf)
        else:
            args.append(t)
    with q2kernels.use_backend(backend):
        y = fn(*args)
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y) if g is None else g) if leaves else ()
    return y, grads


class _View:
    """A parameter passed as a view of a base leaf (make(base) builds the view)."""

    def __init__(self, base, make):
        self.base, self.make = base, make


def _same(a, b, what):
    """Equal elementwise, NaN exactly where the other is NaN, same dtype and shape."""
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN at different places"
    assert torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)), f"{what}: values differ"


def _close(a, b, what, rtol=1e-5):
    """Reduced parameter grads: NaN where the other is NaN, else within rtol (summation order)."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN at different places"
    torch.testing.assert_close(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0), rtol=rtol, atol=1e-6,
                               msg=what)


def _agree(fn, inputs, g=None, exact_grads=1):
    """Both backends: the same y and first `exact_grads` grads exactly, the rest within rtol."""
    (y0, g0), (y1, g1) = (_run(b, fn, inputs, g) for b in BACKENDS)
    _same(y1, y0, "y")
    for i, (a, b) in enumerate(zip(g1, g0)):
        (_same if i < exact_grads else _close)(a, b, f"grad {i}")
    return (y0, g0), (y1, g1)


# ------------------------------------------------------------ 1. strided and expanded parameters

def _x(shape=(2, 6, 3, 5), scale=2.0):
    return (torch.randn(shape) * scale).requires_grad_()


@pytest.mark.parametrize("view", ["strided", "expanded", "offset"])
def test_lsq_per_channel_step_as_a_view(view):
    x = _x()
    s = {"strided": _View(torch.rand(12) * 0.3 + 0.1, lambda b: b[::2]),
         "expanded": _View(torch.tensor([0.3]), lambda b: b.expand(6)),
         "offset": _View(torch.rand(7) * 0.3 + 0.1, lambda b: b[1:])}[view]
    (y0, (_, ds0)), (y1, (_, ds1)) = _agree(lambda x, s: qF.lsq_quantize(x, s, 4, "signed", axis=1), [x, s])
    # and the answer is the one for the same values passed contiguous
    y, (_, ds) = _run("reference", lambda x, s: qF.lsq_quantize(x, s, 4, "signed", axis=1),
                      [x, s.make(s.base).detach().contiguous().requires_grad_()])
    _same(y0, y, "y")
    assert ds1.shape == s.base.shape
    if view == "expanded":  # one step shared by 6 channels: the base gets their sum
        _close(ds1, ds.sum().reshape(1), "ds")
    else:
        _close(s.make(ds1), ds, "ds")
        others = torch.ones(s.base.shape, dtype=torch.bool)
        s.make(others)[:] = False
        assert bool((ds1[others] == 0).all()), "the base's other entries get no gradient"


def test_lsq_plus_offset_strided_and_step_expanded():
    x = _x()
    s = _View(torch.tensor([0.2]), lambda b: b.expand(6))
    beta = _View(torch.randn(12) * 0.2, lambda b: b[::2])
    _agree(lambda x, s, b: qF.lsq_plus_quantize(x, s, b, 3, axis=1), [x, s, beta])


def test_lsq_step_with_stride_in_a_2d_shape():
    """A (C, 1) step cut from a (C, 2) tensor: row stride 2, and the gradient keeps the (C, 1) shape."""
    x = _x()
    s = _View(torch.rand(6, 2) * 0.3 + 0.1, lambda b: b[:, :1])
    (_, (_, ds0)), (_, (_, ds1)) = _agree(lambda x, s: qF.lsq_quantize(x, s, 4, axis=1), [x, s])
    assert bool((ds1[:, 1] == 0).all()) and bool((ds1[:, 0] != 0).any())


def test_n2uq_intervals_strided_and_scalars_expanded():
    bits = 3
    start, a, alpha1, alpha2 = ref_n2uq.ltq_init(bits)
    a = _View(torch.cat([a, a]) * (1 + 0.3 * torch.rand(14)), lambda b: b[::2])
    alpha1 = _View(torch.tensor([[1.2]]), lambda b: b.expand(1, 1).reshape(1))
    x = _x((2, 3, 4, 4), 1.0)
    _agree(lambda x, *p: qF.n2uq_act_quantize(x, *p, bits),
           [x, start.requires_grad_(), a, alpha1, alpha2.requires_grad_()])


def test_fusion_layernorm_affine_strided():
    xs = [torch.randn(2, 3, 2, 2).requires_grad_(), torch.randn(2, 5, 2, 2).requires_grad_()]
    theta = torch.zeros(2, requires_grad=True)
    gamma = _View(torch.rand(16) + 0.5, lambda b: b[::2])
    beta = _View(torch.tensor([0.1]), lambda b: b.expand(8))
    g = torch.randn(2, 8, 2, 2)
    fn = lambda x0, x1, t, ga, be: qF.gated_fusion([x0, x1], t, ga, be)  # noqa: E731
    (y0, g0), (y1, g1) = (_run(b, fn, [*xs, theta, gamma, beta], g) for b in BACKENDS)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    want_y, _ = _run("reference", fn, [*xs, theta, gamma.make(gamma.base).detach().contiguous(),
                                       beta.make(beta.base).detach().contiguous()], g)
    torch.testing.assert_close(y1, want_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_q_ada_delta_expanded():
    T, S, Sq = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3).requires_grad_(), torch.randn(2, 4, 3, 3)
    delta = torch.tensor([0.5]).expand(4)
    losses = []
    for b in BACKENDS:
        with q2kernels.use_backend(b):
            losses.append(qF.q_ada_loss(T, S, Sq, delta, gamma=1.0))
    with q2kernels.use_backend("reference"):
        want = qF.q_ada_loss(T, S, Sq, torch.full((4,), 0.5), gamma=1.0)
    torch.testing.assert_close(losses[0], want, rtol=0, atol=0)
    torch.testing.assert_close(losses[1], want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ 2. NaN and extreme parameters

@pytest.mark.parametrize("value", [NAN, 0.0, -0.5, 1e-40, 1e-9, math.inf])
def test_lsq_step_values(value):
    x = _x()
    s = torch.tensor([value], requires_grad=True)
    (y0, _), _ = _agree(lambda x, s: qF.lsq_quantize(x, s, 4), [x, s])
    if math.isnan(value):
        assert bool(y0.isnan().all()), "a NaN step gives NaN outputs"


def test_lsq_one_nan_channel():
    x = _x()
    s = torch.rand(6) * 0.3 + 0.1
    s[2] = NAN
    (y0, _), _ = _agree(lambda x, s: qF.lsq_quantize(x, s, 4, axis=1), [x, s.requires_grad_()])
    assert bool(y0[:, 2].isnan().all()) and not bool(y0[:, [0, 1, 3, 4, 5]].isnan().any())


@pytest.mark.parametrize("which", ["s", "beta"])
def test_lsq_plus_nan_parameter(which):
    x = _x()
    s, beta = torch.tensor([0.2]), torch.tensor([0.1])
    (s if which == "s" else beta)[0] = NAN
    (y0, _), _ = _agree(lambda x, s, b: qF.lsq_plus_quantize(x, s, b, 4), [x, s.requires_grad_(), beta.requires_grad_()])
    assert bool(y0.isnan().all())


@pytest.mark.parametrize("alpha", [NAN, 1e-40, 1e-45, 0.0, -1.0, 1e-9, 1e-8, math.inf])
def test_pact_clip_values(alpha):
    x = torch.tensor([-1.0, -0.0, 0.0, 1e-41, 5e-9, 1e-8, 0.3, 2.0, 1e30]).requires_grad_()
    a = torch.tensor([alpha], requires_grad=True)
    (y0, (_, da0)), _ = _agree(lambda x, a: qF.pact_quantize(x, a, 4), [x, a])
    if math.isnan(alpha):
        assert bool(y0.isnan().all())
    elif alpha < 1e-8:  # floored to 1e-8 (docs/math.md §3 as LSQ's step): finite, no alpha gradient
        assert bool(((y0 >= 0) & (y0 <= 1e-8)).all()) and da0.item() == 0.0


def test_dorefa_one_nan_weight():
    w = torch.randn(4, 3, 3, 3)
    w[1, 2, 0, 0] = NAN
    (y0, (dw0,)), _ = _agree(lambda w: qF.dorefa_weight_quantize(w, 4), [w.requires_grad_()])
    assert bool(y0.isnan().all()) and bool(dw0.isnan().all()), "m = max|tanh| is NaN: every output is"


def test_dorefa_infinite_weights():
    w = torch.randn(4, 3)
    w[0, 0], w[2, 1] = math.inf, -math.inf
    _agree(lambda w: qF.dorefa_weight_quantize(w, 3), [w.requires_grad_()], exact_grads=0)


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_n2uq_nan_parameter(index):
    bits = 3
    params = [p.clone() for p in ref_n2uq.ltq_init(bits)]
    params[index][-1] = NAN
    x = _x((2, 3, 4, 4), 1.0)
    _agree(lambda x, *p: qF.n2uq_act_quantize(x, *p, bits), [x, *(p.requires_grad_() for p in params)])


def test_n2uq_weight_nan_channel():
    w = torch.randn(4, 3, 3, 3) * 0.1
    w[2, 1, 1, 1] = NAN
    (y0, (dw0,)), _ = _agree(lambda w: qF.n2uq_weight_quantize(w, 4), [w.requires_grad_()])
    assert bool(y0[2].isnan().all()) and not bool(y0[[0, 1, 3]].isnan().any())


# ------------------------------------------------------------ 3. degenerate data

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dorefa_all_zero_weights(bits):
    """The convention (reference docstring): m = 0 gives u = 1/2, wq = 2*R(n/2)/n - 1 = 1/n, dw = 0."""
    w = torch.zeros(5, 3, 3, 3, requires_grad=True)
    g = torch.randn(w.shape)
    (y0, (dw0,)), (y1, (dw1,)) = _agree(lambda w: qF.dorefa_weight_quantize(w, bits), [w], g)
    n = 2**bits - 1
    torch.testing.assert_close(y0, torch.full_like(y0, 1 / n), rtol=0, atol=2**-22)  # 2q/n - 1 in fp32
    assert torch.equal(dw0, torch.zeros_like(dw0))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_n2uq_weight_zero_channel(bits):
    """The convention (reference docstring): a zero channel (sf = 0) gives wq = 0 and dW = 0; the
    other channels are untouched."""
    w = torch.randn(4, 3, 3, 3) * 0.1
    w[1] = 0.0
    g = torch.randn(w.shape)
    (y0, (dw0,)), _ = _agree(lambda w: qF.n2uq_weight_quantize(w, bits), [w.requires_grad_()], g)
    assert torch.equal(y0[1], torch.zeros_like(y0[1])) and torch.equal(dw0[1], torch.zeros_like(dw0[1]))
    assert bool(y0.isfinite().all()) and bool(dw0.isfinite().all())
    with q2kernels.use_backend("reference"):
        kept = qF.n2uq_weight_quantize(w[[0, 2, 3]], bits)
    assert torch.equal(y0[[0, 2, 3]], kept)


def test_n2uq_weight_all_zero():
    w = torch.zeros(3, 8, requires_grad=True)
    (y0, (dw0,)), _ = _agree(lambda w: qF.n2uq_weight_quantize(w, 4), [w], torch.randn(3, 8))
    assert torch.equal(y0, torch.zeros_like(y0)) and torch.equal(dw0, torch.zeros_like(dw0))


@pytest.mark.parametrize("case", [
    "lsq_empty", "lsq_zero_channels", "lsq_plus_zero_channels", "pact_empty", "dorefa_empty",
    "dorefa_zero_rows", "n2uq_act_empty", "n2uq_weight_zero_channels", "n2uq_weight_zero_inner",
])
def test_empty_tensors_agree(case):
    """Zero-size inputs: the same empty output and zero (or empty) parameter grads on both backends."""
    cases = {
        "lsq_empty": (lambda x, s: qF.lsq_quantize(x, s, 4), [torch.empty(0, 3, requires_grad=True),
                                                           torch.tensor([0.2], requires_grad=True)]),
        "lsq_zero_channels": (lambda x, s: qF.lsq_quantize(x, s, 4, axis=1),
                              [torch.empty(2, 0, 3, requires_grad=True), torch.empty(0, requires_grad=True)]),
        "lsq_plus_zero_channels": (lambda x, s, b: qF.lsq_plus_quantize(x, s, b, 4, axis=1),
                                   [torch.empty(2, 0, 3, requires_grad=True), torch.empty(0, requires_grad=True),
                                    torch.empty(0, requires_grad=True)]),
        "pact_empty": (lambda x, a: qF.pact_quantize(x, a, 4), [torch.empty(0, requires_grad=True),
                                                                torch.tensor([2.0], requires_grad=True)]),
        "dorefa_empty": (lambda w: qF.dorefa_weight_quantize(w, 4), [torch.empty(0, requires_grad=True)]),
        "dorefa_zero_rows": (lambda w: qF.dorefa_weight_quantize(w, 4), [torch.empty(0, 3, 3, 3, requires_grad=True)]),
        "n2uq_act_empty": (lambda x, *p: qF.n2uq_act_quantize(x, *p, 3),
                           [torch.empty(2, 0, 4, requires_grad=True),
                            *(p.requires_grad_() for p in ref_n2uq.ltq_init(3))]),
        "n2uq_weight_zero_channels": (lambda w: qF.n2uq_weight_quantize(w, 4), [torch.empty(0, 3, requires_grad=True)]),
        "n2uq_weight_zero_inner": (lambda w: qF.n2uq_weight_quantize(w, 4), [torch.empty(3, 0, requires_grad=True)]),
    }
    fn, inputs = cases[case]
    (y0, g0), (y1, g1) = _agree(fn, inputs)
    assert y0.numel() == 0
    for gr in g0[1:]:
        assert bool((gr == 0).all())


@pytest.mark.parametrize("op", ["lsq", "lsq_plus", "pact", "dorefa", "n2uq_act"])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1, 1)])
def test_scalar_and_single_element_inputs(op, shape):
    x = torch.full(shape, 0.7).requires_grad_()
    fn, params = {
        "lsq": (lambda x, s: qF.lsq_quantize(x, s, 4), [torch.tensor([0.25])]),
        "lsq_plus": (lambda x, s, b: qF.lsq_plus_quantize(x, s, b, 4), [torch.tensor([0.25]), torch.tensor([0.1])]),
        "pact": (lambda x, a: qF.pact_quantize(x, a, 4), [torch.tensor([0.5])]),
        "dorefa": (lambda x: qF.dorefa_weight_quantize(x, 4), []),
        "n2uq_act": (lambda x, *p: qF.n2uq_act_quantize(x, *p, 3), list(ref_n2uq.ltq_init(3))),
    }[op]
    (y0, _), _ = _agree(fn, [x, *(p.requires_grad_() for p in params)])
    assert y0.shape == shape


@pytest.mark.parametrize("axis", [1, 3])
def test_lsq_per_channel_nan_and_inf_inputs_channels_last(axis):
    x = (torch.randn(2, 5, 3, 4) * 2).to(memory_format=torch.channels_last)
    x[0, 1, 0, 0], x[1, 3, 2, 1], x[0, 4, 1, 2] = NAN, math.inf, -math.inf
    s = torch.rand(x.shape[axis]) * 0.3 + 0.1
    (y0, _), _ = _agree(lambda x, s: qF.lsq_quantize(x, s, 4, axis=axis), [x.requires_grad_(), s.requires_grad_()])
    assert int(y0.isnan().sum()) == 1


# ------------------------------------------------------------ 4. fp16 / bf16 stores round to nearest even

def _ulp_spread(shape, dtype, scale):
    """Inputs whose fp32 results need more mantissa bits than `dtype` has, so truncation and
    rounding to nearest differ on about half of them."""
    return (torch.randn(shape) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["lsq", "lsq_plus", "pact", "dorefa", "n2uq_act", "n2uq_weight"])
def test_half_outputs_round_to_nearest_even(op, dtype):
    # DoReFa: |w| well below 1, where 1 - tanh^2 does not cancel (the ulp of the kernel's tanh
    # stays an ulp in dw)
    x = _ulp_spread((4, 6, 5, 5), dtype, 0.3 if op == "dorefa" else 3.0).requires_grad_()
    g = torch.randn(x.shape).to(dtype)
    s, beta, alpha = torch.tensor([0.1234567]), torch.tensor([0.0321]), torch.tensor([2.71828])
    start, a, alpha1, alpha2 = ref_n2uq.ltq_init(3)
    fn, params = {
        "lsq": (lambda x, s: qF.lsq_quantize(x, s, 4), [s]),
        "lsq_plus": (lambda x, s, b: qF.lsq_plus_quantize(x, s, b, 4), [s, beta]),
        "pact": (lambda x, a: qF.pact_quantize(x, a, 4), [alpha]),
        "dorefa": (lambda x: qF.dorefa_weight_quantize(x, 4), []),
        "n2uq_act": (lambda x, *p: qF.n2uq_act_quantize(x, *p, 3), [start, a, alpha1 * 1.1234567, alpha2 * 0.987654]),
        "n2uq_weight": (lambda x: qF.n2uq_weight_quantize(x, 4), []),
    }[op]
    (y0, g0), (y1, g1) = (_run(b, fn, [x, *params], g) for b in BACKENDS)
    # the reference computes in fp32 and converts with .to(dtype): round to nearest even
    assert y1.dtype == dtype and g1[0].dtype == dtype
    if op == "dorefa":  # the kernel's exp-based tanh may differ in the last fp32 ulp, which can
        # move a value across a rounding boundary of `dtype` rarely (truncating would on half)
        for got, want in ((y1, y0), (g1[0], g0[0])):
            assert (got != want).float().mean() < 0.02
            torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-4)
    else:
        _same(y1, y0, "y")
        _same(g1[0], g0[0], "dx")


# ------------------------------------------------------------ 5. malformed arguments: clear errors naming them

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,match", [
    (lambda x: qF.lsq_quantize(x, 0.5, 4), "s: expected a torch.Tensor"),
    (lambda x: qF.lsq_quantize(x, torch.tensor([1], dtype=torch.int32), 4), "s: expected a floating-point"),
    (lambda x: qF.lsq_quantize(x, torch.tensor([0.5]), "4"), "bits"),
    (lambda x: qF.lsq_quantize(x, torch.tensor([0.5]), 4, axis=1.0), "axis"),
    (lambda x: qF.lsq_quantize(x, torch.tensor([0.5]), 4, axis=True), "axis"),
    (lambda x: qF.lsq_quantize(x, torch.tensor([0.5]), 4, grad_scale=float("nan")), "grad_scale"),
    (lambda x: qF.lsq_quantize(x, torch.tensor([0.5]), 4, grad_scale=float("inf")), "grad_scale"),
    (lambda x: qF.lsq_quantize(x, torch.tensor([0.5]), 4, grad_scale=torch.tensor(1.0)), "grad_scale"),
    (lambda x: qF.lsq_quantize(x.tolist(), torch.tensor([0.5]), 4), "x: expected a torch.Tensor"),
    (lambda x: qF.lsq_quantize(x, torch.ones(2, 3), 4, axis=1), "s: expected 3 element"),
    (lambda x: qF.lsq_plus_quantize(x, torch.tensor([0.5]), torch.ones(3), 4), "beta: expected 1 element"),
    (lambda x: qF.lsq_plus_quantize(x, torch.tensor([0.5]), torch.ones(1).half(), 4), "beta: expected a float32"),
    (lambda x: qF.pact_quantize(x, torch.tensor(2.0).to("meta"), 4), "alpha: is on meta"),
    (lambda x: qF.pact_quantize(x, torch.empty(0), 4), "alpha: expected 1 element"),
    (lambda x: qF.dorefa_weight_quantize(x.bool(), 4), "w: expected a float32"),
    (lambda x: qF.n2uq_act_quantize(x, *ref_n2uq.ltq_init(3)[:3], torch.ones(1, dtype=torch.float64), 3),
     "alpha2: expected a float32"),
    (lambda x: qF.n2uq_act_quantize(x, torch.zeros(0), *ref_n2uq.ltq_init(3)[1:], 3), "start: expected 1 element"),
    (lambda x: qF.n2uq_weight_quantize(x, 2.5), "bits"),
    (lambda x: qF.lsq_quantize(torch.tensor(1.0), torch.tensor([0.5]), 4, axis=0), "axis"),
])
def test_malformed_arguments(bad, match, backend):
    x = torch.randn(2, 3, 4)
    with q2kernels.use_backend(backend), pytest.raises((ValueError, TypeError), match=match):
        bad(x)
