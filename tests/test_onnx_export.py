"""The ONNX exports (deploy.onnx_export, deploy.onnx_qdq) against q2kernels, run in onnxruntime (CPU).

- The exact arithmetic: the fma emulation against exact rational arithmetic (Fraction), on random
  operands and on constructed double-rounding cases where float64 then float32 gives the wrong bit;
  the epilogue (SiLU's exp polynomial, ReLU, the affine, rounding and threshold codes, float heads, the
  zero-point term) against the C++ conv2d_epilogue op bit for bit, over dense sweeps of the integer
  sum that cross every special case of exp_det.
- Whole integer models (the demo's YOLOv5 network, every recipe, ReLU and SiLU, LSQ+'s zero point,
  N2UQ's thresholds, grouped convs): every integer layer's codes equal q2kernels' bit for bit, with
  the float layers' outputs fed from the q2kernels model (teacher forcing: a float conv sums in the
  runtime's own order); the outputs themselves; a loaded model file; the CLI.
- Q/DQ: every QConv2d of a model, fed its real input, gives the fake-quant output; refusals by name.
"""
import json
import subprocess
import sys
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx", reason="onnx is not installed (the optional [onnx] extra)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the optional [onnx] extra)")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from q2kernels.deploy import convert_to_int, load_int_model, remove_layernorm, save_int_model  # noqa: E402
from q2kernels.deploy.onnx_export import (ExportRefused, export_onnx, node_values,  # noqa: E402
                                           quantized_float_nodes, run_onnx)
from q2kernels.deploy.onnx_graph import GraphBuilder, f32  # noqa: E402
from q2kernels.deploy.onnx_qdq import export_onnx_qdq  # noqa: E402
from q2kernels.nn import QConv2d, quantize_model  # noqa: E402
from q2kernels.ops import int_conv as ic  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_convert import _mixed_model, tiny_yolo  # noqa: E402


def _session(g: GraphBuilder, outputs: list[tuple[str, int]]):
    for name, elem in outputs:
        g.outputs.append(g.helper.make_tensor_value_info(name, elem, None))
    return ort.InferenceSession(g.model("test").SerializeToString(), providers=["CPUExecutionProvider"])


def _input(g: GraphBuilder, name: str, elem=None):
    assert g.name(name) == name  # taken before any constant could take it
    g.inputs.append(g.helper.make_tensor_value_info(name, elem or g.TensorProto.FLOAT, None))
    return name


# The oracle: exact rationals, rounded to float32 by comparing the neighbours' exact distances.
def _round_f32(exact: Fraction) -> np.float32:
    guess = np.float32(float(exact))
    cands = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(cands, key=lambda c: (abs(Fraction(float(c)) - exact), int(np.array(c).view(np.int32)) & 1))


def _bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.int32)


def _double_rounding_cases(n: int, seed: int = 0):
    """(a, b, c) with a·b + c within 2^-53 relative of a float32 midpoint, off it: float64 rounds onto
    the midpoint, and a float64 result rounded to float32 takes the even side, wrong half the time.
    a·b = 2^-25·(2 - δ) with tiny δ (x·y near 2 for 24-bit x, y), c = 1 + k·2^-23 of either parity."""
    rng = np.random.default_rng(seed)
    x = (1 + rng.random(200_000)).astype(np.float32)
    y = (np.float32(2) / x).astype(np.float32)
    delta = 2.0 - x.astype(np.float64) * y.astype(np.float64)
    keep = (delta != 0) & (np.abs(delta) < 2.0**-29)
    x, y = x[keep][:n], y[keep][:n]
    a = (x * np.float32(2.0**-25)).astype(np.float32)
    c = (1 + rng.integers(0, 2**20, len(x)) * 2.0**-23).astype(np.float32)
    return a, y, c


def test_fma_is_rounded_once():
    rng = np.random.default_rng(1)
    ra, rb, rc = ((rng.standard_normal(2000) * 10.0 ** rng.integers(-8, 8, 2000)).astype(np.float32)
                  for _ in range(3))
    da, db, dc = _double_rounding_cases(500)
    assert len(da) >= 100
    a, b, c = np.concatenate([ra, da, -da]), np.concatenate([rb, db, db]), np.concatenate([rc, dc, -dc])
    g = GraphBuilder(21)
    out = g.fma(_input(g, "a"), _input(g, "b"), _input(g, "c"))
    got = _session(g, [(out, g.TensorProto.FLOAT)]).run(None, {"a": a, "b": b, "c": c})[0]
    want = np.array([_round_f32(Fraction(float(p)) * Fraction(float(q)) + Fraction(float(r)))
                     for p, q, r in zip(a, b, c)], np.float32)
    np.testing.assert_array_equal(_bits(got), _bits(want))
    # The constructed cases really are double-rounding cases: float64 then float32 misses some of them.
    naive = (da.astype(np.float64) * db + dc).astype(np.float32)
    assert (_bits(naive) != _bits(want[len(ra):len(ra) + len(da)])).sum() > 10


