"""deploy.verify_int_model and the reference mode, without Ultralytics.

A tiny YOLOv5 (q2kernels.models) plus a depthwise block, under every recipe: the integer model's
codes equal the reference mode's (plain PyTorch) bit for bit at every layer and its outputs too; the
codes that differ from the teacher-forced fake-quant model are rare rounding flips. The checker can
fail: a shifted epilogue (a folding error) and a flipped code (a kernel error) are both reported,
naming the layer.
"""
import warnings

import pytest
import torch
from torch import nn

from q2kernels.deploy import IntConv2d, convert_to_int, reference_forward, verify_int_model
from q2kernels.deploy.verify import pack_codes, unpack_codes
from q2kernels.models import YOLOv5
from q2kernels.models.yolo import ConvBNAct
from q2kernels.nn import quantize_model
from q2kernels.ops import int_conv as ic

from deployable import settle, spread_activation_quantizers

IMAGE = 32


class _Net(nn.Module):
    """A tiny YOLOv5 whose first output also passes a 1x1 and a depthwise 3x3 conv (as YOLO11's heads do)."""

    def __init__(self, yolo, dw, pw):
        super().__init__()
        self.yolo, self.dw, self.pw = yolo, dw, pw

    def forward(self, x):
        outs = self.yolo(x)
        return (*outs, self.pw(self.dw(outs[0])))


def _qat(recipe, bits, seed=0):
    """Quantizers initialised, BatchNorm statistics re-estimated, activation ranges from data."""
    torch.manual_seed(seed)
    # 64 channels: a depthwise weight packs 1 channel per group, in fewer bytes than 64 would take.
    dw = ConvBNAct(64, 64, 3)
    dw.conv = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
    model = _Net(YOLOv5(width=0.125, depth=0.33, outputs=16), nn.Sequential(ConvBNAct(16, 64, 1), dw),
                 ConvBNAct(64, 8, 1))
    quantize_model(model, recipe, w_bits=bits, a_bits=bits)
    g = torch.Generator().manual_seed(seed)
    batch = lambda: torch.randn(2, 3, IMAGE, IMAGE, generator=g)  # noqa: E731
    settle(model, batch)
    spread_activation_quantizers(model, batch())
    return model, batch()


def _convert(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return convert_to_int(model, x)


@pytest.mark.parametrize("recipe,bits", [("lsq", 4), ("lsq_plus", 4), ("pact", 3), ("n2uq", 4), ("n2uq", 3)])
def test_integer_model_equals_reference_and_flips_are_rounding(recipe, bits):
    model, x = _qat(recipe, bits)
    int_model = _convert(model, x)
    assert any(m.groups == 64 for m in int_model.net.modules() if isinstance(m, IntConv2d))
    result = verify_int_model(model, int_model, x)
    assert len(result.layers) == sum(isinstance(m, IntConv2d) for m in int_model.net.modules())
    assert result.exact and result.ok, result.failures()
    assert result.differing_fraction <= 2e-3
    assert "exact: True" in result.summary()
    out = int_model(x)
    ref_out, ref_codes = reference_forward(int_model, x)
    assert set(ref_codes) == set(result.layers)
    for a, b in zip(out, ref_out):
        assert torch.equal(a, b)


def test_a_folding_error_is_not_a_rounding_flip():
    model, x = _qat("lsq", 4)
    int_model = _convert(model, x)
    victim = next(m for m in int_model.net.modules() if isinstance(m, IntConv2d) and m.source == "yolo.8.cv1.conv")
    # A bias folded wrongly: every value it writes moves by 0.3 steps of the quantizer it writes for.
    victim.epilogues[:, ic.BIAS] += 0.3 / victim.epilogues[:, ic.Q_MUL]
    result = verify_int_model(model, int_model, x)
    assert result.exact  # the kernels still compute what the (wrong) model says
    assert not result.ok
    assert any(f.startswith("yolo.8.m.0.cv1.conv:") and "not a rounding flip" in f for f in result.failures())


def test_a_kernel_error_is_caught_by_the_reference():
    model, x = _qat("pact", 4)
    int_model = _convert(model, x)
    victim = next(m for m in int_model.net.modules() if isinstance(m, IntConv2d) and m.source == "yolo.4.cv1.conv")
    forward = victim.forward

    def wrong(x, head=0, **kw):  # one code of its output changed, as a kernel bug would
        out = forward(x, head, **kw)
        if out.dtype == torch.uint8:
            out.view(-1)[0] ^= 0x01
        return out

    victim.forward = wrong
    result = verify_int_model(model, int_model, x)
    assert not result.exact
    assert any("codes differ from the reference mode" in f for f in result.failures())


def test_pack_unpack_round_trip_matches_the_extension():
    g = torch.Generator().manual_seed(0)
    for c, signed in ((1, True), (33, False), (64, True), (7, False)):
        codes = torch.randint(-8 if signed else 0, 8 if signed else 16, (2, c, 3, 5), generator=g)
        packed = pack_codes(codes)
        assert torch.equal(packed, ic.pack(codes, 4, signed))
        assert torch.equal(unpack_codes(packed, c, signed), codes)
