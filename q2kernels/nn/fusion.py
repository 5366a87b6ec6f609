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
grad_norm (last G), grad_norm_ema (Gbar), steps, tau.

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
from ..constants import GATE_EMA_WEIGHT, GATE_ETA, LAYERNORM_EPS
from ..gate_controller import GateController, register_process_group

MODES = ("learned", "balanced")


class GatedFusion(nn.Module):
    """Gated fusion of K >= 2 branches + LayerNorm over the fused channels at every pixel.

    channels: the branches' channel counts, e.g. [512, 256] (ragged allowed for concat; equal for sum).
    mode: "learned" (GABFusion: gates trained by backprop) or "balanced" (Q-GBFusion: gates moved
        by the gradient-norm controller after each backward, in training mode only).
    fuse: "concat" (output channels sum(channels)) or "sum" (output channels channels[0]).
    affine: learnable per-channel gamma (init 1) and beta (init 0).
    ema_weight, eta, tau: the controller's EMA weight of the new sample (beta), step size and
        per-branch target offsets of log Gbar (default 0), docs/math.md §5.
    process_group: the group whose ranks' energies are summed (balanced mode); by default the
        default group whenever torch.distributed is initialised. Every rank of that group must run
        the backward of this module at every step (as DDP does).
    log_size: steps kept by gate_log() (0 keeps none).
    """

    def __init__(self, channels, mode: str = "learned", fuse: str = "concat", affine: bool = True,
                 eps: float = LAYERNORM_EPS, ema_weight: float = GATE_EMA_WEIGHT,
                 eta: float = GATE_ETA, tau=None, process_group=None, log_size: int = 1000,
                 device=None):
        super().__init__()
        channels = [int(c) for c in channels]
        K = len(channels)
        if K < 2 or min(channels) < 1:
            raise ValueError(f"channels: expected at least 2 positive channel counts, got {channels}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if fuse not in ref.fusion.FUSE_MODES:
            raise ValueError(f"fuse: expected one of {ref.fusion.FUSE_MODES}, got {fuse!r}")
        if fuse == "sum" and len(set(channels)) != 1:
            raise ValueError(f"channels: fuse='sum' needs equal channel counts, got {channels}")
        if not 0.0 < ema_weight <= 1.0:
            raise ValueError(f"ema_weight: expected a number in (0, 1], got {ema_weight!r}")
        if isinstance(log_size, bool) or not isinstance(log_size, int) or log_size < 0:
            raise ValueError(f"log_size: expected a non-negative integer, got {log_size!r}")
        self.channels, self.mode, self.fuse = channels, mode, fuse
        self.eps, self.ema_weight, self.eta = float(eps), float(ema_weight), float(eta)
        self.group = None if process_group is None else register_process_group(process_group)
        self.out_channels = sum(channels) if fuse == "concat" else channels[0]
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
        tau = torch.zeros(K, **f32) if tau is None else torch.as_tensor(tau, **f32).reshape(-1)
        if tau.numel() != K:
            raise ValueError(f"tau: expected {K} values, got {tau.numel()}")
        self.register_buffer("tau", tau)
        self.register_buffer("grad_norm", torch.zeros(K, **f32))
        self.register_buffer("grad_norm_ema", torch.zeros(K, **f32))
        self.register_buffer("steps", torch.zeros((), device=device, dtype=torch.int64))
        # Filled by q2kernels.deploy.calibrate_fusion: NaN until calibrated.
        self.register_buffer("mubar", torch.full((), float("nan"), **f32))
        self.register_buffer("sigmabar", torch.full((), float("nan"), **f32))
        # Rows [step, G, Gbar, gates]; step -1 marks a row not written in this session.
        history = torch.zeros(log_size, 1 + 3 * K, **f32)
        history[:, 0] = -1.0
        self.register_buffer("history", history, persistent=False)

    def controller(self):
        """The GateController the backward updates, or None (eval mode)."""
        if not self.training:
            return None
        balanced = self.mode == "balanced"
        return GateController(self.grad_norm, self.grad_norm_ema, self.steps, self.history,
                              self.theta if balanced else None, self.tau if balanced else None,
                              self.ema_weight, self.eta, self.group)

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
        "gates": (n, K)}. Reads the buffer on the host (a sync): call it outside the training step."""
        K = len(self.channels)
        h = self.history.detach().cpu()
        h = h[h[:, 0] >= 0]
        h = h[torch.argsort(h[:, 0])]
        return {"step": h[:, 0].long(), "grad_norm": h[:, 1:1 + K], "grad_norm_ema": h[:, 1 + K:1 + 2 * K],
                "gates": h[:, 1 + 2 * K:]}

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, mode={self.mode!r}, fuse={self.fuse!r}, "
                f"affine={self.gamma is not None}, eps={self.eps}")


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
