"""Deterministic float layers (deploy.det_float) and their ONNX form (deploy.onnx_det_float).

- Each op's ONNX form against the q2kernels op bit for bit, one op per graph, at shapes and settings
  that exercise every path of the emitter (padding, stride, dilation, groups, depthwise, 1x1, bias or
  not, ReLU/SiLU, a matmul's and a softmax's runtime length, every softmax axis, ±inf and NaN), at a
  second input size (the graph's sizes are dynamic).
- deterministic_float on converted models: what it replaces, that it keeps the model's function
  (close to the original, which sums in PyTorch's own order), that the original is untouched, that
  a saved and loaded model runs the same bits; and then the whole model, exported and run in
  onnxruntime without any forced value, equals q2kernels' outputs bit for bit at fresh inputs.
"""
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("onnx", reason="onnx is not installed (the optional [onnx] extra)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the optional [onnx] extra)")

from q2kernels.deploy import load_int_model, save_int_model  # noqa: E402
from q2kernels.deploy.det_float import DetConv2d, deterministic_float, inexact_float_nodes  # noqa: E402
from q2kernels.deploy.int_graph import IntGraph  # noqa: E402
from q2kernels.deploy.int_model import IntModel  # noqa: E402
from q2kernels.deploy.onnx_export import export_onnx, run_onnx  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_onnx_export import _converted  # noqa: E402


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, any NaN equal to any NaN (the payload is the runtime's)."""
    if a.shape != b.shape:
        return False
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


def _rec(name, op, target, args=(), kwargs=None):
    return {"name": name, "op": op, "target": target, "args": {"tuple": list(args)}, "kwargs": {"dict": kwargs or {}}}


def _one_module_model(m: nn.Module) -> IntModel:
    records = [_rec("x", "placeholder", "x"), _rec("y", "call_module", "layer", [{"node": "x"}]),
               _rec("output", "output", "output", [{"node": "y"}])]
    return IntModel(IntGraph(records, {"layer": m}, {}), {})


def _function_model(fn: str, extra=()) -> IntModel:
    """x -> fn(x, *extra), or for det_matmul x @ x.transpose(-2, -1)."""
    records = [_rec("x", "placeholder", "x")]
    if fn == "q2kernels.ops.det_float.det_matmul":
        records += [_rec("t", "call_method", "transpose", [{"node": "x"}, -2, -1]),
                    _rec("y", "call_function", fn, [{"node": "x"}, {"node": "t"}])]
    else:
        records.append(_rec("y", "call_function", fn, [{"node": "x"}, *extra]))
    records.append(_rec("output", "output", "output", [{"node": "y"}]))
    return IntModel(IntGraph(records, {}, {}), {})


def _assert_exported_equal(model: IntModel, example: torch.Tensor, others, tmp_path):
    report = export_onnx(model, example, tmp_path / "m.onnx")
    assert report.float_layers == [] and report.outputs_identical == [True]
    for x in others:
        with torch.no_grad():
            ours = model(x)
        theirs, = run_onnx(report.path, x)
        assert _same_bits(ours, theirs)


def _wild(shape, seed):
    """Values over many binades, with zeros of both signs, infinities and NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 20, shape, generator=g).float())
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)[:8]
    flat[idx] = torch.tensor([0.0, -0.0, 0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40])[:len(idx)]
    return x


CONVS = [  # (in, out, kernel, stride, padding, dilation, groups, act, bias)
    (3, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, "silu", True),
    (5, 4, (1, 1), (1, 1), (0, 0), (1, 1), 1, "identity", True),
    (1, 3, (3, 2), (1, 2), (2, 0), (2, 1), 1, "relu", False),
    (6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 6, "identity", True),    # depthwise
    (6, 9, (3, 3), (2, 1), (1, 4), (1, 1), 3, "silu", True),        # grouped, channel multiplier
    (4, 4, (1, 1), (1, 1), (0, 0), (1, 1), 4, "identity", True),    # a folded BatchNorm
]


@pytest.mark.parametrize("cfg", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
def test_det_conv_onnx_equals_the_op(cfg, tmp_path):
    cin, cout, k, s, p, d, groups, act, bias = cfg
    g = torch.Generator().manual_seed(sum(k) + cin)
    w = torch.randn(cout, cin // groups, *k, generator=g)
    b = torch.randn(cout, generator=g) if bias else None
    m = DetConv2d(cin, cout, k, s, p, d, groups, act, w, b)
    _assert_exported_equal(_one_module_model(m), torch.randn(1, cin, 9, 11, generator=g),
                           [torch.randn(2, cin, 13, 7, generator=g) * 4, _wild((1, cin, 6, 5), 1),
                            torch.randn(1, cin, 1, 1, generator=g) if k == (1, 1) else torch.randn(1, cin, 5, 5)],
                           tmp_path)


def test_det_matmul_onnx_equals_the_op(tmp_path):
    model = _function_model("q2kernels.ops.det_float.det_matmul")
    g = torch.Generator().manual_seed(0)
    _assert_exported_equal(model, torch.randn(1, 2, 5, 7, generator=g),
                           [torch.randn(3, 2, 4, 33, generator=g), _wild((1, 2, 6, 9), 2),
                            torch.randn(1, 2, 3, 1, generator=g)], tmp_path)


@pytest.mark.parametrize("dim", [-1, 0, 1, 2, 3])
def test_det_softmax_onnx_equals_the_op(dim, tmp_path):
    model = _function_model("q2kernels.ops.det_float.det_softmax", [dim])
    g = torch.Generator().manual_seed(dim + 5)
    edge = torch.randn(2, 3, 4, 5, generator=g) * 30
    edge[0, 0, 0, :] = -float("inf")
    edge[0, 1, 0, 0] = float("inf")
    edge[1, 0, 1, 1] = float("nan")
    edge[1, 2] = 88.0
    _assert_exported_equal(model, torch.randn(2, 3, 4, 5, generator=g),
                           [torch.randn(1, 3, 7, 3, generator=g) * 10, edge, torch.randn(3, 3, 1, 6, generator=g)],
                           tmp_path)


def test_det_silu_onnx_equals_the_op(tmp_path):
    model = _function_model("q2kernels.ops.det_float.det_silu")
    x = torch.linspace(-100, 100, 4001).view(1, 1, 1, -1)
    _assert_exported_equal(model, x, [_wild((2, 1, 4, 5), 3)], tmp_path)


@pytest.mark.parametrize("recipe,act", [("lsq", "silu"), ("n2uq", "silu"), ("lsq_plus", "relu")])
def test_deterministic_model_is_bit_exact_in_onnxruntime_end_to_end(recipe, act, tmp_path):
    """No forced values: onnxruntime computes every layer, float ones included, and gives q2kernels'
    outputs bit for bit, at the example and at fresh inputs of other sizes."""
    int_model, x = _converted(recipe, act)
    assert inexact_float_nodes(int_model)  # the stem conv and the output convs
    det = deterministic_float(int_model)
    assert inexact_float_nodes(det) == []
    report = export_onnx(det, x, tmp_path / "m.onnx")
    assert report.float_layers == [] and all(report.outputs_identical)
    g = torch.Generator().manual_seed(11)
    for shape in ((1, 3, 96, 64), (3, 3, 32, 32)):
        xi = torch.randn(shape, generator=g)
        with torch.no_grad():
            ours = det(xi)
        theirs = run_onnx(report.path, xi)
        assert len(ours) == len(theirs)
        assert all(_same_bits(a, b) for a, b in zip(ours, theirs))


def test_deterministic_float_rewrites_and_keeps_the_function(tmp_path):
    int_model, x = _converted("lsq")
    with torch.no_grad():
        before = int_model(x)
    det = deterministic_float(int_model)
    with torch.no_grad():
        again, after = int_model(x), det(x)
    for a, b, c in zip(before, again, after):
        assert torch.equal(a, b)  # the input model is not changed
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-4)  # only the float rounding moved
    dets = [m for m in det.modules() if isinstance(m, DetConv2d)]
    assert dets and any(m.act == "silu" for m in dets)  # the stem: conv + BatchNorm + SiLU, one layer
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.SiLU)) for m in det.modules())
    assert any("DetConv2d" in v for v in det.report.values())
    # Saved and loaded: the same bits.
    save_int_model(det, tmp_path / "det.q2k")
    loaded = load_int_model(tmp_path / "det.q2k")
    with torch.no_grad():
        for a, b in zip(after, loaded(x)):
            assert torch.equal(a, b)
    assert inexact_float_nodes(loaded) == []


def test_det_conv_module_refuses_bad_arguments():
    w = torch.randn(4, 2, 3, 3)
    ok = dict(in_channels=2, out_channels=4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
              groups=1, act="silu", weight=w, bias=torch.zeros(4))
    DetConv2d(**ok)
    bad = [("act", "gelu", "act"), ("groups", 3, "groups"), ("stride", (0, 1), "stride"),
           ("padding", (-1, 0), "padding"), ("kernel_size", (3, 2), "weight"),
           ("weight", w.double(), "weight"), ("weight", w.clone().fill_(float("nan")), "weight"),
           ("bias", torch.zeros(5), "bias"), ("bias", torch.tensor([1.0, float("inf"), 0, 0]), "bias"),
           ("in_channels", 2.0, "in_channels"), ("stride", (1,), "stride")]
    for key, value, name in bad:
        with pytest.raises(ValueError, match=name):
            DetConv2d(**{**ok, key: value})


def test_a_file_with_a_bad_det_conv_is_refused(tmp_path):
    int_model, x = _converted("lsq")
    det = deterministic_float(int_model)
    save_int_model(det, tmp_path / "det.q2k")
    rec = torch.load(tmp_path / "det.q2k", weights_only=True)
    name = next(k for k, r in rec["modules"].items() if r["type"] == "DetConv2d")
    rec["modules"][name]["tensors"]["weight"] = rec["modules"][name]["tensors"]["weight"] * float("nan")
    torch.save(rec, tmp_path / "bad.q2k")
    with pytest.raises(ValueError, match="non-finite"):
        load_int_model(tmp_path / "bad.q2k")
    rec["modules"][name]["config"]["act"] = "exec"
    torch.save(rec, tmp_path / "bad2.q2k")
    with pytest.raises(ValueError, match="act"):
        load_int_model(tmp_path / "bad2.q2k")


def test_cli_export_deterministic_float(tmp_path):
    import subprocess
    int_model, x = _converted("lsq")
    save_int_model(int_model, tmp_path / "m.q2k")
    cmd = [sys.executable, "-m", "q2kernels.cli", "export", str(tmp_path / "m.q2k"), "--onnx", str(tmp_path / "m.onnx"),
           "--shape", "1,3,64,64"]
    plain = subprocess.run(cmd, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    assert "--deterministic-float" in plain.stdout  # the float layers are named, and the way out
    done = subprocess.run(cmd + ["--deterministic-float", str(tmp_path / "det.q2k")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "0 float (none)" in done.stdout and "bit-identical" in done.stdout
    det = load_int_model(tmp_path / "det.q2k")
    assert inexact_float_nodes(det) == []
    with torch.no_grad():
        ours = det(x)
    for a, b in zip(ours, run_onnx(tmp_path / "m.onnx", x)):
        assert _same_bits(a, b)
