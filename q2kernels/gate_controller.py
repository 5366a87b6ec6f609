"""The Q-GBFusion gate controller (docs/math.md §5): the closed loop that moves the gate logits of a
gated fusion after every backward, from the branches' gradient norms.

The fused backward (both backends) returns each branch's gradient energy E_k = sum(dx_k^2) and
hands it to `GateController.step`, which calls the op `q2kernels::gate_controller`. The op runs in
the backward, inside the autograd graph: opaque to torch.compile (the all-reduce is not traced),
no host sync, and it updates the controller's tensors in place. One step, on K-element fp32 tensors:

    E <- all_reduce_sum(E)                       (balanced mode, when a process group applies)
    G = sqrt(E)                                  (the branch gradient norms ||dL/dx_k||_2)
    Gbar <- G on the first step, else (1 - beta)*Gbar + beta*G
    l = log(Gbar + eps_g);  e = l - mean(l) - tau
    theta <- theta - eta*e;  theta <- theta - mean(theta)

The all-reduce is the only communication: every rank then runs the same fp32 ops on the same
values, so theta stays bitwise equal across the ranks of a data-parallel job.

A step whose energies are not all finite (an inf or NaN backward, as an AMP overflow produces before
GradScaler skips the optimizer step), or whose result would not be finite, is skipped as a whole:
G, Gbar, theta, the log and `steps` keep their values and `skipped` counts it. Otherwise one NaN would
stay in Gbar and theta for good. The choice is a torch.where on the device (no host sync); after the
all-reduce every rank sees the same energies, so all ranks skip together.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .constants import GATE_EMA_WEIGHT, GATE_ETA, GATE_LOG_EPS

_PROCESS_GROUPS: dict = {}


def register_process_group(group) -> str:
    """Make a process group reachable by name from inside the backward; returns the name."""
    name = group.group_name
    _PROCESS_GROUPS[name] = group
    return name


def _resolve_group(name: Optional[str]):
    """The registered group `name`; for None the default group when torch.distributed is
    initialised, else None (a single process: nothing to reduce)."""
    import torch.distributed as dist

    if name is not None:
        if name not in _PROCESS_GROUPS:
            raise ValueError(f"group: no process group named {name!r} was registered "
                             "(q2kernels.gate_controller.register_process_group)")
        return _PROCESS_GROUPS[name]
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def controller_update(grad_norm, grad_norm_ema, steps, theta=None, tau=None,
                      ema_weight=GATE_EMA_WEIGHT, eta=GATE_ETA):
    """One step of the loop on this step's (already all-reduced) norms G, out of place:
    returns (new Gbar, new theta or None). No host sync: the first step is a torch.where."""
    ema = torch.where(steps == 0, grad_norm, (1.0 - ema_weight) * grad_norm_ema + ema_weight * grad_norm)
    if theta is None:
        return ema, None
    lg = torch.log(ema + GATE_LOG_EPS)
    e = lg - lg.mean()
    if tau is not None:
        e = e - tau
    t = theta - eta * e
    return ema, t - t.mean()


def _all_finite(*tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor on the device: every element of every given tensor is finite."""
    ok = torch.ones((), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        if t is not None:
            ok = ok & torch.isfinite(t).all()
    return ok


@torch.library.custom_op(
    "q2kernels::gate_controller",
    mutates_args=("grad_norm", "grad_norm_ema", "steps", "history", "theta", "skipped"))
def gate_controller(energy: torch.Tensor, gates: torch.Tensor, grad_norm: torch.Tensor,
                    grad_norm_ema: torch.Tensor, steps: torch.Tensor, history: torch.Tensor,
                    theta: Optional[torch.Tensor], tau: Optional[torch.Tensor], ema_weight: float,
                    eta: float, group: Optional[str], skipped: Optional[torch.Tensor]) -> None:
    """Record this backward's branch energies `energy` (K) as norms and, when `theta` is given,
    move it, or skip the step when it is not finite (module docstring; GateController documents the
    other arguments; `gates` are those the forward used). `skipped` has no default on purpose: torch
    (2.11) drops a trailing argument equal to its default from the boxed call, and its in-place
    bookkeeping then indexes past the end of the arguments for the mutated `skipped`."""
    e = energy.detach().float().clone()
    pg = _resolve_group(group) if theta is not None else None
    if pg is not None:
        import torch.distributed as dist

        dist.all_reduce(e, op=dist.ReduceOp.SUM, group=pg)
    g = torch.sqrt(e)  # a negative energy (none is) would give NaN here and be skipped too
    ema, new_theta = controller_update(g, grad_norm_ema, steps, theta, tau, ema_weight, eta)
    ok = _all_finite(g, ema, new_theta)
    grad_norm.copy_(torch.where(ok, g, grad_norm))
    grad_norm_ema.copy_(torch.where(ok, ema, grad_norm_ema))
    if new_theta is not None:
        theta.copy_(torch.where(ok, new_theta, theta))
    if history.size(0) > 0:
        index = (steps % history.size(0)).reshape(1)
        row = torch.cat([steps.reshape(1).float(), g, ema, gates.detach().float()]).unsqueeze(0).to(history.dtype)
        history.index_copy_(0, index, torch.where(ok, row, history.index_select(0, index)))
    steps.add_(ok.to(steps.dtype))
    if skipped is not None:
        skipped.add_((~ok).to(skipped.dtype))


@gate_controller.register_fake
def _(energy, gates, grad_norm, grad_norm_ema, steps, history, theta, tau, ema_weight, eta, group, skipped):
    return None


class GateController(NamedTuple):
    """Where the backward of a gated fusion records the branch gradient norms and, when `theta` is
    given, moves the gates. The backward updates every tensor in place.

    grad_norm:     (K,) fp32, the last applied step's G = sqrt(E) (E summed over the ranks of
                   `group` when theta moves).
    grad_norm_ema: (K,) fp32, Gbar.
    steps:         () int64, backward steps applied so far (Gbar <- G on the first); a skipped
                   step (non-finite energies) does not count.
    history:       (L, 1 + 3K) fp32 ring buffer, row `steps % L` = [step, G, Gbar, gates used in
                   the forward]; L = 0 keeps none.
    theta:         (K,) fp32 gate logits the loop moves (balanced mode), or None to record only:
                   then the norms are this rank's own, not all-reduced.
    tau:           (K,) fp32 target offsets of log Gbar, or None for 0.
    ema_weight:    beta, the EMA weight of the new sample.
    eta:           the gate-logit step.
    group:         name of a process group registered with `register_process_group`, or None for
                   the default group when torch.distributed is initialised (no all-reduce otherwise).
    skipped:       () int64, steps skipped because they were not finite, or None to count none.
    """
    grad_norm: torch.Tensor
    grad_norm_ema: torch.Tensor
    steps: torch.Tensor
    history: torch.Tensor
    theta: Optional[torch.Tensor] = None
    tau: Optional[torch.Tensor] = None
    ema_weight: float = GATE_EMA_WEIGHT
    eta: float = GATE_ETA
    group: Optional[str] = None
    skipped: Optional[torch.Tensor] = None  # last: callers that give the others by position still can

    @classmethod
    def from_op_arguments(cls, tensors: list, ema_weight: float, eta: float, group: Optional[str]):
        """The controller that `op_arguments` (or a caller of the fused op, with or without the trailing
        `skipped`) described."""
        fixed, rest = tensors[:6], tensors[6:]
        return cls(*fixed, ema_weight=ema_weight, eta=eta, group=group, skipped=rest[0] if rest else None)

    def tensors(self) -> list[Optional[torch.Tensor]]:
        """The tensors the fused op carries to its backward (`controller` argument), in order."""
        return [self.grad_norm, self.grad_norm_ema, self.steps, self.history, self.theta, self.tau, self.skipped]

    def step(self, energy: torch.Tensor, gates: torch.Tensor) -> None:
        """One controller step on the energies E (K) of a backward that used `gates`."""
        torch.ops.q2kernels.gate_controller(energy, gates, self.grad_norm, self.grad_norm_ema, self.steps,
                                            self.history, self.theta, self.tau, float(self.ema_weight),
                                            float(self.eta), self.group, self.skipped)


def op_arguments(controller: Optional[GateController]) -> tuple[list, float, float, Optional[str]]:
    """(controller tensors, ema_weight, eta, group) as the fused op `q2kernels::gated_fusion` takes
    them; an empty list for no controller."""
    if controller is None:
        return [], GATE_EMA_WEIGHT, GATE_ETA, None
    return controller.tensors(), float(controller.ema_weight), float(controller.eta), controller.group
