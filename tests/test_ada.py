"""Q-ADA (docs/math.md §6): the reference against float64 autograd and a plain SimAM, the fused kernels
against the reference (loss and dS), opcheck, torch.compile, QADALoss on two small conv nets, and
bad input."""
import copy
import gc

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import q2kernels
from q2kernels import functional as qF
from q2kernels.nn import LSQQuantizer, QADALoss, QConv2d

from conftest import DEVICE

DIVERGENCES = ("js", "kl")


# ---------------------------------------------------------------------------------------------
# Oracles, written independently of the reference.

def oracle(T, S, Sq=None, delta=None, Tq=None, form="simam", lam=1e-4, kappa=1e-6, gamma=1.0,
           divergence="js", reduction="mean"):
    """docs/math.md §6 in float64 with autograd; the distortion maps are computed without a graph."""
    M = T.shape[2] * T.shape[3]

    def moments(x):
        mu = x.mean(dim=(2, 3), keepdim=True)
        return mu, ((x - mu) ** 2).sum(dim=(2, 3), keepdim=True) / max(M - 1, 1)

    def distortion(x, xq):
        with torch.no_grad():
            den = moments(x)[1].sqrt() if delta is None else delta.double().reshape(1, -1, 1, 1)
            if form == "simam":
                return gamma * (xq.double() - x).abs() / (den + 1e-6)
            r = (x - xq.double()).abs() / (den + kappa)
            return gamma * torch.log(1 + r ** 2)

    def attention(x, g):
        mu, var = moments(x)
        if form == "simam":
            score = (x - mu) ** 2 / (4 * (var + lam)) + 0.5
        else:
            z = (x - mu).abs() / (var.sqrt() + kappa)
            score = torch.log(1 + z ** 2)
        a = torch.sigmoid(score + g)
        return a / a.sum(dim=(2, 3), keepdim=True)

    t, s = T.double(), S.double()
    g_s = 0.0 if Sq is None else distortion(s, Sq)
    g_t = g_s if Tq is None else distortion(t, Tq)
    p_t = attention(t, g_t)
    p_s = attention(s, g_s)
    if divergence == "kl":
        rows = (p_t * torch.log(p_t / p_s)).sum(dim=(2, 3))
    else:
        mx = (p_t + p_s) / 2
        rows = 0.5 * (p_t * torch.log(p_t / mx)).sum(dim=(2, 3)) + 0.5 * (p_s * torch.log(p_s / mx)).sum(dim=(2, 3))
    return rows.mean() if reduction == "mean" else rows.sum()


def simam_ada(T, S):
    """GABFusion's ADA from SimAM's published module code (x * sigmoid(y)) and torch's kl_div."""
    def simam_attention(x):
        b, c, h, w = x.size()
        n = w * h - 1
        x_minus_mu_square = (x - x.mean(dim=[2, 3], keepdim=True)).pow(2)
        y = x_minus_mu_square / (4 * (x_minus_mu_square.sum(dim=[2, 3], keepdim=True) / n + 1e-4)) + 0.5
        return torch.sigmoid(y).flatten(2)

    p = simam_attention(T.double())
    q = simam_attention(S.double())
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    m = (0.5 * (p + q)).log()
    js = 0.5 * F.kl_div(m, p, reduction="none").sum(-1) + 0.5 * F.kl_div(m, q, reduction="none").sum(-1)
    return js.mean()


# ---------------------------------------------------------------------------------------------
# Inputs and comparisons.

