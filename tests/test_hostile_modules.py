"""Hostile inputs to the modules of q2kernels.nn, and to the state they load:
- a non-finite backward (an AMP overflow) must not poison GatedFusion's controller: the step is skipped
  and counted, on one process and under DDP, against docs/math.md §5 written out by hand over the
  finite steps only (gate_controller_oracle.py);
- constructor arguments (GatedFusion, QConv2d, QLinear, every quantizer kind, quantize_model) are checked,
  not coerced, and GatedFusion's settings are checked again when set later;
- a state_dict carries its quantizers' settings with its tensors, so a plain dict copy or a file of a
  4-bit state does not load into a 2-bit model, while older checkpoints (settings in the metadata only)
  still load;
- every entry of a quantizer's or a GatedFusion's state is checked at load, the error naming its key.
The seeds live in tests/hostile_corpus/modules/*.json; every one is run."""
import io
import json
import math
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import q2kernels
from q2kernels.gate_controller import GateController
from q2kernels.nn import (QUANTIZER_KINDS, DoReFaWeightQuantizer, GatedFusion, LSQPlusQuantizer, LSQQuantizer,
                          N2UQQuantizer, N2UQWeightQuantizer, PACTQuantizer, QConv2d, QLinear, quantize_model)
from q2kernels.nn.quantizers import SETTINGS_KEY

from gate_controller_oracle import controller_by_hand

# The interpreter evaluates an inf backward in numpy, which warns about the inf - inf it computes; the
# tests check what the controller makes of it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")

CORPUS = pathlib.Path(__file__).parent / "hostile_corpus" / "modules"
BACKENDS = ("reference", "triton")
INF, NAN = float("inf"), float("nan")


def _seeds(name):
    """The seeds of one corpus file, each with an id naming its file and position."""
    seeds = json.loads((CORPUS / name).read_text())["seeds"]
    return [pytest.param(*s, id=f"{name.split('.')[0]}-{i}") for i, s in enumerate(seeds)]


def test_every_corpus_file_is_run():
    run = {"constructors.json", "quantizer_state.json", "fusion_state.json"}
    assert {p.name for p in CORPUS.glob("*.json")} == run


def _small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(8, 4, 1), nn.SiLU(), nn.Conv2d(4, 2, 1))


def _value(spec):
    """A state entry from its JSON description (the corpus files say how)."""
    if "python" in spec:
        return spec["python"]
    if "text" in spec:
        return torch.tensor(list(spec["text"].encode("utf-8")), dtype=torch.uint8)
    if "metadata" in spec:
        return _with_tensors(spec["metadata"])
    dtype = getattr(torch, spec["dtype"])
    if "fill" in spec:
        return torch.full(spec["shape"], spec["fill"], dtype=dtype)
    return torch.tensor(spec["tensor"], dtype=dtype)


def _with_tensors(v):
    if isinstance(v, dict):
        return torch.tensor(v["tensor"]) if set(v) == {"tensor"} else {k: _with_tensors(a) for k, a in v.items()}
    return [_with_tensors(a) for a in v] if isinstance(v, list) else v


# ------------------------------------------------------------------------------------------------
# 5. a non-finite backward is skipped by the controller, and counted
# ------------------------------------------------------------------------------------------------

