"""q2kernels: fused Triton kernels for 4/3-bit QAT and an integer W4A4/W3A3 conv backend.

Importing the package loads nothing but the backend switch; the functional API and the
submodules (functional, nn, reference, deploy) load on first use. That keeps `q2k` able to turn
the Triton interpreter on (a CPU machine) before triton is imported.
"""
import importlib

from ._backend import get_backend, use_backend

__version__ = "0.1.0"

_FUNCTIONAL = (
    "dorefa_weight_quantize",
    "gated_fusion",
    "lsq_plus_quantize",
    "lsq_quantize",
    "n2uq_act_quantize",
    "n2uq_weight_quantize",
    "pact_quantize",
    "q_ada_loss",
)
_SUBMODULES = ("deploy", "functional", "nn", "ops", "reference")

__all__ = ["__version__", "get_backend", "use_backend", *_FUNCTIONAL, *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _FUNCTIONAL:
        return getattr(importlib.import_module(".functional", __name__), name)
    if name == "_C":  # the C++/CUDA extension: compiled on first use, then cached (q2kernels/_ext.py)
        return importlib.import_module(".ops.int_conv", __name__).load()
    raise AttributeError(f"module 'q2kernels' has no attribute {name!r}")
