"""Deployment tools: calibration, LayerNorm/BN/gate folding, conversion to integer modules."""
import importlib

from .finetune import finetune_without_layernorm
from .fusion import FixedFusion, calibrate_fusion, freeze_fusion, layernorm_affine, remove_layernorm

# The integer path loads on first use (its first op builds the C++ extension, q2kernels._ext).
_INTEGER = {"IntConv2d": "int_modules", "IntModel": "convert", "QuantizePack": "int_modules",
            "convert_to_int": "convert", "load_int_model": "serialize", "save_int_model": "serialize",
            "verify_int_model": "verify", "reference_forward": "verify"}

__all__ = [
    "FixedFusion",
    "calibrate_fusion",
    "finetune_without_layernorm",
    "freeze_fusion",
    "layernorm_affine",
    "remove_layernorm",
    *_INTEGER,
]


def __getattr__(name):
    if name in _INTEGER:
        return getattr(importlib.import_module(f".{_INTEGER[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
