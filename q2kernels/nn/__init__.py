"""Drop-in modules: quantizers, quantized layers, gated fusion, Q-ADA loss."""
from .ada import QADALoss
from .fusion import FusionConv, GatedFusion
from .modules import QConv2d, QLinear
from .n2uq import N2UQQuantizer, N2UQWeightQuantizer
from .quantize_model import RECIPES, Recipe, quantize_model, register_recipe
from .quantizers import DoReFaWeightQuantizer, LSQPlusQuantizer, LSQQuantizer, PACTQuantizer, Quantizer

__all__ = [
    "DoReFaWeightQuantizer",
    "FusionConv",
    "GatedFusion",
    "LSQPlusQuantizer",
    "LSQQuantizer",
    "N2UQQuantizer",
    "N2UQWeightQuantizer",
    "PACTQuantizer",
    "QADALoss",
    "QConv2d",
    "QLinear",
    "Quantizer",
    "RECIPES",
    "Recipe",
    "quantize_model",
    "register_recipe",
]
