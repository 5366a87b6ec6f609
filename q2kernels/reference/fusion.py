"""Eager reference of gated fusion + LayerNorm and its closed-loop gate controller (MATH.md section 5).

GABFusion / Q-GBFusion: K >= 2 branches x_k (B, C_k, H, W) are scaled by gates a = softmax(theta),
concatenated along channels (or summed, when every C_k is equal), and normalised over the channels
of every pixel by a LayerNorm with optional affine (gamma, beta). The backward is the closed form of
MATH.md 5 in plain fp32 PyTorch, and it also returns each branch's gradient energy
E_k = sum(dx_k^2) (from the fp32 dx_k, before any cast to the branch's dtype).

The controller (Q-GBFusion) moves the gate logits after each backward from those energies. It runs
inside the backward as the opaque op `q2kernels::gate_controller`, so that both backends, eagerly
and under torch.compile, apply it in place to the module's buffers without tracing the all-reduce.
It is registered here, with the reference, because its implementation *is* the reference math: there
is no kernel, only K-element tensor ops. This module never imports from q2kernels.ops.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._output import output_as

FUSE_MODES = ("concat", "sum")
EPS = 1e-5
MOMENTUM = 0.9      # EMA of the energies: Ebar <- m*Ebar + (1-m)*E
ETA = 0.05          # gate-logit step: theta <- theta - eta*d
LOG_FLOOR = 1e-12   # l_k = log(Ebar_k + 1e-12)


# --------------------------------------------------------------------------------------------
# The controller
# --------------------------------------------------------------------------------------------

class GateController(NamedTuple):
    """Where the backward of a gated fusion records the branch energies and, when `theta` is given,
    moves the gates (MATH.md 5). All tensors are updated in place by the backward.

    energy:     (K,) fp32, this step's energies E (summed over the ranks of `group` when theta moves).
    energy_ema: (K,) fp32, Ebar.
    steps:      () int64, backward steps recorded so far (Ebar <- E on the first).
    history:    (L, 1 + 3K) fp32 ring buffer, row `steps % L` = [step, E, Ebar, gates used in the
                forward]; L = 0 keeps none.
    theta:      (K,) fp32 gate logits the loop moves (balanced mode), or None to record only: then
                the energies are this rank's own, not all-reduced.
    tau:        (K,) fp32 target log-energy offsets, or None for 0.
    group:      name of a process group registered with `register_process_group`, or None for the
                default group when torch.distributed is initialised (no all-reduce otherwise).
    """
    energy: torch.Tensor
    energy_ema: torch.Tensor
    steps: torch.Tensor
    history: torch.Tensor
    theta: Optional[torch.Tensor] = None
    tau: Optional[torch.Tensor] = None
    momentum: float = MOMENTUM
    eta: float = ETA
    group: Optional[str] = None


def controller_update(energy, energy_ema, steps, theta=None, tau=None, momentum=MOMENTUM, eta=ETA):
    """One step of the closed loop on already all-reduced energies, out of place (MATH.md 5):
    Ebar <- E on the first step (steps == 0), else m*Ebar + (1-m)*E; l = log(Ebar + 1e-12);
    d = l - mean(l) - tau; theta <- theta - eta*d; theta <- theta - mean(theta).
    Returns (new Ebar, new theta or None). No host sync: the first step is a torch.where."""
    e = energy.float()
    ema = torch.where(steps == 0, e, energy_ema * momentum + e * (1.0 - momentum))
    if theta is None:
        return ema, None
    lg = torch.log(ema + LOG_FLOOR)
    d = lg - lg.mean()
    if tau is not None:
        d = d - tau
    t = theta - eta * d
    return ema, t - t.mean()


_PROCESS_GROUPS: dict = {}


def register_process_group(group) -> str:
    """Make a process group reachable by name from inside the backward; returns the name."""
    name = group.group_name
    _PROCESS_GROUPS[name] = group
    return name


def _resolve_group(name: Optional[str]):
    import torch.distributed as dist

    if name is not None:
        if name not in _PROCESS_GROUPS:
            raise ValueError(f"group: no process group named {name!r} was registered "
                             "(q2kernels.reference.fusion.register_process_group)")
        return _PROCESS_GROUPS[name]
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


@torch.library.custom_op(
    "q2kernels::gate_controller",
    mutates_args=("energy", "energy_ema", "steps", "history", "theta"))
def gate_controller(energy_in: torch.Tensor, gates: torch.Tensor, energy: torch.Tensor,
                    energy_ema: torch.Tensor, steps: torch.Tensor, history: torch.Tensor,
                    theta: Optional[torch.Tensor], tau: Optional[torch.Tensor], momentum: float,
                    eta: float, group: Optional[str]) -> None:
    """Record this backward's energies `energy_in` and, when `theta` is given, move it (see
    GateController for the arguments). The all-reduce is the only communication: every rank then
    runs the same fp32 ops on the same values, so theta stays bitwise equal across ranks."""
    e = energy_in.detach().float().clone()
    pg = _resolve_group(group) if theta is not None else None
    if pg is not None:
        import torch.distributed as dist

        dist.all_reduce(e, op=dist.ReduceOp.SUM, group=pg)
    ema, new_theta = controller_update(e, energy_ema, steps, theta, tau, momentum, eta)
    energy.copy_(e)
    energy_ema.copy_(ema)
    if new_theta is not None:
        theta.copy_(new_theta)
    if history.size(0) > 0:
        row = torch.cat([steps.reshape(1).float(), e, ema, gates.detach().float()]).unsqueeze(0)
        history.index_copy_(0, (steps % history.size(0)).reshape(1), row.to(history.dtype))
    steps.add_(1)


@gate_controller.register_fake
def _(energy_in, gates, energy, energy_ema, steps, history, theta, tau, momentum, eta, group):
    return None


def run_controller(controller: Optional[GateController], energies: torch.Tensor, gates: torch.Tensor):
    """Called by both backends' backward with the energies they computed."""
    if controller is None:
        return
    c = controller
    torch.ops.q2kernels.gate_controller(energies, gates, c.energy, c.energy_ema, c.steps, c.history,
                                        c.theta, c.tau, float(c.momentum), float(c.eta), c.group)


