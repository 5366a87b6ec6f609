"""Which implementation an op runs: the fused Triton kernels or the eager reference.

"auto" (the default) sends CUDA tensors to the fused kernels and everything else to the reference,
which is the CPU backend. `use_backend("triton")` forces the kernels (on CPU tensors that needs
TRITON_INTERPRET=1: that is how the test suite executes every kernel without a GPU);
`use_backend("reference")` forces the eager code everywhere.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading

BACKENDS = ("auto", "triton", "reference")

_state = threading.local()  # .backend: this thread's scoped choice (None or absent: the process-wide one)
_global_backend = "auto"
_global_owner = None  # the use_backend call that set _global_backend last (None: nobody, or undone)


def _check(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend: expected one of {BACKENDS} (a str), got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend requested now ("auto", "triton" or "reference")."""
    return getattr(_state, "backend", None) or _global_backend


@contextlib.contextmanager
def _scoped(name: str):
    """`name` for this thread until the block ends, then whatever this thread had before, also when
    the block raises."""
    previous = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = previous


class use_backend:
    """Force a backend. As a call it sets the process-wide default; as a context manager or a
    decorator it applies to the enclosed block or to each call of the function, in the thread that
    runs it, and then restores what that thread had before (also on an exception)::

        q2kernels.use_backend("reference")          # from now on, in every thread
        with q2kernels.use_backend("triton"):        # inside the block
            ...
        @q2kernels.use_backend("reference")          # inside every call of f
        def f(x): ...

    Blocks and calls nest and re-enter (the same object may be entered again inside itself, or in
    several threads at once). Generator and coroutine functions are refused as decorator targets:
    their bodies run after the call returns, outside the scope a decorator could give them.
    Python cannot tell a call from the start of a `with` or `@`, so the call sets the process-wide
    default at once and entering or decorating undoes it: for that instant other threads see it.
    """

    def __init__(self, name: str):
        self.name = _check(name)
        self._entered = threading.local()  # .scopes: this thread's open `with` blocks of this object
        self._set_global()

    def _set_global(self):
        global _global_backend, _global_owner
        self._previous_global = _global_backend
        _global_backend, _global_owner = self.name, self

    def _withdraw_global(self):
        """Used as a context manager or decorator: the call form's process-wide change was not meant,
        so undo it, unless something has set the process-wide backend since (that setting stays)."""
        global _global_backend, _global_owner
        if _global_owner is self:
            _global_backend, _global_owner = self._previous_global, None

    def __enter__(self):
        self._withdraw_global()
        scope = _scoped(self.name)
        scope.__enter__()
        self._scopes().append(scope)
        return self

    def __exit__(self, *exc):
        scopes = self._scopes()
        if not scopes:
            raise RuntimeError(f"use_backend({self.name!r}): __exit__ without a matching __enter__ in this thread")
        scopes.pop().__exit__(*exc)
        return False

    def _scopes(self) -> list:
        if not hasattr(self._entered, "scopes"):
            self._entered.scopes = []
        return self._entered.scopes

    def __call__(self, func):
        self._withdraw_global()
        if not callable(func):
            raise TypeError(f"use_backend({self.name!r}): decorates a function, got {type(func).__name__}")
        if (inspect.isgeneratorfunction(func) or inspect.iscoroutinefunction(func)
                or inspect.isasyncgenfunction(func)):
            raise TypeError(f"use_backend({self.name!r}): cannot decorate {func.__qualname__}, a generator or "
                            "coroutine function (its body runs after the call returns); use "
                            "`with use_backend(...):` inside it instead")

        @functools.wraps(func)
        def with_backend(*args, **kwargs):
            with _scoped(self.name):
                return func(*args, **kwargs)

        return with_backend


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(x) -> str:
    """The backend that runs for tensor `x` (a torch.Tensor: this module imports no torch, so that `q2k`
    answers a bad flag without the seconds torch takes to import): "triton" or "reference"."""
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
