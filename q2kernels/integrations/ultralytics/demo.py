"""The Ultralytics demo (`q2k demo --ultralytics`, python/ultralytics_qat.py): Q2 on a YOLO detector,
from its YAML to an integer model evaluated by Ultralytics' validator. No pretrained weights, no
dataset download; its entry points call q2kernels.integrations.ultralytics_offline() before
Ultralytics is imported.

1. A tiny synthetic detection dataset in Ultralytics' format (images, labels, data.yaml).
2. Q2 QAT inside Ultralytics' trainer (Q2DetectionTrainer): W/A quantization with detector
   defaults, Q-GBFusion (GatedFusion, balanced) at every neck Concat, Q-ADA from the float teacher;
   Ultralytics' data pipeline, loss, optimiser, EMA, validation and checkpoints.
3. The best checkpoint reloaded; the fusion nodes calibrated and their LayerNorms removed, with a
   short fine-tuning of the LayerNorm-free model (Adam, lr 2e-5, task loss only).
4. Ultralytics' validator on the LayerNorm-free fake-quant model.
5. convert_to_int on training images; verify_int_model on a validation batch (every layer's codes
   against the reference mode, bit for bit, and the codes that differ from the fake-quant model's);
   the integer model saved, and validated by Ultralytics' validator through IntDetector.
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.nn.tasks import load_checkpoint

from ...deploy import calibrate_fusion, convert_to_int, finetune_without_layernorm, save_int_model, verify_int_model
from ...nn import GatedFusion
from .data import write_synthetic_dataset
from .int_detector import IntDetector
from .trainer import Q2DetectionTrainer

SMOKE = dict(epochs=1, imgsz=64, images=4, finetune_steps=2)


def _batches(trainer, count: int) -> list[dict]:
    """`count` preprocessed training batches from the trainer's own data pipeline."""
    out = []
    while len(out) < count:
        for batch in trainer.train_loader:
            out.append(trainer.preprocess_batch(batch))
            if len(out) == count:
                break
    return out


def _detection_loss(model, batch):
    return model.loss(batch)[0].sum()


def _validate(model, data: Path, imgsz: int, device: str) -> tuple[float, float]:
    """(mAP50, mAP50-95) from Ultralytics' validator (on a copy: validation fuses float blocks)."""
    validator = DetectionValidator(args=dict(data=str(data), imgsz=imgsz, batch=2, device=device, plots=False,
                                             save_json=False, verbose=False))
    metrics = validator(model=copy.deepcopy(model).eval())
    return metrics["metrics/mAP50(B)"], metrics["metrics/mAP50-95(B)"]


def run(model: str = "yolo11n.yaml", recipe: str = "lsq", bits: int = 4, epochs: int = 3, imgsz: int = 128,
        images: int = 32, finetune_steps: int = 8, out: str | os.PathLike | None = None) -> dict:
    """The demo (module docstring); returns its measurements."""
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="q2k_yolo_"))
    device = "0" if torch.cuda.is_available() else "cpu"
    data = write_synthetic_dataset(out / "dataset", train=images, val=max(2, images // 4), imgsz=imgsz, classes=2)
    print(f"dataset: {data}")

    # 2. Q2 QAT inside Ultralytics' trainer.
    yolo = YOLO(model)
    trainer_cls = Q2DetectionTrainer.with_options(recipe=recipe, w_bits=bits, a_bits=bits, fusion="balanced",
                                                  distill_weight=0.01)
    yolo.train(trainer=trainer_cls, data=str(data), epochs=epochs, imgsz=imgsz, batch=2, workers=0,
               device=device, amp=False, plots=False, mosaic=0.0, project=str(out), name="qat", exist_ok=True,
               seed=0, verbose=False)
    trainer = yolo.trainer
    qada = float(trainer.tloss["qada_loss"])
    print(f"Q2 QAT ({recipe}, W{bits}A{bits}, Q-GBFusion + Q-ADA): last epoch losses "
          + ", ".join(f"{k} {float(v):.4g}" for k, v in trainer.tloss.items()))
    if not (qada > 0 and qada < float("inf")):
        raise RuntimeError(f"the Q-ADA term did not run (last epoch qada_loss {qada})")
    gates = [m.gates().tolist() for m in trainer.model.modules() if isinstance(m, GatedFusion)]
    print("fusion gates: " + "; ".join(", ".join(f"{a:.3f}" for a in g) for g in gates))

    # 3. The checkpoint, reloaded; LayerNorm removal with fine-tuning on the trainer's own batches.
    q2_model, _ = load_checkpoint(trainer.best)
    q2_model.args = trainer.args  # the hyperparameters its loss reads
    for name, p in q2_model.named_parameters():  # the checkpoint is frozen; DFL's fixed conv stays so
        p.requires_grad_(".dfl." not in name)
    stats = calibrate_fusion(q2_model, _batches(trainer, 2), forward=lambda m, b: m(b["img"]))
    print("calibrated: " + ", ".join(f"{n} sigma {s:.3f}" for n, (_, s) in stats.items()))
    losses = finetune_without_layernorm(q2_model, _batches(trainer, finetune_steps), None, steps=finetune_steps,
                                        lr=2e-5, forward=_detection_loss)
    print(f"LayerNorm removed, fine-tuned {len(losses)} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    # 4. The LayerNorm-free fake-quant model, validated.
    fake = _validate(q2_model, data, imgsz, device)
    print(f"LN-free W{bits}A{bits} fake-quant model: mAP50 {fake[0]:.4f}, mAP50-95 {fake[1]:.4f}")

    # 5. The integer model: converted, verified layer by layer, saved, validated.
    q2_model.eval()
    calibration = torch.cat([b["img"] for b in _batches(trainer, 2)])
    int_model = convert_to_int(q2_model, calibration)
    result = verify_int_model(q2_model, int_model, trainer.preprocess_batch(next(iter(trainer.test_loader)))["img"])
    print(result.summary())
    if not result.exact:
        raise RuntimeError(f"the integer model differs from the reference mode: {result.failures()}")
    save_int_model(int_model, out / "int_model.pt")
    integer = _validate(IntDetector(int_model, q2_model), data, imgsz, device)
    print(f"integer W{bits}A{bits} model ({out / 'int_model.pt'}): mAP50 {integer[0]:.4f}, "
          f"mAP50-95 {integer[1]:.4f}")
    return {"qada_loss": qada, "finetune_losses": losses, "fake_quant_map": fake, "integer_map": integer,
            "differing_fraction": result.differing_fraction}
