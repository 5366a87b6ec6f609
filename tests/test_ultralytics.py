"""q2kernels.integrations.ultralytics: prepare() on YOLOv5s and YOLO11s built from YAML, first-step
losses per recipe, fuse(), and Ultralytics' own trainer with validation and checkpoint reload on a
tiny synthetic dataset. Needs Ultralytics (the [ultralytics] extra; see README: its own env)."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from q2kernels.integrations import ultralytics_offline

ultralytics_offline()  # Ultralytics must never reach the network or write outside a temp dir

pytest.importorskip("ultralytics", reason="Ultralytics is not installed (pip install q2kernels[ultralytics])")

from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.modules import Concat  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, load_checkpoint  # noqa: E402
from ultralytics.utils.torch_utils import unwrap_model as unwrap  # noqa: E402

from q2kernels.deploy import calibrate_fusion, freeze_fusion, load_int_model, remove_layernorm  # noqa: E402
from q2kernels.integrations.ultralytics import (  # noqa: E402
    Q2DetectionModel, Q2DetectionTrainer, Q2Options, prediction_convs, prepare, write_synthetic_dataset)
from q2kernels.nn import DoReFaWeightQuantizer, GatedFusion, LSQQuantizer, QConv2d, Quantizer  # noqa: E402

IMGSZ = 64
EXAMPLES = Path(__file__).resolve().parent.parent / "python"
# Written out from the two YAMLs (ultralytics/cfg/models/{v5/yolov5,11/yolo11}.yaml), not computed.
LAYOUT = {
    "yolov5s.yaml": dict(concats=(12, 16, 19, 22), detect=24, points=["model.17", "model.20", "model.23"],
                         feeds={"model.12": ["model.13.cv1.conv", "model.13.cv2.conv"],
                                "model.16": ["model.17.cv1.conv", "model.17.cv2.conv"],
                                "model.19": ["model.20.cv1.conv", "model.20.cv2.conv"],
                                "model.22": ["model.23.cv1.conv", "model.23.cv2.conv"]},
                         channels={12: [256, 256], 16: [128, 128], 19: [128, 128], 22: [256, 256]}),
    "yolo11s.yaml": dict(concats=(12, 15, 18, 21), detect=23, points=["model.16", "model.19", "model.22"],
                         feeds={"model.12": ["model.13.cv1.conv"], "model.15": ["model.16.cv1.conv"],
                                "model.18": ["model.19.cv1.conv"], "model.21": ["model.22.cv1.conv"]},
                         channels={12: [512, 256], 15: [256, 256], 18: [128, 256], 21: [256, 512]}),
}
RECIPES = ("lsq", "lsq_plus", "pact", "n2uq")


def _predictions(detect):
    return [f"model.{detect}.{branch}.{level}.2" for branch in ("cv2", "cv3") for level in range(3)]


@pytest.fixture(scope="module")
def float_models():
    torch.manual_seed(0)
    out = {}
    for yaml in LAYOUT:
        m = DetectionModel(yaml, nc=2, verbose=False)
        m.args = get_cfg()
        out[yaml] = m
    return out


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"img": torch.rand(2, 3, IMGSZ, IMGSZ, generator=g),
            "cls": torch.tensor([[0.0], [1.0], [0.0]]), "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
            "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.3, 0.2, 0.4], [0.6, 0.4, 0.5, 0.5]])}


def _plain_convs(model):
    return {n for n, m in model.named_modules() if type(m) is nn.Conv2d}


@pytest.mark.parametrize("yaml", list(LAYOUT))
def test_prepare_structure(float_models, yaml):
    lay = LAYOUT[yaml]
    ref = float_models[yaml]
    model = copy.deepcopy(ref)
    p = prepare(model)

    assert type(model) is Q2DetectionModel and p.model is model
    # Routing: every layer keeps its f, i and type; GatedFusion exactly at the neck Concats.
    for old, new in zip(ref.model, model.model):
        assert (new.f, new.i, new.type) == (old.f, old.i, old.type)
    fused = [i for i, m in enumerate(model.model) if isinstance(m, GatedFusion)]
    assert tuple(fused) == lay["concats"]
    assert not any(isinstance(m, Concat) for m in model.modules())
    for i in fused:
        assert model.model[i].channels == lay["channels"][i] and model.model[i].mode == "balanced"
    assert p.feeds == lay["feeds"] and model.q2["feeds"] == lay["feeds"]
    assert p.points == lay["points"] and model.q2["points"] == lay["points"]
    # Float: the stem, DFL and the six prediction convs; every other conv quantizes.
    d = lay["detect"]
    expected_float = {"model.0.conv", f"model.{d}.dfl.conv", *_predictions(d)}
    assert set(prediction_convs(model)) == set(_predictions(d))
    assert _plain_convs(model) == expected_float and set(p.float_layers) == expected_float
    assert all(isinstance(model.get_submodule(n), QConv2d) for n in _plain_convs(ref) - expected_float)
    # The probe forward ran on the float model: no quantizer is initialised yet.
    assert not any(bool(q.initialized) for q in model.modules() if isinstance(q, Quantizer))
    # The teacher: the untouched float model, frozen.
    assert type(p.teacher) is DetectionModel and not p.teacher.training
    assert _plain_convs(p.teacher) == _plain_convs(ref)
    assert not any(p.requires_grad for p in p.teacher.parameters())
    for (n, a), (_, b) in zip(ref.state_dict().items(), p.teacher.state_dict().items()):
        assert torch.equal(a, b), n
    # The prepared model runs Ultralytics' layer loop; eval output has the float model's shape.
    model.eval()
    with torch.no_grad():
        assert model(_batch()["img"])[0].shape == ref.eval()(_batch()["img"])[0].shape


@pytest.mark.parametrize("yaml", list(LAYOUT))
def test_declared_feeds_fold_the_layernorm_exactly(float_models, yaml):
    """The recorded consumers are all of each node's readers: remove_layernorm(feeds=model.q2["feeds"])
    folds every node's frozen LayerNorm affine into them and computes what freeze_fusion's explicit
    affine computes (a reader left out would read the un-normalised concat). Convs kept float: the
    fold refuses quantizing consumers."""
    model = copy.deepcopy(float_models[yaml])
    prepare(model, keep_float=sorted(_plain_convs(model)), distill=False)
    x = _batch(3)["img"]
    calibrate_fusion(model, [x])
    frozen = freeze_fusion(copy.deepcopy(model)).eval()
    report = remove_layernorm(model, feeds=model.q2["feeds"], strict=True)
    assert sorted(report) == sorted(LAYOUT[yaml]["feeds"])
    assert not any(isinstance(m, GatedFusion) for m in model.modules())
    folded, expected = _neck_outputs(model.eval(), x), _neck_outputs(frozen, x)
    for a, b in zip(folded, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def _neck_outputs(model, x):
    """The features Detect reads (its input maps), not its squashed decoded output."""
    outs = []
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o: outs.append(o))
               for n in model.q2["points"]]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outs


def test_prepare_options(float_models):
    ref = float_models["yolov5s.yaml"]
    model = copy.deepcopy(ref)
    p = prepare(model, "pact", w_bits=3, a_bits=3, head_bits=8, keep_float=["model.24.dfl.conv"],
                fusion="learned", distill=False)
    assert p.teacher is None and _plain_convs(model) == {"model.24.dfl.conv"}
    assert all(model.get_submodule(f"model.{i}").mode == "learned" for i in LAYOUT["yolov5s.yaml"]["concats"])
    for name in _predictions(24):  # no BatchNorm follows: DoReFa's scale-free weights become per-channel LSQ
        conv = model.get_submodule(name)
        assert isinstance(conv.weight_quantizer, LSQQuantizer) and conv.weight_quantizer.bits == 8
        assert conv.weight_quantizer.s.numel() == conv.out_channels and conv.act_quantizer.bits == 8
        assert p.quantized[name] == (8, 8)
    body = model.get_submodule("model.1.conv")
    assert isinstance(body.weight_quantizer, DoReFaWeightQuantizer) and body.weight_quantizer.bits == 3
    assert isinstance(model.get_submodule("model.0.conv"), QConv2d)  # the stem, not kept this time
    with pytest.raises(ValueError, match="distill=False"):
        p.distillation()
    plain = copy.deepcopy(ref)
    prepare(plain, fusion=None)
    assert [i for i, m in enumerate(plain.model) if type(m) is Concat] == list(LAYOUT["yolov5s.yaml"]["concats"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(recipe="int4"), "recipe"),
    (dict(fusion="sum"), "fusion"),
    (dict(head_bits=1), "head_bits"),
    (dict(head_bits=True), "head_bits"),
    (dict(w_bits=9), "w_bits"),
    (dict(a_bits=1), "a_bits"),
    (dict(keep_float="model.0.conv"), "keep_float"),
    (dict(keep_float=["model.99.conv"]), "keep_float"),
    (dict(keep_float=["model.24.cv2.0.2"], head_bits=8), "keep_float"),
])
def test_prepare_rejects_bad_arguments(float_models, kwargs, match):
    model = copy.deepcopy(float_models["yolov5s.yaml"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prepare(model, **kwargs)
    assert type(model) is DetectionModel and model.state_dict().keys() == before.keys()


def test_prepare_takes_a_yolo_object():
    from ultralytics import YOLO

    yolo = YOLO("yolov5n.yaml")
    p = prepare(yolo, fusion="learned")
    assert p.model is yolo.model and type(yolo.model) is Q2DetectionModel
    assert [i for i, m in enumerate(yolo.model.model) if isinstance(m, GatedFusion)] == [12, 16, 19, 22]


def test_prepare_rejects_other_models(float_models):
    with pytest.raises(TypeError, match="model"):
        prepare(nn.Sequential(nn.Conv2d(3, 8, 3)))
    model = copy.deepcopy(float_models["yolov5s.yaml"])
    prepare(model)
    with pytest.raises(ValueError, match="already prepared"):
        prepare(model)


@pytest.mark.parametrize("yaml", list(LAYOUT))
@pytest.mark.parametrize("recipe,head_bits", [(r, None) for r in RECIPES] + [("pact", 4)])
def test_first_step_loss_near_float(float_models, yaml, recipe, head_bits):
    """At the first training step (train mode, quantizers initialised on this batch) every loss
    component is within 3x of the float model's on the same batch. DoReFa weights on Detect's
    prediction convs once gave a cls loss 7x (here) to 300x (YOLO11s, 128 px) the float one."""
    ref = copy.deepcopy(float_models[yaml]).train()
    batch = _batch()
    with torch.no_grad():
        _, float_items = ref.loss(batch)
        model = copy.deepcopy(float_models[yaml])
        prepare(model, recipe, head_bits=head_bits)
        model.train()
        _, items = model.loss(batch)
    for k, v in float_items.items():
        assert torch.isfinite(items[k]) and 1 / 3 <= items[k] / v <= 3, (k, items[k].item(), v.item())


def test_fuse_keeps_every_block_as_trained(float_models):
    """fuse() (run by Ultralytics' validation and prediction) used to reach q2kernels quantizers
    through fuse_conv_and_bn's ModelOpt branch (AttributeError: no `amax`), and folding the float stem
    moved the next quantizer's codes (module docstring of model.py). It folds nothing: the fused model
    computes what the trained one does, bit for bit."""
    model = copy.deepcopy(float_models["yolo11s.yaml"])
    prepare(model, "lsq")
    model.train()
    with torch.no_grad():
        model.loss(_batch())  # initialise the quantizers
    model.eval()
    x = _batch(1)["img"]
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(x)[0]
        assert model.fuse(verbose=False) is model
        after = model(x)[0]
    assert isinstance(model.get_submodule("model.0").bn, nn.BatchNorm2d)  # the float stem too
    for name, m in model.named_modules():
        if isinstance(getattr(m, "conv", None), QConv2d):
            assert isinstance(m.bn, nn.BatchNorm2d), name
    assert list(model.state_dict()) == keys
    assert torch.equal(after, before)


def test_options_and_trainer_arguments(tmp_path):
    assert Q2Options().prepare_kwargs() == dict(recipe="lsq", w_bits=4, a_bits=4, head_bits=None,
                                                keep_float=None, fusion="balanced", distill=True)
    assert Q2Options(distill_weight=0.0).prepare_kwargs()["distill"] is False
    for bad in (-0.1, float("nan"), float("inf"), "0.01", True):
        with pytest.raises(ValueError, match="distill_weight"):
            Q2Options(distill_weight=bad)
    for name, bad in (("layernorm_free_epochs", -1), ("layernorm_free_epochs", 1.5), ("layernorm_free_epochs", True),
                      ("calibration_batches", 0), ("calibration_batches", "8"), ("random_teacher", 1),
                      ("fusion_init", "ones"), ("fusion_init", None), ("layernorm_removal", "median")):
        with pytest.raises(ValueError, match=name):
            Q2Options(**{name: bad})
    with pytest.raises(ValueError, match="layernorm_free_epochs.*no fusion node"):
        Q2Options(fusion=None, layernorm_free_epochs=1)
    data = write_synthetic_dataset(tmp_path / "ds", train=2, val=1, imgsz=IMGSZ)
    args = dict(model="yolov5n.yaml", data=str(data), project=str(tmp_path), name="r")
    with pytest.raises(TypeError, match="q2"):
        Q2DetectionTrainer(overrides=args, q2={"recipe": "lsq"})
    # with_options: a subclass carrying its options (Ultralytics' DDP workers rebuild from the class).
    trainer_cls = Q2DetectionTrainer.with_options(recipe="pact", head_bits=8)
    assert issubclass(trainer_cls, Q2DetectionTrainer) and trainer_cls is not Q2DetectionTrainer
    assert trainer_cls(overrides=args).q2 == Q2Options(recipe="pact", head_bits=8)
    assert Q2DetectionTrainer(overrides=args).q2 == Q2Options()
    with pytest.raises(TypeError):
        Q2DetectionTrainer.with_options(bits=4)
    with pytest.raises(ValueError, match="layernorm_free_epochs: 5 is more than the run's 3 epochs"):
        Q2DetectionTrainer.with_options(layernorm_free_epochs=5)(overrides={**args, "epochs": 3})
    with pytest.raises(ValueError, match="quantize"):
        Q2DetectionTrainer(overrides={**args, "quantize": 8})


def test_synthetic_dataset(tmp_path):
    """The generated task: Ultralytics' layout, boxes inside the image around the drawn pixels,
    deterministic, the splits disjoint, every class present in a larger draw."""
    import numpy as np
    from PIL import Image

    data = write_synthetic_dataset(tmp_path / "a", train=6, val=3, imgsz=64, classes=3, seed=1)
    assert data.read_text().splitlines()[1:3] == ["train: images/train", "val: images/val"]
    assert "  2: triangle" in data.read_text()
    for split, n in (("train", 6), ("val", 3)):
        images = sorted((tmp_path / "a" / "images" / split).iterdir())
        assert len(images) == n and all(Image.open(p).size == (64, 64) for p in images)
        for p in images:
            rows = [r.split() for r in (tmp_path / "a" / "labels" / split / f"{p.stem}.txt").read_text().splitlines()]
            assert len(rows) <= 6
            for k, *box in rows:
                cx, cy, w, h = (float(v) for v in box)
                assert int(k) in range(3) and 0 < w <= 1 and 0 < h <= 1
                assert 0 <= cx - w / 2 + 1e-6 and cx + w / 2 - 1e-6 <= 1 and 0 <= cy - h / 2 + 1e-6 and cy + h / 2 - 1e-6 <= 1
    again = write_synthetic_dataset(tmp_path / "b", train=6, val=3, imgsz=64, classes=3, seed=1)
    for f in (tmp_path / "a").rglob("*.png"):
        assert f.read_bytes() == (again.parent / f.relative_to(tmp_path / "a")).read_bytes()
    train = {Image.open(p).tobytes() for p in (tmp_path / "a" / "images" / "train").iterdir()}
    assert not train & {Image.open(p).tobytes() for p in (tmp_path / "a" / "images" / "val").iterdir()}
    big = write_synthetic_dataset(tmp_path / "c", train=40, val=1, imgsz=96)
    classes = [int(r.split()[0]) for f in (tmp_path / "c" / "labels" / "train").iterdir()
               for r in f.read_text().splitlines()]
    assert sorted(set(classes)) == list(range(6)) and np.bincount(classes).min() >= 5
    for bad in (dict(train=0), dict(imgsz=16), dict(classes=7), dict(val=1.5), dict(classes=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            write_synthetic_dataset(tmp_path / "bad", **bad)


def _quantizer_state(model):
    return {n: t for n, t in model.state_dict().items() if "quantizer" in n}


def test_trainer_trains_validates_and_reloads(tmp_path):
    """Two epochs of Ultralytics' trainer (its data, loss, optimiser, EMA, validation and
    checkpoints) on a Q2 YOLOv5s with GatedFusion and Q-ADA, then the checkpoint reloaded."""
    data = write_synthetic_dataset(tmp_path / "ds", train=4, val=2, imgsz=IMGSZ)
    trainer = Q2DetectionTrainer(
        overrides=dict(model="yolov5s.yaml", data=str(data), epochs=2, imgsz=IMGSZ, batch=2, workers=0,
                       device="cpu", amp=False, plots=False, project=str(tmp_path), name="run", exist_ok=True,
                       mosaic=0.0, warmup_epochs=0, nbs=2, seed=0),
        q2=Q2Options(recipe="lsq", distill_weight=0.01, random_teacher=True))
    ema_gap, epoch_metrics = [], []

    def after_validation(tr):  # the EMA the validation just used, against the live model
        epoch_metrics.append(dict(tr.metrics))
        live = _quantizer_state(tr.model)
        ema_gap.append(max(((v - live[k]).abs() / live[k].abs().clamp_min(1e-6)).max().item()
                           for k, v in _quantizer_state(tr.ema.ema).items() if v.is_floating_point()))

    trainer.add_callback("on_fit_epoch_end", after_validation)
    trainer.train()

    assert "qada_loss" in trainer.loss_names and torch.isfinite(trainer.tloss["qada_loss"])
    assert trainer.tloss["qada_loss"] > 0
    assert all({"metrics/mAP50(B)", "val/box_loss"} <= set(m) and "val/qada_loss" not in m
               for m in epoch_metrics[:2])
    # The EMA's quantizers started from the live ones' initialisation (not the placeholder step 1,
    # not a re-initialisation on the validation batch): they stay within EMA drift of the model.
    assert len(ema_gap) >= 2 and max(ema_gap[:2]) < 0.05, ema_gap
    # No hook left on the trained model once its epochs are over.
    assert not any(m._forward_hooks for m in trainer.model.modules())

    last = tmp_path / "run" / "weights" / "last.pt"
    model, ckpt = load_checkpoint(last)
    assert type(model) is Q2DetectionModel and model.q2["feeds"] == LAYOUT["yolov5s.yaml"]["feeds"]
    assert all(bool(q.initialized) and q._initialized for q in model.modules() if isinstance(q, Quantizer))
    fusions = [m for m in model.modules() if isinstance(m, GatedFusion)]
    assert len(fusions) == 4 and all(torch.isnan(m.mubar) and torch.isnan(m.sigmabar) for m in fusions)
    # The checkpoint is the final EMA in fp16: the reloaded model computes what that EMA computes.
    ema = copy.deepcopy(trainer.ema.ema).half().float().eval()
    x = _batch(2)["img"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)[0], ema(x)[0], rtol=0, atol=0)

    # The checkpoint as the weights of a new run: rebuilt from its `q2` record, loaded whole.
    rebuilt = trainer.get_model(cfg=model.yaml, weights=model, verbose=False)
    assert type(rebuilt) is Q2DetectionModel
    for (k, a), (k2, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert k == k2 and (torch.equal(a, b) or (torch.isnan(a).all() and torch.isnan(b).all())), k


def _no_decay_ids(optimizer):
    return {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}


def test_teacher_survives_the_checkpoint_and_scales_are_not_decayed(tmp_path):
    """Trained from float weights, a Q2 checkpoint names them; a run continuing from the checkpoint
    rebuilds the same float teacher and keeps Q-ADA. Quantizer and fusion parameters are not decayed."""
    data = write_synthetic_dataset(tmp_path / "ds", train=2, val=2, imgsz=IMGSZ, classes=2)  # the model's nc
    torch.manual_seed(0)
    float_model = DetectionModel("yolov5n.yaml", nc=2, verbose=False)
    weights = tmp_path / "float.pt"
    torch.save({"model": float_model}, weights)
    run = dict(data=str(data), epochs=1, imgsz=IMGSZ, batch=2, workers=0, device="cpu", amp=False, plots=False,
               project=str(tmp_path), exist_ok=True, mosaic=0.0, warmup_epochs=0, nbs=2, seed=0, val=False)
    first = Q2DetectionTrainer(overrides=dict(model=str(weights), name="first", **run))
    first.train()
    assert first.model.q2["teacher"] == str(weights)
    teacher = first.teacher.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in float_model.state_dict().items())

    model = unwrap(first.model)
    no_decay = _no_decay_ids(first.optimizer)
    scales = [p for m in model.modules() if isinstance(m, (Quantizer, GatedFusion)) for p in m.parameters()]
    assert len(scales) > 50 and all(id(p) in no_decay for p in scales)
    conv_weights = [m.weight for m in model.modules() if isinstance(m, QConv2d)]
    assert conv_weights and not any(id(w) in no_decay for w in conv_weights)
    assert sorted(id(p) for g in first.optimizer.param_groups for p in g["params"]) == \
        sorted(id(p) for p in model.parameters())  # each once (Ultralytics' groups hold frozen ones too)

    second = Q2DetectionTrainer(overrides=dict(model=str(tmp_path / "first" / "weights" / "last.pt"),
                                               name="second", **run))
    second.train()
    assert second.model.q2["teacher"] == str(weights)
    assert all(torch.equal(second.teacher.state_dict()[k], v) for k, v in teacher.items())
    assert torch.isfinite(second.tloss["qada_loss"]) and second.tloss["qada_loss"] > 0

    # From a YAML alone the teacher would be a random float start: refused unless asked for.
    with pytest.raises(ValueError, match="distill_weight: Q-ADA distils from the float model .* random_teacher=True"):
        Q2DetectionTrainer(overrides=dict(model="yolov5n.yaml", name="refused", **run)).train()
    scratch = Q2DetectionTrainer(overrides=dict(model="yolov5n.yaml", name="scratch", **run),
                                 q2=Q2Options(random_teacher=True))
    scratch.train()
    assert scratch.model.q2["teacher"] is None
    third = Q2DetectionTrainer(overrides=dict(model=str(tmp_path / "scratch" / "weights" / "last.pt"),
                                              name="third", **run))
    third.train()
    assert third.teacher is None and third.q2.distill_weight == 0


def test_example_smoke(tmp_path):
    """The Ultralytics demo's smoke mode end to end: float model, the four QAT runs, integer models,
    the table (JSON + markdown), the diagnostic figure, a prediction drawn; a re-run reuses the float
    model."""
    r = subprocess.run([sys.executable, "ultralytics_qat.py", "--smoke", "--out", str(tmp_path)], cwd=EXAMPLES,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    rows = {row["variant"]: row for row in summary["rows"]}
    assert list(rows) == ["plain", "qada", "fusion", "q2", "q2_layernorm"]
    for variant, row in rows.items():
        fusion, converted = variant in ("fusion", "q2", "q2_layernorm"), variant != "q2_layernorm"
        assert (row["layernorm_removed"] is not None) == (fusion and converted)
        assert (row["fake_quant_with_layernorm"] is not None) == fusion
        assert len(row["history"]) == 2
        if converted:
            assert row["verify_exact"], row["failures"]
            assert load_int_model(row["int_model"]) is not None and row["integer"] is not None
        else:
            assert row["int_model"] is None and row["integer"] is None and row["verify_ok"] is None
    assert summary["wall_seconds"] > 0 and "Wall time" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "diagnostics.png").stat().st_size > 0 and any((tmp_path / "predict").iterdir())
    # Every fusion node's branch gradients were recorded, with and without Q-GBFusion.
    assert set(summary["gradient_imbalance"]["lsq/plain"]) == set(summary["gradient_imbalance"]["lsq/q2"])
    assert len(summary["gradient_imbalance"]["lsq/q2"]) == 4
    float_pt = tmp_path / "float" / "weights" / "best.pt"
    mtime = float_pt.stat().st_mtime_ns
    r = subprocess.run([sys.executable, "ultralytics_qat.py", "--smoke", "--out", str(tmp_path), "--recipes", "pact",
                        "--variants", "q2"], cwd=EXAMPLES, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "float model: reusing" in r.stdout and float_pt.stat().st_mtime_ns == mtime
