"""The CUDA sources (csrc/cuda/*.cu) build into the machine code the design needs, checked without a GPU.

The archs, and the MMA path each must show, come from the one table of csrc/cuda/archs.h
(q2kernels._ext.GPU_ARCHS; today sm_80, sm_86, sm_89 on the int4 path "s4", sm_90 on the int8 path
"s8"). Each .cu file is compiled by nvcc to a cubin for every arch of the table with the flags of the
real build (q2kernels._ext.CUDA_FLAGS), once per session, in parallel. Then, from ptxas -v and from
the SASS (cuobjdump from the triton wheel):
- an "s4" arch (sm_80/86/89): the int4-path conv kernels run the native int4 MMA, IMMA.16864, in the
  kernel body, and the int8-path kernels are empty stubs (archs.h mma_path_built);
- an "s8" arch (sm_90): the int8-path conv kernels run IMMA.16832.S8, twice as many as the int4 kernels
  run IMMA.16864, none inside a called subroutine, and nothing in its code is IMMA.16864. On sm_90
  ptxas turns mma.m16n8k64.s4 into a CALL to a subroutine of ~180 integer instructions around two
  IMMA.16832 (the emulation); the int4-path kernels built for it (the forced path of the GPU tests)
  must show exactly that, which is what proves this check can see an emulation;
- every kernel: no local memory (0 bytes stack frame, spill stores and spill loads).
So the kernel's compile-time guard is checked against the table here, on the machine code; the
dispatcher and the build against it in tests/test_gpu_archs.py.
nvcc is required: CI has it, so its absence is a failure, not a skip.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import triton

from q2kernels import _ext

CUDA_DIR = _ext.CSRC / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = _ext.CUDA_ARCHS
# The archs of each MMA path, from the table (a path this test has no expectation for fails below).
INT4_NATIVE = tuple(a.arch for a in _ext.GPU_ARCHS if a.mma_path == "s4")
INT8_ARCHS = tuple(a.arch for a in _ext.GPU_ARCHS if a.mma_path == "s8")
# params.h MmaPath's values, as the mangled kernel names carry them (tests/test_gpu_archs.py checks them).
PATH_IDS = {"s4": 0, "s8": 1}
# IMMA.16864 per int4 conv kernel: one k-tile of the K loop is unrolled, 2 k-steps of 4 m16 x 4 n8
# MMA tiles (Tile in csrc/cuda/int_conv_kernel.cuh); the int8 path runs two m16n8k32 per m16n8k64.
MMAS_PER_KTILE = 32
# Tile<MmaPath, kWarpsN, k1x1> in the mangled kernel names.
CONV_KERNEL = re.compile(r"int_conv_kernel.*MmaPathE(\d)ELi(\d)ELb(\d)")
CONV_VARIANTS = {(path, wn, gemm) for path in PATH_IDS.values() for wn in (1, 2, 4) for gemm in (0, 1)}


def _nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc") or (str(Path(home) / "bin" / "nvcc") if home else None)
    if nvcc is None or not Path(nvcc).exists():
        pytest.fail("nvcc not found (PATH, CUDA_HOME): the CUDA sources must be compile-checked in CI; install the "
                    "CUDA toolkit (13.x) or put its bin/ on PATH")
    return nvcc


def _cuobjdump() -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.fail(f"cuobjdump not found at {tool} (it ships in the triton wheel)")
    return str(tool)


def _parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Kernel name -> registers, stack frame, spill stores and loads, from nvcc -Xptxas -v."""
    kernels, name = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            name = m.group(1)
            kernels[name] = {}
        elif name and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                      line)):
            kernels[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            kernels[name]["registers"] = int(m.group(1))
    return kernels


def _parse_sass(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Kernel name -> its instructions as (address, text)."""
    kernels, current = {}, None
    for line in sass.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            current = kernels.setdefault(m.group(1), [])
        elif current is not None and (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)):
            current.append((int(m.group(1), 16), m.group(2)))
    return kernels


def _called_ranges(code: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """[start, end] addresses of the subroutines the kernel CALLs (from the target to its RET)."""
    ranges = []
    for target in {int(m.group(1), 16) for _, text in code if (m := re.search(r"CALL\.\S+\s+(0x[0-9a-f]+)", text))}:
        end = next((a for a, text in code if a >= target and _opcode(text).startswith("RET")), None)
        ranges.append((target, end if end is not None else code[-1][0]))
    return ranges


def _opcode(text: str) -> str:
    words = text.split()
    return words[1] if words[0].startswith("@") else words[0]  # past a predicate (@P0, @!PT)


def _mmas(code: list[tuple[int, str]], opcode: str) -> tuple[int, int]:
    """How many instructions starting with `opcode` the kernel has in its body and in called subroutines."""
    ranges = _called_ranges(code)
    hits = [a for a, text in code if _opcode(text).startswith(opcode)]
    called = sum(any(s <= a <= e for s, e in ranges) for a in hits)
    return len(hits) - called, called


def _conv_kernels(kernels: dict) -> dict[tuple[int, int, int], str]:
    found = {}
    for name in kernels:
        if m := CONV_KERNEL.search(name):
            found[tuple(int(v) for v in m.groups())] = name
    assert set(found) == CONV_VARIANTS, f"expected conv kernel variants {sorted(CONV_VARIANTS)}, found {sorted(found)}"
    return found


def compile_cu(src: Path, arch: str, out: Path, nvcc: str, cuobjdump: str) -> dict:
    """src compiled to a cubin for sm_<arch> in out with the real build's flags: dict(ptxas, sass) as
    _parse_ptxas and _parse_sass read them, or dict(error) with the command and nvcc's log."""
    flags = [f for f in _ext.CUDA_FLAGS if not f.startswith("-gencode")]
    cubin = out / f"{src.stem}.sm_{arch}.cubin"
    cmd = [nvcc, "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}", *flags, "-Xptxas", "-v",
           f"-I{_ext.CSRC}", f"-I{CUDA_DIR}", str(src), "-o", str(cubin)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode != 0:
        return {"error": f"{' '.join(cmd)}\n{log}"}
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return {"ptxas": _parse_ptxas(log), "sass": _parse_sass(sass)}


def compile_all(out: Path, workers: int | None = None) -> dict[tuple[str, str], dict]:
    """(source name, arch) -> compile_cu's result for every .cu file and arch, in parallel."""
    assert SOURCES, f"no .cu sources in {CUDA_DIR}"
    nvcc, cuobjdump = _nvcc(), _cuobjdump()
    jobs = [(src, arch) for src in SOURCES for arch in ARCHS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        results = pool.map(lambda job: compile_cu(*job, out, nvcc, cuobjdump), jobs)
        return {(src.name, arch): res for (src, arch), res in zip(jobs, results)}


@pytest.fixture(scope="session")
def builds(tmp_path_factory):
    """compile_all's result, compiled once per session."""
    return compile_all(tmp_path_factory.mktemp("cubins"))


def test_every_arch_has_an_expected_mma():
    """Every row of the table runs a path this file knows the machine code of: a new path (or a typo in
    archs.h, which _ext's parser would already refuse) fails here rather than going unchecked."""
    assert set(INT4_NATIVE) | set(INT8_ARCHS) == set(ARCHS), _ext.GPU_ARCHS
    assert {a.mma_path for a in _ext.GPU_ARCHS} <= set(PATH_IDS), _ext.GPU_ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_every_source_compiles(builds, arch):
    errors = [res["error"] for (_, a), res in builds.items() if a == arch and "error" in res]
    assert not errors, "\n\n".join(errors)
    for (src, a), res in builds.items():
        if a == arch:
            assert res["sass"], f"{src}: no kernel in the sm_{arch} cubin"
            assert set(res["sass"]) == set(res["ptxas"]), f"{src}: ptxas -v and cuobjdump list different kernels"


@pytest.mark.parametrize("arch", INT4_NATIVE)
def test_native_int4_mma(builds, arch):
    kernels = builds[("int_conv.cu", arch)]["sass"]
    for (path, wn, gemm), name in _conv_kernels(kernels).items():
        code = kernels[name]
        if path == PATH_IDS["s4"]:
            assert _mmas(code, "IMMA.16864") == (MMAS_PER_KTILE, 0), f"sm_{arch} {name}: {_mmas(code, 'IMMA.16864')}"
            assert _mmas(code, "IMMA.16832") == (0, 0), f"sm_{arch} {name}: int8 MMA in the int4 path"
        else:
            # The int8 path is built only for the table's "s8" archs; here the kernel is an empty stub the
            # launcher never runs.
            ops = {_opcode(text) for _, text in code}
            assert ops <= {"MOV", "EXIT", "BRA", "NOP"}, f"sm_{arch} {name}: expected an empty stub, got {ops}"


@pytest.mark.parametrize("arch", INT8_ARCHS)
def test_int8_path_not_emulated(builds, arch):
    kernels = builds[("int_conv.cu", arch)]["sass"]
    for src, a in builds:
        if a == arch:
            for name, code in builds[(src, a)]["sass"].items():
                assert _mmas(code, "IMMA.16864") == (0, 0), f"{src} sm_{arch} {name}: int4 MMA on sm_{arch}"
    conv = _conv_kernels(kernels)
    for (path, wn, gemm), name in conv.items():
        if path != PATH_IDS["s8"]:
            continue
        code = kernels[name]
        assert _mmas(code, "IMMA.16832.S8") == (2 * MMAS_PER_KTILE, 0), f"{name}: {_mmas(code, 'IMMA.16832.S8')}"
        # Positive control: the int4 path of the same tile, built for this arch, is the emulation.
        int4 = conv[(PATH_IDS["s4"], wn, gemm)]
        emulated = kernels[int4]
        body, called = _mmas(emulated, "IMMA.16832")
        assert body == 0 and called >= 1, f"sm_{arch} int4 {int4}: IMMA {body} in body, {called} called"
        calls = (sum(_opcode(text).startswith("CALL") for _, text in emulated)
                 - sum(_opcode(text).startswith("CALL") for _, text in code))
        assert calls == MMAS_PER_KTILE, (f"sm_{arch} int4 kernel: {calls} more CALLs than the int8 one, "
                                         "expected 1 per MMA")


@pytest.mark.parametrize("arch", ARCHS)
def test_no_local_memory(builds, arch):
    for (src, a), res in builds.items():
        if a != arch:
            continue
        for name, info in res["ptxas"].items():
            assert info.get("registers", 0) <= 255, f"{src} sm_{arch} {name}: {info}"
            assert (info["stack"], info["spill_stores"], info["spill_loads"]) == (0, 0, 0), (
                f"{src} sm_{arch} {name}: local memory {info}")