# --------------------------------------------------------------------------------------------
# The fused op
# --------------------------------------------------------------------------------------------

def _fuse(xs, gates, concat: bool) -> torch.Tensor:
    """h = concat_k(a_k*x_k) or sum_k a_k*x_k in fp32 (summed left to right)."""
    hs = [gates[k] * x.float() for k, x in enumerate(xs)]
    if concat:
        return torch.cat(hs, dim=1)
    h = hs[0]
    for t in hs[1:]:
        h = h + t
    return h


def _channel(p: torch.Tensor) -> torch.Tensor:
    return p.float().reshape(1, -1, 1, 1)


def _stats(h: torch.Tensor, eps: float):
    """Per-pixel mean and 1/sqrt(var + eps) over channels (biased variance), shapes (B, 1, H, W)."""
    mu = h.mean(dim=1, keepdim=True)
    d = h - mu
    var = (d * d).mean(dim=1, keepdim=True)
    # 1/sqrt, both correctly rounded (torch.rsqrt may be approximate).
    return mu, 1.0 / torch.sqrt(var + eps)


class _GatedFusion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates, gamma, beta, concat, eps, controller, *xs):
        h = _fuse(xs, gates, concat)
        mu, rstd = _stats(h, eps)
        y = (h - mu) * rstd
        if gamma is not None:
            y = y * _channel(gamma)
        if beta is not None:
            y = y + _channel(beta)
        ctx.save_for_backward(gates, gamma, mu, rstd, *xs)
        ctx.concat, ctx.has_beta, ctx.controller = concat, beta is not None, controller
        return output_as(y, xs[0])

    @staticmethod
    def backward(ctx, dy):
        gates, gamma, mu, rstd, *xs = ctx.saved_tensors
        h = _fuse(xs, gates, ctx.concat)
        xhat = (h - mu) * rstd
        dyf = dy.float()
        g = dyf * _channel(gamma) if gamma is not None else dyf
        c1 = (g * xhat).mean(dim=1, keepdim=True)
        c2 = g.mean(dim=1, keepdim=True)
        dh = rstd * (g - c2 - xhat * c1)
        if ctx.concat:
            dhs = torch.split(dh, [x.size(1) for x in xs], dim=1)
        else:
            dhs = [dh] * len(xs)
        dxs = [gates[k] * dhs[k] for k in range(len(xs))]
        da = torch.stack([(dhs[k] * x.float()).sum() for k, x in enumerate(xs)])
        energies = torch.stack([(dx * dx).sum() for dx in dxs])
        run_controller(ctx.controller, energies, gates)
        dgamma = (dyf * xhat).sum(dim=(0, 2, 3)) if gamma is not None else None
        dbeta = dyf.sum(dim=(0, 2, 3)) if ctx.has_beta else None
        return (da, dgamma, dbeta, None, None, None) + tuple(dx.to(x.dtype) for dx, x in zip(dxs, xs))


def gated_fusion_gates(xs, gates, gamma=None, beta=None, fuse="concat", eps=EPS, controller=None):
    """Gated fusion + LayerNorm from the gates a themselves (K fp32 values); grad flows to a as
    da_k = sum(dh_k*x_k)."""
    return _GatedFusion.apply(gates, gamma, beta, fuse == "concat", float(eps), controller, *xs)


def gated_fusion(xs, theta, gamma=None, beta=None, fuse="concat", eps=EPS, controller=None):
    """MATH.md 5: a = softmax(theta); h = concat_k(a_k*x_k) (or sum_k a_k*x_k);
    y = (h - mean_c h)/sqrt(var_c h + eps)*gamma + beta at every pixel. dtheta comes from the
    softmax Jacobian, a*(da - sum_j a_j*da_j), by autograd of torch.softmax. `controller`
    (GateController) receives the branch energies after the backward."""
    gates = torch.softmax(theta.float(), dim=0)
    return gated_fusion_gates(xs, gates, gamma, beta, fuse, eps, controller)


def fusion_stats(xs, theta, fuse="concat", eps=EPS):
    """Per-pixel (mu, sqrt(var + eps)) of the fused, gated input, fp32, shapes (B, H, W): what
    deployment calibration averages into mubar and sigmabar."""
    with torch.no_grad():
        h = _fuse(xs, torch.softmax(theta.float(), dim=0), fuse == "concat")
        mu = h.mean(dim=1)
        var = ((h - mu.unsqueeze(1)) ** 2).mean(dim=1)
        return mu, torch.sqrt(var + eps)
