"""The Ultralytics demo (`q2k demo --ultralytics`, python/ultralytics_qat.py): does Q2 pay off on a
YOLO detector, deployed as an integer model? Offline, no download; its entry points call
q2kernels.integrations.ultralytics_offline() before Ultralytics is imported.

1. A generated detection task (data.py: six shapes that differ in shape only, on textured cluttered
   backgrounds, several scales, occlusion), written once into the output folder.
2. A float YOLO11n trained on it from its YAML, once: a re-run with the same output folder reuses
   `float/weights/best.pt`.
3. Per quantizer recipe, four W/A-bit QAT runs from that float checkpoint in Q2DetectionTrainer,
   each the same number of epochs:
   - plain:  the quantized model alone;
   - qada:   + Q-ADA distillation from the float checkpoint;
   - fusion: + GatedFusion with Q-GBFusion at the neck's fusion nodes, no distillation;
   - q2:     both (the Q2 recipe).
   The fusion runs' last `layernorm_free_epochs` epochs train without LayerNorm (Q2's removal and
   fine-tuning), the first `layernorm_blend_epochs` of them moving each node's statistics from the
   per-pixel ones to the calibrated ones (deploy.fusion_blend), the rest with the calibrated affine in
   place; so plain QAT trains exactly as many steps as Q2 plus its fine-tuning.
4. Each run's best checkpoint: Ultralytics' validator on the fake-quant model, then to_int
   (convert_to_int + verify_int_model) and the validator on the integer model; the integer model is
   saved. The table has, per run, mAP50 / mAP50-95 of the float model, the fake-quant model with
   LayerNorm (the last epoch before removal), right after the removal, the final fake-quant model,
   the integer model, the training time and verify's verdict ("LN removed": the EMA model when the
   fixed affine takes over, after the blend epochs, before any step with it).
5. The papers' diagnostic: per fusion node, the ratio of the branches' gradient norms during QAT
   without (plain) and with (q2) Q-GBFusion, next to each run's loss and mAP curves (diagnostics.png).
6. results.json and results.md (the table), the integer models, and the wall time.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from ultralytics import YOLO
from ultralytics.nn.tasks import load_checkpoint
from ultralytics.utils.torch_utils import unwrap_model

from ..._validate import check_bits
from ...cli import check_flag, check_folder, count_problem
from ...deploy import load_detector, verify_int_model
from ...nn import RECIPES
from .data import write_synthetic_dataset
from .deploy import load_q2_checkpoint, predict, to_int, validate
from .diagnostics import BranchGradients, imbalance
from .trainer import Q2DetectionTrainer, Q2Options

VARIANTS = {  # name: (gated fusion at the neck's fusion nodes, Q-ADA distillation, LayerNorm removed)
    "plain": (False, False, False),
    "qada": (False, True, False),
    "fusion": (True, False, True),
    "q2": (True, True, True),
    # Q2 with its LayerNorm to the end: the reference its removal is measured against at equal
    # training (a fake-quant model only: the integer model has no LayerNorm).
    "q2_layernorm": (True, True, False),
}


# Integer and fake-quant mAP50-95 agree within this, or the demo traces the difference (_trace).
MAP_AGREEMENT = 0.002


@dataclass(frozen=True)
class Config:
    model: str = "yolo11n.yaml"
    recipes: tuple[str, ...] = ("lsq",)
    variants: tuple[str, ...] = tuple(VARIANTS)
    bits: int = 4
    imgsz: int = 160
    train_images: int = 320
    val_images: int = 96
    float_epochs: int = 30
    qat_epochs: int = 6
    layernorm_free_epochs: int = 3
    layernorm_removal: str = "mean"
    layernorm_blend_epochs: int = 1
    distill_weight: float = 0.01
    batch: int = 16
    verify_images: int = 8


SMOKE = Config(imgsz=64, train_images=8, val_images=4, float_epochs=1, qat_epochs=2, layernorm_free_epochs=1,
               layernorm_blend_epochs=0, batch=4, verify_images=2)


def _train_args(cfg: Config, out: Path, name: str, epochs: int) -> dict:
    device = "0" if torch.cuda.is_available() else "cpu"
    return dict(data=str(out / "dataset" / "data.yaml"), epochs=epochs, imgsz=cfg.imgsz, batch=cfg.batch, workers=2,
                device=device, amp=False, plots=False, project=str(out), name=name, exist_ok=True, seed=0,
                deterministic=True, verbose=False)


def _float_model(cfg: Config, out: Path) -> Path:
    """The float checkpoint, trained now unless the output folder already holds it."""
    best = out / "float" / "weights" / "best.pt"
    if best.exists():
        print(f"float model: reusing {best}")
        return best
    YOLO(cfg.model).train(**_train_args(cfg, out, "float", cfg.float_epochs))
    return best


def _history(save_dir: Path) -> list[dict]:
    """The run's per-epoch rows of results.csv (losses and validation metrics), as floats."""
    path = save_dir / "results.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]