def make(shape, sq_mode="none", dtype=torch.float32, layout="nchw", scale=1.0, offset=0.0, own=False):
    """(T, S, Sq, delta, Tq). sq_mode: "none" | "var" (Sq, no delta) | "scalar" | "channel";
    own: Tq, T quantized with the same step (None unless Sq is given)."""
    T = (torch.randn(shape) * scale + offset).to(dtype)
    S = (torch.randn(shape) * 1.3 * scale + 0.2 + offset).to(dtype)
    Sq = delta = Tq = None
    if sq_mode != "none":
        step = 0.3 * scale
        Sq = (torch.round(S.float() / step) * step).to(dtype)
        if own:
            Tq = (torch.round(T.float() / step) * step).to(dtype)
        if sq_mode == "scalar":
            delta = torch.tensor([step])
        elif sq_mode == "channel":
            delta = torch.rand(shape[1]) * step + 0.1 * step
    if layout in ("cl", "mixed"):
        S = S.contiguous(memory_format=torch.channels_last)
        if layout == "cl":
            T = T.contiguous(memory_format=torch.channels_last)
        elif Sq is not None:
            Sq = Sq.contiguous(memory_format=torch.channels_last)
    move = (lambda x: None if x is None else x.to(DEVICE))
    return move(T), move(S), move(Sq), move(delta), move(Tq)


def loss_and_grad(backend, T, S, Sq=None, delta=None, Tq=None, g=None, **kw):
    """(loss, dS) for the upstream gradient g (a number; 1 if None)."""
    leaf = S.detach().clone().requires_grad_()
    with q2kernels.use_backend(backend):
        loss = qF.q_ada_loss(T, leaf, Sq, delta, Tq=Tq, **kw)
    (dS,) = torch.autograd.grad(loss, leaf, None if g is None else torch.tensor(g, device=loss.device))
    return loss, dS


def oracle_loss_and_grad(T, S, Sq=None, delta=None, Tq=None, g=1.0, **kw):
    S64 = S.double().requires_grad_()
    want = oracle(T, S64, Sq, delta, Tq, **kw)
    (want_dS,) = torch.autograd.grad(want, S64, torch.tensor(g, dtype=torch.float64))
    return want, want_dS


def assert_loss_close(actual, expected, rows, reduction="mean", rtol=1e-5):
    """fp32 evaluation of a row's divergence carries an absolute error of a few 1e-7 (the logs of
    ratios near 1 and the normalisers), whatever the divergence's size: 2e-6 per row on top of rtol."""
    atol = 2e-6 * (rows if reduction == "sum" else 1)
    err = abs(actual.double().item() - expected.double().item())
    assert err <= rtol * abs(expected.double().item()) + atol, f"loss {actual.item()} vs {expected.item()}"


def assert_grad_close(actual, expected, dtype=torch.float32):
    """dS is a sum over its row: rtol 1e-5 against the largest |dS|, plus one ulp of a half output
    (its subnormal spacing included: dS of a mean over rows is small)."""
    a, e = actual.double(), expected.double()
    eps, tiny = (0.0, 0.0) if dtype == torch.float32 else (torch.finfo(dtype).eps, torch.finfo(dtype).smallest_normal)
    tol = 1e-5 * e.abs().max() + (1e-5 + eps) * e.abs() + eps * tiny
    err = (a - e).abs()
    assert bool((err <= tol).all()), f"max err {err.max().item():.3e}, max |dS| {e.abs().max().item():.3e}"


# ---------------------------------------------------------------------------------------------
# The reference.

FORMS = ("q2", "simam")
# (sq_mode, own): no distortion, then each distortion denominator shared and own.
DISTORTION_CASES = [("none", False)] + [(m, own) for m in ("var", "scalar", "channel") for own in (False, True)]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("sq_mode,own", DISTORTION_CASES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 20, 20)])
def test_reference_matches_float64_autograd(shape, form, sq_mode, own, divergence):
    torch.manual_seed(1)
    T, S, Sq, delta, Tq = make(shape, sq_mode, own=own)
    for reduction in ("mean", "sum"):
        kw = dict(form=form, divergence=divergence, reduction=reduction)
        loss, dS = loss_and_grad("reference", T, S, Sq, delta, Tq, **kw)
        want, want_dS = oracle_loss_and_grad(T, S, Sq, delta, Tq, **kw)
        assert_loss_close(loss, want, shape[0] * shape[1], reduction)
        assert_grad_close(dS, want_dS)