def _steps_with_overflow(m, backend, bad_steps, bad_value, n=5, seed=0):
    """n backward steps of m; at bad_steps one element of dy is bad_value. Returns the float64 energies
    sum(dx_k^2) of the finite steps, from the grads autograd returned (the oracle's input)."""
    g = torch.Generator().manual_seed(seed)
    energies = []
    with q2kernels.use_backend(backend):
        for step in range(n):
            xs = [(torch.randn(2, c, 3, 3, generator=g) * (1 + k)).requires_grad_() for k, c in enumerate(m.channels)]
            y = m(xs)
            dy = torch.randn(y.shape, generator=g)
            if step in bad_steps:
                dy[1, 2, 0, 1] = bad_value
            y.backward(dy)
            if step not in bad_steps:
                energies.append([x.grad.double().square().sum().item() for x in xs])
    return energies


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_value", [INF, -INF, NAN])
@pytest.mark.parametrize("bad_steps", [(2,), (0,), (1, 3)])
def test_a_non_finite_backward_is_skipped_and_counted(backend, bad_value, bad_steps):
    """theta, G, Gbar after the run equal the hand-written loop fed with the finite steps only (a
    skipped first step leaves the EMA to start at the first finite one); the count says how many."""
    m = GatedFusion([4, 3], mode="balanced", tau=[0.2, -0.2])
    energies = _steps_with_overflow(m, backend, bad_steps, bad_value)
    G, Gbar, theta = controller_by_hand(energies, [0.0, 0.0], [0.2, -0.2])[-1]
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(m.theta.double(), torch.tensor(theta, **f64), rtol=0, atol=1e-6)
    torch.testing.assert_close(m.grad_norm.double(), torch.tensor(G, **f64), rtol=1e-6, atol=0)
    torch.testing.assert_close(m.grad_norm_ema.double(), torch.tensor(Gbar, **f64), rtol=1e-6, atol=0)
    assert int(m.steps) == 5 - len(bad_steps) and int(m.skipped_steps) == len(bad_steps)
    log = m.gate_log()
    assert log["skipped_steps"] == len(bad_steps) and log["step"].tolist() == list(range(5 - len(bad_steps)))
    assert bool(torch.isfinite(log["grad_norm"]).all() and torch.isfinite(log["grad_norm_ema"]).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_mode_skips_too(backend):
    """Learned mode only records the norms; a NaN would stay in their EMA for good just the same."""
    m = GatedFusion([4, 3], mode="learned")
    energies = _steps_with_overflow(m, backend, (1,), NAN, n=3)
    _, Gbar, _ = controller_by_hand(energies, [0.0, 0.0])[-1]
    torch.testing.assert_close(m.grad_norm_ema.double(), torch.tensor(Gbar, dtype=torch.float64), rtol=1e-6, atol=0)
    assert (int(m.steps), int(m.skipped_steps)) == (2, 1)


def test_the_op_skips_a_step_whose_result_is_not_finite():
    """Finite energies with a non-finite target (tau set in place, past every check) would make theta
    NaN: the op skips that step as well, and leaves every tensor as it was."""
    K = 2
    state = GateController(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]), torch.tensor(3),
                           torch.zeros(4, 1 + 3 * K), torch.tensor([0.1, -0.1]), torch.tensor([0.0, NAN]),
                           skipped=torch.zeros((), dtype=torch.int64))
    before = [t.clone() for t in state.tensors()[:5]]
    state.step(torch.tensor([4.0, 9.0]), torch.tensor([0.5, 0.5]))
    for a, b in zip(before, state.tensors()):
        assert torch.equal(a, b)
    assert int(state.skipped) == 1


def test_a_caller_without_the_count_still_skips():
    """GateController built by position, as before `skipped` existed: the step is skipped, uncounted."""
    state = GateController(torch.zeros(2), torch.zeros(2), torch.zeros((), dtype=torch.int64), torch.zeros(0, 7),
                           torch.zeros(2), None, 0.1, 0.05)
    state.step(torch.tensor([INF, 1.0]), torch.tensor([0.5, 0.5]))
    assert int(state.steps) == 0 and torch.equal(state.theta, torch.zeros(2)) and state.skipped is None


def test_the_count_is_saved_and_an_older_checkpoint_loads(tmp_path):
    m = GatedFusion([4, 3], mode="balanced")
    _steps_with_overflow(m, "reference", (1,), INF, n=3)
    torch.save(m.state_dict(), tmp_path / "fusion.pt")
    fresh = GatedFusion([4, 3], mode="balanced")
    fresh.load_state_dict(torch.load(tmp_path / "fusion.pt", weights_only=True))
    assert int(fresh.skipped_steps) == 1 and torch.equal(fresh.theta, m.theta)
    older = {k: v for k, v in m.state_dict().items() if k != "skipped_steps"}  # saved before the count existed
    fresh.load_state_dict(older)
    assert int(fresh.skipped_steps) == 0 and torch.equal(fresh.theta, m.theta)


