"""deploy.verify_int_model and the reference mode, without Ultralytics.

A tiny YOLOv5 (q2kernels.models) plus a depthwise block, under every recipe: the integer model's
codes equal the reference mode's (plain PyTorch) bit for bit at every layer and its outputs too; the
codes that differ from the teacher-forced fake-quant model are rare rounding flips. The checker can
fail: a shifted epilogue (a folding error), a scale 2% off and a flipped code (a kernel error) are
reported, naming the layer. A flip planted at a decision boundary is certified, within a bound far
below a code unit; dead layers and the outputs' difference are reported.
"""
import math
import warnings

import pytest
import torch
from torch import nn

from q2kernels.deploy import IntConv2d, convert_to_int, reference_forward, verify_int_model
from q2kernels.deploy.reference_mode import pack_codes, unpack_codes
from q2kernels.models import YOLOv5
from q2kernels.models.yolo import ConvBNAct
from q2kernels.nn import LSQQuantizer, QConv2d, quantize_model
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
    assert any(f.startswith("yolo.8.m.0.cv1.conv:") and "beyond rounding" in f for f in result.failures())


def test_a_wrong_scale_is_named_with_distance_and_bound():
    model, x = _qat("lsq", 4)
    int_model = _convert(model, x)
    victim = next(m for m in int_model.net.modules() if isinstance(m, IntConv2d) and m.source == "yolo.8.cv1.conv")
    victim.epilogues[:, ic.ALPHA] *= 1.02  # a scale 2% off: codes move where v is within 2% of a boundary
    result = verify_int_model(model, int_model, x)
    assert result.exact and not result.ok
    check = result.layers["yolo.8.m.0.cv1.conv"]
    d, b = check.worst
    assert check.beyond_bound > 0 and 0 < b < d and check.max_ratio == d / b
    assert any(f.startswith("yolo.8.m.0.cv1.conv:") and f"at {d:.3g} code units" in f and f"at most {b:.3g}" in f
               for f in result.failures())


def test_convert_to_int_checks_its_example_input(monkeypatch):
    """A folding error inside the converter (every epilogue's scale 2% off) is caught on the example
    input: a warning naming the layers with both numbers, or with strict=True an error."""
    model, x = _qat("lsq", 4)
    epilogue_params = ic.epilogue_params

    def wrong(cout, alpha, *args, **kwargs):
        return epilogue_params(cout, alpha * 1.02, *args, **kwargs)

    monkeypatch.setattr(ic, "epilogue_params", wrong)
    with pytest.warns(UserWarning, match=r"convert_to_int: on example_input, yolo\.\S+: \d+ codes differ from the "
                                         r"fake-quant model's beyond rounding: at \S+ code units .* at most \S+"):
        convert_to_int(model, x)
    with pytest.raises(ValueError, match="beyond rounding"):
        convert_to_int(model, x, strict=True)


def test_a_difference_behind_an_op_without_an_error_rule_is_not_certified():
    torch.manual_seed(0)
    model = nn.Sequential(
        QConv2d(3, 8, 3, padding=1, weight_quantizer=LSQQuantizer(4, "signed", 0, 8), act_quantizer=LSQQuantizer(4)),
        nn.Hardswish(),  # no integer epilogue (a float op) and no error rule
        QConv2d(8, 4, 1, weight_quantizer=LSQQuantizer(4, "signed", 0, 4), act_quantizer=LSQQuantizer(4))).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    int_model = _convert(model, x)
    victim = next(m for m in int_model.net.modules() if isinstance(m, IntConv2d) and m.source == "0")
    victim.epilogues[:, ic.ALPHA] *= 1.02
    result = verify_int_model(model, int_model, x)
    assert result.exact and not result.ok
    assert result.layers["2"].max_bound == math.inf
    assert any(f.startswith("2: ") and "have no rounding bound" in f and "'1' (Hardswish), which has no error rule" in f
               for f in result.failures())


