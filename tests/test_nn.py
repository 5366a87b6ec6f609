"""Quantizer modules, QConv2d/QLinear, quantize_model: initialisation, equivalence of the fused
and reference backends in training, state_dict round trips, torch.compile, saved tensors."""
import copy
import io

import pytest
import torch
from torch import nn

import q2kernels
from q2kernels.nn import (DoReFaWeightQuantizer, LSQPlusQuantizer, LSQQuantizer, PACTQuantizer, QConv2d,
                          QLinear, quantize_model)
from q2kernels import reference as ref

RECIPES = ["lsq", "lsq_plus", "pact", "n2uq"]


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.SiLU(),
        nn.Conv2d(12, 12, 1), nn.SiLU(),
        nn.Conv2d(12, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5), nn.SiLU(), nn.Linear(5, 3),
    )


def test_lsq_initialises_from_the_first_batch():
    q = LSQQuantizer(4, "signed")
    x = torch.randn(2, 3, 5, 5)
    q(x)
    assert torch.allclose(q.s, 2 * x.abs().mean() / 7 ** 0.5)
    assert q._initialized and bool(q.initialized)
    q(x * 10)  # later batches do not re-initialise
    assert torch.allclose(q.s, 2 * x.abs().mean() / 7 ** 0.5)


def test_per_channel_weight_init_and_lsq_plus_init():
    w = torch.randn(6, 4, 3, 3)
    q = LSQQuantizer(4, "signed", axis=0, channels=6)
    q(w)
    torch.testing.assert_close(q.s, 2 * w.abs().mean(dim=(1, 2, 3)) / 7 ** 0.5)
    x = torch.randn(2, 3, 4, 4) - 0.2
    p = LSQPlusQuantizer(4)
    p(x)
    torch.testing.assert_close(p.s, ((x.max() - x.min()) / 15).reshape(1))
    torch.testing.assert_close(p.beta, x.min().reshape(1))
    a = PACTQuantizer(4)
    a(x)
    torch.testing.assert_close(a.alpha, x.max().reshape(1))


# docs/math.md §1's grids, written out: (Qn, Qp) of b bits in each mode.
GRIDS = {"unsigned": lambda b: (0, 2**b - 1),
         "signed": lambda b: (-(2 ** (b - 1)), 2 ** (b - 1) - 1),
         "symmetric": lambda b: (-(2 ** (b - 1) - 1), 2 ** (b - 1) - 1)}


def _lsq_plus_init64(x, qn, qp, dims=None):
    """LSQ+'s first-batch init (docs/math.md §2) in float64: s = (max - min)/(Qp - Qn), beta = min - Qn*s."""
    x = x.double()
    lo = x.amin() if dims is None else x.amin(dim=dims)
    hi = x.amax() if dims is None else x.amax(dim=dims)
    s = (hi - lo) / (qp - qn)
    return s.reshape(-1), (lo - qn * s).reshape(-1), lo.reshape(-1), hi.reshape(-1)


