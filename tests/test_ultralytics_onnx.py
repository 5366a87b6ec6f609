"""The integer ONNX export of a real Ultralytics detector (YOLO11n and YOLOv5s from YAML, settled on
data as tests/deployable does): every integer layer's codes in onnxruntime equal q2kernels' bit for bit
(the float layers' outputs fed from the q2kernels model: the stem conv, C2PSA's attention and the
prediction convs run in the runtime's own float kernels), and the decoded boxes and scores agree.
And the Q/DQ export of the fake-quant YOLO11n. Skipped only where ultralytics or onnxruntime is not
installed (CI's Ultralytics lane has both)."""
import sys
import warnings
from pathlib import Path

import pytest
import torch

from q2kernels.integrations import ultralytics_offline

ultralytics_offline()
pytest.importorskip("ultralytics", reason="ultralytics is not installed (the optional [ultralytics] extra)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the optional [onnx] extra)")
from q2kernels.deploy import convert_to_int  # noqa: E402
from q2kernels.deploy.det_float import deterministic_float, inexact_float_nodes  # noqa: E402
from q2kernels.deploy.detect_decode import decode  # noqa: E402
from q2kernels.deploy.fixed_fusion import FixedFusion  # noqa: E402
from q2kernels.deploy.onnx_export import export_onnx, node_values, quantized_float_nodes, run_onnx  # noqa: E402
from q2kernels.deploy.onnx_qdq import export_onnx_qdq  # noqa: E402
from q2kernels.deploy.trace import symbolic_trace  # noqa: E402
from q2kernels.nn import QConv2d, Quantizer  # noqa: E402
from q2kernels.nn.fusion import GatedFusion  # noqa: E402
from q2kernels.integrations.ultralytics import IntDetector  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.exactness_table import float_detectors, settled_detector  # noqa: E402
from test_onnx_export import _assert_codes_equal  # noqa: E402


def _converted_detector(cfg: str, recipe: str):
    """(settled W4A4 detector, its batch(), one (2, 3, 64, 64) batch, the converted integer model)."""
    model, batch = settled_detector(float_detectors([cfg])[cfg], recipe, 4, 64)
    x = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, batch, x, convert_to_int(model, x[:1])


@pytest.mark.parametrize("cfg,recipe", [("yolo11n", "lsq"), ("yolo11n", "pact"), ("yolov5s", "lsq_plus")])
def test_detector_integer_layers_bit_exact_in_onnxruntime(cfg, recipe, tmp_path):
    model, batch, x, int_model = _converted_detector(cfg, recipe)
    forced = quantized_float_nodes(int_model)
    report = export_onnx(int_model, x[:1], tmp_path / "m.onnx", codes_outputs=True, forced=tuple(forced))
    assert report.integer_layers > 50
    values = node_values(int_model, x)
    outputs = run_onnx(report.path, x, *(values[n] for n in report.forced_inputs))
    _assert_codes_equal(int_model, report, [o.numpy() for o in outputs], x)
    with torch.no_grad():
        maps = int_model(x)
    theirs = outputs[:len(maps)]
    for a, b in zip(maps, theirs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    head = IntDetector(int_model, model).detect_head(64)
    for a, b in zip(decode(maps, head), decode(theirs, head)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cfg,recipe", [("yolo11n", "lsq"), ("yolov5s", "lsq_plus")])
def test_deterministic_detector_is_bit_exact_end_to_end(cfg, recipe, tmp_path):
    """deterministic_float, then export_onnx with nothing forced: onnxruntime computes every layer (the
    stem, C2PSA's attention, the prediction convs included) and its raw maps and decoded detections
    equal q2kernels' bit for bit, on fresh inputs."""
    model, batch, x, int_model = _converted_detector(cfg, recipe)
    det = deterministic_float(int_model)
    assert inexact_float_nodes(det) == [] and {"model_0_conv", "model_0_bn", "model_0_act"} <= \
        set(inexact_float_nodes(int_model))  # the stem, at least
    report = export_onnx(det, x[:1], tmp_path / "m.onnx")
    assert report.float_layers == [] and all(report.outputs_identical)
    head = IntDetector(det, model).detect_head(64)
    for xi in (batch(), batch()):
        with torch.no_grad():
            maps = det(xi)
        theirs = run_onnx(report.path, xi)
        for a, b in zip(maps, theirs):
            assert a.std() > 0 and torch.equal(a.view(torch.int32), b.view(torch.int32))
        for a, b in zip(decode(maps, head), decode(theirs, head)):
            assert torch.equal(a, b)
    # The attention's float ops and the prediction convs were replaced, not dropped.
    kinds = {r["target"] for r in det.net.records if r["op"] == "call_function"}
    if cfg == "yolo11n":
        assert {"q2kernels.ops.det_float.det_matmul", "q2kernels.ops.det_float.det_softmax"} <= kinds


def test_detector_qdq_export_matches_the_fake_quant_model(tmp_path):
    """export_onnx_qdq of the prepared-and-settled YOLO11n: onnxruntime's raw maps equal the traced
    fake-quant model's up to float rounding (measured: 9e-6 on maps of magnitude 13; no code flipped)."""
    model, batch = settled_detector(float_detectors(["yolo11n"])["yolo11n"], "lsq", 4, 64)
    x = batch()
    path = export_onnx_qdq(model.eval(), x[:1], tmp_path / "qdq.onnx")
    traced = symbolic_trace(model, is_leaf=lambda m: isinstance(m, (QConv2d, Quantizer, GatedFusion, FixedFusion)))
    with torch.no_grad():
        want = traced(x)
    for a, b in zip(want, run_onnx(path, x)):
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(a.abs().max())), float((a - b).abs().max())
