"""Eager PyTorch implementations of every op: the oracle of the tests and the CPU backend."""
from .ada import q_ada_loss
from .fusion import fusion_stats, gated_fusion
from .fake_quant import (
    QRANGE_MODES,
    dorefa_weight_fake_quant,
    lsq_fake_quant,
    lsq_grad_scale,
    lsq_init_scale,
    lsq_plus_init,
    pact_fake_quant,
    qrange,
)
from .n2uq import ltq_init, ltq_tables, n2uq_act_fake_quant, n2uq_weight_fake_quant, n2uq_weight_scale

__all__ = [
    "QRANGE_MODES",
    "dorefa_weight_fake_quant",
    "fusion_stats",
    "gated_fusion",
    "lsq_fake_quant",
    "lsq_grad_scale",
    "lsq_init_scale",
    "lsq_plus_init",
    "ltq_init",
    "ltq_tables",
    "n2uq_act_fake_quant",
    "n2uq_weight_fake_quant",
    "n2uq_weight_scale",
    "pact_fake_quant",
    "q_ada_loss",
    "qrange",
]
