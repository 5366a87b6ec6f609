"""Integer models of the real Ultralytics YOLOv5s and YOLO11s (DetectionModel from YAML, no download).

For each model, recipe and bit width: convert_to_int traces the DetectionModel itself (deploy.trace),
converts every quantized conv (YOLO11s's depthwise ones too), and deploy.verify_int_model checks it:
every layer's codes equal the reference mode's (plain PyTorch, exact integer sums, emulated fp32
epilogue) bit for bit, and the codes that differ from the teacher-forced fake-quant model's are rare
and each within rounding of its decision boundary. The model saves and reloads bit for bit.
The packed max-pool runs at SPPF's real map sizes. Skipped only where ultralytics is not installed.

Each cell runs twice: settled (quantizers initialised, BatchNorm and activation ranges from data) and
after a few QAT steps on Ultralytics' own detection loss, which move the weights and the quantizers'
parameters off the values settle() gave them, as training does. The models are built by
benchmarks/exactness_table.py, whose table (docs/exactness.md) shows the numbers asserted on here.
"""
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from q2kernels.integrations import ultralytics_offline

ultralytics_offline()  # before Ultralytics is imported
pytest.importorskip("ultralytics", reason="ultralytics is not installed (the optional [ultralytics] extra)")
from q2kernels.deploy import (IntConv2d, convert_to_int, load_int_model, save_int_model,  # noqa: E402
                              verify_int_model)
from q2kernels.integrations.ultralytics import IntDetector  # noqa: E402
from q2kernels.nn import QConv2d  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.exactness_table import (CASES, QAT_STEPS, float_detectors, quantizer_state,  # noqa: E402
                                        settled_detector, train_steps)

IMAGE = 32
# Upper bound on the fraction of codes that differ from the fake-quant model's (rounding flips); the
# measured fractions are printed (pytest -s) and are far below it.
MAX_DIFFERING = 2e-3
# After QAT_STEPS steps at least these fractions of the conv weights and of the quantizers' parameter
# tensors have moved: the steps are training, not a no-op that leaves the settled cell. Not all of
# them move: a clipped or negative input passes no gradient through its quantizer to the layers before
# it, and PACT's clip gets one only where an input is clipped (measured on YOLOv5s: 55 of 74 LSQ W4A4
# conv weights move; 13 of 74 PACT clips have a gradient at the first step). The loss need not fall:
# at lr 1e-2 LSQ's overshoots on the third step (0.079, 0.068, 0.095).
MIN_MOVED_WEIGHTS = 0.5
MIN_MOVED_QUANTIZERS = 0.1


@pytest.fixture(scope="module")
def float_models():
    return float_detectors()


def _qat_model(float_model, recipe, bits, steps):
    """The quantized model (benchmarks.exactness_table.settled_detector), after `steps` QAT steps on
    the detection loss when steps > 0, and the input it is converted and verified on."""
    model, batch = settled_detector(float_model, recipe, bits, IMAGE)
    if steps:
        weights, quantizers = _conv_weights(model), quantizer_state(model)
        losses = train_steps(model, batch, steps)
        assert all(math.isfinite(v) for v in losses), losses
        _assert_moved("conv weights", weights, _conv_weights(model), MIN_MOVED_WEIGHTS)
        _assert_moved("quantizer parameters", quantizers, quantizer_state(model), MIN_MOVED_QUANTIZERS)
    return model, batch()


def _conv_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, QConv2d)}


def _assert_moved(what, before, after, least):
    moved = sum(not torch.equal(before[k], after[k]) for k in before)
    assert moved >= least * len(before), f"{moved} of {len(before)} {what} moved"


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


@pytest.mark.parametrize("steps", [0, QAT_STEPS], ids=["settled", "qat"])
@pytest.mark.parametrize("cfg,recipe,bits", CASES)
def test_detection_model_integer_equals_reference(float_models, cfg, recipe, bits, steps, tmp_path):
    model, x = _qat_model(float_models[cfg], recipe, bits, steps)
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
    print(f"\n{cfg} {recipe} W{bits}A{bits} after {steps} steps: {len(result.layers)} layers, differing codes "
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