@pytest.mark.parametrize("mode", ["signed", "symmetric", "unsigned"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [None, 1])
def test_lsq_plus_init_on_every_grid(mode, bits, axis):
    """The signed and symmetric grids put Qn < 0, where beta = min - Qn*s is not min (the unsigned
    grid's answer) and, on the symmetric grid, Qp - Qn is 2^b - 2, not 2^b - 1. Checked on the
    module's first-batch init (per tensor and per channel) and on reference.lsq_plus_init (the formula
    the module calls on the batch's all-reduced min and max), against the formula in float64, and by
    what it means: the batch's min lands on level Qn and its max on Qp."""
    qn, qp = GRIDS[mode](bits)
    torch.manual_seed(bits)
    x = torch.randn(2, 5, 4, 4) * 1.5 + torch.tensor([0.7, -0.4, 2.0, 0.0, -3.0]).view(1, 5, 1, 1)
    dims = None if axis is None else [0, 2, 3]
    s64, beta64, lo, hi = _lsq_plus_init64(x, qn, qp, dims)
    q = LSQPlusQuantizer(bits, mode) if axis is None else LSQPlusQuantizer(bits, mode, axis=1, channels=5)
    q(x)
    assert q._initialized
    ref_s, ref_beta = ref.lsq_plus_init(lo.float(), hi.float(), bits, mode)  # the formula the module calls
    scale = lo.abs() + hi.abs()  # beta's terms are of this size: fp32 rounding of them, no more
    for name, s, beta in [("module", q.s.detach(), q.beta.detach()), ("reference.lsq_plus_init", ref_s, ref_beta)]:
        assert s.dtype == beta.dtype == torch.float32 and s.shape == beta.shape == s64.shape, name
        torch.testing.assert_close(s.double(), s64, rtol=2**-22, atol=0, msg=lambda m: f"{name}: s\n{m}")
        torch.testing.assert_close(beta.double(), beta64, rtol=0, atol=float((scale * 2**-21).max()),
                                   msg=lambda m: f"{name}: beta\n{m}")
    # The grid spans the batch: x = min is level Qn, x = max level Qp (per channel where per channel).
    shape = (1, -1, 1, 1) if axis is not None else (1, 1, 1, 1)
    ends = torch.cat([lo.float().view(shape).expand(1, 5, 1, 1), hi.float().view(shape).expand(1, 5, 1, 1)])
    with torch.no_grad(), q2kernels.use_backend("reference"):
        y = q(ends)
    s_, b_ = q.s.detach().view(shape), q.beta.detach().view(shape)
    level = torch.round((y - b_) / s_)
    assert level[0].eq(qn).all() and level[1].eq(qp).all(), level.flatten().tolist()
    torch.testing.assert_close(y.double(), ends.double(), rtol=0, atol=float(scale.max()) * 2**-20)


@pytest.mark.parametrize("recipe", RECIPES)
def test_quantize_model_swaps_layers_and_keeps_first_last(recipe):
    m = quantize_model(small_net(), recipe, 4, 4)
    kinds = [type(mod) for mod in m]
    assert kinds[0] is nn.Conv2d and kinds[-1] is nn.Linear  # first and last kept in float
    assert sum(k in (QConv2d, QLinear) for k in kinds) == 4
    m2 = quantize_model(small_net(), recipe, 4, 4, skip=["6"], keep_first_last=False)
    assert type(m2[0]) is QConv2d and type(m2[6]) is nn.Conv2d and type(m2[-1]) is QLinear


def test_quantize_model_bad_arguments():
    with pytest.raises(ValueError, match="recipe"):
        quantize_model(small_net(), "nope")
    with pytest.raises(ValueError, match="skip"):
        quantize_model(small_net(), "lsq", skip=["missing.layer"])
    with pytest.raises(ValueError, match="bits"):
        quantize_model(small_net(), "lsq", w_bits=9)
    with pytest.raises(TypeError, match="weight_quantizer"):
        QConv2d(3, 4, 3, weight_quantizer=nn.ReLU())
    with pytest.raises(ValueError, match="axis and channels"):
        LSQQuantizer(4, axis=0)


def test_from_float_copies_the_layer():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, bias=True)
    q = QConv2d.from_float(conv)
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(q(x), conv(x), rtol=0, atol=0)
    lin = nn.Linear(5, 3)
    torch.testing.assert_close(QLinear.from_float(lin)(torch.ones(2, 5)), lin(torch.ones(2, 5)))


