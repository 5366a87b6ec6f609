"""End-to-end QAT training step of YOLOv5s (the real layer list) at 640x640, bf16 autocast:
q2kernels' fused modules against the same network on the eager reference modules and against
torch.compile of that.

    python benchmarks/bench_train_step.py [--smoke] [--out benchmarks/results]

A step is forward, a synthetic loss over the three Detect outputs, backward and an SGD update.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402  (sets TRITON_INTERPRET before triton loads)

import torch  # noqa: E402

import q2kernels  # noqa: E402
from q2kernels.models import YOLOv5  # noqa: E402
from q2kernels.nn import quantize_model  # noqa: E402

COLUMNS = ["recipe", "batch", "impl", "step_ms", "peak_mem_mb", "speedup_vs_eager", "speedup_vs_compile",
           "mem_saving_vs_eager_pct"]


def _step_fn(model, x, backend, compiled):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    forward = common.Compiled(model) if compiled else model

    def step():
        # bf16 autocast on the GPU; a CPU smoke run stays in fp32 (CPU bf16 convs are slow).
        with q2kernels.use_backend(backend), torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):
            loss = sum(o.float().square().mean() for o in forward(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step.forward = forward
    return step


def run(smoke: bool) -> list[dict]:
    device = common.DEVICE
    if smoke:
        cases, size, width = [("lsq", 2)], 64, 0.0625
    else:
        cases, size, width = [(r, b) for r in ("lsq", "pact") for b in (16,)], 640, 0.50
    rows = []
    for recipe, batch in cases:
        torch.manual_seed(0)
        base = quantize_model(YOLOv5(width=width), recipe, 4, 4).to(device).to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
        with torch.no_grad():
            base(x)  # first-batch initialisation of every quantizer
        impls = {"q2kernels": ("triton", False), "eager": ("reference", False)}
        if not smoke or common.SMOKE_COMPILE:
            impls["compile"] = ("reference", True)
        for impl, (backend, compiled) in impls.items():
            import copy
            step = _step_fn(copy.deepcopy(base), x, backend, compiled)
            fell_back = common.compile_fell_back(step.forward, step)
            if fell_back is not None:
                rows.append(dict(recipe=recipe, batch=batch, impl=impl, **fell_back))
                continue
            try:
                timed = dict(step_ms=common.time_ms(step, reps=20), peak_mem_mb=common.peak_mem_mb(step))
            except Exception as e:  # noqa: BLE001  (a compile baseline that breaks is a row, not the end)
                if not compiled:
                    raise
                timed = common.compile_failed(e)
            rows.append(dict(recipe=recipe, batch=batch, impl=impl, **timed))
    common.add_speedups(rows, ("recipe", "batch"), "eager", metric="step_ms")
    common.add_speedups(rows, ("recipe", "batch"), "compile", metric="step_ms")
    eager = {(r["recipe"], r["batch"]): r for r in rows if r["impl"] == "eager"}
    for r in rows:
        e = eager[(r["recipe"], r["batch"])]
        if r["impl"] == "q2kernels" and r.get("peak_mem_mb") and e.get("peak_mem_mb"):
            r["mem_saving_vs_eager_pct"] = 100 * (1 - r["peak_mem_mb"] / e["peak_mem_mb"])
    return rows


def main(argv=None):
    return common.bench_main("train_step", run, COLUMNS, __doc__, argv)

if __name__ == "__main__":
    main()
