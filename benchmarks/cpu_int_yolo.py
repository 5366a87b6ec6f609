"""The integer YOLO11n on the CPU (issue 21): the float model fused against the integer model on the int32
path and on the fast path (oneDNN's fp32 direct conv of the codes where the bound proves it exact,
docs/integer-format.md "The CPU fast path"), side by side in one run, at 320 and 640 px.

    python benchmarks/cpu_int_yolo.py [--sizes 320 640] [--reps 5] [--threads 1] [--out results.json]

Needs Ultralytics (the [ultralytics] extra); CPU only, so not one of the bench_*.py files that
benchmarks/run_all.py runs in the GPU campaign. The models: YOLO11n's DetectionModel from yolo11n.yaml
(seed 0, no download); its QAT model (LSQ W4A4 by default) settled as tests/deployable.settle does
(quantizers initialised, BatchNorm and activation ranges from data, so that every layer is live) and
converted by convert_to_int; the float model with its BatchNorm re-estimated on the same kind of data,
then fused by Ultralytics' own fuse() (BatchNorm folded into the convs). Rows, batch 1:
- float fused: the fused DetectionModel's forward (its Detect decode included: a few small ops);
- integer (old path): the integer model's forward (to the raw Detect maps) with the fast path off
  (ops.int_conv.use_fast_cpu(False): every conv on csrc/int_conv_cpu.cpp, csrc/grouped_conv.h);
- integer (fast path): the same model with the fast path on (the default);
- integer, deterministic float: that model after deploy.deterministic_float (its stem conv and
  C2PSA's attention on ops.det_float's fixed-order kernels instead of oneDNN's: what a bit-exact
  ONNX export costs on the q2kernels side).
Each case is called once to warm up (the fast path unpacks its weights then, oneDNN builds its
kernels), then the rows are timed in turns, `reps` rounds, so that a load that comes and goes on a
shared machine falls on all of them alike; the median and the fastest round are reported. The fast
and the old path's outputs are checked equal bit for bit at every size before anything is timed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from q2kernels.integrations import ultralytics_offline  # noqa: E402

ultralytics_offline()  # before Ultralytics is imported
import torch  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

from deployable import reestimate_batchnorm, settle  # noqa: E402
from q2kernels.deploy import IntConv2d, convert_to_int, deterministic_float  # noqa: E402
from q2kernels.nn import quantize_model  # noqa: E402
from q2kernels.ops import int_conv as ic  # noqa: E402

ROWS = ("float fused", "integer (old path)", "integer (fast path)", "integer, deterministic float")


def build(recipe: str, bits: int, settle_image: int = 64):
    """(float fused DetectionModel, integer model) of YOLO11n."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        float_model = DetectionModel("yolo11n.yaml", verbose=False).eval()
    g = torch.Generator().manual_seed(0)
    batch = lambda: torch.randn(2, 3, settle_image, settle_image, generator=g)  # noqa: E731
    model = settle(quantize_model(copy.deepcopy(float_model), recipe, w_bits=bits, a_bits=bits), batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int_model = convert_to_int(model, batch()[:1]).eval()
    reestimate_batchnorm(float_model, batch())
    fused = float_model.eval().fuse(verbose=False)
    return fused, int_model


def _same(a, b) -> bool:
    """a and b equal bit for bit (tensors, or lists/tuples of them)."""
    if isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype == torch.float32:
            return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))
        return torch.equal(a, b)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def run(sizes, reps: int, recipe: str, bits: int) -> dict:
    fused, int_model = build(recipe, bits)
    det_model = deterministic_float(int_model)
    convs = [m for m in int_model.modules() if isinstance(m, IntConv2d)]
    load_before = os.getloadavg()
    results = []
    for size in sizes:
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        cases = {
            ROWS[0]: lambda: fused(x),
            ROWS[1]: lambda: _old(int_model, x),
            ROWS[2]: lambda: int_model(x),
            ROWS[3]: lambda: det_model(x),
        }
        with torch.inference_mode():
            fast_out, old_out = int_model(x), _old(int_model, x)
            assert _same(fast_out, old_out), f"{size}: the fast path's outputs differ from the int32 path's"
            fused(x), det_model(x)
            times = {name: [] for name in cases}
            for _ in range(reps):
                for name, fn in cases.items():
                    t = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t) * 1e3)
        base = statistics.median(times[ROWS[0]])
        for name in ROWS:
            med = statistics.median(times[name])
            results.append({"imgsz": size, "row": name, "median_ms": round(med, 1), "min_ms": round(min(times[name]), 1),
                            "x_float": round(med / base, 2), "times_ms": [round(t, 1) for t in times[name]]})
    return {"model": "yolo11n", "recipe": recipe, "bits": bits, "batch": 1, "reps": reps,
            "integer_convs": len(convs), "fast_convs": sum(m.fast_cpu for m in convs),
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "rows": results}


def _old(int_model, x):
    with ic.use_fast_cpu(False):
        return int_model(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--recipe", default="lsq")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own); on a shared "
                    "machine 1 thread avoids OpenMP barriers spinning against other jobs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args.sizes, args.reps, args.recipe, args.bits)
    print(f"YOLO11n {args.recipe} W{args.bits}A{args.bits}, batch 1, {report['threads']} threads, torch "
          f"{report['torch']}; {report['fast_convs']} of {report['integer_convs']} integer convs on the fast path; "
          f"load average before {report['loadavg_before'][0]:.1f}, after {report['loadavg_after'][0]:.1f} "
          f"on {report['cpus']} CPUs")
    print("| imgsz | row | median ms | min ms | x float fused |\n|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['imgsz']} | {r['row']} | {r['median_ms']} | {r['min_ms']} | {r['x_float']} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