@pytest.mark.parametrize("recipe", RECIPES)
def test_fused_training_follows_the_reference(recipe):
    """A few SGD steps with the fused kernels follow the reference backend's loss curve."""
    torch.manual_seed(1)
    base = quantize_model(small_net(), recipe, 4, 4)
    data = [(torch.randn(4, 3, 12, 12), torch.randint(0, 3, (4,))) for _ in range(4)]
    curves, params = {}, {}
    for backend in ("reference", "triton"):
        m = copy.deepcopy(base)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        curves[backend] = []
        with q2kernels.use_backend(backend):
            for x, y in data:
                loss = nn.functional.cross_entropy(m(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                curves[backend].append(loss.item())
        params[backend] = [p.detach() for p in m.parameters()]
    torch.testing.assert_close(torch.tensor(curves["triton"]), torch.tensor(curves["reference"]),
                               rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(p, p0) for p, p0 in zip(params["triton"], base.parameters())), "it trained"


@pytest.mark.parametrize("recipe", RECIPES)
def test_state_dict_round_trip_is_exact(recipe, tmp_path):
    m = quantize_model(small_net(), recipe, 3, 3)
    m(torch.randn(2, 3, 8, 8))  # initialise every quantizer
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    fresh = quantize_model(small_net(), recipe, 3, 3)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    saved, loaded = m.state_dict(), fresh.state_dict()
    assert list(saved) == list(loaded)
    for k, a in saved.items():
        assert torch.equal(a, loaded[k]) if isinstance(a, torch.Tensor) else a == loaded[k], k
    for mod in fresh.modules():
        if isinstance(mod, q2kernels.nn.Quantizer):
            assert mod._initialized, "a loaded quantizer must not re-initialise"
    m.eval(), fresh.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(m(x), fresh(x))


def test_compiled_model_has_no_graph_breaks(triton_backend):
    m = quantize_model(small_net(), "lsq_plus", 4, 4)
    x = torch.randn(2, 3, 8, 8)
    m(x)  # first-batch init runs eagerly
    eager_out = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager_out)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("make", [
    lambda: (LSQQuantizer(4, "signed", axis=1, channels=6), torch.randn(2, 6, 5, 5)),
    lambda: (LSQPlusQuantizer(4), torch.randn(2, 6, 5, 5)),
    lambda: (PACTQuantizer(4, 3.0), torch.randn(2, 6, 5, 5)),
    lambda: (DoReFaWeightQuantizer(4), torch.randn(6, 4, 3, 3)),
])
def test_autograd_saves_nothing_larger_than_the_input(make, triton_backend):
    q, x = make()
    x.requires_grad_()
    q(x.detach())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(x)
    assert saved, "the input must be saved"
    assert all(t.numel() <= x.numel() for t in saved)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), "only the input itself, not a copy"


def test_step_size_is_what_q_ada_divides_by():
    q = LSQQuantizer(4, "unsigned")
    q(torch.rand(10))
    assert torch.equal(q.step_size(), q.s.detach())
    p = PACTQuantizer(4, 1.5)
    assert torch.allclose(p.step_size(), torch.tensor([0.1]))
    assert ref.qrange(4, "unsigned") == (0, 15)


# ---------------------------------------------------------------- quantizer settings in the state_dict

@pytest.mark.parametrize("w_bits,a_bits,module,saved,model", [
    (3, 3, "3.weight_quantizer", "bits=4", "bits=3"),
    (8, 8, "3.weight_quantizer", "bits=4", "bits=8"),
    (4, 2, "3.act_quantizer", "bits=4", "bits=2"),
])
def test_state_dict_of_other_bit_widths_does_not_load(w_bits, a_bits, module, saved, model):
    src = quantize_model(small_net(), "lsq", 4, 4)
    dst = quantize_model(small_net(), "lsq", w_bits, a_bits)
    with pytest.raises(RuntimeError) as e:
        dst.load_state_dict(src.state_dict())
    line = next(l for l in str(e.value).splitlines() if f"quantizer {module!r}" in l)
    assert f"the state_dict holds a LSQQuantizer({saved}" in line and f"the module is a LSQQuantizer({model}" in line


def test_state_dict_of_another_kind_or_mode_does_not_load():
    with pytest.raises(RuntimeError, match=r"'3.act_quantizer': the state_dict holds a LSQQuantizer\(bits=4, "
                                           r"mode='signed', axis=None\), the module is a PACTQuantizer\(bits=4\)"):
        quantize_model(small_net(), "pact").load_state_dict(quantize_model(small_net(), "lsq").state_dict())
    with pytest.raises(RuntimeError, match="holds a LSQQuantizer.*mode='signed'.*the module is a LSQQuantizer.*"
                                           "mode='unsigned'"):
        LSQQuantizer(4, "unsigned").load_state_dict(LSQQuantizer(4, "signed").state_dict())
    with pytest.raises(RuntimeError, match="holds a LSQQuantizer.*axis=None.*the module is a LSQQuantizer.*axis=0"):
        LSQQuantizer(4, axis=0, channels=1).load_state_dict(LSQQuantizer(4).state_dict())
    # The settings travel with the tensors (a uint8 entry, test_hostile_modules.py) and in the
    # state_dict's metadata, and every value stays a tensor (trainers' EMA and checkpoint transfer
    # read .dtype and .shape of each); torch.save and a weights_only load keep them, so a saved file
    # is checked too.
    state = quantize_model(small_net(), "n2uq", 3, 3).state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state._metadata["3.act_quantizer"]["q2kernels.quantizer"] == {"kind": "N2UQQuantizer", "bits": 3}
    buffer = io.BytesIO()
    torch.save(quantize_model(small_net(), "lsq").state_dict(), buffer)
    buffer.seek(0)
    with pytest.raises(RuntimeError, match="holds a LSQQuantizer.*the module is a PACTQuantizer"):
        quantize_model(small_net(), "pact").load_state_dict(torch.load(buffer, weights_only=True))
    # A state_dict rebuilt without metadata (a trainer's filtered copy) keeps the settings entry and
    # loads into a model of the same settings.
    plain = dict(quantize_model(small_net(), "lsq").state_dict())
    quantize_model(small_net(), "lsq").load_state_dict(plain)