class _RunRecorder:
    """Callbacks on one QAT run: the branch gradient norms from the first training step (after the
    EMA copy, which must not carry hooks), and the mAP of the EMA model right after the LayerNorm
    removal, before any LayerNorm-free step (at the first batch of that epoch)."""

    def __init__(self, cfg: Config, data: Path):
        self.cfg, self.data = cfg, data
        self.gradients: BranchGradients | None = None
        self.norms: dict[str, torch.Tensor] = {}
        self.removed_map: tuple[float, float] | None = None

    def attach(self, yolo: YOLO):
        yolo.add_callback("on_train_start", self._start)
        yolo.add_callback("on_train_batch_start", self._batch_start)
        yolo.add_callback("on_train_end", self._end)

    def _start(self, trainer):
        self.gradients = BranchGradients(unwrap_model(trainer.model))

    def _batch_start(self, trainer):
        if self.removed_map is None and unwrap_model(trainer.model).q2.get("layernorm") == "removed":
            self.removed_map = validate(trainer.ema.ema, self.data, self.cfg.imgsz, self.cfg.batch)

    def _end(self, trainer):
        self.norms = self.gradients.norms()
        self.gradients.remove()


def _images(folder: Path, count: int, imgsz: int) -> torch.Tensor:
    """The first `count` images of a split, letterboxed to imgsz and scaled to [0, 1] as Ultralytics
    feeds them (the dataset's images are square at imgsz already)."""
    from PIL import Image
    import numpy as np

    paths = sorted(folder.iterdir())[:count]
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((imgsz, imgsz))) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _qat_run(cfg: Config, out: Path, float_pt: Path, recipe: str, variant: str, float_map):
    """One QAT run (module docstring, 3-4): its table row, branch gradient norms and integer detector."""
    fusion, distill, removed = VARIANTS[variant]
    name = f"{recipe}_w{cfg.bits}a{cfg.bits}_{variant}"
    trainer = Q2DetectionTrainer.with_options(
        recipe=recipe, w_bits=cfg.bits, a_bits=cfg.bits, fusion="balanced" if fusion else None,
        distill_weight=cfg.distill_weight if distill else 0.0,
        layernorm_free_epochs=cfg.layernorm_free_epochs if removed else 0, layernorm_removal=cfg.layernorm_removal,
        layernorm_blend_epochs=cfg.layernorm_blend_epochs if removed else 0)
    yolo = YOLO(str(float_pt))
    recorder = _RunRecorder(cfg, out / "dataset" / "data.yaml")
    recorder.attach(yolo)
    start = time.perf_counter()
    yolo.train(trainer=trainer, warmup_epochs=0, **_train_args(cfg, out, name, cfg.qat_epochs))
    train_seconds = time.perf_counter() - start
    save_dir = Path(yolo.trainer.save_dir)
    history = _history(save_dir)

    model = load_q2_checkpoint(save_dir / "weights" / "best.pt")
    data = out / "dataset" / "data.yaml"
    fake = validate(model, data, cfg.imgsz, cfg.batch)
    int_model = check = integer = int_path = trace = None
    if not (fusion and not removed):
        dataset = out / "dataset" / "images"
        int_model, check = to_int(model, _images(dataset / "train", 2, cfg.imgsz),
                                  _images(dataset / "val", cfg.verify_images, cfg.imgsz))
        integer = validate(int_model, data, cfg.imgsz, cfg.batch)
        if abs(integer[1] - fake[1]) > MAP_AGREEMENT:
            trace = _trace(model, int_model, dataset / "val", cfg)
            print(f"{name}: integer and fake-quant mAP50-95 differ by {integer[1] - fake[1]:+.4f}; over all "
                  f"{trace['images']} validation images {trace['differing_codes']} codes differ "
                  f"({trace['layers']}), all rounding flips: {trace['all_flips']}; largest output difference "
                  f"{trace['max_output_difference']:.3g}")
        int_path = out / "int_models" / f"{name}.q2k"
        int_path.parent.mkdir(parents=True, exist_ok=True)
        int_model.save(int_path, imgsz=cfg.imgsz)

    with_ln = None
    if fusion and not removed:
        with_ln = fake
    elif fusion and cfg.layernorm_free_epochs < cfg.qat_epochs:
        last_ln_epoch = history[cfg.qat_epochs - cfg.layernorm_free_epochs - 1]
        with_ln = (last_ln_epoch["metrics/mAP50(B)"], last_ln_epoch["metrics/mAP50-95(B)"])
    row = dict(recipe=recipe, variant=variant, bits=cfg.bits, float=float_map, fake_quant_with_layernorm=with_ln,
               layernorm_removed=recorder.removed_map, fake_quant=fake, integer=integer,
               train_seconds=round(train_seconds, 1), verify_ok=check and check.ok, verify_exact=check and check.exact,
               differing_fraction=check and check.differing_fraction, failures=check and check.failures(),
               int_model=int_path and str(int_path), trace=trace, history=history)
    print(f"{name}: fake-quant mAP50-95 {fake[1]:.4f}" + (
        f", integer {integer[1]:.4f}, verify ok={check.ok} (differing codes {check.differing_fraction:.2e})"
        if check else ", not converted (LayerNorm kept)") + f", {train_seconds:.0f} s")
    return row, recorder.norms, int_model


