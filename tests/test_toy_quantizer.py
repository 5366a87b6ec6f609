"""A quantizer kind defined here and nowhere in q2kernels goes the whole way with no change to
q2kernels/deploy/: it trains, converts (convert_to_int), verifies (verify_int_model: exact, and every
difference from the fake-quant model a certified rounding flip), saves and loads.

ToyUniformQuantizer is a uniform quantizer with a learned per-tensor step, in plain torch ops with a
straight-through estimator. It is the worked example of docs/extending.md, "A quantizer": the
comments "# Step n" are that section's steps, in its order (tests/test_docs_extending.py holds the
two together). It answers the quantizer protocol (q2kernels/nn/protocol.py) like
tests/test_quantizer_protocol.py's kind: config, state_keys, int_activation, int_weight; verify needs
nothing more (its dequantize and decisions come from its integer form). Its first-batch
initialisation is LSQ's formula, taken from the reference, and its step_size() feeds the Q-ADA term
it trains with. Its weights carry their step (scale_free is False); a variant that leaves the step to
a BatchNorm says so with scale_free = True, and the Ultralytics integration then treats it as it
treats DoReFa, with no change to q2kernels/integrations/; a variant without a step (the base class's
step_size(), None) supplies no quantized feature to Q-ADA.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

from q2kernels import reference as ref
from q2kernels.deploy import IntConv2d, convert_to_int, load_int_model, save_int_model, verify_int_model
from q2kernels.nn import (QUANTIZER_KINDS, DoReFaWeightQuantizer, IntActivation, IntWeight, QADALoss, QConv2d,
                          Quantizer, Recipe, quantize_model, register_recipe)
from q2kernels.nn.quantizers import _all_reduce


# Step 1: a subclass of Quantizer, registered under its kind ("ToyUniformQuantizer") when defined.
class ToyUniformQuantizer(Quantizer):
    """q = clip(R(x*(1/s)), qn, qp), y = q*s with a learned step s > 0 (signed 4-bit: -8..7).
    Forward in fp32: y is exactly fp32(q*s); the gradient passes x where it is not clipped (STE) and
    reaches s as q. s starts at `step` and is set from the first usable batch."""

    state_keys = ("bits",)

    def __init__(self, bits: int = 4, step: float = 0.1):
        super().__init__(bits)
        self.qn, self.qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.init_step = float(step)
        self.s = nn.Parameter(torch.tensor(float(step)))

    def _step(self):
        return self.s.float().abs().clamp_min(1e-8)

    # Step 2: the forward.
    def quantize(self, x):
        x = x.float()
        s = self._step()
        v = x * (1.0 / s.detach())
        q = torch.round(v.clamp(self.qn, self.qp))
        inside = ((v >= self.qn) & (v <= self.qp)).float()
        return q.detach() * s + (x - x.detach()) * inside  # the second term is 0 forward, x's STE backward

    # Step 3: the first-batch initialisation: statistics all-reduced across ranks, the reference's
    # formula (LSQ's s = 2*mean|x|/sqrt(Qp)), applied where usable (an all-zero batch is skipped).
    def initialize(self, x):
        a = x.detach().float().abs()
        stats = _all_reduce(torch.stack([a.sum(), a.new_tensor(float(a.numel()))]), "SUM")
        s = ref.lsq_init_scale(stats[0] / stats[1], self.bits, "signed")
        usable = torch.isfinite(s) & (s > 0)
        self.s.copy_(torch.where(usable, s, self.s))
        return usable

    # Step 4: the deployment protocol.
    def config(self):
        return {"bits": self.bits, "step": self.init_step}

    def int_activation(self):
        s = self._step().detach()
        return IntActivation(self.qn, self.qp, q_mul=float(1.0 / s), q_off=0.0, step=float(s), offset=0.0)

    def int_weight(self, w, wq):
        s = float(self._step().detach())
        step = torch.full((w.size(0),), s, dtype=torch.float64, device=w.device)
        return IntWeight(torch.round(wq / s), self.qn, self.qp, w_mul=1, w_add=0, step=step)

    # Step 5: the quantisation step Q-ADA's distortion term divides by, and whether its weight outputs
    # carry the float weights' scale (they do: wq = q*s; the base class's default, said here to show it).
    def step_size(self):
        return self._step().detach().reshape(1)

    scale_free = False


# Step 6: a recipe for quantize_model.
register_recipe("toy_uniform", Recipe(weight=lambda layer, bits: ToyUniformQuantizer(bits, 0.05),
                                      act=lambda layer, bits: ToyUniformQuantizer(bits, 0.25)))


class ToyScaleFreeQuantizer(ToyUniformQuantizer):
    """The toy's codes as its outputs, y = q (its step left out, to a BatchNorm after the conv, as
    DoReFa's [-1, 1] leaves it): a scale-free weight quantizer. Gradient: the toy's, over s."""

    scale_free = True

    def quantize(self, x):
        y = super().quantize(x) / self._step().detach()
        return y + (torch.round(y) - y).detach()  # exactly q forward

    def int_weight(self, w, wq):
        step = torch.ones(w.size(0), dtype=torch.float64, device=w.device)
        return IntWeight(torch.round(wq), self.qn, self.qp, w_mul=1, w_add=0, step=step)


class ToyStepless(ToyUniformQuantizer):
    """The toy answering the base class's step_size(): None, no step."""

    step_size = Quantizer.step_size


