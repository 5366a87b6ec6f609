"""Hostile use of the public API around the ops (issue 23, classes 8, 10, 11 and 13): the backend
switch as a context manager, a decorator, nested, re-entered, in threads and through exceptions;
q_ada_loss and QADALoss on empty and mismatched features, on both backends; verify_int_model on a
converted and on a loaded model, where codes really differ, and on wrong arguments; every `q2k` and
demo argument checked before any work. The seeds are in tests/hostile_corpus/api/ and all of them run."""
import json
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import q2kernels
from q2kernels import _backend, cli
from q2kernels import functional as qF
from q2kernels.deploy import IntConv2d, convert_to_int, load_int_model, save_int_model, verify_int_model
from q2kernels.nn import LSQQuantizer, QADALoss, QConv2d

CORPUS = Path(__file__).resolve().parent / "hostile_corpus" / "api"
ROOT = CORPUS.parent.parent.parent
BACKENDS = ("reference", "triton")

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")


def _seeds(name: str, key: str = "refused") -> list:
    return json.loads((CORPUS / name).read_text())[key]


def test_every_corpus_file_is_used():
    used = {"backend_names.json", "q_ada_shapes.json", "cli_argv.json", "ultralytics_demo_settings.json"}
    assert {p.name for p in CORPUS.iterdir()} == used


# ---------------------------------------------------------------------------------------------------
# Class 8: use_backend.

def test_a_call_sets_the_process_wide_backend_in_every_thread():
    seen = []
    try:
        q2kernels.use_backend("reference")
        worker = threading.Thread(target=lambda: seen.append(q2kernels.get_backend()))
        worker.start()
        worker.join()
        assert seen == ["reference"] and _backend._global_backend == "reference"
        assert q2kernels.get_backend() == "auto"  # this thread is inside conftest's scoped "auto" block
    finally:
        q2kernels.use_backend("auto")


def test_the_context_manager_switches_inside_and_restores_after_also_on_an_exception():
    assert q2kernels.get_backend() == "auto"
    with q2kernels.use_backend("triton") as scope:
        assert q2kernels.get_backend() == "triton"
        assert _backend._global_backend == "auto"  # the block is scoped: no process-wide change
    assert q2kernels.get_backend() == "auto"
    with pytest.raises(KeyError):
        with scope:
            raise KeyError("inside")
    assert q2kernels.get_backend() == "auto"


def test_nested_and_reentered_blocks_restore_each_level():
    outer = q2kernels.use_backend("reference")
    with outer:
        with q2kernels.use_backend("triton"):
            with outer:  # the same object, entered again inside itself
                assert q2kernels.get_backend() == "reference"
            assert q2kernels.get_backend() == "triton"
        assert q2kernels.get_backend() == "reference"
    assert q2kernels.get_backend() == "auto"


def test_the_decorator_switches_per_call_and_leaves_the_definition_without_effect():
    before = _backend._global_backend

    @q2kernels.use_backend("reference")
    def current(depth=0):
        inner = current(depth - 1) if depth else None  # re-entered by recursion
        return q2kernels.get_backend(), inner

    assert _backend._global_backend == before and q2kernels.get_backend() == "auto"
    assert current() == ("reference", None)
    assert current(2) == ("reference", ("reference", ("reference", None)))
    assert q2kernels.get_backend() == "auto"
    with q2kernels.use_backend("triton"):
        assert current()[0] == "reference"
        assert q2kernels.get_backend() == "triton"
    assert current.__name__ == "current"


def test_the_decorator_restores_on_an_exception():
    @q2kernels.use_backend("triton")
    def fails():
        assert q2kernels.get_backend() == "triton"
        raise RuntimeError("inside")

    with q2kernels.use_backend("reference"):
        with pytest.raises(RuntimeError, match="inside"):
            fails()
        assert q2kernels.get_backend() == "reference"


def test_a_later_process_wide_setting_survives_entering_an_earlier_object():
    scope = q2kernels.use_backend("triton")  # set process-wide by the call...
    try:
        q2kernels.use_backend("reference")  # ...then set again by another call
        with scope:  # entering must not undo the later setting
            assert q2kernels.get_backend() == "triton"
        assert _backend._global_backend == "reference"
    finally:
        q2kernels.use_backend("auto")


