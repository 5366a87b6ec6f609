"""convert_to_int, save_int_model, load_int_model (docs/math.md §5 and 7).

End to end: a tiny YOLOv5 (C3 blocks with and without residuals, SPPF max pooling, upsampling, four
gated-fusion concat nodes, SiLU or ReLU) trained a few steps under each recipe, calibrated and
converted. The oracle is the fake-quant model in float64 with its LayerNorms replaced by their
calibrated affines, teacher-forced: every quantized conv of the oracle consumes the codes the integer
model fed the same conv, so each layer is compared on identical inputs. At every quantized conv's
input the integer codes must equal the oracle's quantizer decisions (except where the oracle's value
lies within a hair of a rounding boundary: the fp32 epilogue and a float64 conv may then round
apart; such elements must be very rare), and the final float outputs must agree within 1e-5.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import q2kernels
from q2kernels.deploy import (IntConv2d, IntModel, calibrate_fusion, convert_to_int, freeze_fusion, load_int_model,
                              save_int_model)
from q2kernels.models import YOLOv5
from q2kernels.nn import (DoReFaWeightQuantizer, GatedFusion, LSQPlusQuantizer, LSQQuantizer, N2UQQuantizer,
                          PACTQuantizer, QConv2d, quantize_model)
from q2kernels.ops import int_conv as ic

from deployable import spread_activation_quantizers

IMAGE = 32
# Distance (in code units) of the oracle's decision variable from a rounding tie under which the
# integer path may round the other way.
NEAR = 1e-4


def _train(model, steps=2, seed=0):
    """A few training steps, then what deployment does: BatchNorm statistics re-estimated (YOLOv5's
    momentum 0.03 would leave them at their init after a few steps, and every activation near 0),
    activation ranges set from data, the fusion nodes calibrated."""
    g = torch.Generator().manual_seed(seed)

    def batch():
        return torch.randn(2, 3, IMAGE, IMAGE, generator=g)

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        loss = sum((o - 0.5).square().mean() for o in model(batch()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        for _ in range(2):
            model(batch())
    model.eval()
    spread_activation_quantizers(model, batch())
    if any(isinstance(m, GatedFusion) for m in model.modules()):
        calibrate_fusion(model, [batch()])
    return model


def tiny_yolo(recipe, bits=4, act="silu", mode="learned", seed=0):
    torch.manual_seed(seed)
    model = YOLOv5(width=0.125, depth=0.33, outputs=18, fusion=lambda ch: GatedFusion(ch, mode=mode))
    if act == "relu":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.SiLU):
                    setattr(parent, name, nn.ReLU())
    quantize_model(model, recipe, w_bits=bits, a_bits=bits)
    return _train(model, seed=seed)


# The fake-quant activation quantizers as the reference computes them (fp32): the output of codes,
# and the codes of an output.
def _dequantize(q, codes):
    c = codes.float()
    if isinstance(q, LSQQuantizer):
        beta = q.beta.float() if isinstance(q, LSQPlusQuantizer) else 0.0
        return c * q.s.float().clamp_min(1e-8) + beta
    if isinstance(q, PACTQuantizer):
        return c * (q.alpha.float().reshape(()) / (2**q.bits - 1))
    return (c * q2kernels.reference.n2uq.ltq_interval(q.bits)) * q.alpha2.float().reshape(())


def _codes(q, y):
    step = _dequantize(q, torch.ones(())) - _dequantize(q, torch.zeros(()))
    return torch.round((y - _dequantize(q, torch.zeros(()))) / step)


def _near_boundary(q, x):
    """Where fp32(x) lies within NEAR (in units of the quantizer's step) of a decision boundary."""
    x = x.float()
    if isinstance(q, N2UQQuantizer):
        _, thresholds, _ = q2kernels.reference.n2uq.ltq_tables(q.start, q.a)
        u = x * q.alpha1.float().reshape(())
        return (u.unsqueeze(-1) - thresholds).abs().amin(-1) <= NEAR * q2kernels.reference.n2uq.ltq_interval(q.bits)
    if isinstance(q, LSQQuantizer):
        beta = q.beta.float() if isinstance(q, LSQPlusQuantizer) else 0.0
        v = (x - beta) * (1.0 / q.s.float().clamp_min(1e-8))
        lo, hi = q2kernels.reference.qrange(q.bits, q.mode)
    else:
        a, lo, hi = q.alpha.float().reshape(()), 0, 2**q.bits - 1
        v = torch.minimum(x.clamp_min(0.0), a) * (torch.tensor(float(hi)) / a)
    return ((v - torch.floor(v) - 0.5).abs() <= NEAR) & (v > lo - 0.5) & (v < hi + 0.5)


class _Forced(nn.Module):
    """In the float64 oracle, an activation quantizer that records its own codes for its input and
    passes on the integer model's codes, dequantised as the quantizer dequantises."""

    def __init__(self, q, codes):
        super().__init__()
        self.q, self.codes = q, codes

    def forward(self, x):
        with torch.no_grad():
            self.ref_codes = _codes(self.q, self.q(x.float()))
        self.near = _near_boundary(self.q, x)
        return _dequantize(self.q, self.codes).to(x.dtype)


class _F32(nn.Module):
    """In the float64 oracle, a quantizer run as the model runs it: on fp32 values, in fp32."""

    def __init__(self, q):
        super().__init__()
        self.q = q

    def forward(self, w):
        return self.q(w.float()).to(w.dtype)


def _int_codes(int_model, x):
    """Run the integer model; the codes each IntConv2d received, by the name of its QConv2d."""
    codes = {}

    def hook(m, args, kwargs):
        codes[m.source] = ic.unpack(args[0], m.in_channels, m.x_signed).long()

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for m in int_model.modules() if isinstance(m, IntConv2d)]
    try:
        out = int_model(x)
    finally:
        for h in handles:
            h.remove()
    return out, codes


