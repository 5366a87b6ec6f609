"""Helpers shared by the op tests: comparisons that encode docs/math.md §0, the float dtypes every
kernel takes, and the straight-through rounding the float64 autograd oracles are written with."""
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def round_ste(v):
    """round(v) forward, identity backward: the straight-through estimator as QAT code writes it."""
    return v + (torch.round(v) - v).detach()


def run_both(fn, inputs, grad_out=None):
    """Run fn(*inputs) under the reference and the Triton backends from identical leaf copies.
    Returns [(out, grads), (out, grads)] where grads are of every input that requires grad."""
    import q2kernels

    results = []
    for backend in ("reference", "triton"):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                  for t in inputs]
        # clone() keeps the memory format of dense tensors; keep non-dense views as views.
        leaves = [_like_layout(t, l) for t, l in zip(inputs, leaves)]
        with q2kernels.use_backend(backend):
            out = fn(*leaves)
        wants = [l for l in leaves if isinstance(l, torch.Tensor) and l.requires_grad]
        grads = torch.autograd.grad(out, wants, grad_out) if (wants and grad_out is not None) else ()
        results.append((out, grads))
    return results


def _like_layout(src, copy):
    if not isinstance(src, torch.Tensor) or src.stride() == copy.stride():
        return copy
    out = torch.empty_strided(src.size(), src.stride(), dtype=src.dtype, device=src.device)
    with torch.no_grad():
        out.copy_(src)
    return out.requires_grad_(src.requires_grad)


def assert_sum_close(actual, expected, terms_abs_sum, rtol=1e-5):
    """A reduced parameter grad: rtol on the value, plus the summation-order error a sum of
    |terms| can carry (fp32), so sums that cancel to ~0 are not held to a relative bound."""
    tol = rtol * expected.abs() + 1e-6 * terms_abs_sum + 1e-30
    err = (actual.double() - expected.double()).abs()
    assert bool((err <= tol.double()).all()), f"max err {err.max().item():.3e}, tol {tol.min().item():.3e}"
