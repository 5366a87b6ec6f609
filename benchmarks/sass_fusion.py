"""Register, spill and instruction report of the gated-fusion kernels compiled for sm_90, at the
real YOLOv5s / YOLO11s neck nodes (benchmarks/shapes.py), without a GPU.

    python benchmarks/sass_fusion.py [--batch 16] [--kernels fwd bwd] [--offsets int32 int64]

The ops are driven on CPU tensors with Triton's launch replaced by a recorder; every distinct
specialisation is then compiled as a launch would compile it (Triton's own argument binder gives
the signature, the constexprs and the divisibility attributes, so loads vectorise as on the GPU),
and the wheel's ptxas (-v) and cuobjdump read it: registers, stack frame, spill stores/loads, SASS
instructions, and the global loads/stores by width. An INT64 row forces 64-bit offsets (tensors
over 2^31 elements) on the same shapes. Nodes with the same branch channels compile to the same
specialisation and are listed once.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from benchmarks import shapes  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_launches = []


def _record(self, *args, grid, warmup, **kwargs):
    _launches.append((self, args, kwargs))


def _compile(fn, args, kwargs):
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def _resources(kernel) -> dict:
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        cubin.write_bytes(kernel.asm["cubin"])
        # The flags Triton passes for sm_90 (backends/nvidia/compiler.py), with its ptxas for sm_90+.
        r = subprocess.run([str(BIN / "ptxas-blackwell"), "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(ptx),
                            "-o", str(Path(d) / "v.cubin")],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr)
        v = r.stderr
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", v)
    ins = re.findall(r"/\*([0-9a-f]{4})\*/\s+([^;]+);", sass)
    addrs = [int(a, 16) for a, _ in ins]
    ops = [re.sub(r"^@!?U?P\w+\s+", "", i).split()[0] for _, i in ins]
    # The main loop: the longest backward branch (target below the branch); 0 for straight-line code.
    loops = [(a, int(t, 16)) for a, (_, i) in zip(addrs, ins)
             for t in re.findall(r"BRA (?:!?U?P\w+, )?0x([0-9a-f]+)", i) if int(t, 16) < a]
    loop = max((a - t for a, t in loops), default=-16) // 16 + 1
    return dict(regs=int(re.search(r"Used (\d+) registers", v).group(1)), stack=int(frame.group(1)),
                spill_st=int(frame.group(2)), spill_ld=int(frame.group(3)), sass=len(ops), loop=loop,
                ldg={w: sum(o.startswith("LDG") and o.endswith(w) for o in ops) for w in (".128", ".64")},
                ldg_all=sum(o.startswith("LDG") for o in ops), stg_all=sum(o.startswith("STG") for o in ops),
                stg128=sum(o.startswith("STG") and o.endswith(".128") for o in ops))


def _drive(batch: int, int64: bool):
    from q2kernels.ops import fusion as fusion_op

    if int64:
        fusion_op._max_offset = lambda t: 2**31
    seen = set()
    for model, node, branches, hw in shapes.FUSION_NODES:
        if branches in seen:
            continue
        seen.add(branches)
        for dtype in (torch.bfloat16, torch.float32):
            for fmt in (torch.channels_last, torch.contiguous_format):
                xs = [torch.empty(batch, c, hw, hw, dtype=dtype).to(memory_format=fmt) for c in branches]
                C = sum(branches)
                gates, gamma, beta = torch.full((len(xs),), 0.5), torch.ones(C), torch.zeros(C)
                n = len(_launches)
                y, mean, rstd = torch.ops.q2kernels.gated_fusion(xs, gates, gamma, beta, True, 1e-5, [], 0.1, 0.05,
                                                                 None)
                torch.ops.q2kernels.gated_fusion_backward(torch.empty_like(y), xs, gates, gamma, mean, rstd, True, True)
                for fn, args, kwargs in _launches[n:]:
                    yield (model, node, "+".join(map(str, branches)), str(dtype)[6:],
                           "cl" if fmt == torch.channels_last else "nchw", "int64" if int64 else "int32",
                           fn.fn.__name__.replace("_gated_fusion_", "").replace("_kernel", ""), fn, args, kwargs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=shapes.BATCHES[0])
    p.add_argument("--kernels", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    p.add_argument("--offsets", nargs="+", default=["int32", "int64"], choices=["int32", "int64"])
    opts = p.parse_args(argv)
    JITFunction.run = _record
    import q2kernels.functional  # noqa: F401  (registers the ops)

    print("| node | branches | dtype | layout | offsets | kernel | regs | stack B | spill st/ld B | SASS | "
          "loop SASS | per element | LDG (128b/64b) | STG (128b) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for off in opts.offsets:
        for model, node, br, dt, lay, off, kname, fn, args, kwargs in _drive(opts.batch, off == "int64"):
            if kname not in opts.kernels:
                continue
            r = _resources(_compile(fn, args, kwargs))
            # Elements of x a thread holds per pixel block: the [BLOCK_P, sum BCS] tile over its threads.
            # The forward is straight-line code (one pixel block per program): all of it counts.
            per_thread = kwargs["BLOCK_P"] * sum(kwargs["BCS"]) / (32 * kwargs["num_warps"])
            body = r["loop"] or r["sass"]
            print(f"| {model} {node} | {br} | {dt} | {lay} | {off} | {kname} | {r['regs']} | {r['stack']} | "
                  f"{r['spill_st']}/{r['spill_ld']} | {r['sass']} | {body} | {body / per_thread:.1f} | "
                  f"{r['ldg_all']} ({r['ldg']['.128']}/{r['ldg']['.64']}) | {r['stg_all']} ({r['stg128']}) |", flush=True)


if __name__ == "__main__":
    main()