def _forced_oracle(model, codes, x):
    ref = freeze_fusion(copy.deepcopy(model)).eval()
    forced = {}
    for name, m in ref.named_modules():
        if isinstance(m, QConv2d):
            m.weight_quantizer = _F32(m.weight_quantizer)
            if name in codes:
                m.act_quantizer = forced[name] = _Forced(m.act_quantizer, codes[name])
            else:
                m.act_quantizer = _F32(m.act_quantizer)
    ref.double()
    for m in ref.modules():
        if isinstance(m, (_F32, _Forced)):
            m.q.float()
    with torch.no_grad(), q2kernels.use_backend("reference"):
        out = ref(x.double())
    return out, forced


def _check_against_oracle(model, int_model, x, integer_layers):
    out, codes = _int_codes(int_model, x)
    ref_out, forced = _forced_oracle(model, codes, x)
    assert len(forced) == len(codes) == integer_layers
    near_total = total = 0
    for name, f in forced.items():
        got = codes[name].double()
        diff = got != f.ref_codes.double()
        assert not (diff & ~f.near).any(), f"{name}: {int((diff & ~f.near).sum())} codes differ"
        assert bool(((got - f.ref_codes).abs() <= 1).all())
        near_total += int(f.near.sum())
        total += got.numel()
    assert near_total <= total // 1000, f"{near_total} of {total} codes exempt as near a boundary"
    for a, b in zip(out if isinstance(out, (list, tuple)) else [out],
                    ref_out if isinstance(ref_out, (list, tuple)) else [ref_out]):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()
    return out


@pytest.mark.parametrize("recipe,bits,act,mode", [
    ("lsq", 4, "silu", "learned"),
    ("lsq_plus", 4, "silu", "balanced"),
    ("pact", 4, "relu", "learned"),
    ("lsq_plus", 3, "silu", "learned"),
    ("pact", 3, "silu", "balanced"),
    ("n2uq", 4, "silu", "learned"),
    ("n2uq", 3, "relu", "balanced"),
])
def test_end_to_end_equals_float64_fake_quant(recipe, bits, act, mode, tmp_path):
    model = tiny_yolo(recipe, bits, act, mode)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of this model may be refused
        int_model = convert_to_int(model, x)
    assert isinstance(int_model, IntModel)
    folded = [k for k, v in int_model.report.items() if "folded into the producers" in v]
    assert sorted(folded) == ["12", "16", "19", "22"]
    out = _check_against_oracle(model, int_model, x, integer_layers=58)  # all but the stem and the last
    # The saved and reloaded model computes the same bits.
    path = tmp_path / "int.pt"
    save_int_model(int_model, path)
    assert torch.load(path, weights_only=True)["format_version"] == 1
    again = load_int_model(path)
    for a, b in zip(again(x), out):
        assert torch.equal(a, b)


def _lsq_w(c):
    return LSQQuantizer(4, "signed", axis=0, channels=c)


