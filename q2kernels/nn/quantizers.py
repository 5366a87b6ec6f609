"""Quantizer modules: learnable parameters, first-batch initialisation, the functional op, and each
kind's answers to the deployment protocol (protocol.py).

Initialisation (docs/math.md §1-§3's data inits) is deferred to the first non-degenerate batch: a
batch whose statistics give no usable parameter (all zeros: LSQ s = 0, LSQ+ max = min, PACT max <= 0;
NaN or inf anywhere) leaves the parameters at their constructor values and the quantizer tries again
on the next batch. The parameters are updated with torch.where on the device, and the `initialized`
buffer records success, so a loaded state_dict resumes without re-initialising. The Python mirror
`_initialized` is what forward checks: reading the buffer would sync with the host. The mirror is
refreshed from the device once per forward only while the quantizer is uninitialised (normally the
first step only); from then on forward does no host read. The read is deliberate: with
torch.distributed initialised, the statistics are all-reduced over the default process group (so
every rank starts from the same parameters without user code), and every rank must then make the
same decision about calling the collective again, which a host-side flag read from the
all-reduced result guarantees. Every rank must therefore run the quantizer's first batches (DDP does).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .. import functional as qF
from .. import reference as ref
from .._validate import check_bits
from .protocol import IntActivation, IntWeight, NoIntegerForm, Recipe, register_quantizer, register_recipe

_SETTINGS = "q2kernels.quantizer"  # its key in a module's state_dict metadata


class Quantizer(nn.Module):
    """Base class of every quantizer kind. Subclasses implement `quantize(x)` and, where deployment
    needs them, the protocol's `config`, `state_keys`, `int_activation`, `int_weight`, `dequantize`
    (protocol.py);
    data-initialised kinds implement `initialize(x)`; activation quantizers `step_size()`: the
    quantisation step (a tensor of 1 or C elements) that Q-ADA's distortion term divides by.
    A subclass is registered under `kind` (its class name unless it sets one) when it is defined."""

    kind = "Quantizer"
    state_keys: tuple[str, ...] = ("bits",)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__:
            cls.kind = cls.__name__
        register_quantizer(cls)

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._initialized = False

    def initialize(self, x: torch.Tensor) -> torch.Tensor | None:
        """Set the parameters from a batch, under no_grad, where its statistics are usable (module
        docstring); return a 0-d bool tensor: whether they were. None: this kind has no data init."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._initialized:
            with torch.no_grad():
                usable = self.initialize(x)
                if usable is None:
                    self.initialized.fill_(True)
                else:
                    self.initialized.copy_(usable)
                self._initialized = usable is None or bool(usable)  # only on uninitialised steps
        return self.quantize(x)

    # The protocol (protocol.py).
    def config(self) -> dict:
        """The constructor arguments that rebuild this quantizer."""
        return {"bits": self.bits}

    def int_activation(self) -> IntActivation:
        raise NoIntegerForm(f"({self.kind}) has no integer form as an activation quantizer")

    def int_weight(self, w: torch.Tensor, wq: torch.Tensor) -> IntWeight:
        raise NoIntegerForm(f"({self.kind}) has no integer form as a weight quantizer")

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """The fp32 values the forward outputs for activation codes, rounded as the forward rounds
        them (deploy.verify feeds them to the fake-quant model in place of its own outputs). Here:
        the integer form's levels, fp32 q*step, then + offset (LSQ, LSQ+, PACT compute exactly that)."""
        form = self.int_activation()
        f32 = dict(dtype=torch.float32, device=codes.device)
        return codes.to(torch.float32) * torch.tensor(form.step, **f32) + torch.tensor(form.offset, **f32)

    # The kind and state_keys travel in the state_dict's metadata (state_dict._metadata, which torch.save
    # keeps and weights_only loads), not as a value: trainers (Ultralytics' EMA and checkpoint transfer)
    # take every value of a state_dict for a tensor.
    def settings(self) -> dict:
        """What a state_dict must have been saved with to load into this quantizer."""
        return {"kind": self.kind, **{k: getattr(self, k) for k in self.state_keys}}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata.setdefault(prefix[:-1], {})[_SETTINGS] = self.settings()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved, mine = local_metadata.get(_SETTINGS), self.settings()
        if saved is not None and saved != mine:
            error_msgs.append(f"quantizer {prefix[:-1] or '(root)'!r}: the state_dict holds {_describe(saved)}, "
                              f"the module is {_describe(mine)}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        flag = state_dict.get(prefix + "initialized")
        if flag is not None:
            self._initialized = bool(flag)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _describe(state) -> str:
    if not isinstance(state, dict):
        return f"a malformed quantizer state {state!r}"
    settings = ", ".join(f"{k}={v!r}" for k, v in state.items() if k != "kind")
    return f"a {state.get('kind')}({settings})"


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """t reduced ("SUM" or "MAX") over the default process group when torch.distributed is
    initialised (in place)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, getattr(dist.ReduceOp, op))
    return t


def _channels_arg(axis, channels):
    if (axis is None) != (channels is None):
        raise ValueError(f"axis and channels: give both for a per-channel quantizer or neither, "
                         f"got axis={axis!r}, channels={channels!r}")
    if channels is not None and (not isinstance(channels, int) or channels < 1):
        raise ValueError(f"channels: expected a positive integer, got {channels!r}")
    return 1 if channels is None else channels


def _usable(*values: torch.Tensor) -> torch.Tensor:
    """Per element: every value finite, the first (a step) > 0."""
    ok = values[0] > 0
    for v in values:
        ok = ok & torch.isfinite(v)
    return ok


class LSQQuantizer(Quantizer):
    """LSQ (docs/math.md §1). Per tensor, or per channel along `axis` with `channels` steps (weights:
    axis=0, channels=out_channels). mode: "signed" | "unsigned" | "symmetric".

    Init: s = 2*mean|x|/sqrt(Qp) (per channel: over the channel's elements) from the first batch
    where it is positive and finite for some channel; channels where it is not keep s = 1."""

    state_keys = ("bits", "mode", "axis")

    def __init__(self, bits: int = 4, mode: str = "signed", axis: int | None = None,
                 channels: int | None = None, grad_scale="auto"):
        super().__init__(bits)
        ref.qrange(bits, mode)
        self.mode, self.axis, self.grad_scale = mode, axis, grad_scale
        self.s = nn.Parameter(torch.ones(_channels_arg(axis, channels)))

    def _dims(self, x):
        """The dimensions a statistic reduces over: all (per tensor), all but `axis` (per channel)."""
        if self.axis is None:
            return None
        if not -x.dim() <= self.axis < x.dim() or x.size(self.axis) != self.s.numel():
            raise ValueError(f"x: expected {self.s.numel()} channels along axis {self.axis} (a per-channel "
                             f"quantizer), got shape {tuple(x.shape)}")
        return [d for d in range(x.dim()) if d != self.axis % x.dim()]

    def initialize(self, x):
        a = x.detach().float().abs()
        dims = self._dims(x)
        total = (a.sum() if dims is None else a.sum(dim=dims)).reshape(-1)
        count = a.numel() // total.numel()  # elements per step
        stats = _all_reduce(torch.cat([total, total.new_full((1,), float(count))]), "SUM")
        _, qp = ref.qrange(self.bits, self.mode)
        s = 2.0 * (stats[:-1] / stats[-1]) / qp**0.5
        ok = _usable(s)
        self.s.copy_(torch.where(ok, s, self.s))
        return ok.any()

    def quantize(self, x):
        return qF.lsq_quantize(x, self.s, self.bits, self.mode, self.axis, self.grad_scale)

    def step_size(self):
        return self.s.detach().clamp_min(ref.fake_quant.SCALE_FLOOR)

    def config(self):
        return {"bits": self.bits, "mode": self.mode, "axis": self.axis, "grad_scale": self.grad_scale,
                "channels": None if self.axis is None else self.s.numel()}

    def _offset(self) -> float:
        return 0.0

    def int_activation(self):
        if self.axis is not None:
            raise NoIntegerForm("is per channel: the input step would not factor out of the conv's sum")
        qn, qp = ref.qrange(self.bits, self.mode)
        s = self.s.detach().float().reshape(()).clamp_min(ref.fake_quant.SCALE_FLOOR)
        beta = self._offset()
        return IntActivation(qn, qp, q_mul=float(1.0 / s), q_off=beta, step=float(s), offset=beta)

    def int_weight(self, w, wq):
        if self.axis not in (None, 0):
            raise NoIntegerForm(f"is per channel along axis {self.axis}, not the output channels")
        qn, qp = ref.qrange(self.bits, self.mode)
        step = self.s.detach().float().clamp_min(ref.fake_quant.SCALE_FLOOR).double().expand(w.size(0)).contiguous()
        k = torch.round(wq / step.view(-1, *[1] * (w.dim() - 1)))
        return IntWeight(k, qn, qp, w_mul=1, w_add=0, step=step)

    def extra_repr(self):
        return f"bits={self.bits}, mode={self.mode!r}, axis={self.axis}, channels={self.s.numel()}"


class LSQPlusQuantizer(LSQQuantizer):
    """LSQ+ (docs/math.md §2): LSQ with a learnable offset beta; unsigned grid by default.

    Init: s = (max - min)/(Qp - Qn), beta = min - Qn*s from the first batch where s is positive and
    both are finite for some channel (a constant batch, e.g. all zeros, is skipped); channels where
    they are not keep s = 1, beta = 0."""

    def __init__(self, bits: int = 4, mode: str = "unsigned", axis: int | None = None,
                 channels: int | None = None, grad_scale="auto"):
        super().__init__(bits, mode, axis, channels, grad_scale)
        self.beta = nn.Parameter(torch.zeros(_channels_arg(axis, channels)))

    def initialize(self, x):
        xf, dims = x.detach().float(), self._dims(x)
        if xf.numel() == 0:  # no data: the identities of min and max, so other ranks still reduce
            shape = (self.s.numel(),)
            neg_lo, hi = xf.new_full(shape, -float("inf")), xf.new_full(shape, -float("inf"))
        else:
            neg_lo = -(xf.amin() if dims is None else xf.amin(dim=dims)).reshape(-1)
            hi = (xf.amax() if dims is None else xf.amax(dim=dims)).reshape(-1)
        stats = _all_reduce(torch.cat([neg_lo, hi]), "MAX")
        lo, hi = -stats[:neg_lo.numel()], stats[neg_lo.numel():]
        qn, qp = ref.qrange(self.bits, self.mode)
        s = (hi - lo) / (qp - qn)
        beta = lo - qn * s
        ok = _usable(s, beta)
        self.s.copy_(torch.where(ok, s, self.s))
        self.beta.copy_(torch.where(ok, beta, self.beta))
        return ok.any()

    def quantize(self, x):
        return qF.lsq_plus_quantize(x, self.s, self.beta, self.bits, self.mode, self.axis, self.grad_scale)

    def _offset(self):
        return float(self.beta.detach().float().reshape(()))

    def int_weight(self, w, wq):
        raise NoIntegerForm("has an offset (LSQ+): weights need a symmetric grid")


class PACTQuantizer(Quantizer):
    """PACT (docs/math.md §3): clip to a learnable [0, alpha], 2^bits - 1 steps. alpha starts at
    `alpha_init`, or, when that is None, at the maximum (at least 1e-3) of the first batch whose
    maximum is positive and finite (an all-zero or all-negative batch is skipped)."""

    def __init__(self, bits: int = 4, alpha_init: float | None = None):
        super().__init__(bits)
        if alpha_init is not None and not alpha_init > 0:
            raise ValueError(f"alpha_init: expected a positive number or None, got {alpha_init!r}")
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.full((1,), 1.0 if alpha_init is None else float(alpha_init)))

    def initialize(self, x):
        if self.alpha_init is not None:
            return None
        xf = x.detach().float()
        hi = xf.amax().reshape(1) if xf.numel() else xf.new_full((1,), -float("inf"))
        hi = _all_reduce(hi, "MAX")
        ok = _usable(hi)
        self.alpha.copy_(torch.where(ok, hi.clamp_min(1e-3), self.alpha))
        return ok.all()

    def quantize(self, x):
        return qF.pact_quantize(x, self.alpha, self.bits)

    def step_size(self):
        return self.alpha.detach() / (2**self.bits - 1)

    def config(self):
        return {"bits": self.bits, "alpha_init": self.alpha_init}

    def int_activation(self):
        a = self.alpha.detach().float().reshape(())
        if not a > 0:
            raise NoIntegerForm(f"has clip alpha {float(a)} <= 0: every input maps to one level")
        n = float(2**self.bits - 1)
        # The reference's fp32 values: q = R(clip(x, 0, a) * (n/a)), y = q * (a/n).
        return IntActivation(0, int(n), q_mul=float(a.new_full((), n) / a), q_off=0.0, step=float(a / n), offset=0.0)


class DoReFaWeightQuantizer(Quantizer):
    """DoReFa weights (docs/math.md §3), paired with PACT activations. No learnable parameters; the
    output lies in [-1, 1] (DoReFa's convention), so the conv's scale is absorbed by BatchNorm.
    Integer form: wq = (2q - n)/n with q in [0, n], n = 2^bits - 1."""

    def quantize(self, w):
        return qF.dorefa_weight_quantize(w, self.bits)

    def int_weight(self, w, wq):
        n = 2**self.bits - 1
        k = torch.round((wq + 1.0) * (n / 2.0))
        return IntWeight(k, 0, n, w_mul=2, w_add=-n,
                         step=torch.full((w.size(0),), 1.0 / n, dtype=torch.float64, device=w.device))


def _out_channels(layer):
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def _lsq_weight(layer, bits):
    return LSQQuantizer(bits, "signed", axis=0, channels=_out_channels(layer))


register_recipe("lsq", Recipe(weight=_lsq_weight, act=lambda layer, bits: LSQQuantizer(bits, "signed")))
register_recipe("lsq_plus", Recipe(weight=_lsq_weight, act=lambda layer, bits: LSQPlusQuantizer(bits, "unsigned")))
register_recipe("pact", Recipe(weight=lambda layer, bits: DoReFaWeightQuantizer(bits),
                               act=lambda layer, bits: PACTQuantizer(bits)))