def _overflow_on_one_rank(rank, world, init_file):
    """Rank 1's backward overflows at step 1; the energies are all-reduced first, so both ranks skip it
    and keep bitwise-equal state, without DDP's buffer broadcast."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for backend in BACKENDS:
            torch.manual_seed(0)
            m = GatedFusion([4, 3], mode="balanced")
            _steps_with_overflow(m, backend, (1,) if rank == 1 else (), INF, n=3, seed=10 + rank)
            assert (int(m.steps), int(m.skipped_steps)) == (2, 1), f"rank {rank} ({backend})"
            for name in ("theta", "grad_norm", "grad_norm_ema", "steps", "skipped_steps"):
                t = getattr(m, name)
                assert bool(torch.isfinite(t.float()).all()), f"rank {rank}: {name} is not finite"
                out = [torch.empty_like(t) for _ in range(world)]
                dist.all_gather(out, t.contiguous())
                assert torch.equal(out[0], out[1]), f"{name} differs across ranks ({backend})"
    finally:
        dist.destroy_process_group()


def test_all_ranks_skip_together(tmp_path):
    mp.spawn(_overflow_on_one_rank, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


# ------------------------------------------------------------------------------------------------
# 6, 14. constructor arguments are checked, not coerced; GatedFusion's settings also when set later
# ------------------------------------------------------------------------------------------------

_TARGETS = {"GatedFusion": GatedFusion, "QConv2d": QConv2d, "QLinear": QLinear,
            **{k: QUANTIZER_KINDS[k] for k in ("LSQQuantizer", "LSQPlusQuantizer", "PACTQuantizer",
                                               "DoReFaWeightQuantizer", "N2UQQuantizer", "N2UQWeightQuantizer")},
            "quantize_model": lambda **kw: quantize_model(_small_net(), **kw)}


@pytest.mark.parametrize("target,args,kwargs,error,name", _seeds("constructors.json"))
def test_constructor_arguments_are_checked(target, args, kwargs, error, name):
    with pytest.raises({"ValueError": ValueError, "TypeError": TypeError}[error]) as e:
        _TARGETS[target](*args, **kwargs)
    assert str(e.value).startswith(f"{name}:"), str(e.value)


def test_integer_types_other_than_int_are_accepted():
    """Checked, not narrowed to Python's int: a numpy integer is an integer."""
    np = pytest.importorskip("numpy")
    conv = QConv2d(np.int64(4), 6, np.int32(3), groups=np.int64(2))
    assert conv.weight.shape == (6, 2, 3, 3)
    assert GatedFusion([np.int64(4), 3]).channels == [4, 3]


@pytest.mark.parametrize("name,value", [("eta", NAN), ("eta", -1.0), ("eta", INF), ("ema_weight", 0.0),
                                        ("ema_weight", 2.0), ("ema_weight", NAN), ("eps", 0.0), ("eps", -INF)])
def test_settings_set_later_are_checked(name, value):
    m = GatedFusion([4, 3], mode="balanced")
    before = getattr(m, name)
    with pytest.raises(ValueError, match=f"^{name}:"):
        setattr(m, name, value)
    assert getattr(m, name) == before


@pytest.mark.parametrize("tau,error", [([NAN, 0.0], ValueError), (torch.tensor([0.0, INF]), ValueError),
                                       (torch.zeros(3), ValueError), ("x", TypeError), (None, TypeError)])
def test_tau_set_later_is_checked(tau, error):
    m = GatedFusion([4, 3], mode="balanced", tau=[0.5, -0.5])
    with pytest.raises(error, match="^tau:"):
        m.tau = tau
    assert torch.equal(m.tau, torch.tensor([0.5, -0.5]))


@pytest.mark.parametrize("name", ["channels", "mode", "fuse", "out_channels"])
def test_shape_settings_are_read_only(name):
    m = GatedFusion([4, 3])
    with pytest.raises(AttributeError, match=name):
        setattr(m, name, getattr(m, name))


def test_valid_settings_set_later_take_effect():
    """The checked setters still set: a new eta and tau drive the next step (the oracle's loop)."""
    m = GatedFusion([4, 3], mode="balanced")
    m.eta, m.ema_weight, m.tau = 0.2, 0.5, torch.tensor([0.3, -0.3])
    energies = _steps_with_overflow(m, "reference", (), INF, n=2)
    _, _, theta = controller_by_hand(energies, [0.0, 0.0], [0.3, -0.3], beta=0.5, eta=0.2)[-1]
    torch.testing.assert_close(m.theta.double(), torch.tensor(theta, dtype=torch.float64), rtol=0, atol=1e-6)
    assert bool(torch.isfinite(m.gates()).all())