def test_f32_reads_a_literal_as_a_compiler_does():
    for s in ("1.44269502", "-0.693145751953125", "-1.42860677e-06", "1.98412698e-04", "88.72", "0.1"):
        assert Fraction(float(f32(s))) - Fraction(s) == min(
            (Fraction(float(c)) - Fraction(s) for c in (np.nextafter(f32(s), np.float32(-1e30)), f32(s),
                                                        np.nextafter(f32(s), np.float32(1e30)))), key=abs)


def _epilogue_rows(cout: int, rng, affine: str) -> torch.Tensor:
    """Epilogue rows that put alpha·I + bias over [-120, 120] for I in +-2^20 (every branch of exp_det)."""
    alpha = (120.0 / 2**20) * (0.5 + rng.random(cout))
    rows = {"alpha": alpha, "gamma": rng.standard_normal(cout) * 1e-3, "bias": rng.standard_normal(cout) * 4,
            "q_mul": 1 / (0.05 + rng.random(cout)), "q_off": rng.standard_normal(cout) * 0.1}
    if affine == "one":
        rows["aff_mul"], rows["aff_add"] = np.ones(cout), rng.standard_normal(cout) * 0.1
    elif affine == "zero":
        rows["aff_mul"], rows["aff_add"] = rng.standard_normal(cout), np.zeros(cout)
    else:
        rows["aff_mul"], rows["aff_add"] = rng.standard_normal(cout), rng.standard_normal(cout) * 0.1
    return ic.epilogue_params(cout, **{k: torch.tensor(v) for k, v in rows.items()})


@pytest.mark.parametrize("act", ["identity", "relu", "silu"])
@pytest.mark.parametrize("affine", ["one", "zero", "general"])
@pytest.mark.parametrize("head", ["codes", "thresholds", "float"])
@pytest.mark.parametrize("zero_point", [False, True])
def test_epilogue_equals_the_cpp_op(act, affine, head, zero_point):
    rng = np.random.default_rng(hash((act, affine, head, zero_point)) % 2**32)
    cout, cin, hw = 5, 3, 48
    ep = _epilogue_rows(cout, rng, affine)
    sums = torch.cat([torch.arange(-2**20, 2**20, 2**20 // (hw * hw // 2)),  # a sweep over every branch
                      torch.randint(-2**20, 2**20, (hw * hw,))])[:2 * hw * hw].float()
    sums = sums.view(2, 1, hw, hw).expand(2, cout, hw, hw).contiguous()
    sums[:, :, 0, :8] = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0**24, -2.0**24, 3.0, -3.0])
    sums = sums.contiguous(memory_format=torch.channels_last)
    # A 1x1 conv's J is w_mul·(its channel's weight-code sum) + w_add·C_in: from these prefix sums.
    w_sum = torch.randint(-40, 40, (cout,), dtype=torch.int32)
    tap_sums = torch.zeros(cout, 2, 2, dtype=torch.int32)
    tap_sums[:, 1, 1] = w_sum
    w_mul, w_add = (2, -15) if zero_point else (1, 0)
    thresholds = torch.sort(torch.randn(7) * 3).values if head == "thresholds" else None
    qn, qp = (0, 15) if head != "thresholds" else (0, 7)
    out_dtype = torch.float32 if head == "float" else torch.uint8
    want = ic._ops.conv2d_epilogue(sums, ep, tap_sums if zero_point else None, thresholds, [hw, hw], [1, 1], cin,
                                   False, False, w_mul, w_add, [1, 1], [0, 0], [1, 1], ic.ACTIVATIONS[act], qn, qp,
                                   out_dtype)
    g = GraphBuilder(21)
    acc = _input(g, "acc")
    taps = _input(g, "taps") if zero_point else None
    out = g.epilogue(acc, taps, ep.numpy(), act, head != "float", qn, qp,
                     thresholds.numpy() if thresholds is not None else None)
    elem = g.TensorProto.FLOAT if head == "float" else g.TensorProto.INT8
    feed = {"acc": sums.contiguous().numpy()}
    if zero_point:
        feed["taps"] = (w_mul * w_sum + w_add * cin).float().view(1, cout, 1, 1).numpy()
    got = torch.from_numpy(_session(g, [(out, elem)]).run(None, feed)[0])
    if head == "float":
        assert torch.equal(got.view(torch.int32), want.contiguous().view(torch.int32))
    else:
        assert torch.equal(got, ic.unpack(want, cout, False))


