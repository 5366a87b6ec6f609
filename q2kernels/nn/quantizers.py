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

import json

import torch
import torch.distributed as dist
from torch import nn

from .. import functional as qF
from .. import reference as ref
from .._validate import check_bits, check_choice, check_int, check_number
from .protocol import IntActivation, IntWeight, NoIntegerForm, Recipe, register_quantizer, register_recipe

_SETTINGS = "q2kernels.quantizer"  # its key in a module's state_dict metadata (older checkpoints)
SETTINGS_KEY = "quantizer_settings"  # its key among the state_dict's tensors
MAX_SETTINGS_BYTES = 4096  # a kind's settings are a few names and numbers


class Quantizer(nn.Module):
    """Base class of every quantizer kind. Subclasses implement `quantize(x)` and, where deployment
    needs them, the protocol's `config`, `state_keys`, `int_activation`, `int_weight`, `dequantize`
    (protocol.py);
    data-initialised kinds implement `initialize(x)`; activation quantizers `step_size()`: the
    quantisation step (a tensor of 1 or C elements) that Q-ADA's distortion term divides by (the
    default, None: no step); a weight quantizer whose outputs carry no scale of the float weights
    sets `scale_free`. A subclass is registered under `kind` (its class name unless it sets one)
    when it is defined."""

    kind = "Quantizer"
    state_keys: tuple[str, ...] = ("bits",)
    # As a weight quantizer: its outputs carry no scale of the float weights (DoReFa's lie in [-1, 1]),
    # which is left to a BatchNorm that follows the conv (protocol.py).
    scale_free: bool = False
    # Entries of its state_dict that a checkpoint written before they existed lacks, and that
    # load_state_dict therefore does not require.
    optional_state_keys: tuple[str, ...] = (SETTINGS_KEY,)

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

    def step_size(self) -> torch.Tensor | None:
        """The step of its output levels (a tensor of 1 or C elements), which Q-ADA's distortion term
        divides by; None: this kind has none (it then supplies no quantized feature to Q-ADA)."""
        return None

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

    # The kind and state_keys travel with the tensors, as the UTF-8 JSON bytes of settings() in a uint8
    # tensor under SETTINGS_KEY: a plain dict copy of a state_dict keeps them, and trainers (Ultralytics'
    # EMA and checkpoint transfer) that take every value for a tensor still can. They also go into the
    # metadata (state_dict._metadata), where checkpoints from before SETTINGS_KEY hold them.
    def settings(self) -> dict:
        """What a state_dict must have been saved with to load into this quantizer."""
        return {"kind": self.kind, **{k: getattr(self, k) for k in self.state_keys}}

    def _settings_json(self) -> str:
        try:
            return json.dumps(self.settings(), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"quantizer kind {self.kind!r}: its state_keys {self.state_keys} must be plain "
                            f"finite numbers, strings, booleans or None ({e})") from None

    def _settings_tensor(self) -> torch.Tensor:
        # On the CPU whatever the default device: settings are not data, and a meta tensor would hold none.
        return torch.tensor(list(self._settings_json().encode("utf-8")), dtype=torch.uint8, device="cpu")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + SETTINGS_KEY] = self._settings_tensor()
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata.setdefault(prefix[:-1], {})[_SETTINGS] = self.settings()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        where = f"quantizer {prefix[:-1] or '(root)'!r}"
        errors = self._settings_errors(state_dict, prefix, local_metadata) or self._state_errors(state_dict, prefix)
        if errors:
            error_msgs.extend(f"{where}: {e}" for e in errors)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + SETTINGS_KEY in unexpected_keys:
            unexpected_keys.remove(prefix + SETTINGS_KEY)
        flag = state_dict.get(prefix + "initialized")
        if flag is not None:
            self._initialized = bool(flag)

    def _settings_errors(self, state_dict, prefix, local_metadata) -> list[str]:
        """The settings the state_dict was saved with, from its tensor and from its metadata, against
        this quantizer's. Either may be absent; a checkpoint without both is from before either
        existed and loads by its tensors alone, as it always did."""
        mine = json.loads(self._settings_json())
        key = prefix + SETTINGS_KEY
        given = []
        if state_dict.get(key) is not None:
            saved, error = _decoded_settings(state_dict[key], key)
            if error:
                return [error]
            given.append((key, saved))
        if _SETTINGS in local_metadata:
            given.append((f"the metadata's {_SETTINGS!r}", local_metadata[_SETTINGS]))
        for source, saved in given:
            plain = _plain_settings(saved)
            if plain is None:
                return [f"{source}: expected a dict of plain settings with a 'kind', got {_describe_value(saved)}"]
            if plain != mine:
                return [f"the state_dict holds {_describe(plain)}, the module is {_describe(self.settings())}"]
        return []

    def _state_errors(self, state_dict, prefix) -> list[str]:
        """Each of this quantizer's own tensors the state_dict gives: a tensor; `initialized` a 0-d
        bool; a floating-point parameter or buffer floating-point and finite (a NaN step or clip
        would make every output NaN). Shapes are load_state_dict's to check, except initialized's,
        which is read here."""
        errors = []
        own = {**self._parameters, **{k: v for k, v in self._buffers.items()
                                      if k not in self._non_persistent_buffers_set}}
        for name, mine in own.items():
            key = prefix + name
            t = state_dict.get(key)
            if t is None or mine is None:
                continue
            if not isinstance(t, torch.Tensor):
                errors.append(f"{key}: expected a tensor, got {type(t).__name__}")
            elif name == "initialized":
                if t.dtype != torch.bool or t.dim() != 0:
                    errors.append(f"{key}: expected a 0-d bool tensor, got a {t.dtype} tensor of shape "
                                  f"{tuple(t.shape)}")
            elif mine.is_floating_point():
                if not t.is_floating_point():
                    errors.append(f"{key}: expected a floating-point tensor, got {t.dtype}")
                elif not bool(torch.isfinite(t.detach()).all()):
                    errors.append(f"{key}: expected finite values, got a NaN or inf")
        return errors

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _describe(state: dict) -> str:
    settings = ", ".join(f"{k}={v!r}" for k, v in state.items() if k != "kind")
    return f"a {state.get('kind')}({settings})"


