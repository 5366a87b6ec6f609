"""What tests/triton_spills.py compiles: op calls that launch the Triton kernels as the library, the
GPU tests and the benchmarks do. Each runs with JITFunction.run replaced by a recorder, on CPU tensors
(nothing computes, so values do not matter; torch.empty stands in for random data where a shape is large).

- ops: every kernel and every constexpr branch that matters (kinds, layouts, per-channel tilings,
  dtypes, int64 offsets), on small tensors;
- cuda_tests: the launches of the tests marked `cuda`, at their sizes (kept in step with them by hand:
  each block names its test);
- benchmarks: every q2kernels case of benchmarks/bench_{fake_quant,fusion,qada,n2uq}.py, through their
  own run() with measure() reduced to one forward and backward. bench_int_conv launches no Triton
  kernel; bench_train_step runs its fake-quant kernels under CUDA autocast (bf16), which a CPU replay
  cannot reproduce, at the activation shapes bench_fake_quant covers.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import q2kernels.functional as qF
from q2kernels.ops import _layout


def _fwd_bwd(fn, *tensors):
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.ones_like(out))


def _fusion_case(channels, fuse, dtype, fmt, affine, B=1, HW=(40, 40)):
    xs = [torch.randn(B, c, *HW).to(dtype).to(memory_format=fmt).requires_grad_() for c in channels]
    C = sum(channels) if fuse == "concat" else channels[0]
    gb = (torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)) if affine else (None, None)
    qF.gated_fusion(xs, torch.zeros(len(xs), requires_grad=True), *gb, fuse=fuse).backward(torch.randn(B, C, *HW))


def _ltq(bits):
    n = 2**bits - 1
    return torch.zeros(1), torch.full((n,), 2.0 / n), torch.tensor([1.0]), torch.tensor([1.0])


def ops():
    from q2kernels.ops import fusion as fusion_op

    x = torch.randn(2, 6, 4, 4)
    xl = x.to(memory_format=torch.channels_last)
    s1, s6 = torch.tensor([0.3]), torch.rand(6) + 0.1
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        _fwd_bwd(lambda x, s: qF.lsq_quantize(x, s, 4), x.to(dtype), s1)
    _fwd_bwd(lambda x, s: qF.lsq_quantize(x, s, 4, axis=1), x, s6)
    _fwd_bwd(lambda x, s: qF.lsq_quantize(x, s, 4, axis=1), xl, s6)
    _fwd_bwd(lambda x, s, b: qF.lsq_plus_quantize(x, s, b, 4, axis=1), xl, s6, s6.clone())
    _fwd_bwd(lambda x, a: qF.pact_quantize(x, a, 4), x.bfloat16(), s1)
    _fwd_bwd(lambda w: qF.dorefa_weight_quantize(w, 4), x)

    for bits, dtype, xx in ((4, torch.bfloat16, xl), (8, torch.float32, x), (2, torch.float16, xl)):
        _fwd_bwd(lambda x, st, a, a1, a2: qF.n2uq_act_quantize(x, st, a, a1, a2, bits), xx.to(dtype), *_ltq(bits))
        _fwd_bwd(lambda w: qF.n2uq_weight_quantize(w, bits), xx.to(dtype))

    T = torch.randn(2, 24, 9, 9)
    for dtype, fmt, kw in ((torch.bfloat16, torch.contiguous_format, dict(delta=torch.rand(24) + 0.1)),
                           (torch.float32, torch.contiguous_format, dict(divergence="kl")),
                           (torch.float16, torch.channels_last, dict())):
        Tc, Sc = T.to(dtype).to(memory_format=fmt), torch.randn_like(T).to(dtype).to(memory_format=fmt)
        Sq = None if kw.get("divergence") == "kl" else (Sc + 0.01)
        _fwd_bwd(lambda S: qF.q_ada_loss(Tc, S, Sq, form="simam", **kw), Sc)
    _fwd_bwd(lambda S: qF.q_ada_loss(torch.randn(1, 4, 90, 90), S, form="simam"), torch.randn(1, 4, 90, 90))  # rows in chunks
    for dtype, fmt, hw in ((torch.bfloat16, torch.contiguous_format, 9), (torch.float16, torch.channels_last, 9),
                           (torch.bfloat16, torch.contiguous_format, 90)):  # the Q2 form, the teacher's own Tq
        Tc = torch.randn(1, 24, hw, hw).to(dtype).to(memory_format=fmt)
        Sc = torch.randn_like(Tc)
        _fwd_bwd(lambda S: qF.q_ada_loss(Tc, S, Sc + 0.01, 0.25, Tq=Tc + 0.01, form="q2"), Sc)
    _fwd_bwd(lambda S: qF.q_ada_loss(T, S, form="q2", divergence="kl"), torch.randn_like(T))

    for fmt in (torch.contiguous_format, torch.channels_last):
        _fusion_case([512, 256], "concat", torch.bfloat16, fmt, True)
        _fusion_case([128, 256], "concat", torch.float32, fmt, True)
    _fusion_case([256, 256], "sum", torch.float16, torch.channels_last, False)
    _fusion_case([64, 32, 16, 16], "concat", torch.bfloat16, torch.channels_last, True)

    # int64 offsets (tensors over 2^31 elements), forced on small tensors
    needs_int64, max_offset = _layout.needs_int64, fusion_op._max_offset
    _layout.needs_int64 = lambda t: True
    fusion_op._max_offset = lambda t: 2**31
    try:
        _fwd_bwd(lambda x, s: qF.lsq_quantize(x, s, 4, axis=1), xl, s6)
        _fwd_bwd(lambda w: qF.dorefa_weight_quantize(w, 4), x.bfloat16())
        _fwd_bwd(lambda x, st, a, a1, a2: qF.n2uq_act_quantize(x, st, a, a1, a2, 4), xl.bfloat16(), *_ltq(4))
        _fwd_bwd(lambda w: qF.n2uq_weight_quantize(w, 4), x)
        _fwd_bwd(lambda S: qF.q_ada_loss(T.to(memory_format=torch.channels_last), S, S + 0.01),
                 torch.randn_like(T).to(memory_format=torch.channels_last))
        _fusion_case([512, 256], "concat", torch.bfloat16, torch.channels_last, True)
    finally:
        _layout.needs_int64, fusion_op._max_offset = needs_int64, max_offset


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cuda_tests():
    cl = torch.channels_last
    # test_fake_quant.py::test_cuda_kernels_match_reference_at_scale
    for dtype in DTYPES:
        for axis in (None, 1):
            x = torch.empty(16, 64, 80, 80).to(dtype).to(memory_format=cl)
            C = 1 if axis is None else 64
            s, beta = torch.rand(C) * 0.2 + 0.05, torch.randn(C) * 0.1
            _fwd_bwd(lambda x, s: qF.lsq_quantize(x, s, 4, "signed", axis), x, s)
            _fwd_bwd(lambda x, s, b: qF.lsq_plus_quantize(x, s, b, 4, axis=axis), x, s, beta)
            _fwd_bwd(lambda x, a: qF.pact_quantize(x, a, 4), x, torch.tensor([2.0]))
    # test_n2uq.py::test_cuda_act_matches_reference_at_scale, ::test_cuda_weight_matches_reference
    for bits in (2, 4, 8):
        for dtype in DTYPES:
            x = torch.empty(16, 64, 40, 40).to(dtype).to(memory_format=cl)
            _fwd_bwd(lambda x, st, a, a1, a2: qF.n2uq_act_quantize(x, st, a, a1, a2, bits), x, *_ltq(bits))
        _fwd_bwd(lambda w: qF.n2uq_weight_quantize(w, bits), torch.empty(512, 256, 3, 3))
    # test_ada.py::test_cuda_distillation_points (both forms; the bf16 case with its own Tq)
    for c, hw in ((128, 80), (256, 40), (512, 20)):
        for layout in ("nchw", "cl"):
            fmt = cl if layout == "cl" else torch.contiguous_format
            for divergence in ("js", "kl"):
                for form in ("q2", "simam"):
                    for dtype, scalar_sq in ((torch.bfloat16, True), (torch.float32, False)):
                        T, S = (torch.empty(4, c, hw, hw).to(dtype).to(memory_format=fmt) for _ in range(2))
                        kw = dict(delta=torch.tensor([0.3]), Tq=T.clone()) if scalar_sq else {}
                        Sq = S.clone() if scalar_sq else None
                        _fwd_bwd(lambda S: qF.q_ada_loss(T, S, Sq, form=form, divergence=divergence, **kw), S)
    # test_fusion.py::test_cuda_kernel_matches_reference_yolo_nodes
    for dtype in DTYPES:
        for fmt in (torch.contiguous_format, cl):
            for channels, HW in (([512, 256], (40, 40)), ([128, 256], (40, 40)), ([256, 256], (80, 80))):
                _fusion_case(channels, "concat", dtype, fmt, True, B=2, HW=HW)


def benchmarks():
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from benchmarks import bench_fake_quant, bench_fusion, bench_n2uq, bench_qada, common

    def once(fn, inputs, grad, bytes_fwd, bytes_bwd, **labels):
        if labels.get("impl", "").startswith("q2kernels"):
            wants = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
            torch.autograd.grad(fn(*inputs), wants, grad)
        return dict(labels, peak_mem_mb=None)

    saved = common.measure, common.add_speedups, torch.randn, torch.randn_like
    common.measure = once
    common.add_speedups = lambda *a, **k: None
    torch.randn = lambda *shape, **kw: torch.empty(*shape, **kw)  # values are never read: nothing runs
    torch.randn_like = torch.empty_like
    try:
        for bench in (bench_fake_quant, bench_fusion, bench_qada, bench_n2uq):
            bench.run(False)
    finally:
        common.measure, common.add_speedups, torch.randn, torch.randn_like = saved
