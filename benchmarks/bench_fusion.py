"""Gated fusion + LayerNorm (GABFusion / Q-GBFusion) at the YOLOv5s and YOLO11s neck Concat nodes:
the fused Triton op against the eager chain, torch.compile of that chain, and qF.layer_norm on a
channels_last input (the LayerNorm alone, on an already concatenated tensor).

    python benchmarks/bench_fusion.py [--smoke] [--out benchmarks/results] [--sweep]

impl:
  q2kernels       fused op, learned gates (GABFusion), energies computed but not recorded
  q2kernels+ctrl  fused op with the balanced controller (Q-GBFusion): gradient norms recorded,
                  EMA and gate step in the backward (single process: no all-reduce)
  eager           softmax, mul, mul, cat, permute, layer_norm, permute
  eager+energy    the same, with the branch energies measured the eager way (a hook per branch:
                  one more read of every dx)
  compile         torch.compile of the eager chain (no energies)
  native_ln       qF.layer_norm over the channels of a channels_last tensor that is already the
                  concatenation (no gates, no concat): the LayerNorm's own cost
--sweep adds q2kernels rows for other block-size settings (ops/fusion.py FWD_TILE, FWD_WARPS,
BWD_TILE, BWD_WARPS, PROGRAMS_PER_SM) so a GPU run can pick the rule.

Byte floors (N elements out, element size e, P = B*H*W pixels): forward reads every branch and writes
y once, plus mean and rstd in fp32: 2Ne + 8P; backward reads the branches, dy and the statistics
and writes every dx: 3Ne + 8P.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, shapes  # noqa: E402  (common sets TRITON_INTERPRET first)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import q2kernels  # noqa: E402
from q2kernels import functional as qF  # noqa: E402
from q2kernels.gate_controller import GateController  # noqa: E402
from q2kernels.ops import fusion as fusion_op  # noqa: E402

COLUMNS = ["model", "node", "branches", "batch", "layout", "dtype", "impl", "fwd_ms", "bwd_ms",
           "fwd_bwd_ms", "fwd_pct_copy", "bwd_pct_copy", "peak_mem_mb", "saved_mb",
           "speedup_vs_eager", "speedup_vs_eager+energy", "speedup_vs_compile", "speedup_vs_native_ln"]

# (FWD_TILE, FWD_WARPS, BWD_TILE, BWD_WARPS, PROGRAMS_PER_SM) tried by --sweep. Backward tiles over
# ~16 values per thread spill on sm_90 (see ops/fusion.py).
SWEEP = [(8192, 8, 2048, 4, 8), (16384, 16, 2048, 8, 4), (16384, 16, 4096, 8, 2), (32768, 16, 4096, 8, 4),
         (32768, 32, 8192, 16, 4)]


def _eager_chain(*args):
    *xs, theta, gamma, beta = args
    a = torch.softmax(theta.float(), 0).to(xs[0].dtype)
    h = torch.cat([a[k] * x for k, x in enumerate(xs)], dim=1)
    y = F.layer_norm(h.permute(0, 2, 3, 1), (h.size(1),), gamma.to(h.dtype), beta.to(h.dtype), 1e-5)
    return y.permute(0, 3, 1, 2)


class _EnergyTap(torch.autograd.Function):
    """Identity whose backward measures sum(dx^2) the way eager code does it: another read of dx."""

    @staticmethod
    def forward(ctx, x, sink):
        ctx.sink = sink
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dx):
        ctx.sink.append(dx.float().square().sum())
        return dx, None


def _eager_with_energy(*args):
    *xs, theta, gamma, beta = args
    sink = []
    return _eager_chain(*[_EnergyTap.apply(x, sink) for x in xs], theta, gamma, beta)


def _fused(controller_factory):
    def run(*args):
        *xs, theta, gamma, beta = args
        with q2kernels.use_backend("triton"):
            return qF.gated_fusion(list(xs), theta, gamma, beta, controller=controller_factory())
    return run


def _balanced_controller(K, device):
    """Controller state of a balanced GatedFusion, made once: the step is timed, not its setup."""
    f32 = dict(device=device, dtype=torch.float32)
    state = GateController(torch.zeros(K, **f32), torch.zeros(K, **f32),
                               torch.zeros((), device=device, dtype=torch.int64),
                               torch.zeros(1000, 1 + 3 * K, **f32), torch.zeros(K, **f32), torch.zeros(K, **f32))
    return lambda: state


def _native_ln(cat_cl):
    def run(*args):
        *_, gamma, beta = args
        y = F.layer_norm(cat_cl.permute(0, 2, 3, 1), (cat_cl.size(1),), gamma.to(cat_cl.dtype),
                          beta.to(cat_cl.dtype), 1e-5)
        return y.permute(0, 3, 1, 2)
    return run


def _cases(smoke: bool):
    if smoke:
        return [("yolo11s", 12, (8, 4), 4, 1, "channels_last", torch.float32),
                ("yolo11s", 18, (4, 8), 3, 1, "nchw", torch.bfloat16)]
    cases = []
    for model, node, branches, hw in shapes.FUSION_NODES:
        for batch in shapes.BATCHES:
            for layout in ("channels_last", "nchw"):
                cases.append((model, node, branches, hw, batch, layout, torch.bfloat16))
        cases.append((model, node, branches, hw, shapes.BATCHES[0], "channels_last", torch.float32))
    return cases


def _blocks():
    return (fusion_op.FWD_TILE, fusion_op.FWD_WARPS, fusion_op.BWD_TILE, fusion_op.BWD_WARPS,
            fusion_op.PROGRAMS_PER_SM)


def _set_blocks(setting):
    (fusion_op.FWD_TILE, fusion_op.FWD_WARPS, fusion_op.BWD_TILE, fusion_op.BWD_WARPS,
     fusion_op.PROGRAMS_PER_SM) = setting


def run(smoke: bool, sweep: bool = False) -> list[dict]:
    device = common.DEVICE
    default_blocks = _blocks()
    rows = []
    for model, node, branches, hw, batch, layout, dtype in _cases(smoke):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        xs = [torch.randn(batch, c, hw, hw, device=device).mul_(k + 1).to(dtype).to(memory_format=fmt).requires_grad_()
              for k, c in enumerate(branches)]
        C = sum(branches)
        theta = torch.zeros(len(xs), device=device, requires_grad=True)
        gamma = torch.ones(C, device=device, requires_grad=True)
        beta = torch.zeros(C, device=device, requires_grad=True)
        dy = torch.randn(batch, C, hw, hw, device=device).to(dtype).to(memory_format=fmt)
        e, n, p = xs[0].element_size(), dy.numel(), batch * hw * hw
        inputs = [*xs, theta, gamma, beta]
        labels = dict(model=model, node=node, branches="+".join(map(str, branches)), batch=batch,
                      layout=layout, dtype=str(dtype)[6:])
        impls = {"q2kernels": _fused(lambda: None),
                 "q2kernels+ctrl": _fused(_balanced_controller(len(xs), device)),
                 "eager": _eager_chain, "eager+energy": _eager_with_energy}
        if not smoke or common.SMOKE_COMPILE:
            impls["compile"] = common.Compiled(_eager_chain)
        cat_cl = torch.cat([x.detach() for x in xs], 1).to(memory_format=torch.channels_last).requires_grad_()
        for impl, fn in impls.items():
            rows.append(common.measure(fn, inputs, dy, 2 * n * e + 8 * p, 3 * n * e + 8 * p, impl=impl, **labels))
        dy_cl = dy.contiguous(memory_format=torch.channels_last)
        rows.append(common.measure(_native_ln(cat_cl), [cat_cl, gamma, beta], dy_cl, 2 * n * e, 3 * n * e,
                                   impl="native_ln", **labels))
        if sweep:
            for setting in SWEEP:
                _set_blocks(setting)
                rows.append(common.measure(_fused(lambda: None), inputs, dy, 2 * n * e + 8 * p, 3 * n * e + 8 * p,
                                           impl=f"q2kernels{list(setting)}", **labels))
            _set_blocks(default_blocks)
    keys = ("model", "node", "batch", "layout", "dtype")
    for base in ("eager", "eager+energy", "compile", "native_ln"):
        common.add_speedups(rows, keys, base)
        common.add_speedups(rows, keys, base, impl="q2kernels+ctrl")
    return rows


def main(argv=None):
    return common.bench_main("fusion", run, COLUMNS, __doc__, argv, sweep=True)

if __name__ == "__main__":
    main()
