"""Deployment tools: calibration, LayerNorm/BN/gate folding, conversion to integer modules, model
files, and the standalone detector that runs one (deploy.detector)."""
import importlib

# Everything loads on first use: the integer path's first op builds the C++ extension (q2kernels._ext),
# and the training-side tools (calibration, fine-tuning, conversion) import q2kernels.nn and Triton,
# which a program that only loads and runs a saved integer model (load_int_model, load_detector) never needs.
_LAZY = {"FixedFusion": "fixed_fusion", "calibrate_fusion": "fusion", "finetune_without_layernorm": "finetune",
         "fitted_fusion": "fusion_fit",
         "freeze_fusion": "fusion", "layernorm_affine": "fusion", "remove_layernorm": "fusion",
         "IntConv2d": "int_modules", "IntModel": "int_model", "QuantizePack": "int_modules",
         "convert_to_int": "convert", "load_int_model": "serialize", "save_int_model": "serialize",
         "verify_int_model": "verify", "reference_forward": "reference_mode",
         "DetectHead": "detect_head", "load_detector": "detector",
         "export_onnx": "onnx_export", "run_onnx": "onnx_export",
         "DetConv2d": "det_float", "deterministic_float": "det_float", "inexact_float_nodes": "det_float"}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