# Whole integer models.
def _converted(recipe, act="silu", bits=4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_yolo(recipe, bits=bits, act=act).eval()
        remove_layernorm(model)
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
        return convert_to_int(model, x[:1]), x


def _assert_codes_equal(int_model, report, outputs, x):
    values = node_values(int_model, x)
    theirs = outputs[len(outputs) - len(report.codes_nodes):]
    assert report.codes_nodes and len(theirs) == len(report.codes_nodes)
    for (node, offset, channels), got in zip(report.codes_nodes, theirs):
        packed = values[node]
        signed = bool((got < 0).any())
        ours = ic.unpack(packed, packed.shape[-1] * 2, True)[:, offset:offset + channels]
        if not signed:
            ours = ours % 16
        assert torch.equal(ours.to(torch.int8), torch.from_numpy(np.asarray(got)).to(torch.int8)), node


@pytest.mark.parametrize("recipe,act,bits", [("lsq", "silu", 4), ("lsq_plus", "silu", 4), ("pact", "silu", 4),
                                             ("n2uq", "silu", 4), ("lsq", "relu", 3), ("lsq_plus", "relu", 3)])
def test_integer_layers_are_bit_exact(recipe, act, bits, tmp_path):
    int_model, x = _converted(recipe, act, bits)
    forced = quantized_float_nodes(int_model)
    report = export_onnx(int_model, x[:1], tmp_path / "m.onnx", codes_outputs=True, forced=tuple(forced))
    assert report.integer_layers > 20 and report.forced_inputs == forced
    values = node_values(int_model, x)
    outputs = run_onnx(report.path, x, *(values[n] for n in report.forced_inputs))
    _assert_codes_equal(int_model, report, [o.numpy() for o in outputs], x)
    # The outputs: bit for bit where an integer head writes them, else (a float conv after one) close.
    with torch.no_grad():
        ours = int_model(x)
    for a, b in zip(ours, outputs):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)) or torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_whole_model_on_its_example(tmp_path):
    """Without forcing, end to end: the report compares onnxruntime's outputs with the model's. On this
    model and input they are bit-identical (the stem's float conv happens to round alike here); a
    float conv in the runtime's own order may differ in the last bits elsewhere (docs/deploy.md)."""
    int_model, x = _converted("lsq_plus")
    report = export_onnx(int_model, x, tmp_path / "m.onnx")
    assert report.outputs_identical and all(d < 1e-4 for d in report.max_abs_diff)
    assert "_0_conv" in report.float_layers
    graph = onnx.load(report.path)
    ops = {n.op_type for n in graph.graph.node}
    assert "ConvInteger" in ops and graph.opset_import[0].version == 21
    assert {i.data_type for i in graph.graph.initializer if i.name.startswith("levels")} == {onnx.TensorProto.INT8}


def test_a_loaded_model_file_exports_the_same(tmp_path):
    int_model, x = _converted("n2uq")
    save_int_model(int_model, tmp_path / "m.q2k")
    loaded = load_int_model(tmp_path / "m.q2k")
    a = export_onnx(int_model, x[:1], tmp_path / "a.onnx", check=False)
    b = export_onnx(loaded, x[:1], tmp_path / "b.onnx", check=False)
    assert a.integer_layers == b.integer_layers
    for p, q in zip(run_onnx(a.path, x), run_onnx(b.path, x)):
        assert torch.equal(p, q)


