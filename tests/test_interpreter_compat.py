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


@pytest.mark.parametrize("threads", [1, 3])
def test_an_interpreted_run_keeps_the_thread_count_the_user_set(threads, monkeypatch):
    """torch.set_num_threads holds inside every interpreted launch, forward and backward, in the thread
    that set it and in a new one (torch's intra-op count is process-wide)."""
    import threading

    import q2kernels
    from q2kernels import functional as qF
    from triton.runtime import interpreter

    if not q2kernels._backend.interpreter_enabled():
        pytest.skip("kernels are compiled here, not interpreted")
    seen, launch = [], interpreter.GridExecutor.__call__

    def observed(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", observed)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def run():
            x, s = torch.randn(2, 3, 4, 4, requires_grad=True), torch.tensor([0.1], requires_grad=True)
            with q2kernels.use_backend("triton"):
                qF.lsq_quantize(x, s).sum().backward()

        run()
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(before)
    assert len(seen) >= 4 and set(seen) == {threads}
