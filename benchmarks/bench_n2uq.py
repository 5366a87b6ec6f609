"""N2UQ: the fused LTQ activation quantizer and the N2UQ weight quantizer against the eager reference
(the authors' one-pass-per-level form) and torch.compile of the reference.

    python benchmarks/bench_n2uq.py [--smoke] [--out benchmarks/results]

Targets (issue 3, H100, 4 bits, tensors of >= 2^24 elements): forward+backward >= 20x eager and
>= 2x compile (speedup_vs_* columns, on fwd_bwd_ms), >= 75% of copy bandwidth (fwd_bwd_pct_copy),
and autograd saving nothing larger than the input (saved_mb: x itself plus a table of at most 6 KiB).

Byte floors (elements N, element size e): the activation forward reads x and writes y, 2Ne; its
backward reads x and g and writes dx, 3Ne. The weight forward reads w and writes wq, 2Ne (its second
read of each channel comes from L2); the backward reads g and writes dW, 2Ne.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, shapes  # noqa: E402  (common sets TRITON_INTERPRET first)

import torch  # noqa: E402

from q2kernels import functional as qF  # noqa: E402

COLUMNS = ["quantizer", "bits", "shape", "dtype", "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_pct_copy",
           "bwd_pct_copy", "fwd_bwd_pct_copy", "peak_mem_mb", "saved_mb", "speedup_vs_eager",
           "speedup_vs_compile"]



def _ltq_params(bits, device):
    """Trained-looking parameters: intervals spread around 2/n, a start below zero."""
    n = 2**bits - 1
    gen = torch.Generator().manual_seed(bits)
    a = (2.0 / n) * (0.5 + torch.rand(n, generator=gen))
    return [t.to(device).requires_grad_() for t in
            (torch.tensor([-0.1]), a, torch.tensor([1.2]), torch.tensor([0.9]))]


def _act_cases(smoke):
    if smoke:
        return [((1, 8, 16, 16), torch.float32, 4)]
    b16 = [(16, 32, 320, 320), (16, 64, 160, 160), (16, 256, 80, 80)]
    b64 = [(64, 64, 160, 160)]
    assert all(s in shapes.activation_shapes("yolov5s", s[0]) for s in b16 + b64)
    cases = [(s, dt, 4) for s in b16 + b64 for dt in (torch.bfloat16, torch.float32)]
    cases += [((16, 64, 160, 160), torch.float32, bits) for bits in (2, 3, 8)]
    return cases


def run(smoke: bool) -> list[dict]:
    device = common.DEVICE
    rows = []
    for shape, dtype, bits in _act_cases(smoke):
        x = torch.randn(shape, device=device).to(dtype).to(memory_format=torch.channels_last)
        x.requires_grad_()
        g = torch.randn_like(x)
        e = x.element_size()
        fn = lambda x, s, a, a1, a2, bits=bits: qF.n2uq_act_quantize(x, s, a, a1, a2, bits)  # noqa: E731
        for impl, f in common.backend_impls(fn, smoke).items():
            rows.append(common.measure(f, [x, *_ltq_params(bits, device)], g, 2 * x.numel() * e,
                                       3 * x.numel() * e, quantizer="ltq", bits=bits, shape=str(tuple(shape)),
                                       dtype=str(dtype)[6:], impl=impl))
        del x, g
    w_shapes = [(32, 3, 6, 6)] if smoke else sorted(shapes.weight_shapes("yolov5s"),
                                                     key=lambda s: -s[0] * s[1] * s[2] * s[3])[:2]
    for shape in w_shapes:
        w = (torch.randn(shape, device=device) * 0.02).requires_grad_()
        g = torch.randn_like(w)
        fn = lambda w: qF.n2uq_weight_quantize(w, 4)  # noqa: E731
        for impl, f in common.backend_impls(fn, smoke).items():
            rows.append(common.measure(f, [w], g, 2 * w.numel() * 4, 2 * w.numel() * 4, quantizer="n2uq_weight",
                                       bits=4, shape=str(tuple(shape)), dtype="float32", impl=impl))
    keys = ("quantizer", "bits", "shape", "dtype")
    for base in ("eager", "compile"):
        common.add_speedups(rows, keys, base)
    return rows


def main(argv=None):
    return common.bench_main("n2uq", run, COLUMNS, __doc__, argv)

if __name__ == "__main__":
    main()