def test_cli_export(tmp_path):
    int_model, x = _converted("lsq")
    save_int_model(int_model, tmp_path / "m.q2k")
    cmd = [sys.executable, "-m", "q2kernels.cli", "export", str(tmp_path / "m.q2k"), "--onnx", str(tmp_path / "m.onnx")]
    missing = subprocess.run(cmd, capture_output=True, text=True)
    assert missing.returncode == 2 and "--shape" in missing.stderr
    done = subprocess.run(cmd + ["--shape", "1,3,64,64"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "integer layers" in done.stdout and (tmp_path / "m.onnx").exists()
    bad = subprocess.run(cmd + ["--shape", "1,3,0,64"], capture_output=True, text=True)
    assert bad.returncode == 2 and "N,C,H,W" in bad.stderr


def test_detect_head_travels_as_metadata(tmp_path):
    from q2kernels.deploy import DetectHead
    from q2kernels.deploy.int_model import IntModel
    int_model, x = _converted("lsq")
    head = DetectHead(nc=2, reg_max=4, strides=(8, 16, 32), names=("a", "b"), imgsz=(64, 64))
    with_head = IntModel(int_model.net, int_model.report, head)
    export_onnx(with_head, x[:1], tmp_path / "m.onnx", check=False)
    props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert json.loads(props["q2kernels.detect_head"]) == head.record()


def test_refusals_name_what_and_why(tmp_path):
    int_model, x = _converted("lsq")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(int_model, x, tmp_path / "m.onnx", opset=13)
    with pytest.raises(ValueError, match="example"):
        export_onnx(int_model, x[0], tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="int_model"):
        export_onnx(nn.Conv2d(3, 3, 1), x, tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="check"):
        export_onnx(int_model, x, tmp_path / "m.onnx", check="no")
    with pytest.raises(TypeError, match="forced"):
        export_onnx(int_model, x, tmp_path / "m.onnx", forced="x")
    with pytest.raises(ValueError, match="forced: no such nodes"):
        export_onnx(int_model, x, tmp_path / "m.onnx", forced=("nope",))
    # A fake-quant layer the converter kept in float (a per-channel activation quantizer) has no
    # exact ONNX form: the export refuses it by name instead of writing something else.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = convert_to_int(_mixed_model().eval(), torch.randn(1, 3, 16, 16))
    with pytest.raises(ExportRefused, match="node 'per_channel'.*QConv2d"):
        export_onnx(kept, torch.randn(1, 3, 16, 16), tmp_path / "k.onnx")


# Q/DQ.
@pytest.mark.parametrize("recipe,bits", [("lsq", 4), ("lsq_plus", 4), ("pact", 4), ("lsq", 3), ("pact", 3)])
def test_qdq_layers_equal_the_fake_quant_model(recipe, bits, tmp_path):
    """Each QConv2d, fed its real input in the model, gives the fake-quant output (end to end, a rare
    tie flip cascades through a random network's layers, so the layers are compared one by one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_yolo(recipe, bits=bits).eval()
        remove_layernorm(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in model.named_modules() if isinstance(m, QConv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    differing = total = 0
    for name, m in model.named_modules():
        if not isinstance(m, QConv2d):
            continue
        single = nn.Sequential(m).eval()
        path = export_onnx_qdq(single, inputs[name][:1], tmp_path / "one.onnx")
        with torch.no_grad():
            want = single(inputs[name])
        got = run_onnx(path, inputs[name])[0]
        differing += int(((want - got).abs() > 1e-4 * want.abs().max()).sum())
        total += want.numel()
    assert total > 50_000 and differing <= 1e-4 * total, (differing, total)
    graph = onnx.load(path)
    types = {i.data_type for i in graph.graph.initializer}
    # 4-bit codes travel in 4-bit containers (LSQ's weight levels as int4; DoReFa's odd levels up to 15 need int8).
    assert types & {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    if recipe == "lsq":
        assert onnx.TensorProto.INT4 in types


def test_qdq_int8_containers(tmp_path):
    """int8_containers=True: no 4-bit type in the graph, the same outputs (a clip keeps the 4-bit range)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 1))
    quantize_model(model, "lsq", w_bits=4, a_bits=4)
    x = torch.randn(2, 3, 16, 16)
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        want = model(x)
    for int8 in (False, True):
        path = export_onnx_qdq(model, x[:1], tmp_path / f"m{int8}.onnx", int8_containers=int8)
        types = {i.data_type for i in onnx.load(path).graph.initializer}
        assert bool(types & {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}) != int8
        assert torch.allclose(run_onnx(path, x)[0], want, atol=1e-5)


def test_qdq_refuses_n2uq_and_layernorm(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_yolo("n2uq").eval()
    with pytest.raises(ExportRefused, match="GatedFusion|non-uniform thresholds"):
        export_onnx_qdq(model, torch.randn(1, 3, 64, 64), tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        remove_layernorm(model)
    with pytest.raises(ExportRefused, match="non-uniform thresholds"):
        export_onnx_qdq(model, torch.randn(1, 3, 64, 64), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="eval mode"):
        export_onnx_qdq(model.train(), torch.randn(1, 3, 64, 64), tmp_path / "m.onnx")
