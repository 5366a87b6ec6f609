"""Q2 on an Ultralytics YOLO detector, from its YAML to an integer model, offline.

The steps (q2kernels/integrations/ultralytics/demo.py, also `q2k demo --ultralytics`):
1. a tiny synthetic detection dataset in Ultralytics' format;
2. Q2 QAT inside Ultralytics' own trainer (Q2DetectionTrainer): quantization with detector
   defaults, Q-GBFusion at every neck Concat, Q-ADA from the float teacher;
3. the best checkpoint reloaded, fusion calibrated, LayerNorm removed with a short fine-tuning;
4. Ultralytics' validator on the LayerNorm-free fake-quant model;
5. the integer model: converted, verified layer by layer against the reference mode, saved, and
   validated by Ultralytics' validator (IntDetector).

    python ultralytics_qat.py --smoke              # a few minutes on a CPU
    python ultralytics_qat.py --model yolo11s.yaml --epochs 3 --imgsz 128
"""
import argparse

from q2kernels.integrations import ultralytics_offline

ultralytics_offline()  # before Ultralytics is imported: it reads these settings then
from q2kernels.integrations.ultralytics import demo  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolo11n.yaml", help="an Ultralytics model YAML (built untrained)")
    ap.add_argument("--recipe", default="lsq", choices=["lsq", "lsq_plus", "pact", "n2uq"])
    ap.add_argument("--bits", type=int, default=4, help="weight and activation bits")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--images", type=int, default=32, help="training images to synthesise")
    ap.add_argument("--finetune-steps", type=int, default=8)
    ap.add_argument("--out", default=None, help="folder for the dataset, the runs and the integer model "
                                               "(default: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny run: 1 epoch, 64 px, 4 images")
    args = ap.parse_args()
    sizes = demo.SMOKE if args.smoke else dict(epochs=args.epochs, imgsz=args.imgsz, images=args.images,
                                                finetune_steps=args.finetune_steps)
    demo.run(model=args.model, recipe=args.recipe, bits=args.bits, out=args.out, **sizes)


if __name__ == "__main__":
    main()
