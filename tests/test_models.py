"""The YOLOv5 definition at width 0.50 / depth 0.33 is YOLOv5s: every conv's name, kernel, stride,
padding and input/output shape at 640x640 equal the recorded layer list."""
import json
from pathlib import Path

import torch
from torch import nn

from q2kernels.models import YOLOv5

DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data"


def test_yolov5s_conv_list_matches_the_reference_shapes():
    with torch.device("meta"):
        model = YOLOv5()
        x = torch.empty(1, 3, 640, 640)
    seen = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0].shape, o.shape)))
    model(x)
    convs = json.loads((DATA / "yolov5s_convs_640.json").read_text())["convs"]
    assert list(seen) == [c["name"] for c in convs]
    for c in convs:
        conv = model.get_submodule(c["name"])
        assert (conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.groups) == (c["k"], c["stride"], c["pad"], c["groups"])
        assert tuple(seen[c["name"]][0]) == (1, c["cin"], c["h_in"], c["w_in"])
        assert tuple(seen[c["name"]][1]) == (1, c["cout"], c["h_out"], c["w_out"])


def test_fusion_factory_replaces_the_neck_concats():
    made = []

    class Recording(nn.Module):
        def __init__(self, channels):
            super().__init__()
            made.append(list(channels))

        def forward(self, xs):
            return torch.cat(xs, 1)

    model = YOLOv5(width=0.25, depth=0.33, outputs=7, fusion=Recording)
    assert made == [[128, 128], [64, 64], [64, 64], [128, 128]]
    outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 7, 8, 8), (1, 7, 4, 4), (1, 7, 2, 2)]
