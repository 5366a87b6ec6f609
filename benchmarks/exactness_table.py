"""The exactness table: how far each integer detector is from its fake-quant model (docs/exactness.md).

    python -m benchmarks.exactness_table --out docs/exactness.md [--image 32] [--trained-image 64]

Needs Ultralytics (the [ultralytics] extra, in its own environment: README). For the real YOLOv5s and
YOLO11s (DetectionModel from YAML, no download) x LSQ, LSQ+, PACT, N2UQ x W4A4, W3A3, two states:
"settled" (quantizers initialised, BatchNorm statistics and activation ranges from data:
tests/deployable.settle) and "QAT steps" (then a few Adam steps on Ultralytics' detection loss,
BatchNorm re-estimated); and per recipe at W4A4, "trained": YOLO11n trained in Q2DetectionTrainer on
the generated shapes task, its checkpoint converted by to_int. Each row is convert_to_int +
verify_int_model: the fraction of input codes that differ from the teacher-forced fake-quant model's,
the largest distance of a differing code from its decision boundary relative to its fp32 bound
(docs/math.md §7; <= 1 for a rounding flip), how far the decoded detections (boxes in pixels,
class scores) and the raw Detect maps move, the dead layers, and verify's ok.

tests/test_ultralytics_int.py and tests/test_ultralytics_trained_exactness.py build their models with
the functions here, so the table shows what CI asserts on.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/deployable: the settled models CI checks

from q2kernels.integrations import ultralytics_offline  # noqa: E402

ultralytics_offline()  # before Ultralytics is imported
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

from q2kernels.deploy import convert_to_int, verify_int_model  # noqa: E402
from q2kernels.integrations.ultralytics import (IntDetector, Q2DetectionTrainer, Q2Options,  # noqa: E402
                                                write_synthetic_dataset)
from q2kernels.integrations.ultralytics.data import SHAPES  # noqa: E402
from q2kernels.integrations.ultralytics.deploy import load_q2_checkpoint, to_int  # noqa: E402
from q2kernels.nn import Quantizer, quantize_model  # noqa: E402
from deployable import qat_steps, reestimate_batchnorm, settle  # noqa: E402

CONFIGS = ("yolov5s", "yolo11s")
RECIPES = ("lsq", "lsq_plus", "pact", "n2uq")
CASES = [(cfg, recipe, bits) for cfg in CONFIGS for recipe in RECIPES for bits in (4, 3)]
QAT_STEPS = 3
# Adam moves every parameter by about QAT_LR per step: a few steps move the quantizers' step sizes,
# clips and thresholds by a sizeable fraction of their settled values, as a short QAT run does.
QAT_LR = 1e-2
TRAINED_MODEL = "yolo11n.yaml"  # the trained-PACT case was a YOLO11n
TABLE = ("<!-- exactness-table -->", "<!-- /exactness-table -->")


def float_detectors(configs=CONFIGS) -> dict:
    """Randomly initialised DetectionModels (seed 0), with the hyperparameters their loss reads."""
    torch.manual_seed(0)
    models = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cfg in configs:
            models[cfg] = DetectionModel(f"{cfg}.yaml", verbose=False).eval()
            models[cfg].args = get_cfg()
    return models


def settled_detector(float_model, recipe: str, bits: int, image: int, seed: int = 0):
    """(model, batch): the quantized model as deployment sees it (tests/deployable.settle) and batch(),
    which draws (2, 3, image, image) inputs from the same generator."""
    model = quantize_model(copy.deepcopy(float_model), recipe, w_bits=bits, a_bits=bits)
    g = torch.Generator().manual_seed(seed)
    batch = lambda: torch.randn(2, 3, image, image, generator=g)  # noqa: E731
    settle(model, batch)
    return model, batch


def detection_targets(x: torch.Tensor, nc: int, per_image: int = 3, seed: int = 0) -> dict:
    """An Ultralytics training batch for images x (its DetectionTrainer's keys): `per_image` random
    boxes per image, `bboxes` normalised (cx, cy, w, h), `cls` (n, 1), `batch_idx` (n,)."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0] * per_image
    wh = 0.15 + 0.5 * torch.rand(n, 2, generator=g)
    centre = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
    return {"img": x, "cls": torch.randint(0, nc, (n, 1), generator=g).float(),
            "bboxes": torch.cat([centre, wh], 1), "batch_idx": torch.arange(x.shape[0]).repeat_interleave(per_image).float()}


def train_steps(model, batch, steps: int = QAT_STEPS, lr: float = QAT_LR) -> list[float]:
    """QAT steps on the real detection loss (DetectionModel.loss) of one synthetic batch, then BatchNorm
    re-estimated under the moved weights (their running statistics mix the steps' weights). The losses."""
    targets = detection_targets(batch(), model.model[-1].nc)
    losses = qat_steps(model, lambda m: m.loss(targets)[0].sum(), steps, lr)
    reestimate_batchnorm(model, batch())
    return losses


def quantizer_state(model) -> dict[str, torch.Tensor]:
    """Every quantizer's floating-point parameters, copied (to tell whether training moved them)."""
    return {f"{n}.{k}": p.detach().clone() for n, q in model.named_modules() if isinstance(q, Quantizer)
            for k, p in q.named_parameters(recurse=False)}


def dataset_images(data: Path, split: str = "val") -> torch.Tensor:
    """The images of a generated dataset's split as one (N, 3, H, W) batch in [0, 1]."""
    paths = sorted((data.parent / "images" / split).glob("*.png"))
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def float_checkpoint(root: Path, data: Path) -> Path:
    """The run's start, as a user's would be a trained float detector: YOLO11n with its BatchNorm
    statistics estimated on the training images. A randomly initialised one keeps mean 0, variance 1,
    which a short run (momentum 0.03) barely moves: most of its quantized layers then see only the
    code of 0 in eval mode, and a check on them proves nothing (docs/math.md §7, dead layers)."""
    torch.manual_seed(0)
    model = DetectionModel(TRAINED_MODEL, nc=len(SHAPES), verbose=False)
    reestimate_batchnorm(model, dataset_images(data, "train"))
    path = root / "float.pt"
    torch.save({"model": model}, path)
    return path


def trained_detector(recipe: str, bits: int, root: Path, imgsz: int = 64, epochs: int = 2, images: int = 8):
    """(model, val images): YOLO11n trained `epochs` epochs in Q2DetectionTrainer from float_checkpoint on a
    generated shapes task of `images` training images (Concats kept and no Q-ADA, to stay short), its last
    checkpoint loaded as a user loads it. Ultralytics picks its optimiser and learning rate as for any run."""
    root = Path(root)
    data = write_synthetic_dataset(root / "ds", train=images, val=2, imgsz=imgsz)
    args = dict(model=str(float_checkpoint(root, data)), data=str(data), epochs=epochs, imgsz=imgsz, batch=2,
                workers=0, device="cpu", amp=False, plots=False, val=False, project=str(root),
                name=f"{recipe}-w{bits}", exist_ok=True, mosaic=0.0, warmup_epochs=0, nbs=2, seed=0, verbose=False)
    trainer = Q2DetectionTrainer(overrides=args, q2=Q2Options(recipe=recipe, w_bits=bits, a_bits=bits, fusion=None,
                                                              distill_weight=0.0))
    trainer.train()
    return load_q2_checkpoint(trainer.last), dataset_images(data)


def decoded_difference(model, detector, x) -> tuple[float, float]:
    """(boxes in pixels, class scores): the largest difference between the decoded detections of the
    integer `detector` (IntDetector) and of the fake-quant `model`, on x (not teacher-forced: upstream
    rounding flips show here)."""
    with torch.no_grad():
        want = model.eval()(x)[0].double()
        got = detector(x).double()
    diff = (got - want).abs()
    return float(diff[:, :4].max()), float(diff[:, 4:].max())


def worst_ratio(check) -> float:
    """The largest distance of a differing code from its decision boundary over its bound (0: none differ)."""
    return max((c.max_ratio for c in check.layers.values() if c.differing), default=0.0)


def row(name: str, recipe: str, bits: int, state: str, image: int, model, detector, check, x) -> dict:
    boxes, scores = decoded_difference(model, detector, x)
    return dict(model=name, recipe=recipe, bits=bits, state=state, image=image, layers=len(check.layers),
                fraction=check.differing_fraction, ratio=worst_ratio(check), boxes=boxes, scores=scores,
                maps=check.output_difference, dead=check.dead_layers(), ok=check.ok)


def matrix_row(float_model, cfg: str, recipe: str, bits: int, image: int, steps: int) -> dict:
    model, batch = settled_detector(float_model, recipe, bits, image)
    if steps:
        train_steps(model, batch, steps)
    x = batch()
    int_model = convert_to_int(model, x, check=False)
    check = verify_int_model(model, int_model, x)
    state = f"{steps} QAT steps" if steps else "settled"
    return row(cfg, recipe, bits, state, image, model, IntDetector(int_model, model), check, x)


def trained_row(recipe: str, bits: int, root: Path, image: int, epochs: int) -> dict:
    model, x = trained_detector(recipe, bits, root, image, epochs)
    detector, check = to_int(model, x)
    return row(TRAINED_MODEL.removesuffix(".yaml"), recipe, bits, f"trained {epochs} epochs", image, model,
               detector, check, x)


def _number(v: float) -> str:
    return "0" if v == 0 else "inf" if math.isinf(v) else f"{v:.2e}"


def markdown(rows: list[dict]) -> str:
    head = ("| model | recipe | bits | state | px | layers | codes differing | max d/b | boxes (px) | scores "
            "| raw maps | dead layers | ok |\n|" + "---|" * 13)
    lines = [f"| {r['model']} | {r['recipe']} | W{r['bits']}A{r['bits']} | {r['state']} | {r['image']} | {r['layers']} "
             f"| {_number(r['fraction'])} | {_number(r['ratio'])} | {_number(r['boxes'])} | {_number(r['scores'])} "
             f"| {_number(r['maps'])} | {', '.join(r['dead']) or 'none'} | {'yes' if r['ok'] else '**no**'} |"
             for r in rows]
    return "\n".join([head, *lines])


def rows(image: int, trained_image: int, epochs: int, steps: int = QAT_STEPS):
    """Every row, one at a time: the matrix settled and after `steps` QAT steps, then the trained runs."""
    floats = float_detectors()
    for cfg, recipe, bits in CASES:
        for n in (0, steps):
            yield matrix_row(floats[cfg], cfg, recipe, bits, image, n)
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in RECIPES:
            yield trained_row(recipe, 4, Path(tmp) / recipe, trained_image, epochs)


def machine() -> str:
    import ultralytics
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"Ultralytics {ultralytics.__version__}, Python {platform.python_version()}")


