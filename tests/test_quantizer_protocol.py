"""The quantizer protocol (q2kernels/nn/protocol.py): a new quantizer kind is one class in one file.

FixedScaleQuantizer below is such a kind, defined here and nowhere in the package: a uniform
quantizer with a fixed power-of-two step. Nothing else is edited, yet quantize_model uses its recipe,
convert_to_int turns it into integer layers, and save_int_model/load_int_model store and rebuild it;
the integer model's output equals the fake-quant model's bit for bit (every value is dyadic, so the
fp32 sums of both are exact).
"""
import ast
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from q2kernels.deploy import IntConv2d, QuantizePack, convert_to_int, load_int_model, save_int_model
from q2kernels.nn import (QUANTIZER_KINDS, IntActivation, IntWeight, NoIntegerForm, QADALoss, Quantizer, Recipe,
                          quantize_model, quantizer_class, register_recipe)


class FixedScaleQuantizer(Quantizer):
    """q = clip(R(x * (1/step)), qn, qp), y = q*step, with the straight-through gradient. No parameters."""

    state_keys = ("bits", "step", "signed")

    def __init__(self, bits: int = 4, step: float = 0.25, signed: bool = True):
        super().__init__(bits)
        self.step, self.signed = float(step), bool(signed)
        self.qn, self.qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)

    def quantize(self, x):
        q = torch.clamp(torch.round(x * (1.0 / self.step)), self.qn, self.qp)
        return x + (q * self.step - x).detach()

    def config(self):
        return {"bits": self.bits, "step": self.step, "signed": self.signed}

    def int_activation(self):
        return IntActivation(self.qn, self.qp, q_mul=1.0 / self.step, q_off=0.0, step=self.step, offset=0.0)

    def int_weight(self, w, wq):
        step = torch.full((w.size(0),), self.step, dtype=torch.float64, device=w.device)
        return IntWeight(torch.round(wq / self.step), self.qn, self.qp, w_mul=1, w_add=0, step=step)


register_recipe("fixed_scale", Recipe(weight=lambda layer, bits: FixedScaleQuantizer(bits, 2.0**-4),
                                      act=lambda layer, bits: FixedScaleQuantizer(bits, 0.25, signed=False)))


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                        nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.ReLU(),
                        nn.Conv2d(6, 4, 1, bias=False))
    quantize_model(net, "fixed_scale", 4, 4, keep_first_last=False)
    return net.eval()


def test_a_kind_defined_in_one_file_is_registered():
    assert quantizer_class("FixedScaleQuantizer") is FixedScaleQuantizer
    assert QUANTIZER_KINDS["FixedScaleQuantizer"] is FixedScaleQuantizer
    with pytest.raises(KeyError, match="unknown quantizer kind 'Nope'"):
        quantizer_class("Nope")
    with pytest.raises(TypeError, match="quantizer kind 'FixedScaleQuantizer': already registered"):
        type("FixedScaleQuantizer", (Quantizer,), {"__module__": "elsewhere"})


def test_new_kind_converts_to_integer_and_round_trips_through_a_file(tmp_path):
    net = _net()
    x = torch.randn(2, 3, 9, 7) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        int_model = convert_to_int(net, x, strict=True)
    kinds = [type(m) for m in int_model.net.modules()]
    assert kinds.count(IntConv2d) == 3 and kinds.count(QuantizePack) == 1
    with torch.no_grad():
        expected = net(x)
    out = int_model(x)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    save_int_model(int_model, tmp_path / "m.pt")
    again = load_int_model(tmp_path / "m.pt")
    assert torch.equal(again(x), expected)
    save_int_model(again, tmp_path / "again.pt")  # a loaded model saves again, unchanged
    assert torch.equal(load_int_model(tmp_path / "again.pt")(x), expected)


def test_its_settings_guard_its_state_dict():
    with pytest.raises(RuntimeError, match=r"holds a FixedScaleQuantizer\(bits=4, step=0.25, signed=True\), "
                                           r"the module is a FixedScaleQuantizer\(bits=4, step=0.5, signed=True\)"):
        FixedScaleQuantizer(4, 0.5).load_state_dict(FixedScaleQuantizer(4, 0.25).state_dict())


class _NoInteger(Quantizer):
    def quantize(self, x):
        return x


def test_a_kind_without_an_integer_form_is_kept_in_float_by_name():
    net = _net()
    net[2].act_quantizer = _NoInteger(4)
    with pytest.warns(UserWarning, match=r"layer '2' is kept in float: its activation quantizer "
                                         r"'2.act_quantizer' \(_NoInteger\) has no integer form"):
        report = convert_to_int(net, torch.randn(1, 3, 5, 5)).report
    assert report["2"].startswith("kept in float") and report["0"].startswith("integer conv")
    with pytest.raises(NoIntegerForm, match="as a weight quantizer"):
        _NoInteger(4).int_weight(torch.ones(2, 2), torch.ones(2, 2))


def test_a_kind_gets_the_training_protocols_defaults():
    """FixedScaleQuantizer defines neither step_size() nor scale_free: the base class answers for it
    (no step: Q-ADA takes no quantized feature from it; its weights carry their scale), and a Q-ADA
    loss over a model of such quantizers still runs, with no distortion term."""
    q = FixedScaleQuantizer(4, 0.25)
    assert q.step_size() is None and q.scale_free is False
    teacher, student = _net(), _net()
    x = torch.randn(2, 3, 6, 6)
    with QADALoss(teacher, student, points=["1"]) as distill:
        teacher(x)
        student(x)
        assert distill._points[0].sq is None
        assert torch.isfinite(distill())


# The protocol members training code asks of a quantizer (never by hasattr).
_MEMBERS = {"step_size", "scale_free", "config", "state_keys", "int_activation", "int_weight", "dequantize",
            "initialize", "quantize", "kind"}


def test_training_code_asks_the_protocol_not_the_class():
    """Q-ADA (nn/ada.py) and the Ultralytics integration (prepare.py) ask a quantizer its protocol
    members: a quantizer kind's class is named there only to construct one (never in an isinstance
    or a tuple of kinds: the base class Quantizer is the protocol), and no protocol member is asked
    with hasattr."""
    root = Path(__file__).resolve().parent.parent
    kinds = {c.__name__ for c in QUANTIZER_KINDS.values()}
    found = []
    for path in ("q2kernels/nn/ada.py", "q2kernels/integrations/ultralytics/prepare.py"):
        tree = ast.parse((root / path).read_text())
        constructed = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in kinds and id(node) not in constructed:
                found.append(f"{path}:{node.lineno}: names the kind {node.id} other than to construct it")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
                    and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in _MEMBERS):
                found.append(f"{path}:{node.lineno}: hasattr(..., {node.args[1].value!r})")
    assert not found, found
