"""DoReFa weights (docs/math.md §3, ops/dorefa.py): the reference against float64 autograd, the fused
Triton kernels (run by the interpreter on CPU) against the reference, int64 offsets, registration
and bad input."""

import numpy as np
import pytest
import torch

import q2kernels
from q2kernels import functional as qF
from q2kernels import reference as ref
from q2kernels.ops import _layout

from helpers import DTYPES, round_ste, run_both


def test_dorefa_reference_matches_float64_autograd():
    # (clamped: unclamped, this seed draws a |w| of 3.15, and the "tie" below would not be at the max)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64).clamp(-2.5, 2.5)
    w[0, 0, 0, 0] = 3.0  # the max
    w[1, 0, 0, 0] = -3.0  # ... and a tie at -max: the amax gradient is shared
    assert (w.abs() == w.abs().max()).sum() == 2
    n = 15
    wl = w.clone().requires_grad_()
    t = torch.tanh(wl)
    u = t / (2 * t.abs().amax()) + 0.5
    y64 = 2 * round_ste(u * n) / n - 1
    g = torch.randn_like(w)
    (dw64,) = torch.autograd.grad(y64, (wl,), g)
    w32 = w.float().requires_grad_()
    y = ref.dorefa_weight_fake_quant(w32, 4)
    (dw,) = torch.autograd.grad(y, (w32,), g.float())
    # fp32 and fp64 may round a value within ~1e-7 of a tie differently; compare away from ties.
    away = ((u * n).detach() % 1 - 0.5).abs() > 1e-5
    torch.testing.assert_close(y.double()[away], y64.detach()[away], rtol=0, atol=1e-5)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dorefa_kernel(dtype):
    w = (torch.randn(16, 8, 3, 3) * 0.5).clamp(-1.75, 1.75).to(dtype)  # (unclamped, this seed draws 2.05)
    w.view(-1)[5] = 2.0
    w.view(-1)[77] = -2.0  # a tie at the max |tanh|
    assert (w.abs() == w.abs().max()).sum() == 2
    g = torch.randn(w.shape).to(dtype)
    (y0, (dw0,)), (y1, (dw1,)) = run_both(lambda w: qF.dorefa_weight_quantize(w, 4), [w.requires_grad_()], g)
    n = 15
    u0 = (y0.float() + 1) * n / 2
    # tanh is computed from exp in the kernel: decisions agree except within ulps of a tie.
    far_from_tie = ((torch.tanh(w.float()) / (2 * torch.tanh(w.float()).abs().amax()) + 0.5) * n % 1 - 0.5).abs() > 1e-4
    assert torch.equal(u0[far_from_tie].round(), ((y1.float() + 1) * n / 2)[far_from_tie].round())
    # fp16/bf16 gradients: the two fp32 values may round to neighbouring dtype values (one ulp, §0).
    rtol = 1e-4 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(dw1.float(), dw0.float(), rtol=rtol, atol=1e-5)


def _dorefa64(w, g, n, ties):
    """docs/math.md §3 written out in float64 (numpy's tanh, not the code's): levels q = R(u*n) of
    u = t/(2m) + 1/2, and the gradient dt = g/m, plus, through m = max|t|, the share
    sign(t)*(-sum(g*t)/m^2)/#ties on each of the tied maxima (torch.amax's rule), times 1 - t^2."""
    t = np.tanh(w.double().numpy())
    gd = g.double().numpy()
    m = np.abs(t).max()
    share = -(gd * t).sum() / m**2 / ties.sum()
    dw = (gd / m + np.where(ties, np.sign(t) * share, 0.0)) * (1.0 - t * t)
    un = (t / (2 * m) + 0.5) * n
    return torch.from_numpy(np.round(un)), torch.from_numpy(np.abs(un % 1 - 0.5)), torch.from_numpy(dw), \
        float(share * m / np.abs(gd).max())