def _trace(model, int_model, val_images: Path, cfg: Config) -> dict:
    """Where integer and fake-quant mAP differ by more than MAP_AGREEMENT: verify on every validation
    image (in batches), to tie the difference to the codes that cause it."""
    count = len(list(val_images.iterdir()))
    images = _images(val_images, count, cfg.imgsz)
    differing, layers, flips, worst = 0, {}, True, 0.0
    for i in range(0, count, cfg.batch):
        x = images[i:i + cfg.batch]
        check = verify_int_model(model, int_model.int_model, x)
        flips &= check.ok
        for layer_name, layer in check.layers.items():
            if layer.differing:
                differing += layer.differing
                layers[layer_name] = layers.get(layer_name, 0) + layer.differing
        with torch.no_grad():
            worst = max(worst, float((int_model(x) - model(x)[0]).abs().max()))
    return dict(images=count, differing_codes=differing, layers=layers, all_flips=flips, max_output_difference=worst)


def _cell(pair) -> str:
    return "—" if pair is None else f"{pair[0]:.3f} / {pair[1]:.3f}"


def findings(rows: list[dict]) -> list[str]:
    """Per recipe, the numbers the demo exists for (mAP50-95): Q2's deployed (integer) model against
    plain QAT, its LayerNorm removal + fine-tuning against Q2 with LayerNorm kept at equal training,
    and the largest integer - fake-quant difference."""
    lines = []
    for recipe in sorted({r["recipe"] for r in rows}):
        by = {r["variant"]: r for r in rows if r["recipe"] == recipe}
        if "q2" in by and "plain" in by:
            lines.append(f"{recipe}: Q2 integer - plain QAT integer = "
                         f"{by['q2']['integer'][1] - by['plain']['integer'][1]:+.3f}")
        if "q2" in by and "q2_layernorm" in by:
            lines.append(f"{recipe}: LayerNorm removal + fine-tuning: Q2 integer - Q2 with LayerNorm (fake-quant) = "
                         f"{by['q2']['integer'][1] - by['q2_layernorm']['fake_quant'][1]:+.3f}")
        gaps = [r["integer"][1] - r["fake_quant"][1] for r in by.values() if r["integer"] is not None]
        lines.append(f"{recipe}: integer - fake-quant, largest |difference| over the runs = "
                     f"{max(gaps, key=abs):+.4f}")
        for r in by.values():
            if r["trace"]:
                t = r["trace"]
                lines.append(f"{recipe} {r['variant']}: integer - fake-quant = {r['integer'][1] - r['fake_quant'][1]:+.4f}, "
                             f"traced: {t['differing_codes']} differing codes over {t['images']} validation images, "
                             f"{'all rounding flips' if t['all_flips'] else 'NOT all rounding flips'}, largest "
                             f"output difference {t['max_output_difference']:.3g} (layers: {t['layers']})")
    return lines