class Mixed(nn.Module):
    """A layer the converter must keep in float (per-channel activation quantizer), a grouped conv, an
    activation with no integer epilogue (LeakyReLU), a sum-mode fusion node, a concat of odd channel
    counts and a residual add, between convertible QConv2d layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = QConv2d(8, 16, 3, padding=1, bias=False, weight_quantizer=_lsq_w(16),
                         act_quantizer=LSQPlusQuantizer(4))
        self.a_bn, self.a_act = nn.BatchNorm2d(16), nn.LeakyReLU(0.1)
        self.grouped = QConv2d(16, 16, 3, padding=1, groups=2, weight_quantizer=_lsq_w(16),
                               act_quantizer=LSQQuantizer(4, "signed"))
        self.per_channel = QConv2d(16, 16, 1, weight_quantizer=_lsq_w(16),
                                   act_quantizer=LSQQuantizer(4, "signed", axis=1, channels=16))
        self.fuse = GatedFusion([16, 16], fuse="sum")
        self.odd1 = QConv2d(16, 7, 1, weight_quantizer=DoReFaWeightQuantizer(4), act_quantizer=PACTQuantizer(4))
        self.odd2 = QConv2d(16, 9, 3, padding=1, weight_quantizer=_lsq_w(9), act_quantizer=PACTQuantizer(4))
        self.d = QConv2d(16, 16, 3, stride=2, padding=1, weight_quantizer=_lsq_w(16),
                         act_quantizer=LSQQuantizer(4, "unsigned"))
        self.d_act = nn.ReLU()
        self.e = QConv2d(16, 16, 1, weight_quantizer=_lsq_w(16), act_quantizer=LSQPlusQuantizer(3))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a = self.a_act(self.a_bn(self.a(self.stem(x))))
        f = self.fuse([a, self.per_channel(self.grouped(a))])
        cat = torch.cat([self.odd1(f), self.odd2(f)], 1)
        d = self.d_act(self.d(cat))
        return self.head(d + self.e(d))


def _mixed_model():
    torch.manual_seed(1)
    return _train(Mixed())


def test_refused_layers_stay_float_and_the_rest_is_exact():
    model = _mixed_model()
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with pytest.warns(UserWarning) as record:
        int_model = convert_to_int(model, x)
    messages = [str(w.message) for w in record]
    assert any("'per_channel'" in m and "per channel" in m for m in messages)
    assert not any("'grouped'" in m for m in messages)
    report = int_model.report
    assert "LeakyReLU" in report["a:activation"]
    assert report["grouped"].startswith("integer conv") and report["per_channel"].startswith("kept in float")
    assert next(m for m in int_model.net.modules() if getattr(m, "source", "") == "grouped").groups == 2
    assert "odd channel count" in next(v for k, v in report.items() if k.endswith(":concat"))
    assert report["fuse"].startswith("GatedFusion: LayerNorm replaced")
    kinds = {type(m).__name__ for m in int_model.net.modules()}
    assert {"IntConv2d", "QuantizePack", "QConv2d", "FixedFusion", "LeakyReLU"} <= kinds
    _check_against_oracle(model, int_model, x, integer_layers=6)


def test_a_memory_format_asked_of_the_model_changes_nothing():
    """Ultralytics' validator moves a model to channels_last on CPUs: the packed weights keep their
    layout, and a channels_last input gives the same answer."""
    model = _mixed_model()
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with pytest.warns(UserWarning):
        int_model = convert_to_int(model, x)
    expected = int_model(x)
    moved = copy.deepcopy(int_model).to(memory_format=torch.channels_last)
    assert all(m.weight.is_contiguous() for m in moved.modules() if isinstance(m, IntConv2d))
    assert torch.equal(moved(x), expected)
    assert torch.equal(moved(x.to(memory_format=torch.channels_last)), expected)


class BiasThenBN(nn.Module):
    """Quantized convs that have a bias *and* a BatchNorm after them (YOLOv5's convs have no bias, and
    Mixed's conv before its BatchNorm has none): BN(conv(x) + b) = scale*conv(x) + (scale*b + shift),
    so the bias is scaled by the BN before the shift is added. Each kind of activation quantizer,
    each epilogue activation, and an affine-less BN; the last unit writes floats to a float head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = QConv2d(8, 16, 3, padding=1, bias=True, weight_quantizer=_lsq_w(16),
                         act_quantizer=LSQQuantizer(4, "signed"))
        self.a_bn, self.a_act = nn.BatchNorm2d(16), nn.ReLU()
        self.b = QConv2d(16, 16, 3, padding=1, bias=True, weight_quantizer=DoReFaWeightQuantizer(4),
                         act_quantizer=PACTQuantizer(4))
        self.b_bn, self.b_act = nn.BatchNorm2d(16), nn.SiLU()
        self.c = QConv2d(16, 16, 3, stride=2, padding=1, bias=True, weight_quantizer=_lsq_w(16),
                         act_quantizer=LSQPlusQuantizer(4))
        self.c_bn = nn.BatchNorm2d(16, affine=False)
        self.d = QConv2d(16, 8, 1, bias=True, weight_quantizer=_lsq_w(8), act_quantizer=LSQQuantizer(3, "signed"))
        self.d_bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.a_act(self.a_bn(self.a(self.stem(x))))
        x = self.b_act(self.b_bn(self.b(x)))
        x = self.c_bn(self.c(x))
        return self.head(self.d_bn(self.d(x)))


def test_conv_bias_and_batchnorm_fold_exactly():
    torch.manual_seed(3)
    model = BiasThenBN()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QConv2d):
                # A bias as large as the conv's output, so that dropping it or adding it unscaled
                # moves values by many quantizer steps.
                m.bias.copy_(torch.randn(m.out_channels) * 0.8)
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                # BN scales far from 1 (gamma/sqrt(var + eps)), and shifts: bias*scale != bias.
                m.weight.copy_(torch.rand(m.num_features) * 2.5 + 0.3)
                m.weight[::3] *= -1
                m.bias.copy_(torch.randn(m.num_features) * 0.5)
    _train(model)
    for m in model.modules():  # the eval statistics are the data's, not the init's
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean.abs().max() > 0.1 and (m.running_var - 1).abs().max() > 0.1
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        int_model = convert_to_int(model, x)
    assert all(int_model.report[n].startswith("integer conv") for n in "abcd")
    # every BatchNorm went into its conv's epilogue
    assert not any(isinstance(m, nn.BatchNorm2d) for m in int_model.net.modules())
    # The float64 oracle first (it folds nothing: it runs conv + bias, then BN), then: nothing was
    # kept in float, nothing else warned.
    _check_against_oracle(model, int_model, x, integer_layers=4)
    assert not caught, [str(w.message) for w in caught]