@pytest.mark.parametrize("ties", [[+1, -1], [-1, +1, -1], [+1, +1], [-1, -1, -1, -1]],
                         ids=["pair_opposite", "three_mixed", "pair_positive", "four_negative"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dorefa_exact_tie_at_the_max(ties, dtype, backend):
    """Several weights at exactly the same |w| = max|w|, so |tanh w| ties exactly at m (tanh is odd in
    fp32 and in the kernel). docs/math.md §3: the amax gradient is split evenly among the tied maxima,
    each with the sign of its t: not given to one of them, not given whole to each. The ties sit in
    different kernel programs (2048 elements each), so the count crosses the partial sums. Every
    other |w| stays far below the max: no tanh rounding can tie it. Forward: each tied weight
    quantizes to +-1. The oracle is written out in float64 numpy (_dorefa64)."""
    torch.manual_seed(len(ties))
    n = 15
    w = (torch.randn(40, 16, 3, 3) * 0.3).clamp(-0.9, 0.9)  # |tanh| <= 0.72 < tanh(1.25) = 0.85
    flat = w.view(-1)
    where = torch.tensor([3, 2100, 4500, 5759][:len(ties)])
    flat[where] = 1.25 * torch.tensor(ties, dtype=torch.float32)
    w = w.to(dtype)
    # g leans with sign(w), so sum(g*t) is large and the share matters next to g/m.
    g = (torch.randn(w.shape) + 0.5 * torch.sign(w.float())).to(dtype)
    is_tie = torch.zeros(w.numel(), dtype=torch.bool)
    is_tie[where] = True
    is_tie = is_tie.view(w.shape)
    levels, dist_to_tie, dw64, share_over_g = _dorefa64(w, g, n, is_tie.numpy())
    assert abs(share_over_g) > 10, "the data must make the share large next to g/m"
    wl = w.clone().requires_grad_()
    with q2kernels.use_backend(backend):
        y = qF.dorefa_weight_quantize(wl, 4)
        (dw,) = torch.autograd.grad(y, (wl,), g)
    assert y.dtype == dw.dtype == dtype
    # Levels: away from rounding ties (the kernel's tanh may differ from numpy's in the last ulp) they
    # are the oracle's; the tied maxima are at the ends, wq = +-1 (u = 1 or 0), up to the rounding
    # of 2q/n - 1 in fp32.
    eps = torch.finfo(dtype).eps
    away = dist_to_tie > 1e-4
    assert away[is_tie].all()
    torch.testing.assert_close(y.double()[away], (2 * levels / n - 1)[away], rtol=0, atol=4 * eps)
    torch.testing.assert_close(y.double()[is_tie], torch.tensor(ties, dtype=torch.float64), rtol=0, atol=4 * eps)
    # The share is over 10 times max|g|/m here: a share given to one tied element only, or whole to
    # each, or without t's sign, is off by about the share at a tied element.
    rtol = 1e-5 if dtype == torch.float32 else 2 * eps
    tol = rtol * dw64.abs() + 1e-6 * g.double().abs().max() / np.tanh(1.25)
    err = (dw.double() - dw64).abs()
    assert not bool((err > tol).any()), (f"dw at the tied maxima: got {dw.double()[is_tie].tolist()}, want "
                                   f"{dw64[is_tie].tolist()}; {int((err > tol).sum())} elements off")


def test_dorefa_int64_offsets_path(monkeypatch, triton_backend):
    """Tensors over 2^31 elements switch the kernels to int64 offsets; run that path small."""
    monkeypatch.setattr(_layout, "needs_int64", lambda x: True)
    w = torch.randn(4, 3, 3, 3)
    (y0, _), (y1, _) = run_both(lambda w: qF.dorefa_weight_quantize(w, 4), [w], None)
    assert (y0 != y1).float().mean() < 0.01


def test_opcheck_dorefa():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.q2kernels.dorefa_weight.default, (w, 15.0))


def test_bad_bits_error():
    with pytest.raises((ValueError, TypeError), match="bits"):
        qF.dorefa_weight_quantize(torch.randn(2, 5, 3, 3), 0)
