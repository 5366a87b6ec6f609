"""Kernels whose loop bound is a runtime scalar argument run under the Triton interpreter whatever the
numpy version (q2kernels/ops/_interpreter_compat.py): Triton 3.6's interpreter with numpy 2.4 failed
every such kernel with "only 0-dimensional arrays can be converted to Python scalars"."""
import pytest
import torch
import triton
import triton.language as tl

from q2kernels.ops import _triton_utils  # noqa: F401  (installs the interpreter fix, as every kernel module does)


@triton.jit
def _count_kernel(out_ptr, n, start, step):
    # out[0] = #{i in range(n)}, out[1] = sum of range(start, n, step): both bounds are runtime scalars.
    count = 0.0
    for _ in range(n):
        count += 1.0
    total = 0.0
    for i in range(start, n, step):
        total += i
    tl.store(out_ptr, count)
    tl.store(out_ptr + 1, total)


@pytest.mark.parametrize("n, start, step", [(0, 0, 1), (1, 0, 1), (7, 2, 3), (40, 5, 16)])
def test_runtime_loop_bounds(n, start, step, device):
    out = torch.full((2,), -1.0, device=device)
    _count_kernel[(1,)](out, n, start, step)
    assert out.tolist() == [float(n), float(sum(range(start, n, step)))]