def test_strict_raises_naming_the_layer():
    with pytest.raises(ValueError, match="layer 'per_channel' kept in float: its activation quantizer"):
        convert_to_int(_mixed_model(), torch.randn(1, 3, IMAGE, IMAGE), strict=True)


def test_model_without_quantizers():
    with pytest.raises(ValueError, match="model: has no QConv2d with both a weight and an activation quantizer"):
        convert_to_int(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 8, 8))


def test_uncalibrated_fusion_keeps_its_layernorm():
    torch.manual_seed(0)
    model = YOLOv5(width=0.125, depth=0.33, outputs=18, fusion=lambda ch: GatedFusion(ch)).eval()
    quantize_model(model, "lsq")
    x = torch.randn(1, 3, IMAGE, IMAGE)
    model(x)  # initialise the quantizers
    int_model = convert_to_int(model, x)
    assert all(int_model.report[n].startswith("GatedFusion not calibrated") for n in ("12", "16", "19", "22"))
    assert sum(isinstance(m, GatedFusion) for m in int_model.net.modules()) == 4


def test_save_load_errors(tmp_path):
    model = _mixed_model()
    x = torch.randn(1, 3, IMAGE, IMAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int_model = convert_to_int(model, x)
    path = tmp_path / "m.pt"
    save_int_model(int_model, path)
    assert torch.equal(load_int_model(path)(x), int_model(x))
    record = torch.load(path, weights_only=True)
    record["format_version"] = 2
    torch.save(record, tmp_path / "v2.pt")
    with pytest.raises(ValueError, match="has format version 2, this version of q2kernels reads version 1"):
        load_int_model(tmp_path / "v2.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a q2kernels integer model"):
        load_int_model(tmp_path / "other.pt")
    with pytest.raises(TypeError, match="model: expected an IntModel"):
        save_int_model(model, tmp_path / "x.pt")
    int_model.net.head = nn.Sequential()
    with pytest.raises(ValueError, match="module 'head' of type Sequential cannot be saved"):
        save_int_model(int_model, tmp_path / "x.pt")