class _Pair(nn.Module):
    """conv a (no BatchNorm, identity activation) feeding conv b, and a's output as an output too:
    the integer model's float head of a is exactly the value b's codes are decided on."""

    def __init__(self):
        super().__init__()
        self.a = QConv2d(3, 8, 3, padding=1, bias=False, weight_quantizer=LSQQuantizer(4, "signed", 0, 8),
                         act_quantizer=LSQQuantizer(4, "signed"))
        self.b = QConv2d(8, 4, 1, bias=False, weight_quantizer=LSQQuantizer(4, "signed", 0, 4),
                         act_quantizer=LSQQuantizer(4, "signed"))

    def forward(self, x):
        a = self.a(x)
        return self.b(a), a


def _neighbours(v, n=4):
    """The fp32 tensor v and its n nearest fp32 neighbours on each side, nearest first."""
    out, up, down = [v], v, v
    for _ in range(n):
        up, down = torch.nextafter(up, torch.tensor(math.inf)), torch.nextafter(down, torch.tensor(-math.inf))
        out += [up, down]
    return out


def _boundary_step(z_fq, z_int, target):
    """An fp32 step s of b's quantizer whose multiplier m = fp32(1/s) puts the decision boundary
    `target` between fp32(z_fq*m) and fp32(z_int*m), or None."""
    zf, zi, one = torch.tensor(z_fq), torch.tensor(z_int), torch.tensor(1.0)
    for m in _neighbours(torch.tensor(2 * target / (z_fq + z_int))):
        if torch.round(zf * m) != torch.round(zi * m):
            s = next((s for s in _neighbours(one / m) if one / s == m), None)
            if s is not None:
                return float(s)
    return None


def test_a_rounding_flip_at_a_boundary_is_certified_within_its_bound():
    torch.manual_seed(0)
    model = _Pair().eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        model(x)  # the quantizers' first-batch initialisation
        z_fq = model.a(x)
    z_int = _convert(model, x)(x)[1]
    # Among a's larger outputs (a tiny one is a sum that cancelled, whose bound is large), the element
    # where the two fp32 evaluations differ most, relatively; b's step is set so that a decision
    # boundary lies between them: the two models must pick neighbouring codes there.
    large = z_fq.abs() >= z_fq.abs().max() / 4
    j = int(torch.where(large, (z_fq - z_int).abs() / z_fq.abs(), 0.0).flatten().argmax())
    zf, zi = float(z_fq.flatten()[j]), float(z_int.flatten()[j])
    assert zf != zi
    s = _boundary_step(zf, zi, 1.5 if zf > 0 else -1.5)
    assert s is not None
    with torch.no_grad():
        model.b.act_quantizer.s.fill_(s)
    int_model = _convert(model, x)  # its own check certifies the flip: no warning
    result = verify_int_model(model, int_model, x)
    check = result.layers["b"]
    assert result.ok, result.failures()
    assert check.differing >= 1 and check.beyond_bound == 0
    # A genuine flip: off the boundary in float64 (d > 0), within a bound far below a code unit.
    assert 0 < check.max_distance <= check.max_bound < 1e-3


def test_dead_layers_and_the_output_difference_are_reported():
    torch.manual_seed(0)

    def q(cin, cout, k):
        return QConv2d(cin, cout, k, padding=k // 2, bias=False, weight_quantizer=LSQQuantizer(4, "signed", 0, cout),
                       act_quantizer=LSQQuantizer(4, "signed"))

    net = nn.Sequential(q(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), q(8, 8, 1), nn.ReLU(), q(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        net(x)
        net[1].bias.fill_(-100.0)  # every value below 0: the ReLU leaves nothing for the next layers
    int_model = _convert(net, x)  # dead layers convert, and nothing differs on them
    result = verify_int_model(net, int_model, x)
    assert result.ok and result.dead_layers() == ["3", "5"]
    assert result.layers["3"].zero_fraction == 1.0 and result.layers["0"].zero_fraction < 0.5
    assert "dead layers (>= 99% codes of 0): 3, 5" in result.summary()

    model, x = _qat("lsq", 4)
    int_model = _convert(model, x)
    result = verify_int_model(model, int_model, x)
    with torch.no_grad():
        expected = max(float((a.double() - b.double()).abs().max()) for a, b in zip(int_model(x), model(x)))
    assert result.output_difference == expected
    assert f"max |integer - fake-quant| = {expected:.3e}" in result.summary()


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
