"""Drop-in modules: quantizers, quantized layers, gated fusion, Q-ADA loss."""
from .modules import QConv2d, QLinear
from .quantize_model import RECIPES, Recipe, quantize_model, register_recipe
from .quantizers import DoReFaWeightQuantizer, LSQPlusQuantizer, LSQQuantizer, PACTQuantizer, Quantizer

__all__ = [
    "DoReFaWeightQuantizer",
    "LSQPlusQuantizer",
    "LSQQuantizer",
    "PACTQuantizer",
    "QConv2d",
    "QLinear",
    "Quantizer",
    "RECIPES",
    "Recipe",
    "quantize_model",
    "register_recipe",
]
