"""The torch.compile baselines of the benchmarks really compile, and one that falls back to eager is
reported, not timed as compiled (benchmarks/common.py Compiled, measure). Dynamo's "eager" backend
keeps these fast on the CPU: what is checked is Dynamo's capture, which every backend shares."""
from __future__ import annotations

import pytest
import torch

from benchmarks import common


@pytest.fixture(autouse=True)
def restore_dynamo():
    # Compiled switches fail_on_recompile_limit_hit on; the patch puts back what was there.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=False):
        yield
    torch._dynamo.reset()


def _scaled_square(x, s):
    return (x * s).square()


def _case(shape, dtype=torch.float32):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    return [x, s], torch.randn(shape, dtype=dtype)


def test_compiled_baseline_is_timed_with_its_graph_count():
    inputs, grad = _case((3, 5))
    row = common.measure(common.Compiled(_scaled_square, backend="eager"), inputs, grad, 1, 1, impl="compile")
    assert row["graphs"] >= 1 and row["graph_breaks"] == 0
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and "compile_error" not in row


def test_every_case_compiles_past_the_recompile_limit():
    # One code object (the same function, as backend_impls' closures share theirs) over more cases than
    # Dynamo's recompile limit: a single shared torch.compile would run the cases past it eager.
    assert torch._dynamo.config.recompile_limit < 12
    rows = []
    for n in range(1, 13):
        inputs, grad = _case((n, 7), torch.float32 if n % 2 else torch.float64)
        rows.append(common.measure(common.Compiled(_scaled_square, backend="eager"), inputs, grad, 1, 1, n=n))
    assert [r.get("compile_error") for r in rows] == [None] * 12
    assert all(r["graphs"] >= 1 and r["fwd_ms"] > 0 for r in rows)


def test_baseline_that_ran_eager_is_reported_not_timed(capsys):
    # Dynamo skips the disabled call (a graph break) and has nothing left to compile: all of it runs eager.
    disabled = torch._dynamo.disable(_scaled_square)

    def eager_only(x, s):
        return disabled(x, s)

    inputs, grad = _case((4, 4))
    row = common.measure(common.Compiled(eager_only, backend="eager"), inputs, grad, 1, 1, impl="compile")
    assert row["compile_error"].startswith("CompileFellBack")
    assert "fwd_ms" not in row and "fwd_bwd_ms" not in row
    assert "fell back to eager, not timed" in capsys.readouterr().err


def test_recompile_limit_within_a_case_is_reported_not_timed():
    fn = common.Compiled(_scaled_square, backend="eager")
    cases = [_case((2, 3), dtype)[0] for dtype in (torch.float32, torch.float64, torch.float16)]
    with torch._dynamo.config.patch(recompile_limit=1):
        fell_back = common.compile_fell_back(fn, lambda: [fn(*c) for c in cases])
    assert fell_back is not None and fell_back["compile_error"].startswith("FailOnRecompileLimitHit")


def test_speedups_skip_a_baseline_that_was_not_timed():
    rows = [dict(k=1, impl="q2kernels", fwd_bwd_ms=2.0), dict(k=1, impl="compile", compile_error="x"),
            dict(k=1, impl="eager", fwd_bwd_ms=6.0)]
    common.add_speedups(rows, ("k",), "compile")
    common.add_speedups(rows, ("k",), "eager")
    assert "speedup_vs_compile" not in rows[0] and rows[0]["speedup_vs_eager"] == 3.0
