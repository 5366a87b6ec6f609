"""Builds and loads the C++/CUDA extension `q2kernels._C` (the integer ops, csrc/).

The extension is compiled with ninja on first use by torch.utils.cpp_extension.load and cached in
its build directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions/<python>_<accelerator>/):
later processes reuse the library as long as the sources and flags are unchanged. Nothing is ever
downloaded. The CUDA sources (csrc/cuda/*.cu) are compiled only where torch sees a GPU and a CUDA
toolkit (CUDA_HOME); otherwise the library holds the CPU kernels alone.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
from torch.utils import cpp_extension

CSRC = Path(__file__).resolve().parent.parent / "csrc"

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


def cuda_enabled() -> bool:
    """Whether the build includes the CUDA kernels: a GPU is visible and a CUDA toolkit is found."""
    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def sources(with_cuda: bool) -> list[str]:
    cpp = sorted(CSRC.glob("*.cpp"))
    if not cpp:
        raise RuntimeError(f"q2kernels._C: no C++ sources in {CSRC}; the integer ops need a source checkout "
                           "of q2kernels (pip install -e .)")
    cu = sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp")) if with_cuda else []
    return [str(p) for p in cpp + cu]


@functools.lru_cache(maxsize=None)
def load():
    """The extension module (compiled on the first call in a process, from the cache afterwards).
    Loading it registers the ops torch.ops.q2kernels_int.*; the module holds the format constants."""
    sanitize = os.environ.get("Q2K_SANITIZE") == "1"
    with_cuda = cuda_enabled() and not sanitize
    flags = _CFLAGS + (["-DQ2K_WITH_CUDA"] if with_cuda else []) + (_SANITIZE if sanitize else [])
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
