"""Integer W4A4 conv (q2kernels._C, docs/math.md §7) on every YOLOv5s conv layer, and the whole stack.

    python benchmarks/bench_int_conv.py [--smoke] [--out benchmarks/results]

The timed op is the full integer layer: packed 4-bit input, int32 accumulation, the epilogue
(scale, bias, SiLU, next-layer quantisation) and packed 4-bit output. Baselines on a GPU: cuDNN
bf16 and fp16 on channels_last with cudnn.benchmark=True, and an int8 bound (im2col + torch._int_mm,
the int32 result left unrequantised: a lower bound on what an int8 layer costs).

Smoke mode (the only mode without a GPU): the C++ CPU path at 1/8 of the resolution, batch 1 —
a check that every layer shape runs, not a measurement. On a GPU: 640x640, batch 1, 16 and 64;
the integer rows appear where the extension has a kernel for the device (csrc/cuda/, issue 7).

Columns: TOPS = 2*MACs/time; pct_mma_peak against the dense int4 MMA peak of the GPU (int8 on
sm_90, where the int4 path runs int8 MMA on unpacked nibbles); GB/s over the bytes each layer must
move (packed input, packed weights, packed output for the integer conv; 2-byte tensors for cuDNN;
int8 input and weights, int32 output for the bound) and its % of the measured copy bandwidth.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, shapes  # noqa: E402  (common sets TRITON_INTERPRET first)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from q2kernels import _ext  # noqa: E402
from q2kernels.ops import int_conv as ic  # noqa: E402

COLUMNS = ["layer", "batch", "shape", "impl", "fwd_ms", "tops", "pct_mma_peak", "gbs", "pct_copy",
           "speedup_vs_cudnn_bf16", "mma", "proj_4090_ms"]

SMOKE_SCALE = 8
# Dense MMA peaks (TOPS) of the path the integer kernels take on each GPU (benchmarks/NOTES.md, hardware ceilings).
MMA_PEAK_TOPS = {"4090": 1321.0, "A100": 1248.0, "H100": 1979.0, "H200": 1979.0}


def _peak_tops():
    name = common.device_name()
    return next((v for k, v in MMA_PEAK_TOPS.items() if k in name), None)


def _has_int_kernel(device: str) -> bool:
    ic.load()
    key = "CUDA" if device == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key("q2kernels_int::conv2d", key)


def _layers(smoke: bool):
    for c in shapes.conv_layers("yolov5s"):
        if not smoke:
            yield c
            continue
        k, s, p = c["k"], c["stride"], c["pad"]
        h, w = max(c["h_in"] // SMOKE_SCALE, k), max(c["w_in"] // SMOKE_SCALE, k)
        yield dict(c, h_in=h, w_in=w, h_out=(h + 2 * p - k) // s + 1, w_out=(w + 2 * p - k) // s + 1)


def _int_layer(c, batch, device):
    cin, cout, k = c["cin"], c["cout"], c["k"]
    # The random codes are drawn and packed on the device itself (the CUDA pack kernel): on the host, the
    # 2.8 G codes of the three batches took about 2 of a stage's 5 minutes.
    x = ic.pack(torch.randint(0, 16, (batch, cin, c["h_in"], c["w_in"]), dtype=torch.int8, device=device), 4, False)
    w = ic.pack(torch.randint(-8, 8, (cout, cin, k, k), dtype=torch.int8, device=device), 4, True)
    ep = ic.epilogue_params(cout, alpha=1e-3, bias=0.1, q_mul=4.0, device=device)

    def run():
        return ic.conv2d(x, w, ep, cin, x_signed=False, w_signed=True, stride=c["stride"], padding=c["pad"],
                         act="silu", qn=0, qp=15)

    out = run()
    return run, x.numel() + w.numel() + out.numel(), out


def _cudnn_layer(c, batch, dtype):
    x = torch.randn(batch, c["cin"], c["h_in"], c["w_in"], device="cuda", dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c["cout"], c["cin"], c["k"], c["k"], device="cuda", dtype=dtype)
    w = w.contiguous(memory_format=torch.channels_last)

    def run():
        return F.conv2d(x, w, stride=c["stride"], padding=c["pad"])

    out = run()
    return run, 2 * (x.numel() + w.numel() + out.numel())


def _int_mm_shape_ok(c, batch):
    """torch._int_mm needs more than 16 rows and K, N multiples of 8 (not the stem, not Detect)."""
    return batch * c["h_out"] * c["w_out"] > 16 and c["cin"] * c["k"] ** 2 % 8 == 0 and c["cout"] % 8 == 0


def _int8_bound_layer(c, batch):
    k, s, p = c["k"], c["stride"], c["pad"]
    x = torch.randint(-8, 8, (batch, c["cin"], c["h_in"], c["w_in"]), device="cuda", dtype=torch.int8)
    w = torch.randint(-8, 8, (c["cin"] * k * k, c["cout"]), device="cuda", dtype=torch.int8)

    def run():
        # unfold has no int8 kernel: im2col as a strided view of the padded NHWC input, gathered once.
        xp = F.pad(x, (p, p, p, p)).permute(0, 2, 3, 1)
        cols = xp.unfold(1, k, s).unfold(2, k, s).reshape(-1, c["cin"] * k * k)
        return torch._int_mm(cols, w)

    out = run()
    return run, x.numel() + w.numel() + 4 * out.numel()


def _row(c, batch, impl, ms, nbytes, peak, copy):
    macs = batch * c["cout"] * c["cin"] * c["k"] ** 2 * c["h_out"] * c["w_out"]
    tops = 2 * macs / ms / 1e9
    gbs = nbytes / ms / 1e6
    return {"layer": c["name"], "batch": batch, "shape": f'{c["cin"]}->{c["cout"]} k{c["k"]}s{c["stride"]} '
            f'{c["h_in"]}x{c["w_in"]}', "impl": impl, "fwd_ms": ms, "tops": tops,
            "pct_mma_peak": 100 * tops / peak if peak else None, "gbs": gbs,
            "pct_copy": 100 * gbs / copy if copy else None}


def run(smoke: bool) -> list[dict]:
    device = common.DEVICE
    batches = (shapes.SMOKE_BATCH,) if smoke else (1,) + shapes.BATCHES
    peak, copy = (_peak_tops(), common.copy_bandwidth_gbs()) if device == "cuda" else (None, None)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    for batch in batches:
        for c in _layers(smoke):
            impls = {}
            if _has_int_kernel(device):
                impls["q2kernels_int4"] = lambda c=c: _int_layer(c, batch, device)[:2]
            if device == "cuda" and not smoke:
                impls["cudnn_bf16"] = lambda c=c: _cudnn_layer(c, batch, torch.bfloat16)
                impls["cudnn_fp16"] = lambda c=c: _cudnn_layer(c, batch, torch.float16)
                if _int_mm_shape_ok(c, batch):
                    impls["int8_int_mm_bound"] = lambda c=c: _int8_bound_layer(c, batch)
            for impl, make in impls.items():
                fn, nbytes = make()
                rows.append(_row(c, batch, impl, common.time_ms(fn), nbytes, peak, copy))
                del fn
                # Each layer's row as it finishes: a stage cut short by its time limit keeps them in its
                # log, and benchmarks/campaign.py salvages them into the results as partial rows.
                print(f"measured: {json.dumps(rows[-1])}", flush=True)
        if device == "cuda" and not smoke and _has_int_kernel(device):
            rows.append(_input_quantize_row(batch, copy))
        _add_stack_rows(rows, batch, peak, copy)
    common.add_speedups(rows, ("layer", "batch"), "cudnn_bf16", impl="q2kernels_int4", metric="fwd_ms")
    if device == "cuda" and not smoke:
        _add_gpu_columns(rows, copy)
    return rows


def _add_stack_rows(rows, batch, peak, copy):
    """The whole conv stack per impl: the sum of its layer times (and MACs, bytes)."""
    layer_rows = [r for r in rows if r["batch"] == batch and r["layer"] != "all"]
    for impl in dict.fromkeys(r["impl"] for r in layer_rows):
        mine = [r for r in layer_rows if r["impl"] == impl]
        ms = sum(r["fwd_ms"] for r in mine)
        tops = sum(r["tops"] * r["fwd_ms"] for r in mine) / ms
        gbs = sum(r["gbs"] * r["fwd_ms"] for r in mine) / ms
        rows.append({"layer": "all", "batch": batch, "shape": f"{len(mine)} convs", "impl": impl, "fwd_ms": ms,
                     "tops": tops, "pct_mma_peak": 100 * tops / peak if peak else None, "gbs": gbs,
                     "pct_copy": 100 * gbs / copy if copy else None})


# GPU additions (issue 7): the quantize-and-pack of the network input (counted in the integer
# stack, with the requantisation that every integer layer's epilogue already does), the MMA path the
# integer conv ran, and what an RTX 4090 would take -- a projection, not a measurement:
#     proj_4090_ms = max(2*MACs / (u_mma * P_4090), bytes / (u_copy * B_4090))
# with u_mma = achieved TOPS / this GPU's peak for the impl's operand type and u_copy = achieved GB/s
# / this GPU's measured copy bandwidth, P_4090 and B_4090 the RTX 4090's peaks (benchmarks/NOTES.md, hardware ceilings): the
# same fractions of peak on the 4090, which runs the int4 MMA (s4) where this GPU may run int8 (s8).
PEAKS = {"4090": {"int4": 1321.0, "int8": 661.0, "bf16": 165.0, "fp16": 165.0, "bw": 1008.0},
         "A100": {"int4": 1248.0, "int8": 624.0, "bf16": 312.0, "fp16": 312.0},
         "H100": {"int8": 1979.0, "bf16": 989.0, "fp16": 989.0},
         "H200": {"int8": 1979.0, "bf16": 989.0, "fp16": 989.0}}
OPERANDS = {"cudnn_bf16": "bf16", "cudnn_fp16": "fp16", "int8_int_mm_bound": "int8"}


def _mma_path() -> str:
    """The MMA path of the integer conv on this GPU (csrc/cuda/register_cuda.cpp): Q2K_INT_MMA's, or the
    one csrc/cuda/archs.h's row for the GPU's compute capability runs (q2kernels._ext.gpu_arch_of)."""
    want = os.environ.get("Q2K_INT_MMA", "auto") or "auto"
    if want != "auto":
        return want
    major, minor = torch.cuda.get_device_capability()
    row = _ext.gpu_arch_of(10 * major + minor)
    return row.mma_path if row else "s4"


def _input_quantize_row(batch, copy):
    """The network input (batch, 3, 640, 640) fp16 channels_last -> packed 4-bit codes."""
    x = torch.randn(batch, 3, 640, 640, device="cuda", dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last)
    qparams = torch.stack([torch.full((3,), 8.0), torch.zeros(3)]).to("cuda").contiguous()
    ms = common.time_ms(lambda: ic.quantize_pack(x, qparams, 0, 15))
    gbs = (2 * x.numel() + batch * 640 * 640 * ic.packed_bytes(3)) / ms / 1e6
    return {"layer": "input.quantize_pack", "batch": batch, "shape": "3x640x640 fp16 -> packed",
            "impl": "q2kernels_int4", "fwd_ms": ms, "tops": 0.0, "pct_mma_peak": 0.0, "gbs": gbs,
            "pct_copy": 100 * gbs / copy if copy else None}


def _add_gpu_columns(rows, copy):
    name = common.device_name()
    here = next((v for k, v in PEAKS.items() if k in name), None)
    path = _mma_path()
    int_operand = "int4" if path == "s4" else "int8"
    for r in rows:
        if r["impl"] == "q2kernels_int4":
            r["mma"] = path
    if here is None or not copy:
        return
    for r in rows:
        operand = int_operand if r["impl"] == "q2kernels_int4" else OPERANDS.get(r["impl"])
        target = "int4" if r["impl"] == "q2kernels_int4" else operand
        if r["layer"] == "all" or operand not in here:
            continue
        ops, nbytes = r["tops"] * r["fwd_ms"] * 1e9, r["gbs"] * r["fwd_ms"] * 1e6
        u_mma, u_copy = r["tops"] / here[operand], r["gbs"] / copy
        compute = ops / (u_mma * PEAKS["4090"][target] * 1e9) if ops > 0 else 0.0
        r["proj_4090_ms"] = max(compute, nbytes / (u_copy * PEAKS["4090"]["bw"] * 1e6))
    for r in rows:
        if r["layer"] == "all":
            mine = [x.get("proj_4090_ms") for x in rows
                    if x["impl"] == r["impl"] and x["batch"] == r["batch"] and x["layer"] != "all"]
            if mine and all(v is not None for v in mine):
                r["proj_4090_ms"] = sum(mine)


def main(argv=None):
    return common.bench_main("int_conv", run, COLUMNS, __doc__, argv)

if __name__ == "__main__":
    main()
