"""The torch.compile baselines of the benchmarks really compile, and one that falls back to eager is
reported, not timed as compiled (benchmarks/common.py Compiled, measure). Dynamo's "eager" backend
keeps these fast on the CPU: what is checked is Dynamo's capture, which every backend shares."""
from __future__ import annotations

import importlib

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
    assert row["compile_error"].startswith("compile failed: CompileFellBack")
    assert "fwd_ms" not in row and "fwd_bwd_ms" not in row
    assert "fell back to eager, not timed" in capsys.readouterr().err


def test_recompile_limit_within_a_case_is_reported_not_timed():
    fn = common.Compiled(_scaled_square, backend="eager")
    cases = [_case((2, 3), dtype)[0] for dtype in (torch.float32, torch.float64, torch.float16)]
    with torch._dynamo.config.patch(recompile_limit=1):
        fell_back = common.compile_fell_back(fn, lambda: [fn(*c) for c in cases])
    assert fell_back is not None and fell_back["compile_error"].startswith("compile failed: FailOnRecompileLimitHit")


def test_speedups_skip_a_baseline_that_was_not_timed():
    rows = [dict(k=1, impl="q2kernels", fwd_bwd_ms=2.0), dict(k=1, impl="compile", compile_error="x"),
            dict(k=1, impl="eager", fwd_bwd_ms=6.0)]
    common.add_speedups(rows, ("k",), "compile")
    common.add_speedups(rows, ("k",), "eager")
    assert "speedup_vs_compile" not in rows[0] and rows[0]["speedup_vs_eager"] == 3.0


def test_compiled_baseline_that_raises_is_a_row_not_a_crash(capsys):
    # Whatever breaks inside a compiled baseline (here: the function itself, on its first call) ends
    # up in its row as "compile failed: <reason>", and the benchmark goes on.
    def broken(x, s):
        raise RuntimeError("non-empty donated buffers")

    inputs, grad = _case((3, 3))
    row = common.measure(common.Compiled(broken, backend="eager"), inputs, grad, 1, 1, impl="compile")
    assert row["compile_error"].startswith("compile failed: ") and "donated buffers" in row["compile_error"]
    assert "fwd_ms" not in row


def test_compiled_backward_can_be_timed_twice_on_one_graph():
    # measure() times the backward with retain_graph=True on one forward's graph, which AOTAutograd's
    # donated buffers refuse; Compiled turns them off (the saved intermediate here would be donated).
    def saves_intermediate(x, s):
        return (x.float() * s).sin().to(x.dtype)

    inputs, grad = _case((8, 8), torch.bfloat16)
    row = common.measure(common.Compiled(saves_intermediate), inputs, grad, 1, 1, impl="compile")
    assert "compile_error" not in row and row["graphs"] >= 1 and row["bwd_ms"] > 0


@pytest.mark.parametrize("name", ["fake_quant", "n2uq", "qada", "fusion", "train_step"])
def test_every_benchmarks_compile_baseline_runs_under_inductor(name, monkeypatch):
    # Each benchmark's own run() at its smoke shapes, with its torch.compile baseline switched on and
    # compiled by inductor (the real backend; on the CPU it needs a C++ compiler): every compile row
    # is timed from compiled graphs, none raises out of the benchmark, none silently ran eager.
    monkeypatch.setattr(common, "SMOKE_COMPILE", True)
    bench = importlib.import_module(f"benchmarks.bench_{name}")
    rows = bench.run(True)
    compiled = [r for r in rows if r["impl"] == "compile"]
    assert compiled, name
    for r in compiled:
        assert "compile_error" not in r, r
        assert r.get("fwd_bwd_ms", r.get("step_ms")) > 0, r
    assert any("speedup_vs_compile" in r for r in rows if r["impl"].startswith("q2kernels")), name
