"""torch.compile of every reference op (the CPU backend, and the eager chain the benchmarks' compile
baselines compile) gives the eager gradients. Under torch 2.11 (the GPU image's) a reference
autograd.Function whose forward returned y.to(dtype) of an fp32 y — y itself — got zero gradients
for every input once compiled (q2kernels/reference/_output.py); the GPU-image CI step runs this."""
import pytest
import torch

import q2kernels
import q2kernels.functional as qF

N = 15  # 4-bit LTQ intervals

CASES = {
    "lsq": (lambda x, s: qF.lsq_quantize(x, s, 4), lambda: [torch.randn(2, 3, 4, 4), torch.tensor([0.3])]),
    "lsq_plus": (lambda x, s, b: qF.lsq_plus_quantize(x, s, b, 4, axis=1),
                 lambda: [torch.randn(2, 3, 4, 4), torch.rand(3) + 0.1, torch.randn(3) * 0.1]),
    "pact": (lambda x, a: qF.pact_quantize(x, a, 4), lambda: [torch.randn(2, 3, 4, 4) * 2, torch.tensor([2.0])]),
    "dorefa": (lambda w: qF.dorefa_weight_quantize(w, 4), lambda: [torch.randn(4, 3, 3, 3)]),
    "n2uq_act": (lambda x, st, a, a1, a2: qF.n2uq_act_quantize(x, st, a, a1, a2, 4),
                 lambda: [torch.randn(2, 3, 4, 4), torch.tensor([-0.2]), torch.full((N,), 2.0 / N) * (1 + 0.3 * torch.rand(N)),
                          torch.tensor([1.3]), torch.tensor([0.8])]),
    "n2uq_weight": (lambda w: qF.n2uq_weight_quantize(w, 4), lambda: [torch.randn(4, 3, 3, 3) * 0.1]),
    "gated_fusion": (lambda x0, x1, th, g, b: qF.gated_fusion([x0, x1], th, g, b),
                     lambda: [torch.randn(2, 4, 3, 3), torch.randn(2, 2, 3, 3) * 2, torch.randn(2), torch.randn(6),
                              torch.randn(6)]),
    "q_ada": (lambda T, S: qF.q_ada_loss(T, S), lambda: [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_reference_matches_eager(name):
    torch._dynamo.reset()
    fn, make = CASES[name]
    torch.manual_seed(0)
    args = make()
    wants = args[1:] if name == "q_ada" else args  # the teacher T gets no gradient
    for t in wants:
        t.requires_grad_()
    g = torch.randn_like(fn(*args))
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    with q2kernels.use_backend("reference"):
        want = torch.autograd.grad(fn(*args), wants, g)
        got = torch.autograd.grad(compiled(*args), wants, g)
    for k, (a, b) in enumerate(zip(got, want)):
        assert b.abs().max() > 0, f"input {k}: the eager gradient is zero, the case checks nothing"
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{name}: input {k}")
