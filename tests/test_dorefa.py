"""DoReFa weights (docs/math.md §3, ops/dorefa.py): the reference against float64 autograd, the fused
Triton kernels (run by the interpreter on CPU) against the reference, int64 offsets, registration
and bad input."""

import pytest
import torch

from q2kernels import functional as qF
from q2kernels import reference as ref
from q2kernels.ops import _layout

from helpers import DTYPES, round_ste, run_both


def test_dorefa_reference_matches_float64_autograd():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    w[0, 0, 0, 0] = 3.0  # a unique max
    w[1, 0, 0, 0] = -3.0  # ... and a tie at -max: the amax gradient is shared
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
    w = (torch.randn(16, 8, 3, 3) * 0.5).to(dtype)
    w.view(-1)[5] = 2.0
    w.view(-1)[77] = -2.0  # a tie at the max |tanh|
    g = torch.randn(w.shape).to(dtype)
    (y0, (dw0,)), (y1, (dw1,)) = run_both(lambda w: qF.dorefa_weight_quantize(w, 4), [w.requires_grad_()], g)
    n = 15
    u0 = (y0.float() + 1) * n / 2
    # tanh is computed from exp in the kernel: decisions agree except within ulps of a tie.
    far_from_tie = ((torch.tanh(w.float()) / (2 * torch.tanh(w.float()).abs().amax()) + 0.5) * n % 1 - 0.5).abs() > 1e-4
    assert torch.equal(u0[far_from_tie].round(), ((y1.float() + 1) * n / 2)[far_from_tie].round())
    torch.testing.assert_close(dw1.float(), dw0.float(), rtol=1e-4, atol=1e-5)


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