def _describe_value(v) -> str:
    return f"a {type(v).__name__}" if isinstance(v, torch.Tensor) else repr(v)[:200]


def _plain_settings(saved) -> dict | None:
    """Settings as JSON would give them back (tuples as lists), or None if they are not a str-keyed dict
    of plain values (a tensor among them would make comparing them ambiguous)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("kind"), str):
        return None
    try:
        return json.loads(json.dumps(saved, allow_nan=False))
    except (TypeError, ValueError):
        return None


def _decoded_settings(t, key: str) -> tuple[dict | None, str | None]:
    """(the settings the tensor under SETTINGS_KEY holds, None), or (None, what is wrong with it)."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1 or t.numel() > MAX_SETTINGS_BYTES:
        got = f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        return None, f"{key}: expected a 1-d uint8 tensor of at most {MAX_SETTINGS_BYTES} bytes (JSON), got {got}"
    try:
        return json.loads(bytes(t.detach().cpu().tolist()).decode("utf-8")), None
    except (UnicodeDecodeError, ValueError):
        return None, f"{key}: does not hold the JSON text of a quantizer's settings"


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
    if axis is None:
        return 1
    if isinstance(axis, bool) or not isinstance(axis, int):  # its range is checked against each input
        raise ValueError(f"axis: expected an integer or None, got {axis!r}")
    return check_int(channels, "channels", 1)


def _grad_scale_arg(grad_scale):
    """'auto', None (no scaling) or a positive finite number: LSQ's gradient scale."""
    if grad_scale is None or (isinstance(grad_scale, str) and grad_scale == "auto"):
        return grad_scale
    try:
        return check_number(grad_scale, "grad_scale", 0.0, lo_allowed=False)
    except ValueError:
        raise ValueError(f"grad_scale: expected 'auto', None or a finite number > 0, got {grad_scale!r}") from None


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
        check_choice(mode, "mode", ref.fake_quant.QRANGE_MODES)
        self.mode, self.axis, self.grad_scale = mode, axis, _grad_scale_arg(grad_scale)
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
        s = ref.lsq_init_scale(stats[:-1] / stats[-1], self.bits, self.mode)
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
        s, beta = ref.lsq_plus_init(lo, hi, self.bits, self.mode)
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
        if alpha_init is not None:
            alpha_init = check_number(alpha_init, "alpha_init", 0.0, lo_allowed=False)
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.full((1,), 1.0 if alpha_init is None else alpha_init))

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

    scale_free = True

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
