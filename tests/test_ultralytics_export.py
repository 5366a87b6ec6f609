"""Exports of a Q2-prepared model stop before any exporter runs and say what to deploy instead
(Q2DetectionModel.forward; q2kernels/integrations/ultralytics/model.py): every format of
Ultralytics' Exporter but imx, and torch.jit.trace / torch.onnx.export called directly. Prediction,
training, torch.compile and the integer conversion the message names are untouched. Needs
Ultralytics (see tests/test_ultralytics.py)."""
import copy
import io

import numpy as np
import pytest
import torch

from q2kernels.integrations import ultralytics_offline

ultralytics_offline()  # Ultralytics must never reach the network or write outside a temp dir

pytest.importorskip("ultralytics", reason="Ultralytics is not installed (pip install q2kernels[ultralytics])")

from ultralytics import YOLO  # noqa: E402
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.engine import exporter  # noqa: E402

from q2kernels.deploy import (calibrate_fusion, convert_to_int, freeze_fusion, load_int_model,  # noqa: E402
                               save_int_model)
from q2kernels.integrations.ultralytics import prepare  # noqa: E402
from q2kernels.integrations.ultralytics.model import _exporter  # noqa: E402

IMGSZ = 64
# imx is the one format the check cannot see: its FXModel runs the layer list, not the model's forward.
FORMATS = [f for f in exporter.export_formats()["Argument"][1:] if f != "imx"]


def _says_what_to_use(message: str) -> None:
    assert "fake-quant model" in message and "Could not export" not in message  # not the quantizer's trace error
    for name in ("q2kernels.integrations.ultralytics.to_int", "int_model.save(path, imgsz)",
                 "q2kernels.deploy.load_detector(path).predict(image)"):
        assert name in message


@pytest.fixture(scope="module")
def yolo():
    torch.manual_seed(0)
    y = YOLO("yolo11n.yaml")
    prepare(y, distill=False)
    y.model.train()
    with torch.no_grad():
        y.model(torch.rand(2, 3, IMGSZ, IMGSZ))  # initialise the quantizers, as training does
    y.model.eval()
    return y


@pytest.mark.parametrize("fmt", FORMATS)
def test_ultralytics_export_stops_at_its_dry_run(yolo, fmt, monkeypatch, tmp_path):
    """Each format stops before its requirements are checked (so before e.g. onnx is imported,
    installed or not). device="cpu": TensorRT ("engine") would otherwise ask for a GPU first."""
    def reached(*args, **kwargs):
        raise AssertionError(f"format={fmt!r} reached its requirements check {args}")

    monkeypatch.setattr(exporter, "check_requirements", reached)
    monkeypatch.chdir(tmp_path)  # where an export that got through would write its file
    with pytest.raises(RuntimeError, match=f"format='{fmt}'") as e:
        yolo.export(format=fmt, imgsz=IMGSZ, device="cpu")
    _says_what_to_use(str(e.value))


def test_direct_exporters_are_refused(yolo):
    model, x = yolo.model, torch.rand(1, 3, IMGSZ, IMGSZ)
    with pytest.raises(RuntimeError, match="^torch.jit.trace cannot export") as e:
        torch.jit.trace(model, x)
    _says_what_to_use(str(e.value))
    with pytest.raises(RuntimeError, match="^torch.onnx.export cannot export") as e:
        torch.onnx.export(model, (x,), io.BytesIO(), dynamo=False)  # the TorchScript exporter: no onnx package
    _says_what_to_use(str(e.value))


def test_training_prediction_and_compile_are_untouched(yolo, monkeypatch, tmp_path):
    """Outside an export the check is inert: a training step runs, the Exporter worked on its own
    copy (the model predicts afterwards), and the check compiles to nothing (fullgraph: no graph break)."""
    model = copy.deepcopy(yolo.model).train()
    model.args = get_cfg()  # the loss hyperparameters a trainer gives its model
    batch = {"img": torch.rand(2, 3, IMGSZ, IMGSZ), "cls": torch.tensor([[0.0], [1.0]]),
             "batch_idx": torch.tensor([0.0, 1.0]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.3, 0.2, 0.4]])}
    loss, _ = model.loss(batch)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert torch.compile(lambda: _exporter(model), fullgraph=True, backend="eager")() is None

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="format='torchscript'"):
        yolo.export(format="torchscript", imgsz=IMGSZ, device="cpu")
    assert yolo.model.model[-1].export is False
    results = yolo.predict(np.zeros((IMGSZ, IMGSZ, 3), np.uint8), imgsz=IMGSZ, device="cpu", verbose=False)
    assert len(results) == 1 and results[0].boxes is not None


def test_the_integer_model_the_message_names(yolo, tmp_path):
    """The layer loop q2kernels.deploy traces is not where the check is: the refused model, its
    LayerNorms frozen, converts to integers and round-trips through the integer model file."""
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    model = copy.deepcopy(yolo.model)
    calibrate_fusion(model, [x])
    int_model = convert_to_int(freeze_fusion(model).eval(), x)
    save_int_model(int_model, tmp_path / "int_model.pt")
    with torch.no_grad():
        maps, loaded = int_model(x), load_int_model(tmp_path / "int_model.pt")(x)
    assert len(maps) == len(loaded) == 3 and all(torch.equal(a, b) for a, b in zip(maps, loaded))