# ---------------------------------------------------------------- degenerate first batches

def _lsq_init(x, qp, dims=None):
    """LSQ's init 2*mean|x|/sqrt(Qp), written out here."""
    mean = x.abs().mean() if dims is None else x.abs().mean(dim=dims)
    return (2 * mean / qp ** 0.5).reshape(-1)


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), float("nan")),
                                 torch.zeros(0, 3, 4, 4)])
def test_lsq_skips_a_degenerate_first_batch_and_learns(bad):
    q = LSQQuantizer(4, "signed")
    q(bad)
    assert q.s.tolist() == [1.0] and not q._initialized and not bool(q.initialized)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    q(x)
    torch.testing.assert_close(q.s.detach(), _lsq_init(x, 7), rtol=1e-6, atol=0)
    assert q._initialized and bool(q.initialized)
    q(x).square().sum().backward()
    assert q.s.grad is not None and q.s.grad.abs().item() > 0


def test_per_channel_init_keeps_a_zero_channel_at_one():
    w = torch.randn(4, 3, 3, 3)
    w[2] = 0
    q = LSQQuantizer(4, "signed", axis=0, channels=4)
    q(w)
    expected = _lsq_init(w, 7, dims=(1, 2, 3))
    expected[2] = 1.0
    torch.testing.assert_close(q.s.detach(), expected, rtol=1e-6, atol=0)
    assert q._initialized


def test_lsq_plus_and_pact_skip_degenerate_first_batches():
    p = LSQPlusQuantizer(4)
    p(torch.full((2, 3, 4, 4), 0.25))  # constant: max == min
    assert p.s.tolist() == [1.0] and p.beta.tolist() == [0.0] and not p._initialized
    x = torch.randn(2, 3, 4, 4)
    p(x)
    torch.testing.assert_close(p.s.detach(), ((x.max() - x.min()) / 15).reshape(1))
    torch.testing.assert_close(p.beta.detach(), x.min().reshape(1))
    a = PACTQuantizer(4)
    for bad in (torch.zeros(2, 3), -torch.rand(2, 3), torch.tensor([1.0, float("inf")])):
        a(bad)
        assert a.alpha.tolist() == [1.0] and not a._initialized
    a(torch.tensor([0.5, 2.5, -1.0]))
    assert a.alpha.tolist() == [2.5] and a._initialized
    fixed = PACTQuantizer(4, alpha_init=3.0)
    fixed(torch.zeros(3))
    assert fixed.alpha.tolist() == [3.0] and fixed._initialized


@pytest.mark.parametrize("make", [lambda: LSQQuantizer(4, "signed"), lambda: LSQPlusQuantizer(4),
                                  lambda: PACTQuantizer(4), lambda: LSQQuantizer(4, "signed", axis=1, channels=3)])
def test_forward_reads_no_tensor_value_once_initialised(make, monkeypatch):
    """The deferred init reads its flag on the host only while uninitialised (module docstring)."""
    q = make()
    x = torch.randn(2, 3, 4, 4)
    q(torch.zeros_like(x))
    q(x)
    assert q._initialized

    def host_read(*args):
        raise AssertionError("forward read a tensor value on the host")

    monkeypatch.setattr(torch.Tensor, "__bool__", host_read)
    monkeypatch.setattr(torch.Tensor, "item", host_read)
    for backend in ("reference", "triton"):
        with q2kernels.use_backend(backend):
            q(x)