def test_own_and_shared_distortion_differ():
    """The teacher's own distortion term is used: Tq changes the loss and the gradient."""
    T, S, Sq, delta, Tq = make((2, 3, 6, 6), "scalar", own=True)
    for form in FORMS:
        shared = loss_and_grad("reference", T, S, Sq, delta, form=form)
        own = loss_and_grad("reference", T, S, Sq, delta, Tq, form=form)
        assert abs(shared[0].item() - own[0].item()) > 1e-4 * abs(shared[0].item())
        assert (shared[1] - own[1]).abs().max() > 1e-3 * shared[1].abs().max()


@pytest.mark.parametrize("shape", [(2, 3, 6, 6), (1, 8, 13, 17)])
def test_reference_gamma0_is_simam_ada(shape):
    torch.manual_seed(2)
    T, S, Sq, _, Tq = make(shape, "var", own=True)
    want = simam_ada(T, S)
    for sq, tq in ((None, None), (Sq, None), (Sq, Tq)):  # gamma = 0: Sq and Tq change nothing
        loss, _ = loss_and_grad("reference", T, S, sq, None, tq, form="simam", gamma=0.0)
        assert_loss_close(loss, want, shape[0] * shape[1])
    # and the distortion term does change the loss when gamma > 0
    assert abs(loss_and_grad("reference", T, S, Sq, form="simam")[0].item() - want.item()) > 1e-5


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 2, 1, 9), (1, 2, 7, 1)])
def test_one_pixel_and_thin_maps_are_finite(backend, shape, form):
    """SimAM divides by H*W - 1: NaN for 1x1 maps. docs/math.md uses max(M - 1, 1). A one-pixel row has
    P^T = P^S = 1: loss and gradient exactly 0 (float64 autograd of Q2's sqrt(var) is NaN there)."""
    torch.manual_seed(3)
    T, S, Sq, delta, Tq = make(shape, "var", own=True)
    for divergence in DIVERGENCES:
        loss, dS = loss_and_grad(backend, T, S, Sq, delta, Tq, form=form, divergence=divergence)
        assert torch.isfinite(loss) and bool(torch.isfinite(dS).all())
        if shape[2] * shape[3] == 1:
            assert loss.item() == 0.0 and bool((dS == 0).all())
            continue
        want, want_dS = oracle_loss_and_grad(T, S, Sq, delta, Tq, form=form, divergence=divergence)
        assert_loss_close(loss, want, shape[0] * shape[1])
        assert_grad_close(dS, want_dS)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_q2_near_constant_rows_are_finite(backend):
    """Q2's dk/dvar = -k/((sd + kappa) sd) overflows fp32 for a tiny sd; the gradient's term is
    written as -k/(sd + kappa) (V2/sd), finite. Rows: constant (sd = 0), one ulp apart, and 1e-20."""
    T = torch.randn(1, 3, 4, 5, device=DEVICE)
    S = torch.ones(1, 3, 4, 5, device=DEVICE)
    S[0, 1, 0, 0] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    S[0, 2] = torch.randn(4, 5) * 1e-20
    Sq = torch.zeros_like(S)
    for sq in (None, Sq):
        loss, dS = loss_and_grad(backend, T, S, sq, form="q2")
        assert torch.isfinite(loss) and bool(torch.isfinite(dS).all())
        assert bool((dS[0, 0] == 0).all())  # a constant row: z = 0 wherever S moves (first order)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp16_sum_of_squares_overflow_gives_fp32_answer(backend, form):
    torch.manual_seed(4)
    T, S, Sq, delta, Tq = make((2, 3, 20, 20), "channel", dtype=torch.float16, scale=300.0, offset=1000.0, own=True)
    d = S - S.mean(dim=(2, 3), keepdim=True)
    assert bool(torch.isinf((d * d).sum(dim=(2, 3))).all())  # the fp16 sum of squares overflows
    for divergence in DIVERGENCES:
        # dS is ~1e-9 here, below fp16's range: an upstream gradient of 1e6 (a loss scaler's role)
        # brings it into range, so the comparison is not of zeros.
        kw = dict(form=form, divergence=divergence)
        loss, dS = loss_and_grad(backend, T, S, Sq, delta, Tq, g=1e6, **kw)
        want, want_dS = oracle_loss_and_grad(T, S, Sq, delta, Tq, g=1e6, **kw)
        assert_loss_close(loss, want, 6)
        assert want_dS.abs().max() > 1e-3
        assert_grad_close(dS, want_dS, torch.float16)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_teacher_sq_tq_and_delta_get_no_gradient(backend, form):
    T, S, Sq, delta, Tq = make((2, 3, 4, 5), "channel", own=True)
    for x in (T, Sq, delta, Tq, S):
        x.requires_grad_()
    with q2kernels.use_backend(backend):
        qF.q_ada_loss(T, S, Sq, delta, Tq=Tq, form=form).backward()
    assert T.grad is None and Sq.grad is None and delta.grad is None and Tq.grad is None
    assert S.grad is not None and S.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# The fused kernels against the reference.