@pytest.mark.parametrize("entry,value,name", _seeds("fusion_state.json"))
def test_fusion_state_entries_are_checked_at_load(entry, value, name):
    m = GatedFusion([4, 3], mode="balanced", tau=[0.5, -0.5])
    state = GatedFusion([4, 3], mode="balanced").state_dict()
    state[entry] = _value(value)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match=f"GatedFusion '\\(root\\)': {name}: expected"):
        m.load_state_dict(state)
    for k, v in m.state_dict().items():
        assert torch.equal(v.nan_to_num(), before[k].nan_to_num()), f"{k} changed by a refused load"


def test_fusion_state_errors_name_the_nested_key():
    net = nn.Sequential(nn.Identity(), GatedFusion([4, 3], mode="balanced"))
    state = net.state_dict()
    state["1.tau"] = torch.tensor([NAN, 0.0])
    with pytest.raises(RuntimeError, match=r"GatedFusion '1': 1.tau: expected finite values"):
        net.load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# 7. the bit width (and kind, and settings) travel with the tensors
# ------------------------------------------------------------------------------------------------

# Every kind q2kernels registers, at two settings that differ only in bits.
_KINDS = {
    "LSQQuantizer": lambda bits: LSQQuantizer(bits),
    "LSQPlusQuantizer": lambda bits: LSQPlusQuantizer(bits),
    "PACTQuantizer": lambda bits: PACTQuantizer(bits),
    "DoReFaWeightQuantizer": lambda bits: DoReFaWeightQuantizer(bits),
    "N2UQQuantizer": lambda bits: N2UQQuantizer(bits),
    "N2UQWeightQuantizer": lambda bits: N2UQWeightQuantizer(bits),
}


def test_every_registered_kind_is_covered():
    ours = {k for k, cls in QUANTIZER_KINDS.items() if cls.__module__.startswith("q2kernels.")}
    assert ours == set(_KINDS)


def _copies(state):
    """The ways a state_dict loses its _metadata: dict(), a comprehension, and a file of either."""
    plain = dict(state)
    buffer = io.BytesIO()
    torch.save({k: v for k, v in state.items()}, buffer)
    buffer.seek(0)
    return {"dict": plain, "comprehension": {k: v for k, v in state.items()},
            "file": torch.load(buffer, weights_only=True)}


@pytest.mark.parametrize("copy", ["dict", "comprehension", "file"])
@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_a_plain_copy_of_another_bit_width_does_not_load(kind, copy):
    src, dst = _KINDS[kind](4), _KINDS[kind](2)
    with pytest.raises(RuntimeError, match=rf"quantizer '\(root\)': the state_dict holds a {kind}\(bits=4.*"
                                           rf"the module is a {kind}\(bits=2"):
        dst.load_state_dict(_copies(src.state_dict())[copy])


@pytest.mark.parametrize("copy", ["dict", "comprehension", "file"])
@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_a_plain_copy_of_the_same_settings_loads(kind, copy):
    src, dst = _KINDS[kind](3), _KINDS[kind](3)
    for p in src.parameters():
        p.data.uniform_(0.5, 1.5)
    dst.load_state_dict(_copies(src.state_dict())[copy])
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("copy", ["dict", "file"])
def test_a_model_copy_names_the_layer(copy):
    src, dst = quantize_model(_small_net(), "lsq", 4, 4), quantize_model(_small_net(), "lsq", 2, 4)
    with pytest.raises(RuntimeError, match=r"quantizer '2.weight_quantizer': the state_dict holds a "
                                           r"LSQQuantizer\(bits=4.*the module is a LSQQuantizer\(bits=2"):
        dst.load_state_dict(_copies(src.state_dict())[copy])
    with pytest.raises(RuntimeError, match=r"quantizer '2.act_quantizer': the state_dict holds a LSQQuantizer"
                                           r".*the module is a PACTQuantizer"):
        quantize_model(_small_net(), "pact").load_state_dict(_copies(src.state_dict())[copy])


def _older_checkpoint(state, keep_metadata):
    """A state_dict as q2kernels wrote it before the settings travelled as a tensor."""
    old = type(state)((k, v) for k, v in state.items() if not k.endswith(SETTINGS_KEY))
    if keep_metadata:
        old._metadata = state._metadata
    return old


