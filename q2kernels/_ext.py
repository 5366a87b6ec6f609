"""Builds and loads the C++/CUDA extension `q2kernels._C` (the integer ops, csrc/).

The extension is compiled with ninja on first use (the first integer op, or `q2k build` ahead of
time) by torch.utils.cpp_extension.load and cached in its build directory (TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions/<python>_<accelerator>/): later processes reuse the library as long
as the sources and flags are unchanged. Importing q2kernels compiles nothing. Nothing is ever
downloaded. The sources ship inside the package (q2kernels/_csrc in a wheel or sdist install, copied
there from the checkout's csrc/ by setup.py), so every kind of install builds the same way.
The CUDA sources (csrc/cuda/*.cu) are compiled where torch sees a GPU and a CUDA toolkit
(cuda_home()), or wherever Q2K_BUILD_CUDA=1 forces them (CI builds and registers the CUDA kernels on a
machine without a GPU); otherwise the library holds the CPU kernels alone.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from torch.utils import cpp_extension


def _find_csrc() -> Path:
    """The C++/CUDA sources: inside the installed package, else in the source checkout (editable)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    return here / "_csrc"


CSRC = _find_csrc()

# -ffp-contract=off: the epilogue's floats must be bit-identical to the CUDA kernels' (csrc/epilogue.h),
# so the compiler may not fuse a multiply and an add into an fma where the source does not say so.
# -fopenmp: at::parallel_for is header code that runs in parallel only when compiled with OpenMP,
# which is the backend of Linux builds of torch (elsewhere it calls into torch's own thread pool).
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
_CFLAGS = ["-O3", "-ffp-contract=off", *_OPENMP]
_LDFLAGS = _OPENMP

# Q2K_SANITIZE=1 builds the CPU ops with AddressSanitizer and UBSan instead, under their own name (and
# so their own build directory); UBSan aborts at the first report. A Python host needs the ASan
# runtime preloaded: .ci/steps/sanitize.sh says how.
_SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]

# The CUDA kernels (csrc/cuda/) are built as real machine code for each GPU generation they support,
# the driver picking by compute capability: the int4 MMA must never come from PTX JIT (on sm_90 and
# later it would silently become the compiler's emulation). compute_90 PTX rides along for GPUs newer
# than sm_90, which run the int8-MMA path. --fmad=false: no contraction outside the epilogue's
# explicit __f*_rn operations (tests/test_cuda_compile.py builds with these same flags). --threads:
# the four targets of a .cu file compile in parallel.
CUDA_ARCHS = ("80", "86", "89", "90")
CUDA_FLAGS = ["-O3", "-std=c++17", "--fmad=false", "--threads=4", "-DQ2K_WITH_CUDA"] + [
    f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS[:-1]
] + ["-gencode=arch=compute_90,code=[sm_90,compute_90]"]


def _is_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def _toolkit_of_nvcc(nvcc: Path) -> Path | None:
    """The toolkit an nvcc on PATH belongs to: its real file's bin/.. where that is a toolkit, else the
    toolkit of the absolute .../bin/nvcc path a wrapper script runs (/usr/local/bin/nvcc here is
    `exec /usr/local/cuda-13.0/bin/nvcc "$@"`, for which torch's guess, dirname(dirname(nvcc)), gives
    /usr/local, which has no cuda_runtime.h). The script is read, never run."""
    real = nvcc.resolve()
    if _is_toolkit(real.parent.parent):
        return real.parent.parent
    with open(real, "rb") as f:
        head = f.read(4096)
    if not head.startswith(b"#!"):
        return None
    for target in re.findall(rb"(/[^\s'\";|&]*/bin/nvcc)(?![\w.-])", head):
        home = Path(os.fsdecode(target)).resolve().parent.parent
        if _is_toolkit(home):
            return home
    return None


def cuda_home() -> str | None:
    """The CUDA toolkit to build with: $CUDA_HOME (or $CUDA_PATH) as given; else the toolkit the nvcc on
    PATH really is (through symlinks and wrapper scripts); else /usr/local/cuda; None when none is found."""
    given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if given:
        return given
    nvcc = shutil.which("nvcc")
    home = _toolkit_of_nvcc(Path(nvcc)) if nvcc else None
    if home is None and _is_toolkit(Path("/usr/local/cuda")):
        home = Path("/usr/local/cuda")
    return str(home) if home is not None else None


def cuda_enabled() -> bool:
    """Whether the build includes the CUDA kernels. Q2K_BUILD_CUDA=1 forces them, without a GPU (then a
    CUDA build of torch and a toolkit are required), Q2K_BUILD_CUDA=0 leaves them out; unset, they are
    built where a GPU is visible and a toolkit is found."""
    force = os.environ.get("Q2K_BUILD_CUDA", "")
    if force not in ("", "0", "1"):
        raise ValueError(f"Q2K_BUILD_CUDA: expected 0 or 1 (or unset), got {force!r}")
    if force == "0":
        return False
    if force == "1":
        if torch.version.cuda is None:
            raise RuntimeError(f"Q2K_BUILD_CUDA=1: torch {torch.__version__} is built without CUDA, so it cannot "
                               "load CUDA kernels; install a CUDA build of torch")
        if cuda_home() is None:
            raise RuntimeError("Q2K_BUILD_CUDA=1: no CUDA toolkit found (set CUDA_HOME, put nvcc on PATH, or "
                               "install one at /usr/local/cuda)")
        return True
    return torch.cuda.is_available() and torch.version.cuda is not None and cuda_home() is not None


def registered_kernels() -> dict[str, set[str]]:
    """Every op of torch.ops.q2kernels_int -> the dispatch keys (of CPU, CUDA, Meta) with a kernel for it,
    read from torch's dispatcher: needs no GPU, only the loaded library."""
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("q2kernels_int::"))
    return {op: {key for key in ("CPU", "CUDA", "Meta") if torch._C._dispatch_has_kernel_for_dispatch_key(op, key)}
            for op in ops}


def sources(with_cuda: bool) -> list[str]:
    cpp = sorted(CSRC.glob("*.cpp"))
    if not cpp:
        raise RuntimeError(f"q2kernels._C: no C++ sources in {CSRC}: this installation of q2kernels is "
                           "incomplete (reinstall it; a wheel carries them in q2kernels/_csrc)")
    cu = sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp")) if with_cuda else []
    return [str(p) for p in cpp + cu]


@functools.lru_cache(maxsize=None)
def load():
    """The extension module (compiled on the first call in a process, from the cache afterwards).
    Loading it registers the ops torch.ops.q2kernels_int.*; the module holds the format constants.
    Callers use q2kernels.ops.int_conv.load(), which also registers the ops' fake implementations."""
    sanitize = os.environ.get("Q2K_SANITIZE") == "1"
    with_cuda = cuda_enabled() and not sanitize
    flags = _CFLAGS + (["-DQ2K_WITH_CUDA"] if with_cuda else []) + (_SANITIZE if sanitize else [])
    if with_cuda:
        # torch's builder reads its module-level CUDA_HOME (its own guess, made at import) for nvcc and
        # the CUDA include/library paths.
        cpp_extension.CUDA_HOME = cuda_home()
    return cpp_extension.load(
        name=("q2kernels_C_cuda" if with_cuda else "q2kernels_C") + ("_sanitize" if sanitize else ""),
        sources=sources(with_cuda),
        extra_cflags=flags,
        extra_cuda_cflags=CUDA_FLAGS,
        extra_ldflags=_LDFLAGS + (_SANITIZE if sanitize else []),
        extra_include_paths=[str(CSRC)],
        with_cuda=with_cuda,
        verbose=False,
    )
