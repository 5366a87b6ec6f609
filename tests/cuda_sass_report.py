"""Registers, local memory and SASS instruction mix of the CUDA conv kernels, per arch and variant,
compiled without a GPU exactly as tests/test_cuda_compile.py compiles them (its compile_all).

    python tests/cuda_sass_report.py [--save FILE.json] [--compare FILE.json] [--jobs N]

One line per int_conv_kernel variant (path s4/s8, kWarpsN, 1x1 GEMM) and arch (the s8 variants of
the archs whose row in csrc/cuda/archs.h runs s4, those not in test_cuda_compile's INT8_ARCHS, are
empty stubs and left out), then the grouped-conv kernel: REG, STACK/SPILL (stack frame, spill
stores, spill loads, bytes), the SASS instruction count and its classes. --save writes every kernel
of every source (ptxas numbers and the full opcode histogram) as JSON; --compare reads such a file
and lists, per kernel, what changed (exit status 1 when anything did).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import test_cuda_compile as tcc

# Columns of the table: a class name and the opcodes (before the first '.') it counts.
CLASSES = {
    "IMMA": ("IMMA",),
    "LDSM": ("LDSM",),
    "LDGSTS": ("LDGSTS",),
    "LDS": ("LDS",),
    "STS": ("STS",),
    "LDG": ("LDG",),
    "STG": ("STG",),
    "SHFL": ("SHFL",),
    "IMAD": ("IMAD",),
    "IADD": ("IADD3", "IADD"),
    "LOP/SHF": ("LOP3", "SHF", "LEA", "PRMT", "IDP"),
    "FP": ("FADD", "FMUL", "FFMA", "FSETP", "FSEL", "FMNMX", "MUFU", "F2F", "F2I", "I2F", "FRND", "FCHK"),
    "BRA": ("BRA", "BRX", "CALL", "RET"),
}
VARIANT_ORDER = sorted(tcc.CONV_VARIANTS)


def _histogram(code: list[tuple[int, str]]) -> dict[str, int]:
    return dict(collections.Counter(tcc._opcode(text).split(".")[0] for _, text in code))


def collect(jobs: int) -> dict[str, dict]:
    """'source sm_arch kernel' -> registers, stack, spills, total and the opcode histogram."""
    with tempfile.TemporaryDirectory() as d:
        builds = tcc.compile_all(Path(d), jobs)
    report = {}
    for (src, arch), res in sorted(builds.items()):
        if "error" in res:
            sys.exit(res["error"])
        for name, code in res["sass"].items():
            report[f"{src} sm_{arch} {name}"] = dict(res["ptxas"][name], total=len(code), ops=_histogram(code))
    return report


def _variant_label(name: str) -> str | None:
    m = tcc.CONV_KERNEL.search(name)
    if m is None:
        return "grouped" if "grouped_conv_kernel" in name else None
    path, wn, gemm = (int(v) for v in m.groups())
    return f"{'s4' if path == 0 else 's8'} wn{wn} {'1x1' if gemm else 'gen'}"


def print_table(report: dict[str, dict]) -> None:
    print(f"{'arch':6} {'variant':12} {'REG':>4} {'ST/SP':>7} {'SASS':>5} " + " ".join(f"{c:>7}" for c in CLASSES))
    rows = []
    for key, info in report.items():
        _, arch, name = key.split(" ", 2)
        label = _variant_label(name)
        if label is None or (label.startswith("s8") and arch.removeprefix("sm_") not in tcc.INT8_ARCHS):
            continue
        rows.append((arch, label, info))
    for arch, label, info in sorted(rows, key=lambda r: (r[0], r[1] != "grouped", r[1])):
        local = f"{info['stack']}/{info['spill_stores']}/{info['spill_loads']}"
        counts = [sum(info["ops"].get(op, 0) for op in ops) for ops in CLASSES.values()]
        print(f"{arch:6} {label:12} {info.get('registers', 0):>4} {local:>7} {info['total']:>5} "
              + " ".join(f"{c:>7}" for c in counts))


def compare(report: dict[str, dict], baseline: dict[str, dict]) -> bool:
    """Prints what differs from baseline; True when nothing does."""
    same = True
    for key in sorted(set(report) | set(baseline)):
        old, new = baseline.get(key), report.get(key)
        if old is None or new is None:
            print(f"{key}: {'added' if old is None else 'removed'}")
            same = False
            continue
        diffs = [f"{k} {old.get(k)} -> {new.get(k)}" for k in ("registers", "stack", "spill_stores", "spill_loads",
                                                                 "total") if old.get(k) != new.get(k)]
        ops = sorted(set(old["ops"]) | set(new["ops"]))
        diffs += [f"{op} {old['ops'].get(op, 0)} -> {new['ops'].get(op, 0)}" for op in ops
                  if old["ops"].get(op, 0) != new["ops"].get(op, 0)]
        if diffs:
            same = False
            print(f"{key}: " + ", ".join(diffs))
    print("identical to the baseline" if same else "differs from the baseline")
    return same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--save", type=Path, help="write the full report (every kernel) as JSON")
    ap.add_argument("--compare", type=Path, help="a report saved by --save to compare with")
    ap.add_argument("--jobs", type=int, default=None, help="parallel nvcc runs (default: the CPU count)")
    args = ap.parse_args()
    report = collect(args.jobs)
    print_table(report)
    if args.save:
        args.save.write_text(json.dumps(report, indent=1, sort_keys=True))
    if args.compare:
        return 0 if compare(report, json.loads(args.compare.read_text())) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