def test_older_checkpoints_load_and_their_metadata_is_still_checked():
    src = quantize_model(_small_net(), "n2uq", 4, 4)
    quantize_model(_small_net(), "n2uq", 4, 4).load_state_dict(_older_checkpoint(src.state_dict(), True))
    quantize_model(_small_net(), "n2uq", 4, 4).load_state_dict(_older_checkpoint(src.state_dict(), False))
    with pytest.raises(RuntimeError, match=r"holds a PACTQuantizer\(bits=4\), the module is a PACTQuantizer\(bits=3\)"):
        PACTQuantizer(3).load_state_dict(_older_checkpoint(PACTQuantizer(4).state_dict(), True))


def test_settings_tensor_and_metadata_must_both_agree():
    """A settings tensor edited into another quantizer's state is caught by either source."""
    state = PACTQuantizer(4).state_dict()
    state[SETTINGS_KEY] = PACTQuantizer(3).state_dict()[SETTINGS_KEY]
    with pytest.raises(RuntimeError, match=r"holds a PACTQuantizer\(bits=3\), the module is a PACTQuantizer\(bits=4\)"):
        PACTQuantizer(4).load_state_dict(state)


def test_the_settings_entry_is_a_plain_tensor():
    """Trainers (Ultralytics' EMA, checkpoint transfer) read .dtype and .shape of every entry; a
    non-float dtype keeps an EMA from averaging it."""
    state = quantize_model(_small_net(), "lsq_plus").state_dict()
    settings = {k: v for k, v in state.items() if k.endswith(SETTINGS_KEY)}
    assert len(settings) == 4 and all(v.dtype == torch.uint8 and v.dim() == 1 for v in settings.values())
    assert json.loads(bytes(settings["2.act_quantizer." + SETTINGS_KEY].tolist())) == \
        {"kind": "LSQPlusQuantizer", "bits": 4, "mode": "unsigned", "axis": None}


# ------------------------------------------------------------------------------------------------
# 12. every quantizer state entry is checked at load, the error naming its key
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,config,entry,value,name", _seeds("quantizer_state.json"))
def test_quantizer_state_entries_are_checked_at_load(kind, config, entry, value, name):
    conv = QConv2d(3, 3, 1, act_quantizer=QUANTIZER_KINDS[kind](**config))
    state = QConv2d(3, 3, 1, act_quantizer=QUANTIZER_KINDS[kind](**config)).state_dict()
    if entry == "_metadata":
        state._metadata["act_quantizer"]["q2kernels.quantizer"] = _value(value)
    else:
        state["act_quantizer." + entry] = _value(value)
    before = {k: v.clone() for k, v in conv.act_quantizer.state_dict().items()}
    with pytest.raises(RuntimeError) as e:
        conv.load_state_dict(state)
    line = next((l for l in str(e.value).splitlines() if "quantizer 'act_quantizer'" in l), str(e.value))
    assert name in line, line
    assert "ambiguous" not in str(e.value)
    for k, v in conv.act_quantizer.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused load"


def test_a_loaded_initialized_flag_is_honoured():
    """The flag is read after its check: a loaded initialised state does not re-initialise."""
    src = LSQQuantizer(4)
    src(torch.randn(100) * 3)
    dst = LSQQuantizer(4)
    dst.load_state_dict(dict(src.state_dict()))
    s = dst.s.detach().clone()
    dst(torch.randn(100) * 50)
    assert dst._initialized and torch.equal(dst.s.detach(), s)
    assert math.isfinite(float(s))


@pytest.mark.parametrize("channels,fuse,message", [
    ([4, 2.5], "concat", "channels[1]: expected an integer >= 1, got 2.5"),
    ([4, True], "concat", "channels[1]: expected an integer >= 1, got True"),
    ([4, 0], "concat", "channels[1]: expected an integer >= 1, got 0"),
    ([4], "concat", "channels: expected a list of at least 2"),
    ("48", "concat", "channels: expected a list of at least 2"),
    ([4, 4], "mean", "fuse: expected one of"),
])
def test_fixed_fusion_arguments_are_checked(channels, fuse, message):
    from q2kernels.deploy.fixed_fusion import FixedFusion

    with pytest.raises(ValueError) as e:
        FixedFusion(channels, fuse)
    assert str(e.value).startswith(message)
