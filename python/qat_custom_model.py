"""QAT of your own model with q2kernels' public API: quantize_model, GatedFusion and QADALoss.

    python python/qat_custom_model.py [--smoke] [--recipe lsq|lsq_plus|pact|n2uq] [--bits 4]

A two-branch segmentation-style net (think of a UNet skip joined to an upsampled path) is trained
in float, then fine-tuned quantized: its fusion node becomes a Q-GBFusion gated fusion, and the
float model teaches the quantized one through Q-ADA at the fused feature.
"""
import argparse

import torch
from torch import nn

from q2kernels.data import labels_at_stride, make_shapes, mean_iou
from q2kernels.nn import GatedFusion, QADALoss, quantize_model


class TwoBranchNet(nn.Module):
    def __init__(self, fusion: nn.Module | None = None, classes: int = 4):
        super().__init__()
        block = lambda ci, co, s: nn.Sequential(nn.Conv2d(ci, co, 3, s, 1, bias=False),  # noqa: E731
                                                nn.BatchNorm2d(co), nn.SiLU())
        self.stem = block(3, 16, 2)
        self.skip = block(16, 32, 2)                     # stride 4
        self.deep = nn.Sequential(block(32, 64, 2), block(64, 32, 1), nn.Upsample(scale_factor=2))
        self.fuse = fusion or GatedFusion([32, 32], mode="learned")
        self.neck = block(64, 32, 1)
        self.head = nn.Conv2d(32, classes, 1)

    def forward(self, x):
        s = self.skip(self.stem(x))
        return self.head(self.neck(self.fuse([s, self.deep(s)])))


def train(model, data, steps, lr, teacher=None, distill=None):
    x_all, y_all = data
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, x_all.shape[0], (16,), generator=g)
        x, y = x_all[idx], labels_at_stride(y_all[idx], 4)
        if teacher is not None:
            with torch.no_grad():
                teacher(x)
        loss = nn.functional.cross_entropy(model(x), y, weight=torch.tensor([0.25, 1.0, 1.0, 1.0]))
        if distill is not None:
            loss = loss + distill()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


@torch.no_grad()
def miou(model, data):
    model.eval()
    return mean_iou(model(data[0]).argmax(1), labels_at_stride(data[1], 4))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--recipe", default="lsq")
    p.add_argument("--bits", type=int, default=4)
    args = p.parse_args(argv)
    steps = 30 if args.smoke else 300
    torch.manual_seed(0)
    train_data, test_data = make_shapes(256, 32, seed=0), make_shapes(64, 32, seed=1)

    teacher = TwoBranchNet()
    loss = train(teacher, train_data, steps, 3e-3)
    print(f"float: loss {loss:.3f}, mIoU {miou(teacher, test_data):.3f}")

    student = TwoBranchNet(GatedFusion([32, 32], mode="balanced"))
    student.load_state_dict(teacher.state_dict())
    quantize_model(student, args.recipe, args.bits, args.bits)   # first and last conv stay float
    student.train()
    with QADALoss(teacher.eval(), student, points=["fuse"], weight=0.01) as distill:
        loss = train(student, train_data, steps, 1e-3, teacher, distill)
    gates = student.fuse.gates()
    print(f"{args.recipe} W{args.bits}A{args.bits} + Q-GBFusion + Q-ADA: loss {loss:.3f}, "
          f"mIoU {miou(student, test_data):.3f}, gates {gates.tolist()}")
    assert torch.isfinite(torch.tensor(loss)) and torch.allclose(gates.sum(), torch.tensor(1.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
