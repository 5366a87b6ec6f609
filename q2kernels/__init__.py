"""q2kernels: fused Triton kernels for 4/3-bit QAT and an integer W4A4/W3A3 conv backend."""
from ._backend import get_backend, use_backend
from .functional import dorefa_weight_quantize, lsq_plus_quantize, lsq_quantize, pact_quantize

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "dorefa_weight_quantize",
    "get_backend",
    "lsq_plus_quantize",
    "lsq_quantize",
    "pact_quantize",
    "use_backend",
]
