"""Integer models of the real Ultralytics YOLOv5s and YOLO11s (DetectionModel from YAML, no download).

For each model, recipe and bit width: convert_to_int traces the DetectionModel itself (deploy.trace),
converts every quantized conv (YOLO11s's depthwise ones too), and deploy.verify_int_model checks it:
every layer's codes equal the reference mode's (plain PyTorch, exact integer sums, emulated fp32
epilogue) bit for bit, and the codes that differ from the teacher-forced fake-quant model's are rare
and each within rounding of its decision boundary. The model saves and reloads bit for bit.
The packed max-pool runs at SPPF's real map sizes. Skipped only where ultralytics is not installed.
"""
import copy
import warnings

import pytest
import torch

from q2kernels.integrations import ultralytics_offline

ultralytics_offline()  # before Ultralytics is imported
pytest.importorskip("ultralytics", reason="ultralytics is not installed (the optional [ultralytics] extra)")
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

from q2kernels.deploy import (IntConv2d, convert_to_int, load_int_model, save_int_model,  # noqa: E402
                              verify_int_model)
from q2kernels.integrations.ultralytics import IntDetector  # noqa: E402
from q2kernels.nn import QConv2d, quantize_model  # noqa: E402
from deployable import settle  # noqa: E402

IMAGE = 32
# Upper bound on the fraction of codes that differ from the fake-quant model's (rounding flips); the
# measured fractions are printed (pytest -s) and are far below it.
MAX_DIFFERING = 2e-3


@pytest.fixture(scope="module")
def float_models():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {cfg: DetectionModel(f"{cfg}.yaml", verbose=False).eval() for cfg in ("yolov5s", "yolo11s")}


def _qat_model(float_model, recipe, bits, seed=0):
    """A quantized model as deployment sees it: quantizers initialised, BatchNorm statistics
    re-estimated on data (random init leaves them meaningless), activation ranges from data."""
    model = quantize_model(copy.deepcopy(float_model), recipe, w_bits=bits, a_bits=bits)
    g = torch.Generator().manual_seed(seed)
    batch = lambda: torch.randn(2, 3, IMAGE, IMAGE, generator=g)  # noqa: E731
    settle(model, batch)
    return model, batch()


CASES = [(cfg, recipe, bits) for cfg in ("yolov5s", "yolo11s") for recipe in ("lsq", "lsq_plus", "pact", "n2uq")
         for bits in (4, 3)]


def _check_int_detector(model, int_model, maps, x):
    """IntDetector decodes the integer maps as Detect decodes its own: the oracle is the fake-quant
    model's forward with each level's box and class head outputs replaced by the integer model's."""
    detect = model.model[-1]
    box = 4 * detect.reg_max
    hooks = [head[i].register_forward_hook(lambda m, a, o, i=i, part=part: maps[i][:, part])
             for head, part in ((detect.cv2, slice(0, box)), (detect.cv3, slice(box, None)))
             for i in range(detect.nl)]
    try:
        with torch.no_grad():
            expected = model.eval()(x)[0]
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        decoded = IntDetector(int_model, model)(x)
    assert decoded.shape == (x.shape[0], box // detect.reg_max + detect.nc, expected.shape[-1])
    assert torch.equal(decoded, expected)


@pytest.mark.parametrize("cfg,recipe,bits", CASES)
def test_detection_model_integer_equals_reference(float_models, cfg, recipe, bits, tmp_path):
    model, x = _qat_model(float_models[cfg], recipe, bits)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QConv2d)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be refused
        int_model = convert_to_int(model, x)
    sources = {m.source for m in int_model.net.modules() if isinstance(m, IntConv2d)}
    # Every quantized conv the detector runs is an integer conv (the DFL conv is not run on raw maps).
    assert sources == {n for n in quantized if ".dfl." not in n}
    grouped = {m.source for m in int_model.net.modules() if isinstance(m, IntConv2d) and m.groups > 1}
    assert bool(grouped) == (cfg == "yolo11s")

    result = verify_int_model(model, int_model, x)
    print(f"\n{cfg} {recipe} W{bits}A{bits}: {len(result.layers)} layers, differing codes "
          f"{result.differing_fraction:.2e}, worst distance "
          f"{max(c.max_distance for c in result.layers.values()):.2e} code units")
    assert set(result.layers) == sources and not result.missing
    assert not result.dead_layers(), result.dead_layers()  # an exactness check on dead layers proves nothing
    assert result.exact, result.failures()
    assert result.ok, result.failures()
    assert result.differing_fraction <= MAX_DIFFERING
    assert result.outputs_equal  # the three raw Detect maps, bit for bit

    out = int_model(x)
    assert len(out) == 3 and all(o.dtype == torch.float32 for o in out)
    _check_int_detector(model, int_model, out, x)

    path = tmp_path / "int.pt"
    save_int_model(int_model, path)
    again = load_int_model(path)
    for a, b in zip(again(x), out):
        assert torch.equal(a, b)
