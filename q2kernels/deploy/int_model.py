"""IntModel: what convert_to_int returns and load_int_model reads back.

It lives apart from deploy.convert, which imports q2kernels.nn, so that loading and running a saved
model (deploy.serialize, deploy.detector) needs no training code.
"""
from __future__ import annotations

from torch import nn

from .detect_head import DetectHead


class IntModel(nn.Module):
    """A converted model: `net` (a torch.fx GraphModule of IntConv2d heads, packed-code ops and float
    ops; loaded from a file, the same graph as an int_graph.IntGraph), `report` ({module name: what
    the conversion did with it, and why}) and `detect_head` (the DetectHead that decodes its outputs,
    which save_int_model writes with it, or None)."""

    def __init__(self, net: nn.Module, report: dict[str, str], detect_head: DetectHead | None = None):
        super().__init__()
        if detect_head is not None and not isinstance(detect_head, DetectHead):
            raise TypeError(f"detect_head: expected a DetectHead or None, got {type(detect_head).__name__}")
        self.net = net
        self.report = dict(report)
        self.detect_head = detect_head

    def forward(self, *args):
        return self.net(*args)
