"""N2UQ quantizer modules (docs/math.md §4): the learnable-threshold activation quantizer and the N2UQ
weight quantizer, on the Quantizer base of quantizers.py, with their answers to the deployment
protocol (protocol.py) and the "n2uq" quantize_model recipe."""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as qF
from .. import reference as ref
from .protocol import IntActivation, IntWeight, Recipe, register_recipe
from .quantizers import Quantizer


class N2UQQuantizer(Quantizer):
    """N2UQ's learnable-threshold activation quantizer (LTQ). Parameters (fp32, per tensor), at
    docs/math.md's initial values: `start` 0, the 2^bits - 1 intervals `a` 2/(2^bits - 1) each, the input
    scale `alpha1` 1 and the output scale `alpha2` 1. They start from constants, not from data; the
    outputs are the uniform levels k*(2/(2^bits - 1))*alpha2, k = 0..2^bits - 1."""

    def __init__(self, bits: int = 4):
        super().__init__(bits)
        start, a, alpha1, alpha2 = ref.ltq_init(bits)
        self.start = nn.Parameter(start)
        self.a = nn.Parameter(a)
        self.alpha1 = nn.Parameter(alpha1)
        self.alpha2 = nn.Parameter(alpha2)

    def quantize(self, x):
        return qF.n2uq_act_quantize(x, self.start, self.a, self.alpha1, self.alpha2, self.bits)

    def step_size(self):
        """The output step I*|alpha2| (the thresholds on the input side are not uniform)."""
        return (ref.n2uq.ltq_interval(self.bits) * self.alpha2.detach()).abs()

    def int_activation(self):
        """k = #{i : alpha1*x > t_i} (the thresholds as the reference's fp32 running sums), y = k*I*alpha2."""
        _, thresholds, _ = ref.n2uq.ltq_tables(self.start.detach(), self.a.detach())
        alpha1 = float(self.alpha1.detach().float().reshape(()))
        step = ref.n2uq.ltq_interval(self.bits) * float(self.alpha2.detach().float().reshape(()))
        return IntActivation(0, 2**self.bits - 1, q_mul=alpha1, q_off=0.0, step=step, offset=0.0,
                             thresholds=thresholds.float().contiguous(), monotone=alpha1 > 0)

    def dequantize(self, codes):
        """(k*I)*alpha2 in fp32, the forward's two roundings (the integer form's step is the exact product)."""
        return (codes.to(torch.float32) * ref.n2uq.ltq_interval(self.bits)) * self.alpha2.detach().float().reshape(())


class N2UQWeightQuantizer(Quantizer):
    """N2UQ weights: per output channel (dim 0) scale sf = mean|W|*(2^bits-1)/2^(bits-1), computed
    from the weights at every call (not learned), 2^bits symmetric levels with no zero in [-sf, sf],
    and the straight-through gradient dW = g/sf. No learnable parameters. Integer form: wq =
    (sf/n)*(2k - n) with k in [0, n], n = 2^bits - 1."""

    def quantize(self, w):
        return qF.n2uq_weight_quantize(w, self.bits)

    def int_weight(self, w, wq):
        n = 2**self.bits - 1
        sf = ref.n2uq_weight_scale(w, self.bits).double()
        k = torch.round((wq / sf.view(-1, *[1] * (w.dim() - 1)) + 1.0) * (n / 2.0))
        return IntWeight(k, 0, n, w_mul=2, w_add=-n, step=sf / n)


register_recipe("n2uq", Recipe(weight=lambda layer, bits: N2UQWeightQuantizer(bits),
                               act=lambda layer, bits: N2UQQuantizer(bits)))
