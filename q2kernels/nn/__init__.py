"""Drop-in modules: quantizers, quantized layers, gated fusion, Q-ADA loss."""
from .ada import QADALoss
from .fusion import FusionConv, GatedFusion
from .modules import QConv2d, QLinear
from .n2uq import N2UQQuantizer, N2UQWeightQuantizer
from .protocol import (QUANTIZER_KINDS, RECIPES, IntActivation, IntWeight, NoIntegerForm, Recipe, quantizer_class,
                       register_recipe)
from .quantize_model import quantize_model
from .quantizers import DoReFaWeightQuantizer, LSQPlusQuantizer, LSQQuantizer, PACTQuantizer, Quantizer

__all__ = [
    "DoReFaWeightQuantizer",
    "FusionConv",
    "GatedFusion",
    "IntActivation",
    "IntWeight",
    "LSQPlusQuantizer",
    "LSQQuantizer",
    "N2UQQuantizer",
    "N2UQWeightQuantizer",
    "NoIntegerForm",
    "PACTQuantizer",
    "QADALoss",
    "QConv2d",
    "QLinear",
    "QUANTIZER_KINDS",
    "Quantizer",
    "RECIPES",
    "Recipe",
    "quantize_model",
    "quantizer_class",
    "register_recipe",
]
