"""Q2 QAT of an Ultralytics YOLO model inside Ultralytics' own trainer, then LayerNorm removal.

Everything runs offline from YAML (no pretrained weights, no dataset download):
1. writes a tiny synthetic detection dataset in Ultralytics' format (images, labels, data.yaml);
2. trains YOLO from its YAML with Q2DetectionTrainer: W4A4 quantization with detector defaults,
   Q-GBFusion (GatedFusion, balanced) at every neck Concat, Q-ADA from the float teacher, with
   Ultralytics' data pipeline, loss, optimiser, EMA, validation and checkpoints;
3. reloads the best checkpoint, calibrates the fusion nodes and removes their LayerNorms with a
   short fine-tuning of the LN-free model (Adam, lr 2e-5, task loss only);
4. validates the LN-free fake-quant model with Ultralytics' validator.
The integer conversion of the LN-free model (q2kernels.deploy.convert_to_int) takes it from here.

    python ultralytics_qat.py --smoke              # about a minute on a CPU
    python ultralytics_qat.py --model yolo11s.yaml --epochs 3 --imgsz 128
"""
import argparse
import copy
import os
import tempfile
from pathlib import Path

# Offline: no hub, no settings sync, no font or asset download; config under the temp dir.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "q2k_yolo_config"))

import torch  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.models.yolo.detect import DetectionValidator  # noqa: E402
from ultralytics.nn.tasks import load_checkpoint  # noqa: E402

from q2kernels.deploy import calibrate_fusion, finetune_without_layernorm  # noqa: E402
from q2kernels.integrations.ultralytics import Q2DetectionTrainer, write_synthetic_dataset  # noqa: E402
from q2kernels.nn import GatedFusion  # noqa: E402

def batches(trainer, count):
    """`count` preprocessed training batches from the trainer's own data pipeline."""
    out = []
    while len(out) < count:
        for batch in trainer.train_loader:
            out.append(trainer.preprocess_batch(batch))
            if len(out) == count:
                break
    return out


def detection_loss(model, batch):
    return model.loss(batch)[0].sum()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolo11n.yaml", help="an Ultralytics model YAML (built untrained)")
    ap.add_argument("--recipe", default="lsq", choices=["lsq", "lsq_plus", "pact", "n2uq"])
    ap.add_argument("--bits", type=int, default=4, help="weight and activation bits")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--images", type=int, default=32, help="training images to synthesise")
    ap.add_argument("--finetune-steps", type=int, default=8)
    ap.add_argument("--out", default=None, help="folder for the dataset and the runs (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny run: 1 epoch, 64 px, 4 images")
    args = ap.parse_args()
    if args.smoke:
        args.epochs, args.imgsz, args.images, args.finetune_steps = 1, 64, 4, 2
    out = Path(args.out or tempfile.mkdtemp(prefix="q2k_yolo_"))
    device = "0" if torch.cuda.is_available() else "cpu"

    data = write_synthetic_dataset(out / "dataset", train=args.images, val=max(2, args.images // 4),
                                   imgsz=args.imgsz, classes=2)
    print(f"dataset: {data}")

    # 2. Q2 QAT inside Ultralytics' trainer.
    yolo = YOLO(args.model)
    trainer_cls = Q2DetectionTrainer.with_options(recipe=args.recipe, w_bits=args.bits, a_bits=args.bits,
                                                  fusion="balanced", distill_weight=0.01)
    yolo.train(trainer=trainer_cls, data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=2,
               workers=0, device=device, amp=False, plots=False, mosaic=0.0, project=str(out),
               name="qat", exist_ok=True, seed=0, verbose=False)
    trainer = yolo.trainer
    qada = float(trainer.tloss["qada_loss"])
    print(f"Q2 QAT ({args.recipe}, W{args.bits}A{args.bits}, Q-GBFusion + Q-ADA): last epoch losses "
          + ", ".join(f"{k} {float(v):.4g}" for k, v in trainer.tloss.items()))
    assert torch.isfinite(torch.tensor(qada)) and qada > 0, "the Q-ADA term did not run"
    gates = [m.gates().tolist() for m in trainer.model.modules() if isinstance(m, GatedFusion)]
    print("fusion gates: " + "; ".join(", ".join(f"{a:.3f}" for a in g) for g in gates))

    # 3. The checkpoint, reloaded; LayerNorm removal with fine-tuning on the trainer's own batches.
    model, _ = load_checkpoint(trainer.best)
    assert sum(isinstance(m, GatedFusion) for m in model.modules()) == len(gates)
    model.args = trainer.args  # the hyperparameters its loss reads
    for name, p in model.named_parameters():  # the checkpoint is frozen; DFL's fixed conv stays so
        p.requires_grad_(".dfl." not in name)
    stats = calibrate_fusion(model, batches(trainer, 2), forward=lambda m, b: m(b["img"]))
    print("calibrated: " + ", ".join(f"{n} sigma {s:.3f}" for n, (_, s) in stats.items()))
    losses = finetune_without_layernorm(model, batches(trainer, args.finetune_steps), None,
                                        steps=args.finetune_steps, lr=2e-5, forward=detection_loss)
    assert not any(isinstance(m, GatedFusion) for m in model.modules())
    assert all(torch.isfinite(torch.tensor(losses)))
    print(f"LayerNorm removed, fine-tuned {len(losses)} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    # 4. Ultralytics' validator on the LN-free fake-quant model (a copy: validation fuses its float blocks).
    validator = DetectionValidator(args=dict(data=str(data), imgsz=args.imgsz, batch=2, device=device,
                                             plots=False, save_json=False, verbose=False))
    metrics = validator(model=copy.deepcopy(model).eval())
    print(f"LN-free W{args.bits}A{args.bits} model: mAP50 {metrics['metrics/mAP50(B)']:.4f}, "
          f"mAP50-95 {metrics['metrics/mAP50-95(B)']:.4f}")
    torch.save(model.state_dict(), out / "ln_free_state_dict.pt")
    print(f"saved {out / 'ln_free_state_dict.pt'}")
    # 5. Integer conversion and evaluation start here, from `model` (the LN-free fake-quant
    # Q2DetectionModel) and the trainer's batches: q2kernels.deploy.convert_to_int(model, images).


if __name__ == "__main__":
    main()
