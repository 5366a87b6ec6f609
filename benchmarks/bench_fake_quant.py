"""LSQ / LSQ+ / PACT / DoReFa fake quantisation: fused Triton ops against the eager reference,
torch.compile of the reference, and PyTorch's native learnable fake-quant op (LSQ per tensor).

    python benchmarks/bench_fake_quant.py [--smoke] [--out benchmarks/results]

Byte floors (elements N, element size e): forward reads x and writes y, 2Ne; backward reads x and
g and writes dx, 3Ne (parameters and partials are negligible).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, shapes  # noqa: E402  (common sets TRITON_INTERPRET first)

import torch  # noqa: E402

from q2kernels import functional as qF  # noqa: E402

COLUMNS = ["quantizer", "shape", "dtype", "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_pct_copy",
           "bwd_pct_copy", "peak_mem_mb", "saved_mb", "speedup_vs_eager", "speedup_vs_compile",
           "speedup_vs_native"]


def _quantizers(device):
    """name -> (fn(x, p), params(x)) for the activation quantizers; 4 bits."""
    return {
        "lsq": (lambda x, s: qF.lsq_quantize(x, s, 4, "signed"),
                lambda x: [torch.tensor([0.05], device=device, requires_grad=True)]),
        "lsq_plus": (lambda x, s, b: qF.lsq_plus_quantize(x, s, b, 4),
                     lambda x: [torch.tensor([0.05], device=device, requires_grad=True),
                                torch.tensor([-0.3], device=device, requires_grad=True)]),
        "pact": (lambda x, a: qF.pact_quantize(x, a, 4),
                 lambda x: [torch.tensor([2.0], device=device, requires_grad=True)]),
    }


def _native_lsq(x, s):
    zero_point = torch.zeros(1, device=x.device)
    return torch._fake_quantize_learnable_per_tensor_affine(x, s, zero_point, -8, 7, 1.0)



def run(smoke: bool) -> list[dict]:
    device = common.DEVICE
    rows = []
    if smoke:
        cases = [((1, 8, 16, 16), torch.float32)]
    else:
        big = [s for s in shapes.activation_shapes("yolov5s", 16) if s[0] * s[1] * s[2] * s[3] >= 2**22]
        big += [s for s in shapes.activation_shapes("yolov5s", 64) if s[0] * s[1] * s[2] * s[3] >= 2**24][:3]
        cases = [(s, dt) for s in big for dt in (torch.bfloat16, torch.float32)]
    for shape, dtype in cases:
        x = (torch.randn(shape, device=device) * 0.3).to(dtype).to(memory_format=torch.channels_last)
        x.requires_grad_()
        g = torch.randn_like(x)
        e = x.element_size()
        for name, (fn, make_params) in _quantizers(device).items():
            impls = common.backend_impls(fn, smoke)
            if name == "lsq" and dtype == torch.float32:
                impls["native"] = _native_lsq
            for impl, f in impls.items():
                rows.append(common.measure(f, [x, *make_params(x)], g, 2 * x.numel() * e, 3 * x.numel() * e,
                                           quantizer=name, shape=str(tuple(shape)), dtype=str(dtype)[6:], impl=impl))
    # DoReFa runs on weights: the largest YOLOv5s conv weight and the stem.
    w_shapes = [(32, 3, 6, 6)] if smoke else sorted(shapes.weight_shapes("yolov5s"), key=lambda s: -s[0] * s[1] * s[2] * s[3])[:2]
    for shape in w_shapes:
        w = torch.randn(shape, device=device, requires_grad=True)
        g = torch.randn_like(w)
        fn = lambda w: qF.dorefa_weight_quantize(w, 4)  # noqa: E731
        for impl, f in common.backend_impls(fn, smoke).items():
            # DoReFa's global max takes a second read of w in each pass.
            rows.append(common.measure(f, [w], g, 3 * w.numel() * 4, 5 * w.numel() * 4,
                                       quantizer="dorefa", shape=str(tuple(shape)), dtype="float32", impl=impl))
    keys = ("quantizer", "shape", "dtype")
    for base in ("eager", "compile", "native"):
        common.add_speedups(rows, keys, base)
    return rows


def main(argv=None):
    return common.bench_main("fake_quant", run, COLUMNS, __doc__, argv)

if __name__ == "__main__":
    main()