def markdown(rows: list[dict], cfg: Config, wall: float) -> str:
    lines = [f"YOLO11n on the generated shapes task ({cfg.train_images} train / {cfg.val_images} val images, "
             f"{cfg.imgsz} px), W{cfg.bits}A{cfg.bits}, {cfg.qat_epochs} QAT epochs per run "
             f"(fusion runs with removal: the last {cfg.layernorm_free_epochs} without LayerNorm, the first "
             f"{cfg.layernorm_blend_epochs} of them blending its statistics into the fixed affine). "
             "mAP50 / mAP50-95.", "",
             "| recipe | run | float | fake-quant with LN | LN removed | fake-quant | integer | train s | verify |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = ("—" if r["verify_ok"] is None else "ok" if r["verify_ok"]
                   else "exact, flips beyond bound" if r["verify_exact"] else "FAILED")
        lines.append(f"| {r['recipe']} | {r['variant']} | {_cell(r['float'])} | {_cell(r['fake_quant_with_layernorm'])} "
                     f"| {_cell(r['layernorm_removed'])} | {_cell(r['fake_quant'])} | {_cell(r['integer'])} "
                     f"| {r['train_seconds']:.0f} | {verdict} |")
    lines += [""] + [f"- {f}" for f in findings(rows)] + ["", f"Wall time {wall / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict], norms: dict) -> Path | None:
    """diagnostics.png: per recipe, the loss and mAP50-95 curves of the four runs, and per fusion
    node the branch gradient-norm ratio (max/min, per step) without and with Q-GBFusion."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    recipes = sorted({r["recipe"] for r in rows})
    nodes = sorted({n for per_run in norms.values() for n in per_run}, key=lambda n: int(n.split(".")[1]))
    cols = max(2, len(nodes))
    fig, axes = plt.subplots(2 * len(recipes), cols, figsize=(3.4 * cols, 5.6 * len(recipes)), squeeze=False)
    for i, recipe in enumerate(recipes):
        runs = [r for r in rows if r["recipe"] == recipe]
        for r in runs:
            epochs = [h["epoch"] for h in r["history"]]
            loss = [h["train/box_loss"] + h["train/cls_loss"] + h["train/dfl_loss"] for h in r["history"]]
            axes[2 * i, 0].plot(epochs, loss, marker="o", label=r["variant"])
            axes[2 * i, 1].plot(epochs, [h["metrics/mAP50-95(B)"] for h in r["history"]], marker="o",
                                label=r["variant"])
        axes[2 * i, 0].set_title(f"{recipe}: detection loss (box+cls+dfl)", fontsize=9)
        axes[2 * i, 1].set_title(f"{recipe}: val mAP50-95 (fake-quant)", fontsize=9)
        for ax in axes[2 * i, :2]:
            ax.set_xlabel("epoch"), ax.legend(fontsize=7)
        for ax in axes[2 * i, 2:]:
            ax.axis("off")
        for j, node in enumerate(nodes):
            ax = axes[2 * i + 1, j]
            for variant, label in (("plain", "without Q-GBFusion (plain)"), ("q2", "with Q-GBFusion (q2)")):
                g = norms.get((recipe, variant), {}).get(node)
                if g is not None and g.numel():
                    ratio = imbalance(g).log()
                    window = max(1, len(ratio) // 40)  # a running mean (in log) over 1/40 of the run
                    smooth = torch.nn.functional.avg_pool1d(ratio[None, None], window, 1)[0, 0].exp()
                    ax.plot(ratio.exp().numpy(), lw=0.4, alpha=0.3)
                    ax.plot(range(window - 1, len(ratio)), smooth.numpy(), lw=1.2, label=label,
                            color=ax.lines[-1].get_color())
            ax.set_yscale("log"), ax.set_xlabel("QAT step (with LayerNorm)")
            ax.set_title(f"{recipe}: node {node}, max/min branch ||dL/dx||", fontsize=8)
            ax.legend(fontsize=6)
        for ax in axes[2 * i + 1, len(nodes):]:
            ax.axis("off")
    fig.tight_layout()
    out = path / "diagnostics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _mean_imbalance(norms: dict) -> dict:
    """{(recipe, variant): {node: geometric mean over steps of max/min branch gradient norm}}."""
    return {f"{recipe}/{variant}": {n: float(torch.exp(torch.log(imbalance(g)).mean())) for n, g in per.items()
                                    if g.numel()}
            for (recipe, variant), per in norms.items()}


def _check_names(values, name: str, known, at_least_one: str = "") -> None:
    if isinstance(values, str) or not isinstance(values, tuple) or not values or any(v not in known for v in values):
        raise ValueError(f"{name}: expected a tuple of some of {list(known)}{at_least_one}, got {values!r}")


def check_config(cfg: Config) -> Config:
    """Every setting of the demo, checked before anything runs: a bad one would otherwise surface after
    minutes of training, in whichever step first uses it."""
    if not isinstance(cfg.model, str) or not cfg.model.strip():
        raise ValueError(f"model: expected a model YAML or checkpoint name, got {cfg.model!r}")
    _check_names(cfg.recipes, "recipes", sorted(RECIPES))
    _check_names(cfg.variants, "variants", VARIANTS)
    if all(v == "q2_layernorm" for v in cfg.variants):
        raise ValueError(f"variants: at least one must be converted to integers (not only q2_layernorm), "
                         f"got {cfg.variants!r}")
    check_bits(cfg.bits, "bits", 2, 4)  # each run becomes an integer model, whose codes are 4-bit
    limits = {"imgsz": (32, 2048), "train_images": (1, 100_000), "val_images": (1, 100_000),
              "float_epochs": (1, 10_000), "qat_epochs": (1, 10_000), "batch": (1, 4096),
              "verify_images": (1, 4096), "layernorm_free_epochs": (0, cfg.qat_epochs),
              "layernorm_blend_epochs": (0, cfg.qat_epochs)}
    for name, (lo, hi) in limits.items():
        problem = count_problem(getattr(cfg, name), lo, hi)
        if problem:
            raise ValueError(f"{name}: {problem}")
    if cfg.imgsz % 32:
        raise ValueError(f"imgsz: expected a multiple of 32 (YOLO's largest stride), got {cfg.imgsz}")
    # The trainer's own checks of the LayerNorm phases and the distillation weight, as the fusion runs use them.
    Q2Options(layernorm_free_epochs=cfg.layernorm_free_epochs, layernorm_removal=cfg.layernorm_removal,
              layernorm_blend_epochs=cfg.layernorm_blend_epochs, distill_weight=cfg.distill_weight)
    return cfg


def _config(smoke: bool, overrides: dict) -> Config:
    check_flag(smoke, "smoke")
    unknown = sorted(set(overrides) - set(Config.__dataclass_fields__))
    if unknown:
        raise TypeError(f"{', '.join(unknown)}: not a setting of the demo (those are "
                        f"{', '.join(Config.__dataclass_fields__)})")
    return check_config(replace(SMOKE if smoke else Config(), **overrides))


def run(out: str = "q2k_yolo_out", smoke: bool = False, **overrides) -> dict:
    """The demo (module docstring); returns its measurements, also written to out/results.json."""
    start = time.perf_counter()
    cfg = _config(smoke, overrides)
    out = check_folder(out).resolve()
    data = out / "dataset" / "data.yaml"
    if not data.exists():
        write_synthetic_dataset(out / "dataset", train=cfg.train_images, val=cfg.val_images, imgsz=cfg.imgsz)
    float_pt = _float_model(cfg, out)
    float_map = validate(_load_float(float_pt), data, cfg.imgsz, cfg.batch)
    print(f"float {cfg.model}: mAP50 {float_map[0]:.4f}, mAP50-95 {float_map[1]:.4f}")

    rows, norms = [], {}
    for recipe in cfg.recipes:
        for variant in cfg.variants:
            row, run_norms, int_model = _qat_run(cfg, out, float_pt, recipe, variant, float_map)
            rows.append(row)
            norms[(recipe, variant)] = run_norms
            if int_model is not None:
                shipped = (int_model, row["int_model"])
    sample = sorted((out / "dataset" / "images" / "val").iterdir())[0]
    results = predict(shipped[0], str(sample), cfg.imgsz, save_dir=out / "predict")
    print(f"integer model ({shipped[1]}) on {sample.name}, Ultralytics' predictor: "
          f"{len(results[0].boxes)} boxes, drawn in {out / 'predict'}")
    # The shipped file alone: no Ultralytics model object, no training code.
    standalone = load_detector(shipped[1]).predict(str(sample))[0]
    standalone.save(out / "predict" / f"{sample.stem}_standalone.png")
    print(f"the same file through q2kernels.deploy.load_detector: {len(standalone.boxes)} boxes")

    wall = time.perf_counter() - start
    figure = plot(out, rows, norms)
    summary = dict(config=cfg.__dict__ | {"recipes": list(cfg.recipes), "variants": list(cfg.variants)}, rows=rows,
                   gradient_imbalance=_mean_imbalance(norms), wall_seconds=round(wall, 1),
                   diagnostics=str(figure) if figure else None)
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
    table = markdown(rows, cfg, wall)
    (out / "results.md").write_text(table)
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {figure}" if figure else ""))
    return summary


def _load_float(path: Path):
    return load_checkpoint(str(path))[0].float().eval()


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")
