"""Which implementation an op runs: the fused Triton kernels or the eager reference.

"auto" (the default) sends CUDA tensors to the fused kernels and everything else to the reference,
which is the CPU backend. `use_backend("triton")` forces the kernels (on CPU tensors that needs
TRITON_INTERPRET=1: that is how the test suite executes every kernel without a GPU);
`use_backend("reference")` forces the eager code everywhere.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

BACKENDS = ("auto", "triton", "reference")

_state = threading.local()
_global_backend = "auto"


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend requested now ("auto", "triton" or "reference")."""
    return getattr(_state, "backend", None) or _global_backend


class use_backend(contextlib.ContextDecorator):
    """Force a backend. As a call it sets the process-wide default; as a context manager it
    applies to the enclosed block (and this thread) only::

        q2kernels.use_backend("reference")          # from now on
        with q2kernels.use_backend("triton"):        # inside the block
            ...
    """

    def __init__(self, name: str):
        global _global_backend
        self.name = _check(name)
        self._previous_global = _global_backend
        _global_backend = self.name
        self._previous_local = None

    def __enter__(self):
        global _global_backend
        # Entered as a context manager: undo the global change made by __init__ and scope it.
        _global_backend = self._previous_global
        self._previous_local = getattr(_state, "backend", None)
        _state.backend = self.name
        return self

    def __exit__(self, *exc):
        _state.backend = self._previous_local
        return False


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(x: torch.Tensor) -> str:
    """The backend that runs for tensor `x`: "triton" or "reference"."""
    name = get_backend()
    if name == "auto":
        return "triton" if (x.is_cuda and triton_available()) else "reference"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was forced but triton is not installed")
        if not x.is_cuda and not interpreter_enabled():
            raise RuntimeError(
                f"backend 'triton' was forced for a tensor on {x.device}: Triton runs CPU tensors "
                "only under TRITON_INTERPRET=1 (set it before importing triton), or use CUDA tensors")
    return name
