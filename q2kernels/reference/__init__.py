"""Eager PyTorch implementations of every op: the oracle of the tests and the CPU backend."""
from .fake_quant import (
    QRANGE_MODES,
    dorefa_weight_fake_quant,
    lsq_fake_quant,
    lsq_grad_scale,
    lsq_init_scale,
    lsq_plus_fake_quant,
    lsq_plus_init,
    pact_fake_quant,
    qrange,
)

__all__ = [
    "QRANGE_MODES",
    "dorefa_weight_fake_quant",
    "lsq_fake_quant",
    "lsq_grad_scale",
    "lsq_init_scale",
    "lsq_plus_fake_quant",
    "lsq_plus_init",
    "pact_fake_quant",
    "qrange",
]