# (shape, sq_mode, dtype, layout, reduction): M = 1, 7, 400, 1600, 6400, 25600, non-powers of two
# (315, 99, 6643 in several chunks, 26243 > 160*160), C not a multiple of the channel block (3,
# 20), NCHW / channels_last / mixed layouts, fp32 / fp16 / bf16, every distortion mode. Each case
# runs in both forms, with the teacher's own distortion term (where there is one) in one of them.
CASES = [
    ((2, 5, 1, 1), "channel", torch.float32, "nchw", "mean"),
    ((3, 4, 1, 7), "none", torch.float32, "cl", "sum"),
    ((2, 6, 20, 20), "scalar", torch.float32, "cl", "mean"),
    ((2, 6, 20, 20), "var", torch.bfloat16, "nchw", "mean"),
    ((1, 3, 40, 40), "channel", torch.float16, "cl", "mean"),
    ((1, 3, 40, 40), "none", torch.float32, "mixed", "sum"),
    ((1, 2, 80, 80), "channel", torch.float32, "nchw", "mean"),
    ((1, 2, 80, 80), "var", torch.bfloat16, "cl", "mean"),
    ((2, 3, 15, 21), "scalar", torch.float16, "nchw", "mean"),
    ((2, 20, 9, 11), "channel", torch.float32, "cl", "sum"),
    ((1, 2, 73, 91), "var", torch.float32, "mixed", "mean"),
    ((1, 1, 160, 160), "scalar", torch.bfloat16, "nchw", "mean"),
    ((1, 1, 161, 163), "none", torch.float32, "nchw", "mean"),
]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference(case, form, divergence):
    shape, sq_mode, dtype, layout, reduction = CASES[case]
    torch.manual_seed(100 + case)
    own = (form == "q2") == (case % 2 == 0)
    T, S, Sq, delta, Tq = make(shape, sq_mode, dtype, layout, own=own)
    kw = dict(form=form, divergence=divergence, reduction=reduction)
    want, want_dS = loss_and_grad("reference", T, S, Sq, delta, Tq, **kw)
    loss, dS = loss_and_grad("triton", T, S, Sq, delta, Tq, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert dS.dtype == S.dtype and dS.stride() == S.stride()
    assert_loss_close(loss, want, shape[0] * shape[1], reduction)
    assert_grad_close(dS, want_dS, dtype)


@pytest.mark.parametrize("form", FORMS)
def test_kernel_gamma_lambda_and_kappa_are_used(form):
    T, S, Sq, delta, Tq = make((2, 4, 9, 9), "var", own=True)
    for kw in (dict(gamma=0.0), dict(gamma=2.5), dict(lam=0.5), dict(kappa=0.3)):
        want, want_dS = loss_and_grad("reference", T, S, Sq, None, Tq, form=form, **kw)
        loss, dS = loss_and_grad("triton", T, S, Sq, None, Tq, form=form, **kw)
        assert_loss_close(loss, want, 8)
        assert_grad_close(dS, want_dS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_gradient_is_rounded_to_nearest_even(dtype):
    """dS in a half dtype is the kernel's own fp32 dS (the same values read as fp32) rounded to
    nearest even, bit for bit: a truncating store differs in about half the elements."""
    T, S, Sq, delta, Tq = make((2, 6, 20, 20), "scalar", dtype, own=True)
    for form in FORMS:
        _, d_half = loss_and_grad("triton", T, S, Sq, delta, Tq, g=1e4, form=form)
        _, d_fp32 = loss_and_grad("triton", T.float(), S.float(), Sq.float(), delta, Tq.float(), g=1e4, form=form)
        assert torch.equal(d_half, d_fp32.to(dtype))


def test_kernel_fp32_teacher_with_bf16_student():
    """A float teacher distilling an autocast student: each input is read in its own dtype."""
    T, S, Sq, delta, Tq = make((2, 5, 12, 12), "scalar", dtype=torch.bfloat16, own=True)
    T = torch.randn(T.shape, device=DEVICE)
    for form in FORMS:
        want, want_dS = loss_and_grad("reference", T, S, Sq, delta, Tq, form=form)
        loss, dS = loss_and_grad("triton", T, S, Sq, delta, Tq, form=form)
        assert dS.dtype == torch.bfloat16
        assert_loss_close(loss, want, 10)
        assert_grad_close(dS, want_dS, torch.bfloat16)


def test_kernel_non_dense_and_unmergeable_layouts():
    """A slice (not dense) and a W/H-transposed tensor (dense, but H and W do not merge into one
    pixel stride) are copied once; the answer is the reference's."""
    T, S, Sq, delta, Tq = make((2, 6, 8, 10), "channel", own=True)
    S_slice = torch.randn(2, 12, 8, 10, device=DEVICE)[:, ::2]
    S_t = torch.randn(2, 6, 10, 8, device=DEVICE).transpose(2, 3)
    for s in (S_slice, S_t):
        for form in FORMS:
            want, want_dS = loss_and_grad("reference", T, s, Sq, delta, S_t, form=form)
            loss, dS = loss_and_grad("triton", T, s, Sq, delta, S_t, form=form)
            assert_loss_close(loss, want, 12)
            assert_grad_close(dS, want_dS)


def test_kernel_int64_offsets(monkeypatch):
    """The int64 offset path (tensors over 2^31 elements) on a small input."""
    from q2kernels.ops import _layout
    monkeypatch.setattr(_layout, "needs_int64", lambda x: True)
    T, S, Sq, delta, Tq = make((2, 3, 9, 7), "scalar", layout="cl", own=True)
    for form in FORMS:
        want, want_dS = loss_and_grad("reference", T, S, Sq, delta, Tq, form=form)
        loss, dS = loss_and_grad("triton", T, S, Sq, delta, Tq, form=form)
        assert_loss_close(loss, want, 6)
        assert_grad_close(dS, want_dS)


def test_kernel_is_deterministic():
    T, S, Sq, delta, Tq = make((2, 20, 12, 12), "channel", layout="cl", own=True)
    a = loss_and_grad("triton", T, S, Sq, delta, Tq)
    b = loss_and_grad("triton", T, S, Sq, delta, Tq)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch_has_zero_loss(backend, form):
    """A batch of no rows adds nothing: loss 0 under either reduction (not a mean's NaN), dS empty."""
    T, S, Sq, delta, Tq = make((0, 3, 4, 4), "channel", own=True)
    for reduction in ("mean", "sum"):
        loss, dS = loss_and_grad(backend, T, S, Sq, delta, Tq, form=form, reduction=reduction)
        assert loss.item() == 0.0 and dS.shape == S.shape


def test_opcheck():
    for shape, sq_mode, layout, kl, mean, form, own in [
            ((2, 3, 5, 7), "none", "nchw", False, True, "simam", False),
            ((2, 3, 5, 7), "channel", "cl", True, False, "simam", True),
            ((1, 2, 40, 50), "var", "nchw", False, False, "q2", True),
            ((2, 3, 5, 7), "scalar", "mixed", True, True, "q2", False),
            ((2, 3, 1, 1), "scalar", "nchw", True, True, "q2", True)]:
        T, S, Sq, delta, Tq = make(shape, sq_mode, layout=layout, own=own)
        S.requires_grad_()
        torch.library.opcheck(torch.ops.q2kernels.q_ada, (T, S, Sq, delta, 1e-4, 1.0, kl, mean, Tq, form, 1e-6))


@pytest.mark.parametrize("form", FORMS)
def test_torch_compile_fullgraph(triton_backend, form):
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(DEVICE)
    x = torch.randn(2, 3, 12, 12, device=DEVICE)
    T = torch.randn(2, 4, 12, 12, device=DEVICE)
    delta = torch.full((4,), 0.2, device=DEVICE)

    def step(x):
        s = conv(x)
        sq = torch.round(s / 0.2) * 0.2
        return qF.q_ada_loss(T, s, sq.detach(), delta, Tq=torch.round(T / 0.2) * 0.2, form=form, divergence="kl")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    got_grads = torch.autograd.grad(got, list(conv.parameters()))
    want = step(x)
    want_grads = torch.autograd.grad(want, list(conv.parameters()))
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# QADALoss on two small conv nets.

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.neck = nn.Conv2d(8, 6, 3, padding=1, stride=2)
        self.act = nn.ReLU()
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(self.act(self.neck(self.body(torch.relu(self.stem(x))))))


def nets():
    torch.manual_seed(6)
    teacher = Net().to(DEVICE)
    student = copy.deepcopy(teacher)
    student.neck = QConv2d.from_float(student.neck, act=LSQQuantizer(4, "unsigned"))
    student.head = QConv2d.from_float(student.head, act=LSQQuantizer(4, "unsigned"))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def count_hooks(*models):
    return sum(len(m._forward_hooks) for model in models for m in model.modules())


@pytest.mark.parametrize("form,distortion", [("q2", "own"), ("simam", "shared"), ("q2", "shared")])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_qada_loss_collects_features_and_backprops_into_student_only(backend, form, distortion):
    teacher, student = nets()
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    # "body" feeds the neck's input quantizer directly (Sq and Delta from it); "neck" reaches the
    # head's quantizer through a ReLU (no distortion term).
    qada = QADALoss(teacher, student, points=["body", ("neck", "neck")], weight=0.5, divergence="kl",
                    form=form, distortion=distortion)
    captured = {}
    student.body.register_forward_hook(lambda m, i, o: captured.__setitem__("body", o))
    student.neck.register_forward_hook(lambda m, i, o: captured.__setitem__("neck", o))
    teacher(x)
    student(x)
    p_body, p_neck = qada._points
    with torch.no_grad():
        t_body = teacher.body(torch.relu(teacher.stem(x)))
        t_neck = teacher.neck(t_body)
    assert p_body.teacher.grad_fn is None and not p_body.teacher.requires_grad
    torch.testing.assert_close(p_body.teacher, t_body, rtol=0, atol=0)
    torch.testing.assert_close(p_neck.teacher, t_neck, rtol=0, atol=0)
    assert p_body.student is captured["body"] and p_neck.student is captured["neck"]
    quant = student.neck.act_quantizer
    with torch.no_grad():
        torch.testing.assert_close(p_body.sq, quant(captured["body"]), rtol=0, atol=0)
        # the teacher's quantized feature, written out: LSQ unsigned 4-bit with the student's step
        s = quant.s.detach()
        t_q = torch.clamp(torch.round(t_body / s), 0, 15) * s
    torch.testing.assert_close(p_body.delta, quant.step_size(), rtol=0, atol=0)
    assert p_neck.sq is None and p_neck.delta is None

    tq = t_q if distortion == "own" else None
    with q2kernels.use_backend(backend):
        want = 0.5 * (qF.q_ada_loss(t_body, captured["body"], p_body.sq, p_body.delta, Tq=tq, form=form, divergence="kl")
                      + qF.q_ada_loss(t_neck, captured["neck"], form=form, divergence="kl"))
        loss = qada()
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    assert all(p.teacher is None and p.student is None and p.quantizer is None for p in qada._points)  # consumed
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    for name in ("stem.weight", "body.0.weight", "neck.weight"):
        assert student.get_parameter(name).grad.abs().sum() > 0, name
    assert student.head.weight.grad is None  # the head is downstream of every point
    with pytest.raises(RuntimeError, match="no teacher output recorded"):
        qada()
    qada.remove()

    # Sq, Tq and Delta are constants of the loss: the quantizer that supplies them, downstream of
    # the point, gets no gradient from it.
    student.zero_grad(set_to_none=True)
    qada = QADALoss(teacher, student, points=["body"], form=form, distortion=distortion)
    teacher(x)
    student(x)
    assert qada._points[0].sq is not None
    with q2kernels.use_backend(backend):
        qada().backward()
    assert quant.s.grad is None and student.body[0].weight.grad.abs().sum() > 0


def test_qada_loss_defaults_are_q2_with_own_distortion():
    teacher, student = nets()
    with QADALoss(teacher, student, points=["body"]) as qada:
        assert (qada.form, qada.distortion) == ("q2", "own")


def test_qada_loss_remove_and_garbage_collection_remove_hooks():
    teacher, student = nets()
    before = count_hooks(teacher, student)
    qada = QADALoss(teacher, student, points=["body", "neck"])
    assert count_hooks(teacher, student) == before + 4 + 2  # two points, two act quantizers
    qada.remove()
    assert count_hooks(teacher, student) == before
    qada.remove()  # idempotent
    with QADALoss(teacher, student, points=["body"], gamma=0.0):
        assert count_hooks(teacher, student) == before + 2  # gamma = 0: no quantizer hooks
    assert count_hooks(teacher, student) == before
    qada = QADALoss(teacher, student, points=["body"])
    del qada
    gc.collect()
    assert count_hooks(teacher, student) == before


def test_qada_loss_bad_arguments():
    teacher, student = nets()
    with pytest.raises(ValueError, match="student has no module named 'nope'"):
        QADALoss(teacher, student, points=[("body", "nope")])
    with pytest.raises(ValueError, match="points"):
        QADALoss(teacher, student, points=[])
    with pytest.raises(ValueError, match="points"):
        QADALoss(teacher, student, points="body")
    with pytest.raises(ValueError, match="divergence"):
        QADALoss(teacher, student, points=["body"], divergence="l2")
    with pytest.raises(ValueError, match="gamma"):
        QADALoss(teacher, student, points=["body"], gamma=-1.0)
    with pytest.raises(ValueError, match="form"):
        QADALoss(teacher, student, points=["body"], form="ada")
    with pytest.raises(ValueError, match="distortion"):
        QADALoss(teacher, student, points=["body"], distortion="teacher")
    with pytest.raises(ValueError, match="kappa"):
        QADALoss(teacher, student, points=["body"], kappa=0.0)
    assert count_hooks(teacher, student) == 0  # failed constructions leave nothing behind


# ---------------------------------------------------------------------------------------------
# Bad input.

def test_bad_input():
    loss_fn = qF.q_ada_loss
    T, S, Sq, delta, _ = make((2, 3, 4, 5), "channel")
    with pytest.raises(ValueError, match="T: expected the shape of S"):
        loss_fn(T[:, :2], S)
    with pytest.raises(ValueError, match="Sq: expected the shape of S"):
        loss_fn(T, S, Sq[..., :4])
    with pytest.raises(ValueError, match="T: is on meta"):
        loss_fn(T.to("meta"), S)
    with pytest.raises(ValueError, match="delta: is on meta"):
        loss_fn(T, S, Sq, delta.to("meta"))
    with pytest.raises(ValueError, match=r"delta: expected 1 or C = 3 elements"):
        loss_fn(T, S, Sq, torch.ones(2))
    with pytest.raises(ValueError, match="delta: given without Sq"):
        loss_fn(T, S, None, delta)
    with pytest.raises(ValueError, match="delta: expected a finite number > 0"):
        loss_fn(T, S, Sq, 0.0)
    with pytest.raises(ValueError, match="divergence"):
        loss_fn(T, S, divergence="jsd")
    with pytest.raises(ValueError, match="reduction"):
        loss_fn(T, S, reduction="none")
    with pytest.raises(ValueError, match="lam"):
        loss_fn(T, S, lam=0.0)
    with pytest.raises(ValueError, match="gamma"):
        loss_fn(T, S, gamma=float("nan"))
    with pytest.raises(ValueError, match=r"S: expected a \(B, C, H, W\)"):
        loss_fn(T[0], S[0])
    with pytest.raises(ValueError, match="H\\*W >= 1"):
        loss_fn(T[..., :0], S[..., :0])
    with pytest.raises(TypeError, match="S: expected a float32, float16 or bfloat16"):
        loss_fn(T, S.to(torch.int32))
    # a positive number is a valid (scalar) step
    a = loss_fn(T, S, Sq, 0.25)
    b = loss_fn(T, S, Sq, torch.tensor([0.25], device=DEVICE))
    assert torch.equal(a, b)


def test_bad_input_of_the_forms():
    T, S, Sq, delta, Tq = make((2, 3, 4, 5), "channel", own=True)
    with pytest.raises(ValueError, match="Tq: given without Sq"):
        qF.q_ada_loss(T, S, Tq=Tq)
    with pytest.raises(ValueError, match="Tq: expected the shape of S"):
        qF.q_ada_loss(T, S, Sq, Tq=Tq[:, :2])
    with pytest.raises(TypeError, match="Tq: expected a float32"):
        qF.q_ada_loss(T, S, Sq, Tq=Tq.to(torch.int8))
    with pytest.raises(ValueError, match="form"):
        qF.q_ada_loss(T, S, form="Q2")
    with pytest.raises(ValueError, match="kappa"):
        qF.q_ada_loss(T, S, kappa=-1.0)
    with pytest.raises(ValueError, match="form"):
        torch.ops.q2kernels.q_ada(T, S, None, None, 1e-4, 1.0, False, True, None, "ada", 1e-6)


# ---------------------------------------------------------------------------------------------
# GPU: the fused kernels at the distillation points' real sizes.

@pytest.mark.cuda
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("c,hw", [(128, 80), (256, 40), (512, 20)])
def test_cuda_distillation_points(c, hw, layout, divergence, form):
    for dtype, sq_mode in ((torch.bfloat16, "scalar"), (torch.float32, "none")):
        T, S, Sq, delta, Tq = make((4, c, hw, hw), sq_mode, dtype, layout, own=True)
        kw = dict(form=form, divergence=divergence)
        want, want_dS = loss_and_grad("reference", T, S, Sq, delta, Tq, **kw)
        loss, dS = loss_and_grad("triton", T, S, Sq, delta, Tq, **kw)
        assert_loss_close(loss, want, 4 * c)
        assert_grad_close(dS, want_dS, dtype)