def test_blocks_and_decorated_calls_are_per_thread():
    barrier = threading.Barrier(4)
    seen, errors = {}, []

    @q2kernels.use_backend("reference")
    def decorated(key):
        barrier.wait(timeout=30)
        seen[key] = q2kernels.get_backend()
        barrier.wait(timeout=30)

    def in_block(name, key):
        with q2kernels.use_backend(name):
            barrier.wait(timeout=30)
            seen[key] = q2kernels.get_backend()
            barrier.wait(timeout=30)
        seen[key + " after"] = q2kernels.get_backend()

    def plain(key):
        barrier.wait(timeout=30)
        seen[key] = q2kernels.get_backend()
        barrier.wait(timeout=30)

    def guard(fn, *args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=guard, args=a) for a in
               ((decorated, "decorated"), (in_block, "triton", "block"), (in_block, "reference", "block2"),
                (plain, "plain"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert seen == {"decorated": "reference", "block": "triton", "block2": "reference", "plain": "auto",
                    "block after": "auto", "block2 after": "auto"}


def test_generator_and_coroutine_functions_and_non_callables_are_refused_as_decorator_targets():
    def gen():
        yield q2kernels.get_backend()

    async def coro():
        return None

    for target in (gen, coro):
        with pytest.raises(TypeError, match=r"use_backend\('triton'\): cannot decorate .*generator or coroutine"):
            q2kernels.use_backend("triton")(target)
    with pytest.raises(TypeError, match=r"use_backend\('triton'\): decorates a function, got int"):
        q2kernels.use_backend("triton")(3)
    assert _backend._global_backend == "auto"


def test_exit_without_enter_is_an_error():
    scope = q2kernels.use_backend("reference")
    with pytest.raises(RuntimeError, match="__exit__ without a matching __enter__"):
        scope.__exit__(None, None, None)
    q2kernels.use_backend("auto")


@pytest.mark.parametrize("name, error", _seeds("backend_names.json"))
def test_unknown_backend_names_are_refused(name, error):
    with pytest.raises({"ValueError": ValueError, "TypeError": TypeError}[error], match="backend: expected one of"):
        q2kernels.use_backend(name)
    assert q2kernels.get_backend() == "auto"


# ---------------------------------------------------------------------------------------------------
# Class 10: q_ada_loss and QADALoss on empty and mismatched features.

@pytest.mark.parametrize("shape", _seeds("q_ada_shapes.json", "zero_rows"))
@pytest.mark.parametrize("form", ["q2", "simam"])
def test_a_feature_of_no_rows_has_loss_zero_on_both_backends(shape, form):
    """docs/math.md §6 (reference/ada.py): a batch of no rows has loss 0 under either reduction."""
    for backend in BACKENDS:
        for reduction in ("mean", "sum"):
            S = torch.randn(shape, requires_grad=True)
            with q2kernels.use_backend(backend):
                loss = qF.q_ada_loss(torch.randn(shape), S, S.detach() * 1.01, 0.1, Tq=torch.randn(shape), form=form,
                                     reduction=reduction)
                loss.backward()
            assert loss.dtype == torch.float32 and loss.shape == () and loss.item() == 0.0, (backend, reduction)
            assert S.grad.shape == S.shape, backend


@pytest.mark.parametrize("t_shape, s_shape, name", _seeds("q_ada_shapes.json"))
def test_empty_maps_and_mismatched_shapes_are_refused_naming_the_argument(t_shape, s_shape, name):
    for backend in BACKENDS:
        with q2kernels.use_backend(backend), pytest.raises(ValueError, match=f"^{name}: expected"):
            qF.q_ada_loss(torch.randn(t_shape), torch.randn(s_shape))


@pytest.mark.parametrize("which", ["Sq", "Tq"])
def test_a_mismatched_quantized_feature_is_refused_on_both_backends(which):
    S = torch.randn(2, 0, 4, 4)
    other = torch.randn(2, 1, 4, 4)
    kwargs = {"Sq": S, "Tq": S, which: other}
    for backend in BACKENDS:
        with q2kernels.use_backend(backend), pytest.raises(ValueError, match=f"^{which}: expected the shape of S"):
            qF.q_ada_loss(S, S, kwargs["Sq"], Tq=kwargs["Tq"])


def test_the_triton_op_itself_takes_no_rows_and_refuses_rows_of_no_pixels():
    import q2kernels.ops.ada  # noqa: F401  (registers q2kernels::q_ada)
    empty = torch.randn(2, 0, 3, 3)
    loss, stats = torch.ops.q2kernels.q_ada(empty, empty, None, None, 1e-4, 1.0, False, True, None, "q2", 0.1)
    assert float(loss) == 0.0 and stats.shape[1] == 0
    pixelless = torch.randn(2, 3, 0, 5)
    with pytest.raises(ValueError, match=r"S: expected a \(B, C, H, W\) tensor with H\*W >= 1"):
        torch.ops.q2kernels.q_ada(pixelless, pixelless, None, None, 1e-4, 1.0, False, True, None, "q2", 0.1)


class _Features(nn.Module):
    """A module that outputs a given tensor (a model's feature at a distillation point)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape
        self.point = nn.Identity()

    def forward(self, x):
        return self.point(x.new_ones(()).expand(self.shape) * x.mean() + torch.randn(self.shape))


@pytest.mark.parametrize("backend", BACKENDS)
def test_qadaloss_names_the_point_where_teacher_and_student_features_differ(backend):
    teacher, student = _Features((2, 3, 4, 4)), _Features((2, 5, 4, 4))
    with QADALoss(teacher, student, points=["point"]) as loss, q2kernels.use_backend(backend):
        teacher(torch.ones(1))
        student(torch.ones(1, requires_grad=True))
        with pytest.raises(ValueError, match=r"QADALoss at point 'point': the teacher output has shape \(2, 3, 4, 4\) "
                                             r"and the student output \(2, 5, 4, 4\)"):
            loss()


@pytest.mark.parametrize("backend", BACKENDS)
def test_qadaloss_names_the_point_and_the_argument_of_an_empty_map(backend):
    teacher, student = _Features((2, 3, 0, 4)), _Features((2, 3, 0, 4))
    with QADALoss(teacher, student, points=[("point", "point")]) as loss, q2kernels.use_backend(backend):
        teacher(torch.ones(1))
        student(torch.ones(1))
        with pytest.raises(ValueError, match=r"^QADALoss at point 'point': S: expected a \(B, C, H, W\) tensor"):
            loss()


@pytest.mark.parametrize("backend", BACKENDS)
def test_qadaloss_of_zero_channel_features_is_zero(backend):
    teacher, student = _Features((2, 0, 4, 4)), _Features((2, 0, 4, 4))
    with QADALoss(teacher, student, points=["point"], weight=1.0) as loss, q2kernels.use_backend(backend):
        teacher(torch.ones(1))
        student(torch.ones(1))
        assert float(loss()) == 0.0


# ---------------------------------------------------------------------------------------------------
# Class 11: verify_int_model.

def _q(cin, cout, k, weights=True):
    return QConv2d(cin, cout, k, padding=k // 2, bias=False, act_quantizer=LSQQuantizer(4, "signed"),
                   weight_quantizer=LSQQuantizer(4, "signed", 0, cout) if weights else None)


def _models(kept_in_float: bool):
    """(QAT model, its integer model, input): three quantized convs, the middle one kept in float
    (an activation quantizer, no weight quantizer) when asked."""
    torch.manual_seed(0)
    model = nn.Sequential(_q(3, 8, 3), nn.ReLU(), _q(8, 8, 1, weights=not kept_in_float), nn.ReLU(),
                          _q(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layer kept in float is reported by a warning
        return model, convert_to_int(model, x), x


def _perturb_first_weight(int_model, source):
    """One packed weight byte of the integer layer converted from `source` changed: the integer model
    no longer computes what the fake-quant model does, so the codes its next layer reads differ."""
    layer = next(m for m in int_model.net.modules() if isinstance(m, IntConv2d) and m.source == source)
    with torch.no_grad():
        layer.weight.view(-1)[0] ^= 0x77


@pytest.mark.parametrize("kept_in_float", [False, True])
def test_verify_reports_differing_codes_without_crashing(kept_in_float):
    model, int_model, x = _models(kept_in_float)
    assert verify_int_model(model, int_model, x).ok
    _perturb_first_weight(int_model, "0")
    result = verify_int_model(model, int_model, x)
    consumer = "4" if kept_in_float else "2"  # the first integer layer that reads layer 0's codes
    assert result.exact and not result.ok  # the kernels compute what the (changed) model says
    assert result.layers[consumer].differing > 0 and result.layers[consumer].beyond_bound > 0
    assert any(f.startswith(f"{consumer}: ") and "beyond rounding" in f for f in result.failures())


def test_verify_works_on_a_loaded_model_and_finds_its_differences(tmp_path):
    model, int_model, x = _models(kept_in_float=False)
    save_int_model(int_model, tmp_path / "m.q2k")
    loaded = load_int_model(tmp_path / "m.q2k")
    result = verify_int_model(model, loaded, x)
    assert result.ok and set(result.layers) == set(verify_int_model(model, int_model, x).layers)
    _perturb_first_weight(loaded, "0")
    result = verify_int_model(model, loaded, x)
    assert result.exact and not result.ok and result.layers["2"].beyond_bound > 0


def test_verify_names_the_argument_that_is_wrong():
    model, int_model, x = _models(kept_in_float=False)
    cases = [((int_model, int_model, x), TypeError, "model: expected the fake-quant"),
             ((None, int_model, x), TypeError, "model: expected the fake-quant"),
             ((model, model, x), TypeError, "int_model: expected an IntModel"),
             ((model, int_model.net, x), TypeError, "int_model: expected an IntModel"),
             ((model, int_model), ValueError, "inputs: expected the input tensor"),
             ((model, int_model, x.numpy()), TypeError, r"inputs\[0\]: expected a torch.Tensor")]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            verify_int_model(*args)


def test_verify_of_a_model_the_integer_model_was_not_converted_from_is_refused():
    model, int_model, x = _models(kept_in_float=False)
    other = nn.Sequential(_q(3, 8, 3), nn.ReLU(), _q(8, 8, 1), nn.MaxPool2d(2), _q(8, 4, 1)).eval()
    with torch.no_grad():
        other(x)
    with pytest.raises(ValueError, match=r"int_model: its layer '4' received input codes of shape \(2, 8, 8, 8\), "
                                         r"but the model's QConv2d '4' receives an input of shape \(2, 8, 4, 4\)"):
        verify_int_model(other, int_model, x)


# ---------------------------------------------------------------------------------------------------
# Class 13: q2k and the demos' arguments.

def _argv(argv, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    return [a.replace("{file}", str(a_file)) for a in argv]


@pytest.mark.parametrize("argv, flag", _seeds("cli_argv.json"))
def test_bad_q2k_arguments_are_refused_at_parse_time_naming_the_flag(argv, flag, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("q2k started work on a refused argument")

    from q2kernels import demo

    for work in ("doctor", "build", "_ultralytics_demo"):
        monkeypatch.setattr(cli, work, no_work)
    monkeypatch.setattr(demo, "main", no_work)
    with pytest.raises(SystemExit) as stop:
        cli.main(_argv(argv, tmp_path))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "error:" in err, err


def test_a_refused_flag_exits_before_torch_is_imported(tmp_path):
    """`q2k demo --steps -1` answers at once: the refusal comes before torch's import (seconds)."""
    code = ("import sys\nimport q2kernels.cli as c\ntry:\n    c.main(['demo', '--steps', '-1'])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.stdout.split() == ["2", "False"], r.stdout + r.stderr
    assert "argument --steps: expected a whole number in 1..100000, got -1" in r.stderr


@pytest.mark.parametrize("kwargs, name", [({"steps": -1}, "steps"), ({"steps": 0}, "steps"), ({"steps": 2.0}, "steps"),
                                          ({"steps": True}, "steps"), ({"steps": 10**9}, "steps"),
                                          ({"smoke": "yes"}, "smoke"), ({"out": ""}, "out"), ({"out": None}, "out"),
                                          ({"out": "{file}"}, "out"), ({"out": "{file}/sub"}, "out")])
def test_the_demo_function_checks_its_arguments_before_any_work(kwargs, name, tmp_path, monkeypatch):
    from q2kernels import demo

    def no_work(*args, **kw):
        raise AssertionError("the demo started work on a refused argument")

    monkeypatch.setattr(demo, "make_shapes", no_work)
    if "out" in kwargs and isinstance(kwargs["out"], str):
        kwargs = {"out": _argv([kwargs["out"]], tmp_path)[0]}
    with pytest.raises(ValueError, match=f"^{name}: "):
        demo.main(**kwargs)


@pytest.mark.parametrize("overrides, name", _seeds("ultralytics_demo_settings.json"))
def test_the_ultralytics_demo_checks_every_setting_before_any_work(overrides, name, tmp_path, monkeypatch):
    pytest.importorskip("ultralytics")
    from q2kernels.integrations import ultralytics_offline
    ultralytics_offline()
    from q2kernels.integrations.ultralytics import demo

    def no_work(*args, **kw):
        raise AssertionError("the demo started work on a refused setting")

    monkeypatch.setattr(demo, "write_synthetic_dataset", no_work)
    monkeypatch.setattr(demo, "_float_model", no_work)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    with pytest.raises(ValueError, match=f"^{name}: "):
        demo.run(out=str(tmp_path), smoke=True, **overrides)


def test_the_ultralytics_demo_refuses_unknown_settings_and_bad_folders(tmp_path):
    pytest.importorskip("ultralytics")
    from q2kernels.integrations import ultralytics_offline
    ultralytics_offline()
    from q2kernels.integrations.ultralytics import demo

    with pytest.raises(TypeError, match="^epochs: not a setting of the demo"):
        demo.run(out=str(tmp_path), smoke=True, epochs=3)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="^out: .* exists and is not a folder"):
        demo.run(out=str(a_file), smoke=True)
    with pytest.raises(ValueError, match="^smoke: expected True or False"):
        demo.run(out=str(tmp_path), smoke="no")
