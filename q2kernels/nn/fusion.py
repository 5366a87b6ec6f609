"""GatedFusion: gated concat (or sum) + LayerNorm over channels at a feature-fusion node
(GABFusion, mode "learned"; Q-GBFusion, mode "balanced"), docs/math.md §5.

Drop-in for a YOLO-style `Concat`: forward takes the list of branch tensors, so it fits an
ultralytics layer list and nn.Sequential alike::

    fuse = GatedFusion([512, 256], mode="balanced")      # P4 node of YOLO11s
    y = fuse([p4_up, p4_lateral])                        # (B, 768, H, W)

The controller. In "balanced" mode the gate logits `theta` are a buffer, moved after every
backward in training mode by the closed loop of docs/math.md §5 (q2kernels/gate_controller.py): the
fused backward computes each branch's gradient energy E_k = sum(dx_k^2) in its single pass, and the
op `q2kernels::gate_controller` (called at the end of that backward, inside the autograd graph)
all-reduces E over the process group, takes the norms G = sqrt(E), updates their EMA Gbar and moves
theta, in place. So no host sync, nothing for the training loop to call, it compiles with
torch.compile (the controller op is opaque to the tracer), and under DDP every rank applies the same
update to the same all-reduced energies: theta stays bitwise equal across ranks (DDP's buffer
broadcast then copies identical values). The state lives in buffers saved with the model: theta,
grad_norm (last G), grad_norm_ema (Gbar), steps, tau, skipped_steps.

A backward whose branch energies are not finite (an inf or NaN gradient, as an AMP overflow gives
before GradScaler skips the optimizer step) is not a controller step: the state keeps its values and
the buffer `skipped_steps` counts it (on the device, no host sync). Read it as
`int(fusion.skipped_steps)` or `gate_log()["skipped_steps"]` (host reads: outside the training
step); a run with many skips has a loss-scale or a data problem. Under DDP the energies are
all-reduced first, so every rank skips the same steps.

Each backward through the module is one controller step: a module called twice in one forward, or
a graph backpropagated twice (retain_graph), steps the controller twice, each time on the energies
of that backward.

"learned" mode trains theta by backprop (an nn.Parameter). The backward still records the
(per-rank) norms and their EMA, without all-reduce or gate steps, so both modes can be plotted.

The log: `gate_log()` returns the last `log_size` steps of [G, Gbar, gates] recorded by the
backward in a ring buffer (not saved with the model), e.g. to plot the gradient balance.

Deployment (LayerNorm removal) lives in q2kernels.deploy: calibrate_fusion fills the buffers mubar
and sigmabar through a forward hook; this module only holds them.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as qF
from .. import reference as ref
from .._validate import check_bool, check_choice, check_int, check_number
from ..constants import GATE_EMA_WEIGHT, GATE_ETA, LAYERNORM_EPS
from ..gate_controller import GateController, register_process_group

MODES = ("learned", "balanced")
MAX_LOG_SIZE = 1_000_000  # gate_log rows: the ring buffer is allocated at construction


def _check_channels(channels) -> list[int]:
    if not isinstance(channels, (list, tuple)):
        raise TypeError(f"channels: expected a list or tuple of channel counts, got {type(channels).__name__}")
    if len(channels) < 2:
        raise ValueError(f"channels: expected at least 2 branches, got {list(channels)}")
    return [check_int(c, f"channels[{k}]", 1) for k, c in enumerate(channels)]


def _check_tau(tau, K: int, device) -> torch.Tensor:
    """tau as a (K,) fp32 tensor of finite values (a NaN or inf would make every gate NaN)."""
    if isinstance(tau, torch.Tensor):
        if tau.is_complex() or tau.dtype == torch.bool:
            raise TypeError(f"tau: expected real numbers, got a {tau.dtype} tensor")
        t = tau.detach().to(device=device, dtype=torch.float32).reshape(-1)
    else:
        if not isinstance(tau, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in tau):
            raise TypeError(f"tau: expected a tensor or a list of {K} numbers, got {tau!r}")
        t = torch.tensor([float(v) for v in tau], device=device, dtype=torch.float32)
    if t.numel() != K:
        raise ValueError(f"tau: expected {K} values, got {t.numel()}")
    if not bool(torch.isfinite(t).all()):  # set by the user, not in the training step: a host read is fine
        raise ValueError(f"tau: expected finite values, got {t.tolist()}")
    return t


class GatedFusion(nn.Module):
    """Gated fusion of K >= 2 branches + LayerNorm over the fused channels at every pixel.

    channels: the branches' channel counts, e.g. [512, 256] (ragged allowed for concat; equal for sum).
    mode: "learned" (GABFusion: gates trained by backprop) or "balanced" (Q-GBFusion: gates moved
        by the gradient-norm controller after each backward, in training mode only).
    fuse: "concat" (output channels sum(channels)) or "sum" (output channels channels[0]).
    affine: learnable per-channel gamma (init 1) and beta (init 0).
    eps: the LayerNorm's epsilon, > 0.
    ema_weight, eta, tau: the controller's EMA weight of the new sample (beta, in (0, 1]), step size
        (> 0) and per-branch target offsets of log Gbar (K finite values, default 0), docs/math.md §5.
    process_group: the group whose ranks' energies are summed (balanced mode); by default the
        default group whenever torch.distributed is initialised. Every rank of that group must run
        the backward of this module at every step (as DDP does).
    log_size: steps kept by gate_log() (0 keeps none, at most MAX_LOG_SIZE).

    channels, mode and fuse fix the module's shapes and are read-only; eps, ema_weight, eta and tau
    may be set later and are checked as in the constructor (and tau on load_state_dict).
    """

    # Entries of its state_dict that a checkpoint written before they existed lacks: load_state_dict
    # does not require them (and sets them to 0).
    optional_state_keys = ("skipped_steps",)

    def __init__(self, channels, mode: str = "learned", fuse: str = "concat", affine: bool = True,
                 eps: float = LAYERNORM_EPS, ema_weight: float = GATE_EMA_WEIGHT,
                 eta: float = GATE_ETA, tau=None, process_group=None, log_size: int = 1000,
                 device=None):
        super().__init__()
        channels = _check_channels(channels)
        K = len(channels)
        check_choice(mode, "mode", MODES)
        check_choice(fuse, "fuse", ref.fusion.FUSE_MODES)
        if fuse == "sum" and len(set(channels)) != 1:
            raise ValueError(f"channels: fuse='sum' needs equal channel counts, got {channels}")
        check_bool(affine, "affine")
        check_int(log_size, "log_size", 0, MAX_LOG_SIZE)
        self._channels, self._mode, self._fuse = channels, mode, fuse
        self.eps, self.ema_weight, self.eta = eps, ema_weight, eta
        self.group = None if process_group is None else register_process_group(process_group)
        f32 = dict(device=device, dtype=torch.float32)

        theta = torch.zeros(K, **f32)
        if mode == "learned":
            self.theta = nn.Parameter(theta)
        else:
            self.register_buffer("theta", theta)
        if affine:
            self.gamma = nn.Parameter(torch.ones(self.out_channels, **f32))
            self.beta = nn.Parameter(torch.zeros(self.out_channels, **f32))
        else:
            self.register_parameter("gamma", None)
            self.register_parameter("beta", None)
        self.register_buffer("tau", torch.zeros(K, **f32) if tau is None else _check_tau(tau, K, device))
        self.register_buffer("grad_norm", torch.zeros(K, **f32))
        self.register_buffer("grad_norm_ema", torch.zeros(K, **f32))
        self.register_buffer("steps", torch.zeros((), device=device, dtype=torch.int64))
        self.register_buffer("skipped_steps", torch.zeros((), device=device, dtype=torch.int64))
        # Filled by q2kernels.deploy.calibrate_fusion: NaN until calibrated.
        self.register_buffer("mubar", torch.full((), float("nan"), **f32))
        self.register_buffer("sigmabar", torch.full((), float("nan"), **f32))
        # Rows [step, G, Gbar, gates]; step -1 marks a row not written in this session.
        history = torch.zeros(log_size, 1 + 3 * K, **f32)
        history[:, 0] = -1.0
        self.register_buffer("history", history, persistent=False)

    # The shape-giving settings are read-only: the buffers were allocated for them.
    @property
    def channels(self) -> list[int]:
        return list(self._channels)

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def fuse(self) -> str:
        return self._fuse

    @property
    def out_channels(self) -> int:
        return sum(self._channels) if self._fuse == "concat" else self._channels[0]

    # The numeric settings may change between steps, checked as in the constructor.
    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value):
        self._eps = check_number(value, "eps", 0.0, lo_allowed=False)

    @property
    def ema_weight(self) -> float:
        return self._ema_weight

    @ema_weight.setter
    def ema_weight(self, value):
        self._ema_weight = check_number(value, "ema_weight", 0.0, lo_allowed=False, hi=1.0)

    @property
    def eta(self) -> float:
        return self._eta

    @eta.setter
    def eta(self, value):
        self._eta = check_number(value, "eta", 0.0, lo_allowed=False)

    def __setattr__(self, name, value):
        if name == "tau" and "tau" in self.__dict__.get("_buffers", {}):
            value = _check_tau(value, len(self._channels), self.theta.device)
        super().__setattr__(name, value)

    def controller(self):
        """The GateController the backward updates, or None (eval mode)."""
        if not self.training:
            return None
        balanced = self.mode == "balanced"
        return GateController(self.grad_norm, self.grad_norm_ema, self.steps, self.history,
                              self.theta if balanced else None, self.tau if balanced else None,
                              self.ema_weight, self.eta, self.group, self.skipped_steps)

    def forward(self, xs):
        xs = list(xs)
        if len(xs) != len(self.channels):
            raise ValueError(f"xs: expected {len(self.channels)} branches, got {len(xs)}")
        for k, (x, c) in enumerate(zip(xs, self.channels)):
            if x.dim() != 4 or x.size(1) != c:
                raise ValueError(f"xs[{k}]: expected (B, {c}, H, W), got shape {tuple(x.shape)}")
        return qF.gated_fusion(xs, self.theta, self.gamma, self.beta, fuse=self.fuse, eps=self.eps,
                              controller=self.controller())

    def gates(self) -> torch.Tensor:
        """a = softmax(theta), detached."""
        return torch.softmax(self.theta.detach().float(), dim=0)

    def gate_log(self) -> dict:
        """The logged steps in order: {"step": (n,) int64, "grad_norm" (G), "grad_norm_ema" (Gbar),
        "gates": (n, K), "skipped_steps": the steps skipped for non-finite energies so far (int)}.
        Reads the buffers on the host (a sync): call it outside the training step."""
        K = len(self._channels)
        h = self.history.detach().cpu()
        h = h[h[:, 0] >= 0]
        h = h[torch.argsort(h[:, 0])]
        return {"step": h[:, 0].long(), "grad_norm": h[:, 1:1 + K], "grad_norm_ema": h[:, 1 + K:1 + 2 * K],
                "gates": h[:, 1 + 2 * K:], "skipped_steps": int(self.skipped_steps)}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        errors = _state_errors(state_dict, prefix, len(self._channels))
        if errors:
            error_msgs.extend(f"GatedFusion {prefix[:-1] or '(root)'!r}: {e}" for e in errors)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # A checkpoint from before these counts existed: it skipped none that it knew of.
        for name in self.optional_state_keys:
            if prefix + name not in state_dict:
                getattr(self, name).zero_()
                if prefix + name in missing_keys:
                    missing_keys.remove(prefix + name)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, mode={self.mode!r}, fuse={self.fuse!r}, "
                f"affine={self.gamma is not None}, eps={self.eps}")


# The state a checkpoint may give the controller: (key, integer dtype?, the check of its values).
# A NaN or inf in any of them (or a negative norm or count) would stay in the gates for good.
_STATE_CHECKS = (
    ("theta", False, lambda t: torch.isfinite(t), "finite values"),
    ("tau", False, lambda t: torch.isfinite(t), "finite values"),
    ("grad_norm", False, lambda t: torch.isfinite(t) & (t >= 0), "finite values >= 0"),
    ("grad_norm_ema", False, lambda t: torch.isfinite(t) & (t >= 0), "finite values >= 0"),
    ("steps", True, lambda t: t >= 0, "a count >= 0"),
    ("skipped_steps", True, lambda t: t >= 0, "a count >= 0"),
)


def _state_errors(state_dict, prefix: str, K: int) -> list[str]:
    """What is wrong with the controller state a state_dict gives (each message names its key)."""
    errors = []
    for name, integral, ok, expected in _STATE_CHECKS:
        t = state_dict.get(prefix + name)
        if t is None:
            continue  # missing: load_state_dict reports it (or, for skipped_steps, fills 0)
        key = prefix + name
        if not isinstance(t, torch.Tensor):
            errors.append(f"{key}: expected a tensor, got {type(t).__name__}")
            continue
        shape = () if integral else (K,)
        if tuple(t.shape) != shape:
            errors.append(f"{key}: expected shape {shape}, got {tuple(t.shape)}")
        elif t.is_complex() or t.dtype == torch.bool or t.is_floating_point() == integral:
            errors.append(f"{key}: expected {'an integer' if integral else 'a floating-point'} tensor, got {t.dtype}")
        elif not bool(ok(t.detach()).all()):
            errors.append(f"{key}: expected {expected}, got {t.detach().cpu().tolist()}")
    return errors


class FusionConv(nn.Module):
    """A GatedFusion and the conv that consumes its output: forward(xs) = conv(fusion(xs)).

    The pairing tells q2kernels.deploy.remove_layernorm where to fold the LayerNorm. `conv` is an
    nn.Conv2d, or a conv block that applies its `.conv` (an nn.Conv2d) to the input first, like
    ultralytics' Conv (conv -> bn -> act). Models whose fusion output reaches its convs another way
    (an ultralytics layer list, a C3 block with two input convs) name them in remove_layernorm's
    `feeds` instead.
    """

    def __init__(self, fusion: nn.Module, conv: nn.Module):
        super().__init__()
        self.fusion, self.conv = fusion, conv

    def forward(self, xs):
        return self.conv(self.fusion(xs))
