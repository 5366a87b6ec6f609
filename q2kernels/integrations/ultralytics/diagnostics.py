"""The papers' diagnostic on a YOLO detector: at every feature-fusion node, the gradient norm that
reaches each branch during QAT, with and without Q-GBFusion.

`BranchGradients(model)` hooks every fusion node of a DetectionModel's layer list, the plain Concat
of a model trained without gated fusion as well as a GatedFusion, and records G_k = ||dL/dx_k||_2,
the gradient with respect to branch k's input that flows through the node (not what the same
tensor receives from its other consumers), at every backward in training mode. That is the
quantity the Q-GBFusion controller balances (docs/math.md §5), measured the same way whether or not
a controller acts on it, so the two runs can be compared. The norms stay on the device until
`norms()` (one host sync, after training).
"""
from __future__ import annotations

import torch
from torch import nn
from ultralytics.nn.modules import Concat

from ...nn import GatedFusion


class BranchGradients:
    """Records each fusion node's branch gradient norms (module docstring); `remove()` ends it."""

    def __init__(self, model: nn.Module):
        layers = getattr(model, "model", None)
        if not isinstance(layers, nn.Sequential):
            raise TypeError(f"model: expected an Ultralytics DetectionModel, got {type(model).__name__}")
        self.nodes = {f"model.{i}": m for i, m in enumerate(layers) if isinstance(m, (Concat, GatedFusion))}
        self._steps: dict[str, list[torch.Tensor]] = {name: [] for name in self.nodes}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in self.nodes.items()]

    def _hook(self, name: str):
        steps = self._steps[name]

        def hook(module, args):
            xs = list(args[0])
            if not (module.training and torch.is_grad_enabled()) or not all(x.requires_grad for x in xs):
                return None
            # A branch tensor may have other consumers (YOLO reuses a neck output in two places), and a
            # hook on it would see their gradients too: the node gets a view of each branch instead,
            # whose only consumer is the node, so its gradient is the branch's gradient through it.
            views = [x.view_as(x) for x in xs]
            pending: dict[int, torch.Tensor] = {}

            def record(k):
                def grad_hook(g):
                    pending[k] = g.detach().float().norm()
                    if len(pending) == len(views):  # every branch's gradient of this backward has arrived
                        steps.append(torch.stack([pending.pop(j) for j in range(len(views))]))
                return grad_hook

            for k, v in enumerate(views):
                v.register_hook(record(k))
            return (views, *args[1:])
        return hook

    def norms(self) -> dict[str, torch.Tensor]:
        """{node name: (steps, branches) float32 CPU tensor} of the backward passes seen so far."""
        return {name: torch.stack(s).cpu() if s else torch.zeros(0, 0) for name, s in self._steps.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def imbalance(norms: torch.Tensor) -> torch.Tensor:
    """Per step, the largest branch gradient norm over the smallest (1 = balanced)."""
    return norms.max(dim=1).values / norms.min(dim=1).values.clamp_min(1e-30)
