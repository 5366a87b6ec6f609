"""YOLOv5 (v6.0 layout: 6x6 stem, C3 blocks, SPPF, PAN neck, Detect 1x1 heads) in plain PyTorch.

At width 0.50 and depth 0.33 it is YOLOv5s: its 60 convs and their shapes at 640x640 are exactly
benchmarks/data/yolov5s_convs_640.json (a test checks it). Module names follow the upstream
checkpoint ("2.m.0.cv1.conv"), so per-layer results line up with the reference shapes.

`fusion`: what joins two branches at the four neck Concat nodes (12, 16, 19, 22). None is the plain
channel concat; otherwise a callable `fusion(channels: list[int]) -> nn.Module` taking the list of
branch tensors, e.g. `lambda ch: GatedFusion(ch, mode="balanced")` (Q-GBFusion).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class ConvBNAct(nn.Module):
    """conv -> BatchNorm -> SiLU, named conv/bn/act as upstream."""

    def __init__(self, c1, c2, k=1, s=1, p=None, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True):
        super().__init__()
        self.cv1 = ConvBNAct(c1, c2, 1)
        self.cv2 = ConvBNAct(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with three convs: cv3(cat(m(cv1(x)), cv2(x)))."""

    def __init__(self, c1, c2, n=1, shortcut=True):
        super().__init__()
        c_ = c2 // 2
        self.cv1 = ConvBNAct(c1, c_, 1)
        self.cv2 = ConvBNAct(c1, c_, 1)
        self.cv3 = ConvBNAct(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = ConvBNAct(c1, c_, 1)
        self.cv2 = ConvBNAct(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


class Detect(nn.Module):
    """The per-level 1x1 prediction convs (decoding boxes is left to the caller)."""

    def __init__(self, channels, outputs):
        super().__init__()
        self.m = nn.ModuleList(nn.Conv2d(c, outputs, 1) for c in channels)

    def forward(self, xs):
        return [conv(x) for conv, x in zip(self.m, xs)]


class YOLOv5(nn.Module):
    """YOLOv5 at a width and depth multiple; forward returns the Detect outputs of P3, P4, P5.
    `outputs` is the channels of each Detect conv (255 = 3 anchors x (80 classes + 5))."""

    def __init__(self, width=0.50, depth=0.33, outputs=255, in_channels=3, fusion=None):
        super().__init__()

        def ch(c):
            return max(8, int(math.ceil(c * width / 8) * 8))

        def n(k):
            return max(round(k * depth), 1)

        join = fusion or (lambda channels: Concat())
        c64, c128, c256, c512, c1024 = ch(64), ch(128), ch(256), ch(512), ch(1024)
        layers = [
            ConvBNAct(in_channels, c64, 6, 2, 2),          # 0  P1/2
            ConvBNAct(c64, c128, 3, 2),                    # 1  P2/4
            C3(c128, c128, n(3)),                          # 2
            ConvBNAct(c128, c256, 3, 2),                   # 3  P3/8
            C3(c256, c256, n(6)),                          # 4
            ConvBNAct(c256, c512, 3, 2),                   # 5  P4/16
            C3(c512, c512, n(9)),                          # 6
            ConvBNAct(c512, c1024, 3, 2),                  # 7  P5/32
            C3(c1024, c1024, n(3)),                        # 8
            SPPF(c1024, c1024, 5),                         # 9
            ConvBNAct(c1024, c512, 1, 1),                  # 10
            nn.Upsample(None, 2, "nearest"),               # 11
            join([c512, c512]),                            # 12 cat backbone P4
            C3(c1024, c512, n(3), False),                  # 13
            ConvBNAct(c512, c256, 1, 1),                   # 14
            nn.Upsample(None, 2, "nearest"),               # 15
            join([c256, c256]),                            # 16 cat backbone P3
            C3(c512, c256, n(3), False),                   # 17 (P3/8 out)
            ConvBNAct(c256, c256, 3, 2),                   # 18
            join([c256, c256]),                            # 19 cat head P4
            C3(c512, c512, n(3), False),                   # 20 (P4/16 out)
            ConvBNAct(c512, c512, 3, 2),                   # 21
            join([c512, c512]),                            # 22 cat head P5
            C3(c1024, c1024, n(3), False),                 # 23 (P5/32 out)
            Detect([c256, c512, c1024], outputs),          # 24
        ]
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)
        self.fusion_nodes = ("12", "16", "19", "22")
        self.feature_points = ("17", "20", "23")  # P3, P4, P5: where Q-ADA distils

    def forward(self, x):
        m = self._modules
        x4 = m["4"](m["3"](m["2"](m["1"](m["0"](x)))))
        x6 = m["6"](m["5"](x4))
        x10 = m["10"](m["9"](m["8"](m["7"](x6))))
        x14 = m["14"](m["13"](m["12"]([m["11"](x10), x6])))
        p3 = m["17"](m["16"]([m["15"](x14), x4]))
        p4 = m["20"](m["19"]([m["18"](p3), x14]))
        p5 = m["23"](m["22"]([m["21"](p4), x10]))
        return m["24"]([p3, p4, p5])