def write_table(path: Path, text: str) -> None:
    """Put `text` between the file's TABLE markers, keeping the prose around them (the whole file when
    it has none), so that re-running the command updates docs/exactness.md in place."""
    start, end = TABLE
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        before, rest = old.split(start, 1)
        text = before + start + "\n" + text + end + rest.split(end, 1)[1]
    else:
        text = start + "\n" + text + end + "\n"
    path.write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", type=int, default=32, help="input size of the YOLOv5s/YOLO11s matrix (px)")
    p.add_argument("--trained-image", type=int, default=64, help="image size of the trained runs (px)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of each trained run")
    p.add_argument("--out", type=Path, default=None, help="write the table (markdown) here; default: print only")
    args = p.parse_args(argv)
    command = " ".join(["python -m benchmarks.exactness_table", *(sys.argv[1:] if argv is None else argv)])
    start, done, total = time.perf_counter(), [], 2 * len(CASES) + len(RECIPES)
    print(markdown([]))
    # The table is written after every row: a run stopped early leaves the rows it finished.
    for r in rows(args.image, args.trained_image, args.epochs):
        done.append(r)
        print(markdown([r]).splitlines()[-1], flush=True)
        progress = "" if len(done) == total else f", {len(done)} of {total} rows so far"
        text = (f"<!-- {command} on {datetime.date.today()}, {machine()}, "
                f"{time.perf_counter() - start:.0f} s{progress} -->\n{markdown(done)}\n")
        if args.out:
            write_table(args.out, text)


if __name__ == "__main__":
    main()
