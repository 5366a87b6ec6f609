"""Quantizer modules: learnable parameters, first-batch initialisation, and the functional op.

Each quantizer initialises its parameters from the first tensor it sees (MATH.md's initialisations)
and records that in the `initialized` buffer, so a loaded state_dict resumes without re-initialising.
The Python mirror `_initialized` is what forward reads: checking the buffer would sync with the host.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as F
from .. import reference as ref
from .._validate import check_bits


class Quantizer(nn.Module):
    """Base class. Subclasses implement `quantize(x)`, optionally `initialize(x)` (run once, under
    no_grad, on the first input), and activation quantizers `step_size()`: the quantisation step
    (a tensor of 1 or C elements) that Q-ADA's distortion term divides by."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._initialized = False

    def initialize(self, x: torch.Tensor) -> None:
        """Set the parameters from the first input (no-op for quantizers without data init)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._initialized:
            with torch.no_grad():
                self.initialize(x)
            self.initialized.fill_(True)
            self._initialized = True
        return self.quantize(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        flag = state_dict.get(prefix + "initialized")
        if flag is not None:
            self._initialized = bool(flag)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _channels_arg(axis, channels):
    if (axis is None) != (channels is None):
        raise ValueError(f"axis and channels: give both for a per-channel quantizer or neither, "
                         f"got axis={axis!r}, channels={channels!r}")
    if channels is not None and (not isinstance(channels, int) or channels < 1):
        raise ValueError(f"channels: expected a positive integer, got {channels!r}")
    return 1 if channels is None else channels


class LSQQuantizer(Quantizer):
    """LSQ (MATH.md 1). Per tensor, or per channel along `axis` with `channels` steps (weights:
    axis=0, channels=out_channels). mode: "signed" | "unsigned" | "symmetric"."""

    def __init__(self, bits: int = 4, mode: str = "signed", axis: int | None = None,
                 channels: int | None = None, grad_scale="auto"):
        super().__init__(bits)
        ref.qrange(bits, mode)
        self.mode, self.axis, self.grad_scale = mode, axis, grad_scale
        self.s = nn.Parameter(torch.ones(_channels_arg(axis, channels)))

    def initialize(self, x):
        self.s.copy_(ref.lsq_init_scale(x, self.bits, self.mode, self.axis))

    def quantize(self, x):
        return F.lsq_quantize(x, self.s, self.bits, self.mode, self.axis, self.grad_scale)

    def step_size(self):
        return self.s.detach().clamp_min(ref.fake_quant.SCALE_FLOOR)

    def extra_repr(self):
        return f"bits={self.bits}, mode={self.mode!r}, axis={self.axis}, channels={self.s.numel()}"


class LSQPlusQuantizer(LSQQuantizer):
    """LSQ+ (MATH.md 2): LSQ with a learnable offset beta; unsigned grid by default."""

    def __init__(self, bits: int = 4, mode: str = "unsigned", axis: int | None = None,
                 channels: int | None = None, grad_scale="auto"):
        super().__init__(bits, mode, axis, channels, grad_scale)
        self.beta = nn.Parameter(torch.zeros(_channels_arg(axis, channels)))

    def initialize(self, x):
        s, beta = ref.lsq_plus_init(x, self.bits, self.mode, self.axis)
        self.s.copy_(s)
        self.beta.copy_(beta)

    def quantize(self, x):
        return F.lsq_plus_quantize(x, self.s, self.beta, self.bits, self.mode, self.axis, self.grad_scale)


class PACTQuantizer(Quantizer):
    """PACT (MATH.md 3): clip to a learnable [0, alpha], 2^bits - 1 steps. alpha starts at
    `alpha_init`, or, when that is None, at the first batch's maximum (at least 1e-3)."""

    def __init__(self, bits: int = 4, alpha_init: float | None = None):
        super().__init__(bits)
        if alpha_init is not None and not alpha_init > 0:
            raise ValueError(f"alpha_init: expected a positive number or None, got {alpha_init!r}")
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.full((1,), 1.0 if alpha_init is None else float(alpha_init)))

    def initialize(self, x):
        if self.alpha_init is None:
            self.alpha.copy_(x.detach().float().amax().clamp_min(1e-3).reshape(1))

    def quantize(self, x):
        return F.pact_quantize(x, self.alpha, self.bits)

    def step_size(self):
        return self.alpha.detach() / (2**self.bits - 1)


class DoReFaWeightQuantizer(Quantizer):
    """DoReFa weights (MATH.md 3), paired with PACT activations. No learnable parameters; the
    output lies in [-1, 1] (DoReFa's convention), so the conv's scale is absorbed by BatchNorm."""

    def quantize(self, w):
        return F.dorefa_weight_quantize(w, self.bits)
