"""The integer ONNX export of a real Ultralytics detector (YOLO11n and YOLOv5s from YAML, settled on
data as tests/deployable does): every integer layer's codes in onnxruntime equal q2kernels' bit for bit
(the float layers' outputs fed from the q2kernels model: the stem conv, C2PSA's attention and the
prediction convs run in the runtime's own float kernels), and the decoded boxes and scores agree.
Skipped only where ultralytics or onnxruntime is not installed (CI's Ultralytics lane has both)."""
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
from q2kernels.deploy.detect_decode import decode  # noqa: E402
from q2kernels.deploy.onnx_export import export_onnx, node_values, run_onnx  # noqa: E402
from q2kernels.integrations.ultralytics import IntDetector  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.exactness_table import float_detectors, settled_detector  # noqa: E402
from test_onnx_export import _assert_codes_equal, _quantize_inputs  # noqa: E402


@pytest.mark.parametrize("cfg,recipe", [("yolo11n", "lsq"), ("yolo11n", "pact"), ("yolov5s", "lsq_plus")])
def test_detector_integer_layers_bit_exact_in_onnxruntime(cfg, recipe, tmp_path):
    model, batch = settled_detector(float_detectors([cfg])[cfg], recipe, 4, 64)
    x = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int_model = convert_to_int(model, x[:1])
    forced = _quantize_inputs(int_model)
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