register_recipe("toy_scale_free", Recipe(weight=lambda layer, bits: ToyScaleFreeQuantizer(bits, 0.05),
                                         act=lambda layer, bits: ToyUniformQuantizer(bits, 0.25)))


class _Net(nn.Module):
    """Three convs with BatchNorm and ReLU, then a 1x1 conv whose input stays float (a weight
    quantizer only: the integer model keeps it as its QConv2d, stored in the file by kind)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 8, 1))
        self.head = QConv2d(8, 4, 1, weight_quantizer=ToyUniformQuantizer(4, 0.05))

    def forward(self, x):
        return self.head(self.body(x))


def _trained(steps=5):
    """QAT as the Q2 recipe runs it: the task loss plus Q-ADA against the float model at body.5, the
    input of body.6, whose activation quantizer supplies the distortion term (its step_size)."""
    torch.manual_seed(0)
    net = _Net()
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    quantize_model(net.body, "toy_uniform", 4, 4, keep_first_last=False)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    losses = []
    with QADALoss(teacher, net, points=["body.5"], weight=0.01) as distill:
        for _ in range(steps):
            x = torch.randn(4, 3, 12, 12, generator=g)
            with torch.no_grad():
                teacher(x)
            task = (net(x) - 0.5).square().mean()
            loss = task + distill()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(task.item())
    return net.eval(), losses


def test_a_kind_defined_in_a_test_file_trains_converts_verifies_and_round_trips(tmp_path):
    assert QUANTIZER_KINDS["ToyUniformQuantizer"] is ToyUniformQuantizer
    net, losses = _trained()
    assert losses[-1] < losses[0]  # its gradients train the model
    toys = [m for m in net.modules() if isinstance(m, ToyUniformQuantizer)]
    assert all(m._initialized and bool(m.initialized) for m in toys)
    assert all(m.s.item() != m.init_step for m in toys)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing refused, and its own check on x passes
        int_model = convert_to_int(net, x, strict=True)
    assert sum(isinstance(m, IntConv2d) for m in int_model.net.modules()) == 3
    assert isinstance(int_model.net.get_submodule("head").weight_quantizer, ToyUniformQuantizer)

    result = verify_int_model(net, int_model, x)
    assert result.exact and result.ok, result.failures()
    assert set(result.layers) == {"body.0", "body.3", "body.6"} and not result.dead_layers()

    out = int_model(x)
    path = tmp_path / "toy.pt"
    save_int_model(int_model, path)
    again = load_int_model(path)
    assert isinstance(again.net.get_submodule("head").weight_quantizer, ToyUniformQuantizer)
    assert torch.equal(again(x), out)


def test_the_training_protocol_has_defaults_and_the_toy_answers_it():
    assert Quantizer.scale_free is False and DoReFaWeightQuantizer.scale_free is True
    assert ToyUniformQuantizer(4).scale_free is False and ToyScaleFreeQuantizer(4).scale_free is True
    assert DoReFaWeightQuantizer(4).step_size() is None and ToyStepless(4).step_size() is None
    toy = ToyUniformQuantizer(4, 0.25)
    assert torch.equal(toy.step_size(), torch.tensor([0.25]))
    w = torch.randn(4, 8, 3, 3)
    codes = ToyScaleFreeQuantizer(4, 0.05)(w)  # its codes, not on the weights' scale
    assert torch.equal(codes, torch.round(codes)) and codes.abs().max() > 1 and -8 <= codes.min() <= codes.max() <= 7


@pytest.mark.parametrize("stepless", [False, True])
def test_q_ada_takes_the_step_the_quantizer_answers(stepless):
    """body.5's output feeds body.6's activation quantizer as is: its output and step become Sq and
    Delta; a quantizer whose step_size() is None supplies neither (no distortion term)."""
    torch.manual_seed(0)
    net = _Net()
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    quantize_model(net.body, "toy_uniform", 4, 4, keep_first_last=False)
    if stepless:
        net.body[6].act_quantizer = ToyStepless(4, 0.25)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    with QADALoss(teacher, net, points=["body.5"], weight=0.01) as distill:
        with torch.no_grad():
            teacher(x)
        net(x)
        point = distill._points[0]
        q = net.body[6].act_quantizer
        if stepless:
            assert point.sq is None and point.delta is None and point.quantizer is None
        else:
            assert point.quantizer is q and torch.equal(point.delta, q.step_size())
            assert torch.equal(point.sq, q(point.student).detach())
        assert torch.isfinite(distill())


def test_a_scale_free_kind_is_treated_as_dorefa_by_the_ultralytics_integration():
    """prepare asks `scale_free`, not the class: a conv no BatchNorm follows gets a per-channel LSQ
    weight quantizer in place of a scale-free one, and a following BatchNorm's statistics are rescaled
    by the conv's weight gain, for the toy variant as for DoReFa."""
    pytest.importorskip("ultralytics")
    from q2kernels.integrations.ultralytics.prepare import _unnormalized_qconv, rescale_batchnorm_statistics
    from q2kernels.nn import LSQQuantizer

    conv = nn.Conv2d(8, 4, 1)
    replaced = _unnormalized_qconv(conv, "toy_scale_free", 4, 4).weight_quantizer
    assert isinstance(replaced, LSQQuantizer) and replaced.axis == 0 and replaced.s.numel() == 4
    assert type(_unnormalized_qconv(conv, "toy_uniform", 4, 4).weight_quantizer) is ToyUniformQuantizer

    def block(weight_quantizer):
        b = nn.Module()
        b.conv = QConv2d(8, 4, 3, padding=1, bias=False, weight_quantizer=weight_quantizer)
        b.bn = nn.BatchNorm2d(4)
        b.bn.running_mean.fill_(0.5)
        return b

    model = nn.Module()
    model.free, model.scaled = block(ToyScaleFreeQuantizer(4, 0.05)), block(ToyUniformQuantizer(4, 0.05))
    gains = rescale_batchnorm_statistics(model, ["free.conv", "scaled.conv"])
    assert list(gains) == ["free.conv"]
    g = gains["free.conv"]
    assert torch.allclose(model.free.bn.running_mean, 0.5 * g) and torch.allclose(model.free.bn.running_var, g * g)
    assert torch.equal(model.scaled.bn.running_mean, torch.full((4,), 0.5))
