"""Scalar kernel arguments as Python ints in the Triton interpreter (TRITON_INTERPRET=1), whatever the
numpy version.

The interpreter hands a kernel's scalar arguments over as 1-element numpy arrays and converts one to a
Python int (a runtime loop bound: `for it in range(iters)` in ops/n2uq.py, `range(0, M, BLOCK_M)` in
ops/ada.py) with int(array). numpy 2.4 refuses int() of an array that is not 0-dimensional ("only
0-dimensional arrays can be converted to Python scalars"), and Triton 3.6's interpreter (the GPU
image's) does not squeeze first, so every such kernel fails there; later Triton squeezes. This
installs the squeezing conversion, the one later Triton has, into the interpreter's per-launch patch
of tl.tensor. Compiled kernels are untouched: the interpreter module only runs kernels as Python.
"""
import numpy as np


def _numpy_converts_1_element_arrays() -> bool:
    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        return False
    return True


def install() -> None:
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "squeezes_index", False) or _numpy_converts_1_element_arrays():
        return

    def patch_tensor_squeezing_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_tensor_squeezing_index.squeezes_index = True
    interpreter._patch_lang_tensor = patch_tensor_squeezing_index
