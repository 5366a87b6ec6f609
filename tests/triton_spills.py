"""Register spills of the Triton kernels, found without a GPU: every specialisation that a workload
launches, keyed as Triton keys it, compiled for Hopper (sm_90) by the ptxas of the triton wheel.

    python tests/triton_spills.py [WORKLOAD ...]

WORKLOAD is a function of tests/triton_workloads.py (ops, cuda_tests, benchmarks; default: all three)
or FILE.py:FUNCTION. One line per specialisation: kernel, REG/STACK/LOCAL (cuobjdump -res-usage), the
verdict and its key; then the spills. Exit status 1 when a specialisation spills that KNOWN_SPILLS
does not list, 0 otherwise; a listed entry that matched launches none of which spill is reported,
so that the list shrinks with the fix (the Triton versions CI runs may differ there).

How: the interpreter off, JITFunction.run is replaced by a recorder that binds each launch with
Triton's own binder for the CUDA backend at sm_90 (pointers and integers specialised on divisibility
by 16 and on the value 1, constexprs by value), so two launches share a key exactly when Triton would
compile one kernel for both. Nothing runs: the workloads drive the ops on CPU tensors whose values
do not matter. Each distinct key is then compiled; ptxas puts spill stores in the stack frame, so a
specialisation spills when its STACK or LOCAL is non-zero.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_spills: run with TRITON_INTERPRET unset (it compiles for the GPU)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

# Specialisations known to spill, as (kernel, substring of the key): listed so that they are seen
# (printed as "SPILLS (known)"), not hidden; any other spill fails the check.
KNOWN_SPILLS: list[tuple[str, str]] = [
    # The K-generic fusion forward at YOLO11s node 18 (branches 128+256), fp16 NCHW: a 24 B stack frame
    # at 128 registers under Triton 3.9 (the ragged backward no longer spills; benchmarks/NOTES.md,
    # gated fusion). Unmeasured on a GPU; the first fix to try is a smaller BLOCK_P for fp16 NCHW.
    ("_gated_fusion_fwd_kernel", "BCS=(128, 256)"),
    # First seen by this check, not yet fixed (stack frame in bytes; which ones spill depends on the
    # Triton version: CI compiles with 3.9 in the main job and 3.6, the GPU image's, in its own):
    ("_ltq_bwd_kernel", "BITS=2 BLOCK=4096"),  # 2-bit N2UQ, bf16: 8 B (3.9)
    ("_ltq_fwd_kernel", "BITS=8 BLOCK=4096"),  # 8-bit N2UQ, fp32: 8 B at 32 registers (3.6)
    ("_q_ada_bwd_kernel", "BLOCK_M=128 INT64=True"),  # int64 offsets: 8 B (3.6)
    ("_q_ada_fwd_kernel", "HAS_DELTA=True KL=False BLOCK_R=1 BLOCK_M=2048"),  # bf16 row chunks: 16 B (3.6)
    # Q-ADA's Q2 form (FORM=1) under Triton 3.6 only: 8-24 B stack at 128 registers in the 16-row tiles
    # (BLOCK_R=16 BLOCK_M=128) forward and backward, 8 B in the bf16 row-chunked KL forward; none with
    # 3.9. Its extra log1p terms raise the live registers; first fix to try: BLOCK_R=8 for FORM=1.
    ("_q_ada_fwd_kernel", "FORM=1"),
    ("_q_ada_bwd_kernel", "FORM=1 HAS_SQ=True HAS_TQ=True KL=False BLOCK_R=16 BLOCK_M=128"),
]

_launches: dict[tuple, tuple] = {}
_binders: dict[JITFunction, object] = {}


def _record(self, *args, grid, warmup, **kwargs):
    binder = _binders.get(self)
    if binder is None:
        binder = _binders[self] = create_function_from_signature(self.signature, self.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    key = (self.fn.__qualname__, repr(specialization), repr(options))
    if key not in _launches:
        _launches[key] = (self, self._pack_args(BACKEND, kwargs, bound, specialization, options), specialization)


def describe(fn: JITFunction, specialization) -> str:
    """The key in words: name=value for constexprs, name:type[/16 or =1] for the rest."""
    parts = []
    for p, (ty, attr) in zip(fn.params, specialization):
        if ty == "constexpr":
            parts.append(f"{p.name}={attr}")
        else:
            parts.append(f"{p.name}:{ty}" + ("/16" if attr == "D" else ""))
    return " ".join(parts)


def resource_usage(fn: JITFunction, packed) -> dict[str, int]:
    options, signature, constexprs, attrs = packed
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    return {"REG": int(m.group(1)), "STACK": int(m.group(2)), "LOCAL": int(m.group(3))}


def _workload(spec: str):
    if ":" in spec:
        path, name = spec.rsplit(":", 1)
        module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        module, name = importlib.import_module("triton_workloads"), spec
    return getattr(module, name)


def check(workloads: list[str]) -> int:
    JITFunction.run = _record
    import q2kernels._backend as backend
    backend.resolve = lambda x: "triton"  # CPU tensors, interpreter off: launches are recorded only
    for spec in workloads:
        before = len(_launches)
        _workload(spec)()
        print(f"# workload {spec}: {len(_launches) - before} new specialisations", flush=True)
    spills, known_matched, known_spilled = [], set(), set()
    for (name, _, _), (fn, packed, specialization) in sorted(_launches.items(), key=lambda kv: kv[0]):
        usage = resource_usage(fn, packed)
        key = describe(fn, specialization)
        spilled = usage["STACK"] > 0 or usage["LOCAL"] > 0
        known = [k for k in KNOWN_SPILLS if k[0] == name and k[1] in key]
        known_matched.update(known)
        known_spilled.update(known if spilled else [])
        verdict = "ok" if not spilled else ("SPILLS (known)" if known else "SPILLS")
        line = f"{name} REG:{usage['REG']} STACK:{usage['STACK']} LOCAL:{usage['LOCAL']} {verdict} [{key}]"
        print(line, flush=True)
        if spilled and not known:
            spills.append(line)
    print(f"# {len(_launches)} specialisations of {len({k[0] for k in _launches})} kernels compiled for sm_90")
    stale = sorted(known_matched - known_spilled)
    for line in spills:
        print(f"# spill: {line}")
    for k in stale:
        print(f"# listed in KNOWN_SPILLS but not spilling (remove it): {k}")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(check(sys.argv[1:] or ["ops", "cuda_tests", "benchmarks"]))
