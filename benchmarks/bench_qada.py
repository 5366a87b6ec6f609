"""Q-ADA distillation loss at the YOLO distillation points (P3 128x80x80, P4 256x40x40, P5
512x20x20; batch 16 and 64), in both saliency forms: the fused Triton op against the eager
reference and torch.compile(reference).

    python benchmarks/bench_qada.py [--smoke] [--out benchmarks/results] [--sweep]

Variants: "ada" (SimAM form, no distortion term: GABFusion's ADA; T, S), "qada-simam" (SimAM form,
the student's distortion term shared: T, S, Sq) and "qada-q2" (the Q2 form with each side's own
distortion term, QADALoss's default: T, S, Sq, Tq). Byte floors (N = B*C*H*W elements of e bytes;
k = 2, 3, 4 input tensors): the forward reads each input once, kNe; the backward reads them once
more and writes dS, (k+1)Ne (the per-row statistics, 44 bytes a row, are negligible).
`peak_vs_student` is the forward+backward peak allocator memory in units of one student-sized
tensor (the target: at most 1, which dS itself takes). --sweep also times the fused op under every (TILE, ELEMS_PER_THREAD) of ops/ada.py's
tiling rule on the batch-16 bf16 cases, to retune those two constants on a new GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, shapes  # noqa: E402  (common sets TRITON_INTERPRET first)

import torch  # noqa: E402

from q2kernels import functional as qF  # noqa: E402
from q2kernels.ops import ada as ada_op  # noqa: E402

COLUMNS = ["point", "shape", "dtype", "layout", "variant", "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
           "fwd_pct_copy", "bwd_pct_copy", "fwd_bwd_pct_copy", "peak_mem_mb", "peak_vs_student",
           "speedup_vs_eager", "speedup_vs_compile"]

STEP = 0.05  # the scalar Delta of the Q-ADA variant, and the grid Sq is rounded to
SWEEP = [(tile, ept) for tile in (1024, 2048, 4096) for ept in (4, 8, 16)]


# variant -> (input tensors read, the loss's keyword arguments)
VARIANTS = {"ada": (2, dict(form="simam", gamma=0.0)), "qada-simam": (3, dict(form="simam")),
            "qada-q2": (4, dict(form="q2"))}


def _inputs(shape, dtype, layout, variant, device):
    """The loss's tensor arguments (T, S[, Sq, Delta[, Tq]]) and a function of them."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    T = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    S = (torch.randn(shape, device=device) * 1.2 + 0.1).to(dtype).contiguous(memory_format=fmt)
    S.requires_grad_()
    n_inputs, kw = VARIANTS[variant]
    inputs = [T, S]
    if n_inputs > 2:
        inputs += [(torch.round(S.detach().float() / STEP) * STEP).to(dtype).contiguous(memory_format=fmt),
                   torch.tensor([STEP], device=device)]
    if n_inputs > 3:
        inputs.append((torch.round(T.float() / STEP) * STEP).to(dtype).contiguous(memory_format=fmt))
    return inputs, (lambda T, S, Sq=None, delta=None, Tq=None: qF.q_ada_loss(T, S, Sq, delta, Tq=Tq, **kw))


def _cases(smoke):
    """(point, shape, dtype, layout, variant)."""
    if smoke:
        return [("P5", (1, 8, 10, 10), torch.float32, "nchw", "qada-q2"),
                ("P5", (1, 8, 10, 10), torch.float32, "nchw", "qada-simam"),
                ("P5", (1, 8, 10, 10), torch.float32, "channels_last", "ada")]
    cases = []
    for batch in shapes.BATCHES:
        for name, c, hw in shapes.ADA_POINTS:
            shape = (batch, c, hw, hw)
            cases.append((name, shape, torch.bfloat16, "nchw", "qada-q2"))
            cases.append((name, shape, torch.bfloat16, "nchw", "qada-simam"))
            if batch == shapes.BATCHES[0]:
                cases.append((name, shape, torch.bfloat16, "nchw", "ada"))
                cases.append((name, shape, torch.bfloat16, "channels_last", "qada-q2"))
                cases.append((name, shape, torch.float32, "nchw", "qada-q2"))
    return cases


def _measure(fn, inputs, point, shape, dtype, layout, variant, impl):
    S = inputs[1]
    n, e = S.numel(), S.element_size()
    k = VARIANTS[variant][0]
    grad = torch.ones((), device=S.device)
    row = common.measure(fn, inputs, grad, k * n * e, (k + 1) * n * e, point=point, shape=str(tuple(shape)),
                         dtype=str(dtype)[6:], layout=layout, variant=variant, impl=impl)
    if row["peak_mem_mb"] is not None:
        row["peak_vs_student"] = row["peak_mem_mb"] / (n * e / 2**20)
    return row


def run(smoke: bool, sweep: bool = False) -> list[dict]:
    device = common.DEVICE
    rows = []
    for point, shape, dtype, layout, variant in _cases(smoke):
        inputs, loss = _inputs(shape, dtype, layout, variant, device)
        for impl, fn in common.backend_impls(loss, smoke).items():
            rows.append(_measure(fn, inputs, point, shape, dtype, layout, variant, impl))
        if sweep and (smoke or (shape[0] == shapes.BATCHES[0] and dtype == torch.bfloat16)):
            rows += _sweep(inputs, loss, point, shape, dtype, layout, variant)
    keys = ("point", "shape", "dtype", "layout", "variant")
    for base in ("eager", "compile"):
        common.add_speedups(rows, keys, base)
    return rows


def _sweep(inputs, loss, point, shape, dtype, layout, variant):
    """The fused op under each tiling of SWEEP (module constants read at launch), then restored."""
    rows = []
    saved = ada_op.TILE, ada_op.ELEMS_PER_THREAD
    try:
        for tile, ept in SWEEP:
            ada_op.TILE, ada_op.ELEMS_PER_THREAD = tile, ept
            fn = common.backend_impls(loss, True)["q2kernels"]
            rows.append(_measure(fn, inputs, point, shape, dtype, layout, variant,
                                 f"q2kernels[tile={tile},ept={ept}]"))
    finally:
        ada_op.TILE, ada_op.ELEMS_PER_THREAD = saved
    return rows


def main(argv=None):
    return common.bench_main("qada", run, COLUMNS, __doc__, argv, sweep=True)

if __name__ == "__main__":
    main()
